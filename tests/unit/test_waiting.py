"""A waiting job's place and estimated start: one query for a page's places, the same
answers as counting job by job, and estimates equal to handing jobs out one at a time."""

from __future__ import annotations

import heapq
import json
import random
import time

import pytest
from sqlalchemy import insert, update

from labq.backend import waiting
from labq.shared import db, jobstore


def heap_estimate(place: int, idle: int, running_s: list[float], typical: float,
                  now: float) -> float | None:
    """The estimate by simulation: each job ahead goes to the worker free first."""
    free = [now] * idle + [now + max(0.0, typical - ran) for ran in running_s]
    if not free:
        return None
    heapq.heapify(free)
    for _ in range(place - 1):
        heapq.heappush(free, heapq.heappop(free) + typical)
    return free[0]


def test_the_estimate_in_rounds_equals_handing_out_jobs_one_by_one():
    rng = random.Random(7)
    for _ in range(500):
        idle, busy = rng.randint(0, 3), rng.randint(0, 4)
        typical = rng.uniform(1, 600)
        running = [rng.uniform(0, 2 * typical) for _ in range(busy)]
        place = rng.randint(1, 60)
        got = waiting.estimate_start(place, idle, running, typical, 1000.0)
        want = heap_estimate(place, idle, running, typical, 1000.0)
        assert got == pytest.approx(want) if want is not None else got is None


def add_jobs(engine, n: int, **values) -> list[dict]:
    rows = []
    with engine.begin() as conn:
        for i in range(n):
            rows.append(jobstore.insert_job(conn, {
                "id": f"{len(rows):02d}{time.time_ns():030d}"[:32], "name": f"j{i}",
                "bundle_sha256": "0" * 64, "bundle_bytes": 1, "spec": json.dumps({}),
                "created_at": 1000.0 + i, **values}))
    return rows


def test_a_pages_places_come_from_one_query_and_match_counting_one_by_one(engine):
    jobs = add_jobs(engine, 12)
    with engine.begin() as conn:  # one job held by fair share: in nobody's way
        conn.execute(update(db.jobs).where(db.jobs.c.id == jobs[3]["id"])
                     .values(hold_reason="your running-job limit"))
    queued = [j for i, j in enumerate(jobs) if i != 3]
    places = waiting.positions(engine, queued)
    assert places == {j["id"]: waiting.position(engine, j) for j in queued}
    assert sorted(places.values()) == list(range(1, 12))


def test_places_and_the_snapshot_are_read_again_once_a_job_changed(engine):
    jobs = add_jobs(engine, 3)
    first = waiting.snapshot(engine)
    assert waiting.positions(engine, jobs, first.mark)[jobs[2]["id"]] == 3
    assert waiting.snapshot(engine) is first  # nothing changed: nothing read
    # When the oldest job starts (a state change always writes an event row)
    with engine.begin() as conn:
        jobstore.move(conn, jobs[0], "queued", seq=1)
    with engine.begin() as conn:
        started = jobstore.read(conn, jobs[0]["id"])
        conn.execute(update(db.jobs).where(db.jobs.c.id == started["id"])
                     .values(worker="w1", started_at=time.time()))
        jobstore.move(conn, {**started}, "initialized", seq=2)
    # Then the snapshot and the places are new
    again = waiting.snapshot(engine)
    assert again is not first and again.busy == 1 and again.mark > first.mark
    assert waiting.positions(engine, jobs[1:], again.mark)[jobs[2]["id"]] == 2


def test_the_typical_run_time_is_the_median_of_recent_runs(engine):
    jobs = add_jobs(engine, 5)
    with engine.begin() as conn:
        for i, job in enumerate(jobs):
            conn.execute(update(db.jobs).where(db.jobs.c.id == job["id"])
                         .values(run_s=10.0 * (i + 1), stopped_at=2000.0 + i))
        conn.execute(insert(db.events).values(job_id=jobs[0]["id"], seq=9, state="stopped",
                                               at=1.0, data="{}"))
    assert waiting.typical_run_s(engine) == 30.0
