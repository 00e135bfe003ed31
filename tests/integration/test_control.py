"""Pause, resume and stop through ``PUT /api/v1/jobs/{id}/state`` with real processes."""

from __future__ import annotations

import time

import pytest
from helpers import wait_until

pytestmark = pytest.mark.integration

# Jobs run in their own sandbox, so they are watched through what they print (the log
# the API serves) and through their uid, never through files of the host.
COUNTER = """
import time
n = 0
while True:
    n += 1
    print("count", n, flush=True)
    time.sleep(0.05)
"""

GRANDCHILD = """
import os, time
print("uid", os.getuid(), flush=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        print("grandchild up", flush=True)
        while True:
            time.sleep(0.1)
    os._exit(0)
while True:
    time.sleep(0.1)
"""


def _count(system, job_id: str) -> int:
    counts = [line.split()[1] for line in system.log(job_id).splitlines()
              if line.startswith("count ")]
    return int(counts[-1]) if counts else 0


def test_pause_freezes_and_resume_continues_then_stop(system):
    job = system.submit({"code.py": COUNTER})
    system.wait_for_state(job["id"], "started")
    wait_until(lambda: _count(system, job["id"]) > 5, message="counter running")
    resp = system.set_state(job["id"], "paused")
    assert resp.status_code == 200, resp.text
    system.wait_for_state(job["id"], "paused", timeout=15)
    assert system.set_state(job["id"], "paused").status_code == 200  # a repeat is a no-op
    frozen = _count(system, job["id"])
    time.sleep(1.0)  # the assertion is about time passing: a frozen job prints nothing
    assert _count(system, job["id"]) == frozen, "the paused job kept counting"
    assert system.set_state(job["id"], "started").status_code == 200
    system.wait_for_state(job["id"], "started", timeout=15)
    wait_until(lambda: _count(system, job["id"]) > frozen + 5, message="counter to continue")
    assert system.set_state(job["id"], "stopped").status_code == 200
    done = system.wait_done(job["id"], timeout=30)
    assert (done["state"], done["outcome"]) == ("stopped", "cancelled")
    # Impossible now: 409 naming the state.
    resp = system.set_state(job["id"], "paused")
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "invalid_transition"


def test_stop_kills_a_grandchild_that_left_the_session(system):
    from labq.process_unit.uidpool import pids_of_uid

    job = system.submit({"code.py": GRANDCHILD})
    system.wait_for_state(job["id"], "started")
    wait_until(lambda: "grandchild up" in system.log(job["id"]), message="grandchild")
    uid = int(system.log(job["id"]).split("uid ", 1)[1].split()[0])
    assert len(pids_of_uid(uid)) >= 2  # the job and its escaped grandchild (and bwrap)
    assert system.set_state(job["id"], "stopped").status_code == 200
    done = system.wait_done(job["id"], timeout=30)
    assert done["outcome"] == "cancelled"
    wait_until(lambda: not pids_of_uid(uid), timeout=10, message=f"every process of {uid}")


def test_stop_of_a_queued_job_never_runs_it(system):
    blockers = [system.submit({"code.py": "import time\ntime.sleep(60)\n"})
                for _ in range(len(system.workers))]
    for job in blockers:
        system.wait_for_state(job["id"], "started")
    queued = system.submit({"code.py": "print('ran')\n"})
    system.wait_for_state(queued["id"], "queued", timeout=15)
    assert system.set_state(queued["id"], "stopped").status_code == 200
    done = system.wait_done(queued["id"], timeout=10)
    assert (done["state"], done["outcome"]) == ("stopped", "cancelled")
    for job in blockers:
        assert system.set_state(job["id"], "stopped").status_code == 200
    for job in blockers:
        system.wait_done(job["id"], timeout=30)
    # A job submitted after it has run to its end: the queue delivers in order, so the
    # stopped job's message has reached a worker by now (and was dropped there).
    later = system.submit({"code.py": "print('later')\n"})
    system.wait_done(later["id"], timeout=30)
    assert "=== labq: attempt" not in system.log(queued["id"]), "a stopped queued job ran"
    assert system.job(queued["id"])["outcome"] == "cancelled"


def test_a_stop_that_missed_the_control_queue_still_reaches_the_running_job(system):
    # Given a running job, and a stop recorded only on the data dir (as when the backend
    # found no worker bound because the worker was reconnecting to the broker)
    from labq.shared.storage import Storage

    job = system.submit({"code.py": "import time\nwhile True:\n    time.sleep(0.1)\n"})
    system.wait_for_state(job["id"], "started")
    Storage(system.data_dir).mark_cancelled(job["id"])
    # Then the worker notices the marker by itself and stops the job as cancelled
    done = system.wait_done(job["id"], timeout=20)
    assert (done["state"], done["outcome"]) == ("stopped", "cancelled")
