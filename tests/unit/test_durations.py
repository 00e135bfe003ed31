"""Pause-aware run time: resume keeps started_at, pauses add up, durations in the JSON."""

from __future__ import annotations

from test_registry import ev, new_job, registry  # noqa: F401 - the fixture

from labq.backend.registry import job_to_json
from labq.shared.durations import durations


def at(t0: float, seconds: float) -> float:
    return t0 + seconds


def test_resume_keeps_started_at_and_run_time_excludes_pauses(registry):  # noqa: F811
    job = new_job(registry)
    t0 = job["created_at"]
    job_id = job["id"]
    assert registry.apply_event(ev(job_id, 1, "initialized", at=at(t0, 5), env_s=3.0))
    assert registry.apply_event(ev(job_id, 2, "started", at=at(t0, 6)))
    assert registry.apply_event(ev(job_id, 3, "paused", at=at(t0, 16)))
    assert registry.apply_event(ev(job_id, 4, "started", at=at(t0, 76)))
    row = registry.get(job_id)
    assert row["started_at"] == at(t0, 6), "a resume must not move started_at"
    assert row["paused_s"] == 60.0
    assert registry.apply_event(ev(job_id, 5, "completed", at=at(t0, 96), exit_code=0))
    assert registry.apply_event(ev(job_id, 6, "stopped", at=at(t0, 97), outcome="succeeded",
                                   peak_rss_mb=12.5, cpu_s=28.0))
    row = registry.get(job_id)
    assert row["run_s"] == 30.0  # 10 s before the pause + 20 s after it
    d = durations(row)
    assert d == {"queued_s": 2.0, "env_s": 3.0, "run_s": 30.0, "paused_s": 60.0,
                 "total_s": 97.0}
    data = job_to_json(row)
    assert data["durations"] == d
    assert (data["peak_rss_mb"], data["cpu_s"]) == (12.5, 28.0)
    # The timeline: started comes before paused.
    assert data["started_at"] < data["paused_at"]


def test_running_and_paused_jobs_count_up_without_the_pause(registry):  # noqa: F811
    job = new_job(registry)
    t0 = job["created_at"]
    registry.apply_event(ev(job["id"], 2, "started", at=at(t0, 1)))
    registry.apply_event(ev(job["id"], 3, "paused", at=at(t0, 11)))
    row = registry.get(job["id"])
    d = durations(row, now=at(t0, 41))
    assert (d["run_s"], d["paused_s"], d["total_s"]) == (10.0, 30.0, 41.0)


def test_stop_while_paused_counts_the_pause(registry):  # noqa: F811
    job = new_job(registry)
    t0 = job["created_at"]
    registry.apply_event(ev(job["id"], 2, "started", at=at(t0, 1)))
    registry.apply_event(ev(job["id"], 3, "paused", at=at(t0, 11)))
    registry.apply_event(ev(job["id"], 4, "stopped", at=at(t0, 31), outcome="cancelled"))
    row = registry.get(job["id"])
    assert (row["run_s"], row["paused_s"]) == (10.0, 20.0)
