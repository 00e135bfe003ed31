"""Pause, resume and stop through ``PUT /api/v1/jobs/{id}/state`` with real processes."""

from __future__ import annotations

import time
import uuid

import pytest
from helpers import pid_alive, wait_until

pytestmark = pytest.mark.integration

COUNTER = """
import pathlib, time
path = pathlib.Path({path!r})
n = 0
while True:
    n += 1
    path.write_text(str(n))
    time.sleep(0.05)
"""

GRANDCHILD = """
import os, pathlib, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        pathlib.Path({path!r}).write_text(str(os.getpid()))
        while True:
            time.sleep(0.1)
    os._exit(0)
while True:
    time.sleep(0.1)
"""


def _count(path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0




def test_pause_freezes_and_resume_continues_then_stop(system):
    counter = system.tmp / f"count-{uuid.uuid4().hex}"
    job = system.submit({"code.py": COUNTER.format(path=str(counter))})
    system.wait_for_state(job["id"], "started")
    wait_until(lambda: _count(counter) > 5, message="counter running")
    resp = system.set_state(job["id"], "paused")
    assert resp.status_code == 200, resp.text
    system.wait_for_state(job["id"], "paused", timeout=15)
    assert system.set_state(job["id"], "paused").status_code == 200  # a repeat is a no-op
    frozen = _count(counter)
    time.sleep(1.0)
    assert _count(counter) == frozen, "the paused job kept counting"
    assert system.set_state(job["id"], "started").status_code == 200
    system.wait_for_state(job["id"], "started", timeout=15)
    wait_until(lambda: _count(counter) > frozen + 5, message="counter to continue")
    assert system.set_state(job["id"], "stopped").status_code == 200
    done = system.wait_done(job["id"], timeout=30)
    assert (done["state"], done["outcome"]) == ("stopped", "cancelled")
    # Impossible now: 409 naming the state.
    resp = system.set_state(job["id"], "paused")
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "invalid_transition"


def test_stop_kills_a_grandchild_that_left_the_session(system):
    pidfile = system.tmp / f"grandchild-{uuid.uuid4().hex}"
    job = system.submit({"code.py": GRANDCHILD.format(path=str(pidfile))})
    system.wait_for_state(job["id"], "started")
    wait_until(lambda: pidfile.exists() and pidfile.read_text(), message="grandchild")
    pid = int(pidfile.read_text())
    assert pid_alive(pid)
    assert system.set_state(job["id"], "stopped").status_code == 200
    done = system.wait_done(job["id"], timeout=30)
    assert done["outcome"] == "cancelled"
    wait_until(lambda: not pid_alive(pid), timeout=10, message=f"grandchild {pid} to die")


def test_stop_of_a_queued_job_never_runs_it(system):
    blockers = [system.submit({"code.py": "import time\ntime.sleep(60)\n"})
                for _ in range(len(system.workers))]
    for job in blockers:
        system.wait_for_state(job["id"], "started")
    marker = system.tmp / f"ran-{uuid.uuid4().hex}"
    queued = system.submit({"code.py": f"open({str(marker)!r}, 'w').write('ran')\n"})
    system.wait_for_state(queued["id"], "queued", timeout=15)
    assert system.set_state(queued["id"], "stopped").status_code == 200
    done = system.wait_done(queued["id"], timeout=10)
    assert (done["state"], done["outcome"]) == ("stopped", "cancelled")
    for job in blockers:
        assert system.set_state(job["id"], "stopped").status_code == 200
    for job in blockers:
        system.wait_done(job["id"], timeout=30)
    time.sleep(2.0)  # the workers are free; the queued message reaches one of them
    assert not marker.exists(), "a stopped queued job ran"
    assert system.job(queued["id"])["outcome"] == "cancelled"


def test_a_stop_that_missed_the_control_queue_still_reaches_the_running_job(system):
    # Given a running job, and a stop recorded only on the data dir (as when the backend
    # found no worker bound because the worker was reconnecting to the broker)
    from shared.storage import Storage

    job = system.submit({"code.py": "import time\nwhile True:\n    time.sleep(0.1)\n"})
    system.wait_for_state(job["id"], "started")
    Storage(system.data_dir).mark_cancelled(job["id"])
    # Then the worker notices the marker by itself and stops the job as cancelled
    done = system.wait_done(job["id"], timeout=20)
    assert (done["state"], done["outcome"]) == ("stopped", "cancelled")
