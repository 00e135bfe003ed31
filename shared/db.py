"""The database: tables and engine (the writes to ``jobs`` and ``events`` are in
:mod:`shared.jobstore`).

SQLAlchemy Core over SQLite (default, WAL mode) or PostgreSQL (``LABQ_DATABASE_URL``).
Tables:

* ``jobs`` — one row per job, with a column per state timestamp and ``seq``, the
  sequence number of the last lifecycle event applied, its ``owner`` (a user name) and,
  while fair share holds it back, ``hold_reason``.
* ``events`` — every applied lifecycle change, with a global auto-increment id that
  the server-sent event stream uses as ``id:`` (so ``Last-Event-ID`` can resume).
* ``users``, ``api_tokens`` — accounts (argon2 password hash) and their API tokens
  (only the sha256 of a token is stored); ``login_failures`` — recent wrong passwords,
  for rate limiting across backend processes.

The backend owns the database; workers never touch it.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    exc,
    select,
)
from sqlalchemy.engine import Connection

from labq.shared import lifecycle
from labq.shared.settings import Settings

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
    Column("idempotency_key", String(200)),
    Column("updated_at", Float, nullable=False),
    *(Column(column, Float) for column in STATE_TIMESTAMPS.values()),
    # The user name of whoever submitted it (NULL only for jobs older than accounts).
    Column("owner", String(64)),
    # Why fair share keeps this ``created`` job off the queue for now (NULL: it is not held).
    Column("hold_reason", String(200)),
    # Migration 0006: what a researcher wants to know about a run, sweeps, reruns, webhooks.
    Column("paused_s", Float),
    Column("env_s", Float),
    Column("run_s", Float),
    Column("peak_rss_mb", Float),
    Column("cpu_s", Float),
    Column("group_id", String(32)),
    Column("rerun_of", String(32)),
    Column("notify_url", Text),
    # Migration 0007: the host the job's worker runs on (workers on several machines).
    Column("worker_host", String(255)),
    Index("ix_jobs_created", "created_at", "id"),
    Index("ix_jobs_group", "group_id"),
    Index("ix_jobs_name", "name"),
    Index("ix_jobs_owner_created", "owner", "created_at", "id"),
    # Migration 0008: each list filter reads its page in sort order (backend/search.py).
    Index("ix_jobs_state_created", "state", "created_at", "id"),
    Index("ix_jobs_owner_state_created", "owner", "state", "created_at", "id"),
    Index("ix_jobs_outcome_created", "outcome", "created_at", "id"),
    Index("ix_jobs_outcome_run", "outcome", "run_s", "id"),
    Index("ix_jobs_run", "run_s", "id"),
    Index("ix_jobs_stopped", "stopped_at"),
    # Idempotency keys are per user: one user's key never returns another user's job.
    UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_key"),
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

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False),
    Column("password_hash", String(255)),  # argon2id; NULL: no password (tokens only)
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    # Bumped under a row lock whenever fair share decides for this user's jobs, so two
    # backends deciding at once are serialised (see backend/fairshare.py).
    Column("dispatch_seq", Integer, nullable=False, default=0),
    UniqueConstraint("name", name="uq_users_name"),
)

api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", Integer, nullable=False),
    Column("name", String(100), nullable=False),
    Column("token_hash", String(64), nullable=False),  # sha256 hex of the token
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
    Column("revoked_at", Float),
    Index("ix_api_tokens_hash", "token_hash", unique=True),
    Index("ix_api_tokens_user", "user_id"),
)

login_failures = Table(
    "login_failures",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(300), nullable=False),  # "<user name>|<client address>"
    Column("at", Float, nullable=False),
    Index("ix_login_failures_key_at", "key", "at"),
)


def make_engine(settings: Settings, pool_size: int = 20, max_overflow: int = 40) -> Engine:
    """The engine, migrated to the newest schema. ``pool_size`` + ``max_overflow`` is
    the most connections it opens (a backend of several processes shares PostgreSQL's
    ``max_connections`` between them)."""
    url = settings.resolved_database_url
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=max_overflow,
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
        engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow)
        _ping_when_idle(engine)
    # The schema is Alembic's (shared/migrations); create_all would skip the history.
    from labq.shared import migrations

    migrations.upgrade(engine)
    return engine


def dicts(result: Any) -> list[dict[str, Any]]:
    """Every row of a result as a plain dict (a fifth faster than ``.mappings()``: a
    page of 25 jobs of 40 columns is read on every list request)."""
    keys = list(result.keys())
    return [dict(zip(keys, row, strict=True)) for row in result]


#: Read by id on nearly every job request: built once.
JOB_BY_ID = select(jobs).where(jobs.c.id == bindparam("job_id"))


#: A pooled PostgreSQL connection unused for longer than this is tested before it is
#: handed out again (see :func:`_ping_when_idle`).
PING_AFTER_IDLE_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Test a connection at checkout only when it sat idle in the pool, not every time.

    SQLAlchemy's ``pool_pre_ping`` costs a round trip on *every* checkout; under load a
    connection goes back and out again within milliseconds, and a busy list request made
    three of them. A connection idle past :data:`PING_AFTER_IDLE_S` may have been closed
    by a database restart or a proxy: it is tested, and a dead one replaced (the pool
    retries the checkout). One in steady use fails, if the database went away, on its
    next statement: SQLAlchemy then invalidates the whole pool, the request is a 503
    (backend/errors.py), and the next one gets a fresh connection.
    """

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _test_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as error:  # any failure: throw this connection away
            raise exc.DisconnectionError(f"pooled connection is dead: {error}") from error


