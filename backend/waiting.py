"""Why a queued job waits and when it may start; how many workers there are.

RabbitMQ counts *consumers* on the jobs queue. A worker keeps its consumer on while it
runs a job (prefetch 1 holds its next delivery back), so the consumers are the connected
workers, busy or not; the idle ones are the consumers less the distinct workers holding a
job. (A worker that reconnected mid-job consumes again only once its job ends: it is
counted busy, and nothing is idle while consumers are fewer than busy workers.)

The estimate hands the jobs ahead of this one, oldest first, to whichever worker frees
up first, each taking the median run time of recent jobs; a running job is expected to
end when it reaches that median (or now, if it is already past it). A page of jobs costs
one query for all their places, the busy workers and recent run times are read again
only after some job changed (:func:`snapshot`), and the broker is asked at most once a
second.

A job held by fair share (``created`` with a ``hold_reason``) is not in the queue: it has
no place and no estimate, its reason is its hold reason (the user's running-job limit),
and it is never counted ahead of anyone.
"""

from __future__ import annotations

import statistics
import threading
import time
import weakref
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
    snap = snapshot(engine)
    return snap.busy, snap.running_s(time.time())


@dataclass(frozen=True)
class Snapshot:
    """What every waiting job's estimate needs, read once per change of any job."""

    busy: int
    running: tuple[tuple[float | None, float], ...]  # (started_at, paused_s) per job
    typical: float
    mark: int = 0  # the newest event id when it was read

    def running_s(self, now: float) -> list[float]:
        return [max(0.0, now - started - paused) if started else 0.0
                for started, paused in self.running]


#: Per engine: (newest event id when read, snapshot). Every change of a job's state or
#: run time writes an event row in the same transaction, so an unchanged newest id
#: means an unchanged snapshot.
_snapshots: weakref.WeakKeyDictionary[Engine, tuple[int, Snapshot]] = \
    weakref.WeakKeyDictionary()


#: Asked by every page that shows a waiting job: built once.
_NEWEST_EVENT = select(func.max(db.events.c.id))


def snapshot(engine: Engine) -> Snapshot:
    """Busy workers, running jobs and the typical run time; the database is read again
    only when some job changed since the last time."""
    with db.read(engine) as conn:
        mark = int(conn.execute(_NEWEST_EVENT).scalar() or 0)
        cached = _snapshots.get(engine)
        if cached is not None and cached[0] == mark:
            return cached[1]
        rows = conn.execute(select(db.jobs.c.worker, db.jobs.c.started_at, db.jobs.c.paused_s)
                            .where(db.jobs.c.state.in_([str(s) for s in RUNNING]))).all()
        runs = [r[0] for r in conn.execute(
            select(db.jobs.c.run_s).where(db.jobs.c.run_s.is_not(None))
            .order_by(db.jobs.c.stopped_at.desc()).limit(RECENT_RUNS))]
    snap = Snapshot(busy=len({r.worker for r in rows if r.worker}),
                    running=tuple((r.started_at, r.paused_s or 0.0) for r in rows),
                    typical=float(statistics.median(runs)) if runs else DEFAULT_RUN_S,
                    mark=mark)
    _snapshots[engine] = (mark, snap)
    return snap


def typical_run_s(engine: Engine) -> float:
    """The median run time of the last :data:`RECENT_RUNS` jobs that ran."""
    return snapshot(engine).typical


def position(engine: Engine, job: dict[str, Any]) -> int:
    """1-based place among waiting jobs, oldest first (the queue is FIFO); held jobs
    are not in the queue and never ahead."""
    mine = job["queued_at"] or job["created_at"]
    order = func.coalesce(db.jobs.c.queued_at, db.jobs.c.created_at)
    with db.read(engine) as conn:
        ahead = conn.execute(select(func.count()).select_from(db.jobs).where(
            db.jobs.c.state.in_([str(s) for s in WAITING]), db.jobs.c.hold_reason.is_(None),
            or_(order < mine, and_(order == mine, db.jobs.c.id < job["id"])))).scalar_one()
    return int(ahead) + 1


#: Per engine: (newest event id, {job id: place}) of the places looked up since then
#: (the first pages are asked for again and again, by every open tab).
_places: weakref.WeakKeyDictionary[Engine, tuple[int, dict[str, int]]] = \
    weakref.WeakKeyDictionary()
MAX_PLACES = 10_000


