"""The one owner of the ``jobs`` and ``events`` tables: every write to them is here.

Rules it keeps, so no caller has to:

* A job's ``state`` changes only through :func:`move`, a compare-and-set on the state
  and ``seq`` the caller read, checked against :mod:`shared.lifecycle` first: two
  concurrent writers can never lose an update or make an illegal move.
* Every state change writes its ``events`` row in the same transaction (the row the
  server-sent event stream replays), so the stream never misses or invents a change.
* Writers get the row back as it now is, so a caller never has to read it again.

The backend (registry, applier) and the producer (publishing, fair share) call these;
workers never touch the database.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import insert, select, update

from labq.shared import db, lifecycle
from labq.shared.lifecycle import State

Row = dict[str, Any]


def insert_job(conn: Any, values: Mapping[str, Any]) -> Row:
    """Insert a job in ``created`` with its first event; returns the row as stored."""
    now = values.get("created_at") or time.time()
    row: Row = {column.name: None for column in db.jobs.columns}
    row.update({"state": State.CREATED, "attempts": 0, "seq": 0, "created_at": now,
                "updated_at": now, **values})
    row["state"] = str(row["state"])
    # Values as parameters, not in the statement: one cached statement for every job.
    conn.execute(insert(db.jobs), row)
    insert_event(conn, job_id=row["id"], seq=0, state=State.CREATED, at=now)
    return row


def insert_event(conn: Any, *, job_id: str, seq: int, state: str, outcome: str | None = None,
                 exit_code: int | None = None, error: str | None = None, attempt: int = 0,
                 worker: str | None = None, worker_host: str | None = None,
                 at: float | None = None) -> None:
    """Add one row to ``events`` (what ``GET /api/v1/events`` streams)."""
    at = time.time() if at is None else at
    data = {"kind": "lifecycle", "job_id": job_id, "seq": seq, "state": str(state),
            "outcome": outcome, "exit_code": exit_code, "error": error, "attempt": attempt,
            "worker": worker, "worker_host": worker_host, "at": at}
    conn.execute(insert(db.events), {"job_id": job_id, "seq": seq, "state": str(state),
                                     "outcome": outcome, "at": at, "data": json.dumps(data)})


def move(conn: Any, job: Mapping[str, Any], target: State, *, seq: int,
         values: Mapping[str, Any] | None = None, reach: bool = False,
         event: Mapping[str, Any] | None = None) -> Row | None:
    """Move ``job`` (as the caller read it) to ``target`` with sequence number ``seq``,
    and record the event; returns the row after the move, or None when the row changed
    under the caller (re-read and decide again). Raises ConflictError for an illegal move.

    ``reach=False`` demands one allowed step; ``reach=True`` accepts any state reachable
    from the current one (a worker's events that skipped a step). Staying in the same
    state is allowed (a newer event with more detail).
    """
    current = str(job["state"])
    if target != current:
        if reach and lifecycle.can_reach(current, target):
            pass
        else:
            lifecycle.check_transition(current, target)
    now = time.time()
    changes: Row = {"state": str(target), "seq": seq, "updated_at": now, **(values or {})}
    if target != current:
        changes.setdefault(db.STATE_TIMESTAMPS[State(target)], now)
    result = conn.execute(
        update(db.jobs)
        .where(db.jobs.c.id == job["id"], db.jobs.c.state == current,
               db.jobs.c.seq == job["seq"])
        .values(**changes))
    if result.rowcount != 1:
        return None
    insert_event(conn, job_id=job["id"], seq=seq, state=target, **(event or {}))
    return {**job, **changes}


def set_requested(conn: Any, job: Mapping[str, Any], requested: str | None) -> bool:
    """Record (or clear) a pending user request if the job is still as read."""
    result = conn.execute(
        update(db.jobs)
        .where(db.jobs.c.id == job["id"], db.jobs.c.state == job["state"],
               db.jobs.c.seq == job["seq"])
        .values(requested_state=requested, updated_at=time.time()))
    return result.rowcount == 1


def release_held(conn: Any, job_ids: list[str]) -> None:
    """Fair share: these held jobs may now be published (still ``created``)."""
    conn.execute(update(db.jobs)
                 .where(db.jobs.c.id.in_(job_ids), db.jobs.c.state == State.CREATED)
                 .values(hold_reason=None))


def read(conn: Any, job_id: str) -> Row | None:
    row = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).mappings().first()
    return dict(row) if row else None