def warm(engine: Engine, connections: int) -> None:
    """Open ``connections`` pooled connections now, so the first burst of requests does
    not wait for the database to start a backend for each (on PostgreSQL a process
    per connection, milliseconds each, all at once)."""
    opened = []
    try:
        for _ in range(connections):
            opened.append(engine.connect())
    finally:
        for conn in opened:
            conn.close()


#: Per engine: its read-only twin (same pool, autocommit).
_readers: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()


class _SharedReads:
    """The read connection of one :func:`sharing_reads` block, opened on first use."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.conn: Connection | None = None

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


#: The current context's shared reads (a request's, in the backend), or None.
_shared: ContextVar[_SharedReads | None] = ContextVar("labq_shared_reads", default=None)


def _reader(engine: Engine) -> Engine:
    reader = _readers.get(engine)
    if reader is None:
        reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        _readers[engine] = reader
    return reader


def read(engine: Engine) -> contextlib.AbstractContextManager[Connection]:
    """A connection for reading only (use it in ``with``): one round trip a statement.

    Reads run in autocommit, so PostgreSQL gets no ``BEGIN`` before them and no
    ``ROLLBACK`` after (two round trips a connection saved); each statement sees the
    latest committed data, as under READ COMMITTED. Inside :func:`sharing_reads` every
    read of the same engine uses one connection. Writes use ``engine.begin()``.
    """
    shared = _shared.get()
    if shared is not None and shared.engine is engine:
        if shared.conn is None:
            shared.conn = _reader(engine).connect()
        return contextlib.nullcontext(shared.conn)
    return _reader(engine).connect()


def share_reads(engine: Engine) -> Any:
    """Let the reads that follow (in this context: a request) share one connection,
    until :func:`end_shared_reads` with the returned token. A request reads several
    times (its caller's token, the page, the queue); each checkout costs a pool round,
    and on PostgreSQL a round trip to test the connection when it sat idle."""
    return _shared.set(_SharedReads(engine))


def end_shared_reads(token: Any) -> None:
    """Give the shared connection back; reads after this get their own again."""
    shared = _shared.get()
    _shared.reset(token)
    if shared is not None:
        shared.close()


@contextlib.contextmanager
def sharing_reads(engine: Engine) -> Iterator[None]:
    """:func:`share_reads` for the length of a ``with`` block."""
    token = share_reads(engine)
    try:
        yield
    finally:
        end_shared_reads(token)
