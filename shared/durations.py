"""How long each stage of a job took, pause-aware.

A job row keeps one timestamp per state (``<state>_at``) plus ``paused_s``, the seconds
spent in pauses already resumed, ``env_s`` (reported by the worker: unpacking the bundle
and preparing the environment) and ``run_s`` (set when the script ended). Resuming a
paused job must not move ``started_at``: it adds the pause to ``paused_s`` instead, so
the run time and the timeline stay true (:func:`timestamps_for`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from labq.shared.lifecycle import State

#: The states after which the script no longer runs.
_RUN_ENDS = ("completed_at", "stopped_at", "failed_at")


def _pause_added(job: Mapping[str, Any], at: float) -> dict[str, float]:
    """``paused_s`` with the pause that ends at ``at`` added (nothing if none began)."""
    paused_at = job.get("paused_at")
    if paused_at is None:
        return {}
    return {"paused_s": (job.get("paused_s") or 0.0) + max(0.0, at - paused_at)}


def timestamps_for(job: Mapping[str, Any], current: State, target: State,
                   at: float) -> dict[str, Any]:
    """The columns a move ``current → target`` at time ``at`` writes, besides the state."""
    if target == current:
        return {}
    if current == State.PAUSED and target == State.STARTED:
        # A resume: the run began at started_at; the pause just ended counts as paused.
        return {"started_at": job.get("started_at") or at, **_pause_added(job, at)}
    values: dict[str, Any] = {f"{target}_at": at}
    if target == State.STARTED:
        values["paused_s"] = 0.0  # a new attempt starts with no pauses
    if current == State.PAUSED and target != State.QUEUED:
        values.update(_pause_added(job, at))
    if current in (State.STARTED, State.PAUSED) and target in (
            State.COMPLETED, State.STOPPED, State.FAILED):
        paused = values.get("paused_s", job.get("paused_s")) or 0.0
        started = job.get("started_at") or at
        values["run_s"] = round(max(0.0, at - started - paused), 3)
    return values


def paused_seconds(job: Mapping[str, Any], now: float | None = None) -> float:
    """Seconds paused so far, including a pause still going on."""
    total = job.get("paused_s") or 0.0
    if job.get("state") == State.PAUSED and job.get("paused_at") is not None:
        total += max(0.0, (now or time.time()) - job["paused_at"])
    return total


def run_seconds(job: Mapping[str, Any], now: float | None = None) -> float | None:
    """Seconds the script ran, pauses excluded; None if it never started."""
    started = job.get("started_at")
    if started is None:
        return None
    if job.get("run_s") is not None:
        return float(job["run_s"])
    end = now or time.time()
    if job.get("state") not in (State.STARTED, State.PAUSED):
        ends = [job[c] for c in _RUN_ENDS if job.get(c) is not None and job[c] >= started]
        end = min(ends) if ends else end
    paused = job.get("paused_s") or 0.0
    if job.get("state") == State.PAUSED and job.get("paused_at") is not None:
        paused += max(0.0, end - job["paused_at"])
    return round(max(0.0, end - started - paused), 3)


def durations(job: Mapping[str, Any], now: float | None = None) -> dict[str, float | None]:
    """``{queued_s, env_s, run_s, paused_s, total_s}`` for the job JSON (seconds)."""
    now = now or time.time()
    created = job.get("created_at") or now
    env_s = job.get("env_s")
    taken = job.get("initialized_at")
    if taken is not None and env_s is not None:
        taken -= env_s  # the worker took it env_s before it was initialized
    if taken is None and job.get("state") in (State.CREATED, State.QUEUED):
        queued = now - created
    elif taken is not None:
        queued = taken - created
    else:
        queued = None
    terminal = job.get("stopped_at") if job.get("state") == State.STOPPED else (
        job.get("failed_at") if job.get("state") == State.FAILED else None)
    total = (terminal or now) - created

    def r(v: float | None) -> float | None:
        return None if v is None else round(max(0.0, v), 3)

    return {"queued_s": r(queued), "env_s": r(env_s), "run_s": r(run_seconds(job, now)),
            "paused_s": r(paused_seconds(job, now)), "total_s": r(total)}


#: What a worker measures and carries in lifecycle events (see messages.LifecycleEvent).
MEASURES = ("env_s", "peak_rss_mb", "cpu_s")


def event_measures(event: Any) -> dict[str, float]:
    """The measurements an event carries, as job columns."""
    found = {}
    for name in MEASURES:
        value = getattr(event, name, None)
        if value is not None:
            found[name] = float(value)
    return found
