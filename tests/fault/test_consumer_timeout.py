"""Issue 3's consumer-timeout case: a job that runs (or stays paused) longer than the
broker's consumer timeout is never run twice at once and gets exactly one outcome.

The throwaway node runs with ``consumer_timeout = 5000`` (5 s). RabbitMQ checks that
timeout on each channel's "tick" (60 s by default), so the fixture also sets
``channel_tick_interval`` to 1 s: the timeout then bites about 5-6 s after a delivery.
labq declares its jobs queue with ``x-consumer-timeout`` of 30 days, but RabbitMQ
before 3.12 ignores that argument (and a lab may run such a node or set a short global
timeout), so labq must stay correct when the timeout bites. What happens then:

1. Worker A holds the delivery unacked while the job runs. After 5 s the broker closes
   A's channel ("delivery acknowledgement timed out") and puts the message back.
2. The job keeps running under A: A holds the job's **run lock** (``flock`` on
   ``<data>/jobs/<id>/run.lock``) for as long as the job's process lives.
3. Worker B (or A itself, on its new channel) receives the redelivery and tries the
   run lock without blocking: it is held, so B **parks**: it keeps the delivery unacked
   and polls the lock every second, never starting the job. (Its own delivery may time
   out too; the message then bounces between parked workers, none of which runs it.)
4. When the job ends, A writes ``outcome.json`` atomically, publishes the final event
   (confirmed), then would ack, but its delivery tag belongs to a dead channel, so it
   does not (a stale tag would kill the new channel).
5. The parked worker gets the lock, finds ``outcome.json``: a duplicate delivery of a
   finished job. It re-publishes the final event (the backend drops it: the job is
   terminal, ``seq`` not newer) and acks. The job ran once; attempts stays 1, because
   only the worker that takes the lock and finds neither an outcome nor a cancel marker
   records an attempt.

A paused job is the same case with the job frozen (SIGSTOP): the lock is held by the
paused worker the whole time, so however long the pause, a redelivery only parks.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from faultkit import (
    Broker,
    assert_one_outcome,
    intervals,
    main_records,
    probe_bundle,
    wait_running,
)
from helpers import LabqSystem, wait_until

pytestmark = pytest.mark.fault

BROKER_CONF = ["consumer_timeout = 5000"]
BROKER_TICK_MS = 1000
SYSTEM_WORKERS = 2
TIMED_OUT = "timed out waiting for delivery acknowledgement"


def job_frozen(job_id: str) -> bool:
    """True when the job has processes (found by LABQ_JOB_ID in their environment, which
    a root test can read whatever the job's uid) and every live one is stopped."""
    marker = f"LABQ_JOB_ID={job_id}".encode()
    states = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker not in environ.read_bytes().split(b"\0"):
                continue
            states.append((environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
    live = [s for s in states if s not in ("Z", "X")]
    return bool(live) and all(s in ("T", "t") for s in live)


def test_job_longer_than_consumer_timeout_runs_once(fault_system: LabqSystem,
                                                    broker_node: Broker,
                                                    fault_dir: Path) -> None:
    system = fault_system
    job = system.submit(probe_bundle(fault_dir, seconds=15, tag="long"))
    wait_running(fault_dir, job["id"])
    done = system.wait_done(job["id"], timeout=90)
    assert_one_outcome(system, fault_dir, done)
    assert done["attempts"] == 1, done
    assert len(intervals(fault_dir, job["id"])) == 1, intervals(fault_dir, job["id"])
    attempts_log = system.data_dir / "jobs" / job["id"] / "attempts.log"
    assert len(attempts_log.read_text().splitlines()) == 1
    # The test proves something only if the broker really took the delivery back.
    assert TIMED_OUT in broker_node.node.log_text(), "the consumer timeout never bit"


def test_paused_job_longer_than_consumer_timeout_runs_once(fault_system: LabqSystem,
                                                           broker_node: Broker,
                                                           fault_dir: Path) -> None:
    system = fault_system
    job = system.submit(probe_bundle(fault_dir, seconds=3, tag="paused"))
    wait_running(fault_dir, job["id"])
    system.wait_for_state(job["id"], "started", timeout=30)
    resp = system.set_state(job["id"], "paused")
    assert resp.status_code == 200, resp.text
    system.wait_for_state(job["id"], "paused", timeout=30)
    # "paused" follows the SIGSTOPs, which take effect a moment later: count once every
    # process of the job is really stopped, so no beat can follow.
    wait_until(lambda: job_frozen(job["id"]), timeout=15, message="the job's processes to stop")
    beats = len(main_records(fault_dir, job["id"]))
    time.sleep(12)  # more than twice the consumer timeout (+ tick)
    assert len(main_records(fault_dir, job["id"])) == beats, "a paused job kept running"
    assert system.job(job["id"])["state"] == "paused"
    resp = system.set_state(job["id"], "started")
    assert resp.status_code == 200, resp.text
    done = system.wait_done(job["id"], timeout=60)
    assert_one_outcome(system, fault_dir, done)
    assert done["attempts"] == 1, done
    assert len(intervals(fault_dir, job["id"])) == 1
    assert TIMED_OUT in broker_node.node.log_text()