def positions(engine: Engine, jobs: list[dict[str, Any]], mark: int | None = None
              ) -> dict[str, int]:
    """:func:`position` of each of ``jobs`` (waiting, not held) in one query; with
    ``mark`` (the newest event id) places known since that event are reused."""
    known: dict[str, int] = {}
    if mark is not None:
        cached = _places.get(engine)
        if cached is None or cached[0] != mark or len(cached[1]) > MAX_PLACES:
            cached = (mark, {})
            _places[engine] = cached
        known = cached[1]
    missing = [job for job in jobs if job["id"] not in known]
    if missing:
        known.update(_look_up_places(engine, missing))
    return {job["id"]: known[job["id"]] for job in jobs}


def _look_up_places(engine: Engine, jobs: list[dict[str, Any]]) -> dict[str, int]:
    j = db.jobs.c
    place = func.row_number().over(
        order_by=(func.coalesce(j.queued_at, j.created_at), j.id)).label("place")
    queue = (select(j.id, place)
             .where(j.state.in_([str(s) for s in WAITING]), j.hold_reason.is_(None))
             .subquery())
    with db.read(engine) as conn:
        found = dict(conn.execute(select(queue.c.id, queue.c.place)
                                  .where(queue.c.id.in_([job["id"] for job in jobs]))).all())
    # A job that left the queue since the page was read: its place as it was.
    return {job["id"]: int(found[job["id"]]) if job["id"] in found else position(engine, job)
            for job in jobs}


def free_times(idle: int, running_s: list[float], typical: float, now: float
               ) -> list[float]:
    """When each connected worker is next free, soonest first: idle ones now, busy ones
    when their job reaches the typical run time (now, if it is past it)."""
    return sorted([now] * idle + [now + max(0.0, typical - ran) for ran in running_s])


def start_at(place: int, free: list[float], typical: float) -> float | None:
    """When the job at ``place`` should start, given :func:`free_times`.

    Each worker is free within one typical run from now and then takes a job every
    typical run, so the queue is served in rounds, one job per worker each: ``place``
    starts in round ``(place - 1) // workers``, on the worker free ``(place - 1) %
    workers``-th. None when no worker is connected.
    """
    if not free:
        return None
    rounds, nth = divmod(place - 1, len(free))
    return free[nth] + rounds * typical


def estimate_start(place: int, idle: int, running_s: list[float], typical: float,
                   now: float) -> float | None:
    """When the job at ``place`` should start; None when no worker is connected."""
    return start_at(place, free_times(idle, running_s, typical, now), typical)


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
    from labq.backend.registry import iso_of

    out: dict[str, dict[str, Any]] = {}
    waiting = [j for j in jobs if j["state"] in WAITING and not j.get("hold_reason")]
    for job in jobs:
        held = job["state"] == State.CREATED and job.get("hold_reason") or None
        out[job["id"]] = {"queue_position": None, "estimated_start_at": None,
                          "waiting_reason": held}
    if not waiting:
        return out
    snap = snapshot(engine)
    workers = Workers.count(consumers, snap.busy)
    now = time.time()
    free = free_times(workers.idle or 0, snap.running_s(now), snap.typical, now)
    places = positions(engine, waiting, snap.mark)
    for job in waiting:
        place = places[job["id"]]
        start = start_at(place, free, snap.typical)
        out[job["id"]] = {"queue_position": place, "estimated_start_at": iso_of(start),
                          "waiting_reason": reason(place, workers)}
    return out


#: How long the jobs queue's consumer count is reused (one broker call per second at
#: most, however many waiting jobs are shown).
CONSUMERS_TTL_S = 1.0
_consumers: weakref.WeakKeyDictionary[Any, tuple[float, int | None]] = \
    weakref.WeakKeyDictionary()
_asking: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()


def idle_workers(publisher: Any) -> int | None:
    """Consumers on the jobs queue (every connected worker: see :meth:`Workers.count`),
    or None when the broker is away; at most :data:`CONSUMERS_TTL_S` old.

    One request asks the broker at a time; the others meanwhile take the count it had,
    or (none yet) wait for its answer: two hundred requests queueing for the broker one
    after the other behind the publisher's lock stalled them all for seconds.
    """
    cached = _consumers.get(publisher)
    if cached is not None and time.monotonic() - cached[0] < CONSUMERS_TTL_S:
        return cached[1]
    lock = _asking.setdefault(publisher, threading.Lock())
    if not lock.acquire(blocking=cached is None):
        return cached[1]  # type: ignore[index] - someone is asking; the last count will do
    try:
        again = _consumers.get(publisher)
        if again is not None and time.monotonic() - again[0] < CONSUMERS_TTL_S:
            return again[1]  # answered while we waited
        count = _ask(publisher)
        _consumers[publisher] = (time.monotonic(), count)
        return count
    finally:
        lock.release()


def _ask(publisher: Any) -> int | None:
    from labq.shared.errors import BrokerUnavailableError

    try:
        return publisher.queue_info(publisher.topology.jobs_queue)[1]
    except BrokerUnavailableError:
        return None
