"""Broker and whole-system faults on a throwaway node: the broker restarted with jobs
queued and running, uploads while the broker is down (outbox relay), labq stopped and
started again on the same data dir. Nothing accepted is lost; each job has one outcome
and never ran twice at once.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from faultkit import (
    FAULT_ENV,
    Broker,
    assert_one_outcome,
    intervals,
    main_records,
    probe_bundle,
    runs,
    wait_running,
)
from helpers import LabqSystem, wait_until

pytestmark = pytest.mark.fault


def readyz(system: LabqSystem) -> requests.Response:
    return system.http.get(system.api("/readyz"), timeout=10)


def test_broker_restart_with_jobs_queued_and_running(fault_system: LabqSystem,
                                                     broker_node: Broker,
                                                     fault_dir: Path) -> None:
    """(b) stop_app/start_app while two jobs run and four wait: all finish, one outcome
    each, none lost, none run twice at once; every service reconnects by itself."""
    system = fault_system
    jobs = [system.submit(probe_bundle(fault_dir, seconds=3, tag=f"restart{i}"))
            for i in range(6)]
    wait_running(fault_dir, jobs[0]["id"])
    broker_node.broker_down()
    try:
        time.sleep(4)  # the running jobs go on without a broker
    finally:
        broker_node.broker_up()
    for job in jobs:
        done = system.wait_done(job["id"], timeout=120)
        assert_one_outcome(system, fault_dir, done)
        assert 1 <= done["attempts"] <= 2, done
    # The backend is ready again once it reconnected.
    wait_until(lambda: readyz(system).status_code == 200, timeout=60,
               message="readyz to recover after the broker restart")


def test_submit_while_broker_down(fault_system: LabqSystem, broker_node: Broker,
                                  fault_dir: Path) -> None:
    """(c) An upload while the broker is down is accepted (201, ``created``), readyz says
    the broker is down, and the outbox relay publishes the job once it is back."""
    system = fault_system
    broker_node.broker_down()
    try:
        wait_until(lambda: readyz(system).status_code == 503, timeout=30,
                   message="readyz to report the broker down")
        body = readyz(system).text.lower()
        assert "broker" in body or "rabbitmq" in body, body
        began = time.monotonic()
        job = system.submit(probe_bundle(fault_dir, seconds=0, tag="outbox"))
        took = time.monotonic() - began
        assert job["state"] == "created", job
        assert took < 20, f"the upload took {took:.1f}s while the broker was down"
        time.sleep(2)
        assert system.job(job["id"])["state"] == "created"
        assert not main_records(fault_dir, job["id"])
    finally:
        broker_node.broker_up()
    done = system.wait_done(job["id"], timeout=120)
    assert_one_outcome(system, fault_dir, done)
    assert done["attempts"] == 1, done
    wait_until(lambda: readyz(system).status_code == 200, timeout=60,
               message="readyz to recover")


def _stop_processes(system: LabqSystem) -> None:
    """SIGTERM the backend and workers as an admin would, keeping queues and data."""
    procs = [p for p in [*system.workers, system.backend] if p is not None]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"pid {proc.pid} ignored SIGTERM\n{system.read_logs()}") from None
        assert code == 0, f"pid {proc.pid} exited {code} on SIGTERM\n{system.read_logs()}"


def test_restart_labq_same_data_dir(broker_node: Broker, tmp_path: Path,
                                    fault_dir: Path) -> None:
    """(f) Stop the whole labq (backend + workers) with jobs queued and one running,
    start it again on the same data dir and queues: every accepted job finishes."""
    home = tmp_path / "labq"
    home.mkdir()
    first = LabqSystem(home, workers=1, env=FAULT_ENV, rabbitmq_url=broker_node.url)
    second: LabqSystem | None = None
    try:
        first.start()
        # The first job outlasts the 2 s shutdown grace, so it is surely put back; had it
        # been as long as the grace it could end on its own just as the grace ran out.
        jobs = [first.submit(probe_bundle(fault_dir, seconds=6 if i == 0 else 2,
                                          tag=f"labq{i}"))
                for i in range(5)]
        wait_running(fault_dir, jobs[0]["id"])
        _stop_processes(first)

        second = LabqSystem(home, workers=2,
                            env={**FAULT_ENV, "LABQ_PREFIX": first.prefix},
                            rabbitmq_url=broker_node.url)
        second.prefix = first.prefix  # same queues (and stop() deletes them at the end)
        assert second.data_dir == first.data_dir
        second.start()
        for job in jobs:
            done = second.wait_done(job["id"], timeout=120)
            assert_one_outcome(second, fault_dir, done)
            assert 1 <= done["attempts"] <= 2, done
            if job is jobs[0]:
                done_first = done
        # The job that was running when labq stopped was put back, not lost or doubled.
        assert len(intervals(fault_dir, jobs[0]["id"])) == 2, runs(fault_dir, jobs[0]["id"])
        assert done_first["attempts"] == 2, done_first
    finally:
        if second is not None:
            second.stop()
        else:
            first.stop()
