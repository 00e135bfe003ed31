"""Fair share with both limits set, on a real labq with two workers: one busy user cannot
hold every worker, their extra jobs wait (held, with a reason, off the queue) and start as
their own jobs end, and past their quota they get a 429 — with one backend process and
with two on the same database and broker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest
import requests
from helpers import LabqSystem, make_zip, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LONG = {"code.py": "import time\nfor _ in range(600):\n    time.sleep(0.1)\n"}
QUICK = {"code.py": "print('quick')\n"}
TERMINAL = ("stopped", "failed")


@pytest.fixture(scope="module")
def limited(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabqSystem]:
    system = LabqSystem(tmp_path_factory.mktemp("fair"), workers=2,
                        env={"LABQ_MAX_RUNNING_PER_USER": "1", "LABQ_MAX_QUEUED_PER_USER": "3"})
    try:
        system.start()
        yield system
    finally:
        system.stop()


def submit(system: LabqSystem, session: requests.Session, files: dict) -> requests.Response:
    return session.post(system.api("/api/v1/jobs"), timeout=30,
                        files={"bundle": ("b.zip", make_zip(files))})


def state_of(system: LabqSystem, job_id: str) -> dict:
    return system.job(job_id)


def test_one_busy_user_cannot_hold_every_worker(limited: LabqSystem) -> None:
    alice = limited.session_for(limited.add_user("alice"))
    bob = limited.session_for(limited.add_user("bob"))
    # Given alice submits three long jobs with two workers and a limit of one at a time
    jobs = [submit(limited, alice, LONG) for _ in range(3)]
    assert [r.status_code for r in jobs] == [201, 201, 201], [r.text for r in jobs]
    first, *extra = [r.json()["id"] for r in jobs]
    limited.wait_for_state(first, "started")
    # Then only the first runs; the others wait off the queue, saying why
    for job_id in extra:
        job = state_of(limited, job_id)
        assert job["state"] == "created", job
        assert "LABQ_MAX_RUNNING_PER_USER=1" in job["hold_reason"]
    # And a fourth is refused: she has three unfinished jobs, her quota
    over = submit(limited, alice, LONG)
    assert over.status_code == 429
    assert "LABQ_MAX_QUEUED_PER_USER=3" in over.json()["error"]["message"]
    assert int(over.headers["Retry-After"]) > 0
    # When bob submits, his job takes the free worker at once
    bobs = submit(limited, bob, QUICK).json()["id"]
    done = limited.wait_done(bobs)
    assert done["outcome"] == "succeeded"
    assert state_of(limited, extra[0])["state"] == "created"  # still held
    # When alice's running job ends, her next one starts (oldest first), the last still held
    assert limited.set_state(first, "stopped").status_code == 200
    limited.wait_done(first)
    limited.wait_for_state(extra[0], "started")
    held = state_of(limited, extra[1])
    assert held["state"] == "created" and held["hold_reason"]
    # Stopping a held job ends it without it ever running, and frees quota
    stopped = limited.set_state(extra[1], "stopped").json()
    assert stopped["state"] == "stopped" and stopped["outcome"] == "cancelled"
    assert stopped["hold_reason"] is None
    assert submit(limited, alice, QUICK).status_code == 201
    limited.set_state(extra[0], "stopped")
    limited.wait_done(extra[0])


def test_admission_is_serialised_per_user(limited: LabqSystem) -> None:
    """Many uploads of one user at once (threads of the one backend, several connections):
    never more than the running limit is published, and the quota is exact."""
    from concurrent.futures import ThreadPoolExecutor

    carol = limited.session_for(limited.add_user("carol"))
    token = carol.headers["Authorization"]

    def one(_: int) -> requests.Response:
        session = requests.Session()
        session.headers["Authorization"] = token
        return submit(limited, session, LONG)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    accepted = [r.json() for r in results if r.status_code == 201]
    assert len(accepted) == 3 and sum(r.status_code == 429 for r in results) == 5
    wait_until(lambda: sum(state_of(limited, j["id"])["state"] != "created"
                           for j in accepted) >= 1, timeout=30, message="one job published")
    states = [state_of(limited, j["id"]) for j in accepted]
    assert sum(s["hold_reason"] is None for s in states) == 1, states
    for job in accepted:
        limited.set_state(job["id"], "stopped")


def test_held_jobs_are_off_the_queue_and_push_no_one_back(limited: LabqSystem) -> None:
    """A held job has no place in the queue and no estimate, says it waits for the user's
    running-job limit, and does not count against other users' places."""
    erin = limited.session_for(limited.add_user("erin"))
    frank = limited.session_for(limited.add_user("frank"))
    grace = limited.session_for(limited.add_user("grace"))
    # Given erin runs one job and holds one, and frank's job takes the other worker
    running, held = [submit(limited, erin, LONG).json()["id"] for _ in range(2)]
    franks = submit(limited, frank, LONG).json()["id"]
    ids = [running, held, franks]
    try:
        limited.wait_for_state(running, "started")
        limited.wait_for_state(franks, "started")
        # When grace submits after erin's held job, with both workers busy
        graces = submit(limited, grace, QUICK).json()["id"]
        ids.append(graces)
        limited.wait_for_state(graces, "queued")
        # Then erin's held job waits off the queue: no place, no estimate, and why
        job = erin.get(limited.api(f"/api/v1/jobs/{held}"), timeout=10).json()
        assert job["state"] == "created" and job["hold_reason"], job
        assert job["queue_position"] is None and job["estimated_start_at"] is None, job
        assert job["waiting_reason"].startswith("your running-job limit"), job
        assert "starts when one of yours ends" in job["waiting_reason"], job
        # And grace's job is first in the queue: the held job is not ahead of it
        job = grace.get(limited.api(f"/api/v1/jobs/{graces}"), timeout=10).json()
        assert job["queue_position"] == 1, job
        assert job["waiting_reason"] == "0 jobs ahead, 2 workers busy", job
        listed = {j["id"]: j for j in limited.http.get(
            limited.api("/api/v1/jobs?limit=500"), timeout=10).json()["jobs"]}
        assert listed[held]["queue_position"] is None and listed[graces]["queue_position"] == 1
    finally:
        for job_id in ids:
            limited.set_state(job_id, "stopped")
        for job_id in ids:
            limited.wait_done(job_id)


