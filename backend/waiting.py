"""Why a queued job waits and when it may start; how many workers there are.

RabbitMQ counts *consumers* on the jobs queue. A worker keeps its consumer on while it
runs a job (prefetch 1 holds its next delivery back), so the consumers are the connected
workers, busy or not; the idle ones are the consumers less the distinct workers holding a
job. (A worker that reconnected mid-job consumes again only once its job ends: it is
counted busy, and nothing is idle while consumers are fewer than busy workers.)

The estimate hands the jobs ahead of this one, oldest first, to whichever worker frees
up first, each taking the median run time of recent jobs; a running job is expected to
end when it reaches that median (or now, if it is already past it).

A job held by fair share (``created`` with a ``hold_reason``) is not in the queue: it has
no place and no estimate, its reason is its hold reason (the user's running-job limit),
and it is never counted ahead of anyone.
"""

from __future__ import annotations

import heapq
import statistics
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select

from labq.shared import db
from labq.shared.lifecycle import RUNNING, State

#: How many recent finished jobs the median run time comes from.
RECENT_RUNS = 50
#: The run time assumed when no job has finished yet.
DEFAULT_RUN_S = 60.0
WAITING = (State.CREATED, State.QUEUED)


@dataclass(frozen=True)
class Workers:
    idle: int | None  # None when the broker did not answer
    busy: int

    @classmethod
    def count(cls, consumers: int | None, busy: int) -> Workers:
        """From the jobs queue's consumers (None: broker away) and the busy workers."""
        return cls(None if consumers is None else max(0, consumers - busy), busy)

    @property
    def total(self) -> int | None:
        return None if self.idle is None else self.idle + self.busy


def busy_workers(engine: Engine) -> tuple[int, list[float]]:
    """(distinct workers holding a job, the running jobs' run seconds so far)."""
    now = time.time()
    with engine.connect() as conn:
        rows = conn.execute(select(db.jobs.c.worker, db.jobs.c.started_at, db.jobs.c.paused_s)
                            .where(db.jobs.c.state.in_([str(s) for s in RUNNING]))).all()
    names = {r.worker for r in rows if r.worker}
    ran = [max(0.0, now - r.started_at - (r.paused_s or 0.0)) if r.started_at else 0.0
           for r in rows]
    return len(names), ran


def typical_run_s(engine: Engine) -> float:
    with engine.connect() as conn:
        values = [r[0] for r in conn.execute(
            select(db.jobs.c.run_s).where(db.jobs.c.run_s.is_not(None))
            .order_by(db.jobs.c.stopped_at.desc()).limit(RECENT_RUNS))]
    return float(statistics.median(values)) if values else DEFAULT_RUN_S


def position(engine: Engine, job: dict[str, Any]) -> int:
    """1-based place among waiting jobs, oldest first (the queue is FIFO); held jobs
    are not in the queue and never ahead."""
    mine = job["queued_at"] or job["created_at"]
    order = func.coalesce(db.jobs.c.queued_at, db.jobs.c.created_at)
    with engine.connect() as conn:
        ahead = conn.execute(select(func.count()).select_from(db.jobs).where(
            db.jobs.c.state.in_([str(s) for s in WAITING]), db.jobs.c.hold_reason.is_(None),
            or_(order < mine, and_(order == mine, db.jobs.c.id < job["id"])))).scalar_one()
    return int(ahead) + 1


def estimate_start(place: int, idle: int, running_s: list[float], typical: float,
                   now: float) -> float | None:
    """When the job at ``place`` should start; None when no worker is connected."""
    free = [now] * idle + [now + max(0.0, typical - ran) for ran in running_s]
    if not free:
        return None
    heapq.heapify(free)
    for _ in range(place - 1):
        heapq.heappush(free, heapq.heappop(free) + typical)
    return free[0]


def reason(place: int, workers: Workers) -> str:
    ahead = place - 1
    jobs = f"{ahead} job{'s' if ahead != 1 else ''} ahead"
    if workers.total == 0:
        return f"{jobs}, no worker connected"
    if workers.idle is None:
        return f"{jobs}, {workers.busy} worker{'s' if workers.busy != 1 else ''} busy"
    if workers.idle and ahead < workers.idle:
        return f"{jobs}, a worker is free"
    return f"{jobs}, {workers.busy} worker{'s' if workers.busy != 1 else ''} busy"


def waiting_fields(engine: Engine, jobs: list[dict[str, Any]], consumers: int | None
                   ) -> dict[str, dict[str, Any]]:
    """``{job id: {queue_position, estimated_start_at, waiting_reason}}`` for ``jobs``;
    ``consumers`` is :func:`idle_workers`' count."""
    from labq.backend.registry import iso

    out: dict[str, dict[str, Any]] = {}
    waiting = [j for j in jobs if j["state"] in WAITING and not j.get("hold_reason")]
    for job in jobs:
        held = job["state"] == State.CREATED and job.get("hold_reason") or None
        out[job["id"]] = {"queue_position": None, "estimated_start_at": None,
                          "waiting_reason": held}
    if not waiting:
        return out
    busy, running_s = busy_workers(engine)
    workers = Workers.count(consumers, busy)
    typical = typical_run_s(engine)
    now = time.time()
    for job in waiting:
        place = position(engine, job)
        start = estimate_start(place, workers.idle or 0, running_s, typical, now)
        out[job["id"]] = {"queue_position": place, "estimated_start_at": iso(start),
                          "waiting_reason": reason(place, workers)}
    return out


def idle_workers(publisher: Any) -> int | None:
    """Consumers on the jobs queue (every connected worker: see :meth:`Workers.count`),
    or None when the broker is away."""
    from labq.shared.errors import BrokerUnavailableError

    try:
        return publisher.queue_info(publisher.topology.jobs_queue)[1]
    except BrokerUnavailableError:
        return None

