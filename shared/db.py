"""The database: tables, engine, and the one compare-and-set that changes a job's state.

SQLAlchemy Core over SQLite (default, WAL mode) or PostgreSQL (``LABQ_DATABASE_URL``).
Two tables:

* ``jobs`` — one row per job, with a column per state timestamp and ``seq``, the
  sequence number of the last lifecycle event applied.
* ``events`` — every applied lifecycle change, with a global auto-increment id that
  the server-sent event stream uses as ``id:`` (so ``Last-Event-ID`` can resume).

Only :func:`compare_and_set` changes a job's ``state``: it updates the row only if the
state and ``seq`` are still what the caller read, and consults :mod:`shared.lifecycle`
first, so two concurrent writers can never lose an update or make an illegal move.
The backend owns the database; workers never touch it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    update,
)

from shared import lifecycle
from shared.settings import Settings

metadata = MetaData()

STATE_TIMESTAMPS = {state: f"{state}_at" for state in lifecycle.State}

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("state", String(16), nullable=False),
    Column("requested_state", String(16)),
    Column("outcome", String(16)),
    Column("exit_code", Integer),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("worker", String(200)),
    Column("bundle_sha256", String(64), nullable=False),
    Column("bundle_bytes", BigInteger, nullable=False, default=0),
    Column("spec", Text, nullable=False),  # JSON of shared.manifest.JobSpec
    Column("seq", Integer, nullable=False, default=0),
    Column("idempotency_key", String(200), unique=True),
    Column("updated_at", Float, nullable=False),
    *(Column(column, Float) for column in STATE_TIMESTAMPS.values()),
    Index("ix_jobs_created", "created_at", "id"),
    Index("ix_jobs_state", "state"),
    Index("ix_jobs_name", "name"),
)

events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), nullable=False, index=True),
    Column("seq", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("outcome", String(16)),
    Column("at", Float, nullable=False),
    Column("data", Text, nullable=False),  # the event as JSON, as streamed to clients
)


def make_engine(settings: Settings) -> Engine:
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=20,
            max_overflow=40,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets readers go on while the event applier writes; NORMAL sync is
            # durable across process crashes, which is the failure we care about.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
    else:
        engine = create_engine(url, pool_size=20, max_overflow=40, pool_pre_ping=True)
    metadata.create_all(engine)
    return engine


def compare_and_set(
    conn: Any,
    job_id: str,
    *,
    expected_state: str,
    expected_seq: int,
    target: str,
    values: Mapping[str, Any] | None = None,
    reach: bool = False,
) -> bool:
    """Move a job from ``expected_state`` to ``target`` if nobody changed it meanwhile.

    ``reach=False`` demands one allowed step; ``reach=True`` accepts any state reachable
    from the expected one (events that skipped a step). Staying in the same state is
    allowed (e.g. a newer event with more detail). Returns False when the row changed
    under us (the caller re-reads and decides again); raises ConflictError for an
    illegal move.
    """
    if target != expected_state:
        if reach:
            if not lifecycle.can_reach(expected_state, target):
                lifecycle.check_transition(expected_state, target)
        else:
            lifecycle.check_transition(expected_state, target)
    now = time.time()
    changes: dict[str, Any] = {"state": target, "updated_at": now, **(values or {})}
    if target != expected_state:
        changes.setdefault(STATE_TIMESTAMPS[lifecycle.State(target)], now)
    result = conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.state == expected_state, jobs.c.seq == expected_seq)
        .values(**changes)
    )
    return result.rowcount == 1
