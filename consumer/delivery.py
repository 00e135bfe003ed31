"""One delivery of a job message, and the rules that decide what it means.

The rules need only the data dir, never the broker, so they are unit-tested on their own
(tests/unit/test_worker_rules.py). With the job's run lock held:

1. the job already has an outcome → a **duplicate** (a redelivery after a lost ack):
   publish its final event again and ack, never run it twice;
2. it has a stop marker → **cancelled** before it ran: record that, ack;
3. workers were lost running it ``max_attempts`` times → **give up**: record failed,
   reject (dead-letter) — a job that kills its worker must not kill every worker;
4. otherwise **run** it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO

from labq.process_unit.control import Control
from labq.shared.lifecycle import Outcome, RunResult, State
from labq.shared.messages import JobMessage
from labq.shared.outcome import OutcomeRecord
from labq.shared.settings import Settings
from labq.shared.storage import Storage


class Settle(StrEnum):
    ACK = "ack"  #: done with it
    NACK = "nack"  #: put it back on the queue (requeue)
    REJECT = "reject"  #: dead-letter it, never retried


class PlanKind(StrEnum):
    DUPLICATE = "duplicate"
    CANCELLED = "cancelled"
    GIVE_UP = "give_up"
    RUN = "run"


@dataclass(frozen=True)
class Plan:
    kind: PlanKind
    #: DUPLICATE: the outcome it already has; CANCELLED / GIVE_UP: the one to record.
    record: OutcomeRecord | None = None
    settle: Settle = Settle.ACK


@dataclass
class Delivery:
    """One job delivery and, once it runs, everything about its run."""

    tag: int
    generation: int  # which channel it came on; a different one means a stale tag
    job: JobMessage
    lock: IO[bytes] | None = None
    next_try: float = 0.0
    attempt: int = 0
    n: int = 0  # lifecycle events emitted in this attempt
    control: Control = field(default_factory=Control)
    thread: threading.Thread | None = None
    result: RunResult | None = None
    done: threading.Event = field(default_factory=threading.Event)
    control_key: str = ""


def plan_delivery(storage: Storage, settings: Settings, job_id: str, worker: str) -> Plan:
    """What to do with a delivery of ``job_id`` (the caller holds its run lock)."""
    record = storage.read_outcome(job_id)
    if record is not None:
        return Plan(PlanKind.DUPLICATE, record)
    if storage.is_cancelled(job_id):
        return Plan(PlanKind.CANCELLED, OutcomeRecord(
            state=State.STOPPED, outcome=Outcome.CANCELLED,
            attempt=storage.attempts(job_id), worker=worker))
    lost = storage.lost_attempts(job_id)
    if lost >= settings.max_attempts:
        error = f"the worker running this job was lost {lost} times; giving up"
        return Plan(PlanKind.GIVE_UP, OutcomeRecord(
            state=State.FAILED, outcome=Outcome.FAILED, error=error,
            attempt=storage.attempts(job_id), worker=worker), Settle.REJECT)
    return Plan(PlanKind.RUN)


def settle_after(result: RunResult | None) -> Settle:
    """A run put back (a stopping worker) is requeued; anything else has its outcome."""
    return Settle.NACK if result == RunResult.QUEUED else Settle.ACK


def crash_record(attempt: int, worker: str, exc: BaseException) -> OutcomeRecord:
    """The outcome of a run that labq itself broke: the job still gets an end."""
    return OutcomeRecord(state=State.FAILED, outcome=Outcome.FAILED,
                         error=f"internal error in the labq worker: {exc!r}",
                         attempt=attempt, worker=worker)