@pytest.fixture(scope="module")
def second_backend(limited: LabqSystem) -> str:
    """A second `labq backend` on its own port: the same database, data dir and broker."""
    return limited.start_extra_backend()


def _at(text: str | None) -> datetime:
    assert text, "a timestamp is missing"
    return datetime.fromisoformat(text)


def test_two_backends_never_over_admit_or_over_publish(limited: LabqSystem,
                                                       second_backend: str) -> None:
    """One user's uploads and stops reach two backend processes at once: the quota is
    exact, at most her running limit of jobs is ever queued or running (each backend's
    outbox relay releases held jobs), and another user's job still gets a worker."""
    backends = [limited.url, second_backend]
    heidi = limited.add_user("heidi")
    ivan = limited.session_for(limited.add_user("ivan"))
    go = threading.Barrier(8)

    def upload(n: int) -> requests.Response:
        session = limited.session_for(heidi)
        go.wait(timeout=30)  # all eight leave together, four to each backend
        return session.post(f"{backends[n % 2]}/api/v1/jobs", timeout=60,
                            files={"bundle": ("b.zip", make_zip(LONG))})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(upload, range(8)))
    # The quota (3) is exact across both backends, and only one job (the limit) is live
    assert sorted(r.status_code for r in results) == [201] * 3 + [429] * 5, \
        [(r.status_code, r.text[:200]) for r in results]
    ids = [r.json()["id"] for r in results if r.status_code == 201]
    unfinished = list(ids)

    def active() -> list[dict]:
        jobs = [limited.job(job_id) for job_id in unfinished]
        live = [j for j in jobs if j["hold_reason"] is None and j["state"] not in TERMINAL]
        assert len(live) <= 1, ("more than the running limit published",
                                [(j["id"][:8], j["state"], j["hold_reason"]) for j in jobs])
        return live

    def one_started() -> dict | None:
        live = active()
        return live[0] if live and live[0]["state"] == "started" else None

    running = wait_until(one_started, timeout=60, message="one of heidi's jobs to start")
    # Another user's job takes the other worker while heidi's run and wait
    ivans = ivan.post(f"{second_backend}/api/v1/jobs", timeout=30,
                      files={"bundle": ("b.zip", make_zip(QUICK))})
    assert ivans.status_code == 201, ivans.text
    assert limited.wait_done(ivans.json()["id"])["outcome"] == "succeeded"
    assert one_started()["id"] == running["id"]
    # Each stop, through either backend, releases exactly one held job
    for n in range(len(ids)):
        stop = requests.put(f"{backends[n % 2]}/api/v1/jobs/{running['id']}/state",
                            json={"state": "stopped"}, timeout=10,
                            headers={"Authorization": f"Bearer {heidi}"})
        assert stop.status_code == 200, stop.text
        limited.wait_done(running["id"])
        unfinished.remove(running["id"])
        if unfinished:
            running = wait_until(one_started, timeout=60, message="the next job to start")
    # Her jobs were on the queue or a worker one at a time: no two active spans overlap.
    # (A worker may take a job before the backend marks it queued: its event moves the
    # job from created straight to initialized, and queued_at stays empty.)
    spans = sorted((_at(j["queued_at"] or j["initialized_at"]), _at(j["stopped_at"]))
                   for j in (limited.job(job_id) for job_id in ids))
    for (_, end), (begin, _) in zip(spans, spans[1:], strict=False):
        assert begin >= end, spans
