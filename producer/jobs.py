"""Queueing a job: the claim-check message, its confirmed publish, and ``created → queued``.

Used by the upload request (right after the job row is inserted) and by the outbox
relay (for jobs the request could not publish). The job row in state ``created`` *is*
the outbox entry; it moves to ``queued`` only after the broker confirmed the message,
through :func:`shared.db.compare_and_set`. Publishing twice is harmless: the worker's
run lock and ``outcome.json`` make a duplicate delivery a no-op.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine, insert, select

from labq.producer.publisher import Publisher
from labq.shared import db
from labq.shared.lifecycle import State
from labq.shared.manifest import JobSpec
from labq.shared.messages import JobMessage
from labq.shared.topology import JOB_ROUTING_KEY

log = logging.getLogger(__name__)

#: seq of the backend's own ``queued`` event; a worker's events start at 1001.
QUEUED_SEQ = 1


def job_message(row: Mapping[str, Any]) -> JobMessage:
    return JobMessage(
        job_id=row["id"],
        name=row["name"],
        bundle_sha256=row["bundle_sha256"],
        spec=JobSpec.from_dict(json.loads(row["spec"])),
        submitted_at=float(row["created_at"] or 0.0),
        # A rerun installs the exact packages the job it re-runs had.
        lock_of=row.get("rerun_of") or "",
    )


def insert_event(conn: Any, *, job_id: str, seq: int, state: str, outcome: str | None = None,
                 exit_code: int | None = None, error: str | None = None, attempt: int = 0,
                 worker: str | None = None, at: float | None = None) -> None:
    """Add one row to ``events`` (what ``GET /api/v1/events`` streams)."""
    at = time.time() if at is None else at
    data = {"kind": "lifecycle", "job_id": job_id, "seq": seq, "state": state,
            "outcome": outcome, "exit_code": exit_code, "error": error, "attempt": attempt,
            "worker": worker, "at": at}
    conn.execute(insert(db.events).values(job_id=job_id, seq=seq, state=state,
                                          outcome=outcome, at=at, data=json.dumps(data)))


def publish_job(engine: Engine, publisher: Publisher, job_id: str) -> bool:
    """Publish a ``created`` job and move it to ``queued``; True when it is queued now.

    Raises :class:`shared.errors.BrokerUnavailableError` when the broker did not confirm.
    """
    with engine.connect() as conn:
        row = conn.execute(select(db.jobs).where(db.jobs.c.id == job_id)).mappings().first()
    if row is None or row["state"] != State.CREATED or row["hold_reason"]:
        return False  # gone, moved on, or held back by fair share (producer/fairshare.py)
    publisher.publish(publisher.topology.jobs_exchange, JOB_ROUTING_KEY,
                      job_message(row).encode())
    return mark_queued(engine, job_id)


def mark_queued(engine: Engine, job_id: str) -> bool:
    """``created → queued`` after a confirm; a job that moved on meanwhile is left alone."""
    for _ in range(20):
        with engine.begin() as conn:
            row = conn.execute(
                select(db.jobs.c.state, db.jobs.c.seq).where(db.jobs.c.id == job_id)
            ).first()
            if row is None or row.state != State.CREATED:
                # A worker already took it (its events got here first) or a user stopped it.
                return False
            seq = max(row.seq, QUEUED_SEQ)
            if db.compare_and_set(conn, job_id, expected_state=row.state, expected_seq=row.seq,
                                  target=State.QUEUED, values={"seq": seq}):
                insert_event(conn, job_id=job_id, seq=seq, state=State.QUEUED)
                return True
    log.warning("job %s: gave up moving it to queued after repeated races", job_id)
    return False
