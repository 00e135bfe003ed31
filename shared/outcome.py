"""The outcome record: how a job ended, written once beside its log (``outcome.json``).

One type for every place that ends a job: the runner when the script ran, the worker when
it did not (stopped before it ran, given up after lost workers, a crash in labq). The
worker acks a delivery only after this record exists; a redelivery that finds it acks
again without running the job, and re-publishes the final event built from it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Self

from labq.shared.lifecycle import Outcome, State
from labq.shared.messages import SEQ_PER_ATTEMPT, LifecycleEvent, event_seq


@dataclass(frozen=True)
class OutcomeRecord:
    state: State
    outcome: Outcome
    exit_code: int | None = None
    error: str | None = None
    attempt: int = 0
    worker: str | None = None
    at: float = field(default_factory=time.time)
    peak_rss_mb: float | None = None
    cpu_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"], data["outcome"] = str(self.state), str(self.outcome)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Self | None:
        """The record in ``data``, or None when it is not one (junk counts as absent)."""
        if not isinstance(data, dict):
            return None
        known = {f.name for f in fields(cls)}
        try:
            values = {k: v for k, v in data.items() if k in known}
            values["state"] = State(values["state"])
            values["outcome"] = Outcome(values["outcome"])
            values["attempt"] = int(values.get("attempt") or 0)
            values["at"] = float(values.get("at") or time.time())
            return cls(**values)
        except (KeyError, ValueError, TypeError):
            return None

    def final_event(self, job_id: str, worker: str) -> LifecycleEvent:
        """The event that announces this end; its seq is above every event of the
        attempt, so a backend that missed the attempt's own final event applies it."""
        return LifecycleEvent(
            job_id=job_id, seq=event_seq(self.attempt, SEQ_PER_ATTEMPT - 1),
            state=str(self.state), attempt=self.attempt, outcome=str(self.outcome),
            exit_code=self.exit_code, error=self.error, worker=self.worker or worker,
            at=self.at, peak_rss_mb=self.peak_rss_mb, cpu_s=self.cpu_s)
