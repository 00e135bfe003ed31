"""Queueing a job: the claim-check message, its confirmed publish, and ``created → queued``.

Used by the upload request (right after the job row is inserted) and by the outbox
relay (for jobs the request could not publish). The job row in state ``created`` *is*
the outbox entry; it moves to ``queued`` only after the broker confirmed the message,
through :func:`shared.jobstore.move`. Publishing twice is harmless: the worker's
run lock and ``outcome.json`` make a duplicate delivery a no-op.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine

from labq.producer.publisher import Publisher
from labq.shared import db, jobstore
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


def publish_job(engine: Engine, publisher: Publisher, job: Mapping[str, Any]) -> dict[str, Any]:
    """Publish a ``created`` job (the row as the caller has it) and move it to ``queued``;
    returns the row as it is afterwards, without reading it again when nothing raced.

    Raises :class:`shared.errors.BrokerUnavailableError` when the broker did not confirm.
    """
    if job["state"] != State.CREATED or job["hold_reason"]:
        return dict(job)  # moved on, or held back by fair share (producer/fairshare.py)
    publisher.publish(publisher.topology.jobs_exchange, JOB_ROUTING_KEY,
                      job_message(job).encode())
    return mark_queued(engine, job)


def publish_job_id(engine: Engine, publisher: Publisher, job_id: str) -> bool:
    """:func:`publish_job` for a job known by id (the outbox relay); True when queued."""
    with db.read(engine) as conn:
        row = jobstore.read(conn, job_id)
    if row is None:
        return False
    after = publish_job(engine, publisher, row)
    return row["state"] == State.CREATED and after["state"] == State.QUEUED


def mark_queued(engine: Engine, job: Mapping[str, Any]) -> dict[str, Any]:
    """``created → queued`` after a confirm; a job that moved on meanwhile is left alone."""
    row: dict[str, Any] | None = dict(job)
    for _ in range(20):
        if row is None or row["state"] != State.CREATED:
            # A worker already took it (its events got here first) or a user stopped it.
            return row or dict(job)
        with engine.begin() as conn:
            moved = jobstore.move(conn, row, State.QUEUED, seq=max(row["seq"], QUEUED_SEQ))
            if moved is not None:
                return moved
            row = jobstore.read(conn, job["id"])
    log.warning("job %s: gave up moving it to queued after repeated races", job["id"])
    return row or dict(job)
