"""Worker faults on a throwaway broker: SIGKILL mid-job, poison jobs, undecodable
messages, SIGTERM mid-job, duplicate delivery of a finished job.

Every test checks the final state, the attempts, the results, and (through the probe
jobs' run records, see faultkit) that no job ever ran twice at the same time.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest
from faultkit import (
    assert_never_concurrent,
    assert_one_outcome,
    drain_dead_letters,
    ends,
    ensure_workers,
    intervals,
    job_message,
    live_workers,
    main_records,
    probe_bundle,
    publish_job_raw,
    queue_depth,
    runs,
    sleep_until,
    wait_running,
    worker_running,
)
from helpers import LabqSystem, pid_alive, wait_until

from labq.shared.errors import DecodeError
from labq.shared.messages import JobMessage
from labq.shared.topology import Topology

pytestmark = pytest.mark.fault

#: Dead letters taken off the queue by any test of this module (body list).
_DEAD: list[bytes] = []


def worker_name(system: LabqSystem, proc: object) -> str:
    return f"{system.prefix}-w{system.workers.index(proc) + 1}"


def child_pid(fault_dir: Path, job_id: str) -> int:
    recs = wait_until(lambda: [r for r in runs(fault_dir, job_id) if r["kind"] == "child"],
                      timeout=10, message="the probe's grandchild")
    return recs[0]["child_pid"]


def results_text(system: LabqSystem, job_id: str) -> str:
    resp = system.http.get(system.api(f"/api/v1/jobs/{job_id}/results/files/result.txt"),
                        timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.text


def test_sigkill_worker_mid_job(fault_system: LabqSystem, fault_dir: Path) -> None:
    """(a) A worker SIGKILLed mid-job: the job's whole tree dies with it, the job goes
    back on the queue, the other worker runs it, attempts == 2, one outcome."""
    system = fault_system
    ensure_workers(system, 2)
    job = system.submit(probe_bundle(fault_dir, seconds=4, child=True, tag="sigkill"))
    first = wait_running(fault_dir, job["id"])
    grandchild = child_pid(fault_dir, job["id"])
    victim = worker_running(system, first["pid"])
    victim_name = worker_name(system, victim)

    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    killed_at = time.time()
    # No orphan keeps running (or writing) once its worker is gone.
    assert sleep_until(lambda: not pid_alive(first["pid"]), 10), (
        f"job process {first['pid']} outlived its SIGKILLed worker")
    assert sleep_until(lambda: not pid_alive(grandchild), 10), (
        f"the job's grandchild {grandchild} outlived its SIGKILLed worker")

    done = system.wait_done(job["id"], timeout=90)
    assert_one_outcome(system, fault_dir, done)
    assert done["attempts"] == 2, done
    assert done["worker"] != victim_name, done
    spans = intervals(fault_dir, job["id"])
    assert len(spans) == 2, spans
    assert spans[0][2] == first["pid"]
    assert [s[3] for s in spans] == ["1", "2"], spans
    # The first attempt's whole tree, grandchild included, is gone before the second
    # attempt starts: otherwise two copies of the job write at the same time.
    second_start = spans[1][0]
    late = [r for r in runs(fault_dir, job["id"])
            if r["kind"] == "child-beat" and r["pid"] == grandchild and r["t"] >= second_start]
    assert not late, (
        f"attempt 1's grandchild (pid {grandchild}) kept writing for "
        f"{late[-1]['t'] - second_start:.1f}s after attempt 2 started "
        f"(worker killed at {killed_at:.2f}, attempt 2 started {second_start:.2f})")
    assert "attempt 2" in results_text(system, job["id"])
    ensure_workers(system, 2)


def test_poison_job_ends_failed_and_dead_lettered(fault_system: LabqSystem,
                                                  fault_dir: Path) -> None:
    """(d) A job that SIGKILLs whichever worker runs it ends ``failed`` after
    LABQ_MAX_ATTEMPTS (2 here) with an error that says so, its message in
    ``<prefix>.jobs.dead``; other jobs keep flowing meanwhile."""
    system = fault_system
    ensure_workers(system, 2)
    max_attempts = int(system.env["LABQ_MAX_ATTEMPTS"])
    poison = system.submit(probe_bundle(fault_dir, kill_worker=True, tag="poison"))
    others = [system.submit(probe_bundle(fault_dir, seconds=0.3, tag=f"ok{i}"))
              for i in range(4)]

    # Play the process supervisor (systemd, compose): start a worker for each one killed.
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        ensure_workers(system, 2)
        if system.job(poison["id"])["state"] in ("stopped", "failed"):
            break
        time.sleep(0.3)
    done = system.wait_done(poison["id"], timeout=5)
    assert done["state"] == "failed", done
    assert done["outcome"] == "failed", done
    assert "lost" in (done["error"] or ""), done
    assert str(max_attempts) in done["error"], done
    assert done["attempts"] == max_attempts, done
    kills = [r for r in runs(fault_dir, poison["id"]) if r["kind"] == "kill-worker"]
    assert len(kills) == max_attempts, kills
    assert not [r for r in main_records(fault_dir, poison["id"]) if r["kind"] == "start"]
    attempts_log = system.data_dir / "jobs" / poison["id"] / "attempts.log"
    assert len(attempts_log.read_text().splitlines()) == max_attempts

    for job in others:
        assert_one_outcome(system, fault_dir, system.wait_done(job["id"], timeout=90))

    def poison_dead_lettered() -> bool:
        _DEAD.extend(drain_dead_letters(system))
        for body in _DEAD:
            try:
                if JobMessage.decode(body).job_id == poison["id"]:
                    return True
            except DecodeError:
                continue
        return False

    assert sleep_until(poison_dead_lettered, 15), "poison job's message not in the DLQ"
    ensure_workers(system, 2)


def test_undecodable_message_is_dead_lettered_at_once(fault_system: LabqSystem,
                                                      fault_dir: Path) -> None:
    """(d) A message that is not a JobMessage goes to the dead-letter queue at once;
    the workers carry on."""
    system = fault_system
    ensure_workers(system, 2)
    workers_before = {w.pid for w in live_workers(system)}
    body = f"not a job {uuid.uuid4().hex}".encode()
    publish_job_raw(system, body)
    publish_job_raw(system, b'{"kind": "job", "schema_version": 1, "job_id": 7}')

    def arrived() -> bool:
        _DEAD.extend(drain_dead_letters(system))
        return body in _DEAD

    assert sleep_until(arrived, 15), "the undecodable message did not reach the DLQ"
    assert sleep_until(lambda: b'"job_id": 7}' in b"".join(_DEAD), 15)
    assert {w.pid for w in live_workers(system)} == workers_before, "a worker died"
    job = system.submit(probe_bundle(fault_dir, seconds=0, tag="after-junk"))
    assert_one_outcome(system, fault_dir, system.wait_done(job["id"], timeout=60))


def test_sigterm_worker_mid_job(fault_system: LabqSystem, fault_dir: Path) -> None:
    """(e) SIGTERM with a short LABQ_SHUTDOWN_GRACE_S: the worker stops the job, puts it
    back on the queue, exits 0; the other worker finishes it."""
    system = fault_system
    ensure_workers(system, 2)
    grace = float(system.env["LABQ_SHUTDOWN_GRACE_S"])
    job = system.submit(probe_bundle(fault_dir, seconds=8, child=True, tag="sigterm"))
    first = wait_running(fault_dir, job["id"])
    grandchild = child_pid(fault_dir, job["id"])
    victim = worker_running(system, first["pid"])
    victim_name = worker_name(system, victim)

    began = time.monotonic()
    victim.send_signal(signal.SIGTERM)
    code = victim.wait(timeout=grace + 30)
    took = time.monotonic() - began
    assert code == 0, f"worker exited {code} on SIGTERM\n{system.read_logs()}"
    assert took < grace + 15, f"worker took {took:.1f}s to stop (grace {grace}s)"
    assert not pid_alive(first["pid"]), "the job outlived its worker's shutdown"
    assert sleep_until(lambda: not pid_alive(grandchild), 5), "grandchild outlived shutdown"

    done = system.wait_done(job["id"], timeout=90)
    assert_one_outcome(system, fault_dir, done)
    assert done["worker"] != victim_name, done
    # A put-back is not a lost attempt; the next run still gets its own number.
    assert done["attempts"] in (1, 2), done
    spans = intervals(fault_dir, job["id"])
    assert len(spans) == 2, spans
    ensure_workers(system, 2)


def test_duplicate_delivery_of_finished_job_is_noop(fault_system: LabqSystem,
                                                    fault_dir: Path) -> None:
    """(g) Publishing a finished job's JobMessage again changes nothing: no run, no new
    attempt, no state change; the message is acked (not dead-lettered)."""
    system = fault_system
    ensure_workers(system, 2)
    bundle = probe_bundle(fault_dir, seconds=0, tag="dup")
    job = system.submit(bundle)
    done = system.wait_done(job["id"], timeout=60)
    assert_one_outcome(system, fault_dir, done)
    outcome_file = system.data_dir / "jobs" / job["id"] / "outcome.json"
    outcome_before = outcome_file.read_bytes()

    message = job_message(done, bundle)
    for _ in range(2):
        publish_job_raw(system, message.encode())
    topo = Topology(system.prefix)
    assert sleep_until(lambda: queue_depth(system, topo.jobs_queue) == 0, 15)
    time.sleep(3)  # let any (wrong) run or event show up

    after = system.job(job["id"])
    for key in ("state", "outcome", "exit_code", "attempts", "worker", "error"):
        assert after[key] == done[key], (key, done, after)
    assert len([r for r in main_records(fault_dir, job["id"]) if r["kind"] == "start"]) == 1
    assert len(ends(fault_dir, job["id"])) == 1
    attempts_log = system.data_dir / "jobs" / job["id"] / "attempts.log"
    assert len(attempts_log.read_text().splitlines()) == 1
    assert outcome_file.read_bytes() == outcome_before
    _DEAD.extend(drain_dead_letters(system))
    assert message.encode() not in _DEAD, "a duplicate of a finished job was dead-lettered"
    assert_never_concurrent(fault_dir, job["id"])
