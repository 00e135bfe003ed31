"""The worker's delivery rules, without a broker: the real Worker on the in-memory fake
(tests/fakebroker.py, kept honest by tests/integration/test_broker_contract.py) with a
scripted runner in place of run_job. Every rule of consumer/delivery.py and of the
worker's connection handling: run once and ack after the outcome; duplicate; cancelled;
give up; undecodable; never two at once; put back on shutdown; a lost connection never
runs a job twice; a redelivery of a job running elsewhere waits; control reaches the job.
"""

from __future__ import annotations

import fcntl
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakebroker import FakeBroker
from helpers import wait_until

from labq.consumer.worker import Worker
from labq.process_unit.control import Control
from labq.shared.lifecycle import Action, Outcome, RunResult, State
from labq.shared.manifest import JobSpec
from labq.shared.messages import ControlMessage, JobMessage, LifecycleEvent
from labq.shared.outcome import OutcomeRecord
from labq.shared.settings import Settings
from labq.shared.storage import Storage, new_job_id
from labq.shared.topology import Topology


class ScriptedRunner:
    """Stands in for run_job: records its calls; a held run waits for release() or a
    stop/shutdown request, as a long script would."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self.hold = False
        self.release_event = threading.Event()
        self.controls: dict[str, Control] = {}
        self.crash = False
        self.lock = threading.Lock()

    def release(self) -> None:
        self.release_event.set()

    def __call__(self, job: JobMessage, settings: Settings, emit: Any, control: Control, *,
                 attempt: int, worker: str, storage: Storage, **_: Any) -> RunResult:
        with self.lock:
            self.calls.append(job.job_id)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.controls[job.job_id] = control
        try:
            if self.crash:
                raise RuntimeError("runner bug")
            emit("initialized")
            emit("started")
            while self.hold and not self.release_event.is_set():
                action = control.take(timeout=0.05)
                if action == Action.SHUTDOWN:
                    emit("queued")
                    return RunResult.QUEUED
                if action == Action.STOP:
                    return self._end(job, storage, emit, attempt, worker, Outcome.CANCELLED)
            return self._end(job, storage, emit, attempt, worker, Outcome.SUCCEEDED)
        finally:
            with self.lock:
                self.running -= 1

    @staticmethod
    def _end(job: JobMessage, storage: Storage, emit: Any, attempt: int, worker: str,
             outcome: Outcome) -> RunResult:
        storage.write_outcome(job.job_id, OutcomeRecord(
            state=State.STOPPED, outcome=outcome, exit_code=0, attempt=attempt, worker=worker))
        emit("stopped", outcome=str(outcome), exit_code=0)
        return RunResult.STOPPED


class Rig:
    """A worker on a fake broker, with a side channel to publish and to read queues."""

    def __init__(self, tmp: Path) -> None:
        self.broker = FakeBroker()
        self.settings = Settings(data_dir=tmp / "data", work_dir=tmp / "work", prefix="t",
                                 sandbox="off", max_attempts=2, shutdown_grace_s=30,
                                 status_interval_s=0.1, worker_name="w-test")
        self.storage = Storage(self.settings.data_dir).ensure()
        self.topology = Topology.from_settings(self.settings)
        self.conn = self.broker.connect()
        self.ch = self.conn.channel()
        self.topology.declare_all(self.ch)
        self.ch.queue_declare("events-seen")
        self.ch.queue_bind("events-seen", self.topology.events_exchange, "*.lifecycle")
        self.runner = ScriptedRunner()
        self.worker = Worker(self.settings, connect_fn=self.broker.connect, runner=self.runner)
        self.thread = threading.Thread(target=self.worker.serve_forever, daemon=True)

    def start(self) -> Rig:
        self.thread.start()
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        self.runner.release()
        self.worker.request_stop(grace_s)
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the worker did not stop"

    def job(self) -> JobMessage:
        return JobMessage(job_id=new_job_id(), name="proj", bundle_sha256="b" * 64,
                          spec=JobSpec("code.py"))

    def publish(self, body: bytes) -> None:
        self.ch.basic_publish(self.topology.jobs_exchange, "job", body)

    def jobs_waiting(self) -> int:
        return self.broker.message_count(self.topology.jobs_queue)

    def dead(self) -> int:
        return self.broker.message_count(self.topology.dead_queue)

    def unacked(self) -> int:
        with self.broker.lock:
            return sum(len(c.unacked) for conn in self.broker.connections for c in conn.channels)

    def settled(self) -> bool:
        return self.jobs_waiting() == 0 and self.unacked() == 0

    def events(self, job_id: str) -> list[LifecycleEvent]:
        found = [LifecycleEvent.decode(b) for b in self.broker.bodies("events-seen")]
        return [e for e in found if e.job_id == job_id]


@pytest.fixture()
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        if r.thread.is_alive():
            r.stop()


def test_a_job_runs_once_and_is_acked_after_its_outcome(rig: Rig) -> None:
    job = rig.job()
    rig.start().publish(job.encode())
    wait_until(lambda: rig.storage.read_outcome(job.job_id) is not None and rig.settled(),
               message="the job to run and be acked")
    assert rig.runner.calls == [job.job_id]
    states = [e.state for e in rig.events(job.job_id)]
    assert states == ["initialized", "started", "stopped"]
    seqs = [e.seq for e in rig.events(job.job_id)]
    assert seqs == sorted(seqs) and seqs[0] == 1001
    # Every event names the worker's machine, so the job's record says where it ran.
    assert {e.worker_host for e in rig.events(job.job_id)} == {socket.gethostname()}


def test_a_redelivery_of_a_finished_job_is_acked_without_running_it(rig: Rig) -> None:
    job = rig.job()
    rig.storage.job_dir(job.job_id).mkdir(parents=True)
    rig.storage.write_outcome(job.job_id, OutcomeRecord(
        state=State.STOPPED, outcome=Outcome.SUCCEEDED, exit_code=0, attempt=1, worker="old"))
    rig.start().publish(job.encode())
    wait_until(lambda: rig.settled() and rig.events(job.job_id), message="the duplicate")
    assert rig.runner.calls == []
    [final] = rig.events(job.job_id)
    assert (final.state, final.outcome, final.seq) == ("stopped", "succeeded", 1999)


def test_a_job_stopped_before_it_ran_is_cancelled_without_running(rig: Rig) -> None:
    job = rig.job()
    rig.storage.job_dir(job.job_id).mkdir(parents=True)
    rig.storage.mark_cancelled(job.job_id)
    rig.start().publish(job.encode())
    wait_until(lambda: rig.settled() and rig.storage.read_outcome(job.job_id),
               message="the cancellation")
    assert rig.runner.calls == [] and rig.dead() == 0
    assert rig.storage.read_outcome(job.job_id).outcome == Outcome.CANCELLED


def test_a_job_whose_workers_were_lost_too_often_is_dead_lettered(rig: Rig) -> None:
    job = rig.job()
    rig.storage.job_dir(job.job_id).mkdir(parents=True)
    for _ in range(2):  # two attempts that never ended: their workers died
        rig.storage.record_attempt(job.job_id, "gone")
    rig.start().publish(job.encode())
    wait_until(lambda: rig.dead() == 1, message="the dead letter")
    record = rig.storage.read_outcome(job.job_id)
    assert record.state == State.FAILED and "lost 2 times" in record.error
    assert rig.runner.calls == []


@pytest.mark.parametrize("body", [b"not json", b'{"kind": "job", "schema_version": 1}',
                                  JobMessage(job_id="../etc", name="x", bundle_sha256="b",
                                             spec=JobSpec("c.py")).encode()])
def test_an_undecodable_message_is_dead_lettered(rig: Rig, body: bytes) -> None:
    rig.start().publish(body)
    wait_until(lambda: rig.dead() == 1 and rig.settled(), message="the dead letter")
    assert rig.runner.calls == []


def test_never_two_jobs_at_once(rig: Rig) -> None:
    rig.runner.hold = True
    first, second = rig.job(), rig.job()
    rig.start().publish(first.encode())
    rig.publish(second.encode())
    wait_until(lambda: rig.runner.calls == [first.job_id], message="the first job")
    # While it runs the second stays on the queue (or unacked nowhere), never started.
    wait_until(lambda: rig.jobs_waiting() == 1, message="the second to wait")
    rig.runner.release()
    wait_until(lambda: len(rig.runner.calls) == 2 and rig.settled(), message="both jobs")
    assert rig.runner.most_at_once == 1


def test_a_stopping_worker_puts_a_long_job_back(rig: Rig) -> None:
    rig.runner.hold = True
    job = rig.job()
    rig.start().publish(job.encode())
    wait_until(lambda: rig.runner.calls, message="the job to start")
    rig.worker.request_stop(grace_s=0.1)
    rig.thread.join(timeout=30)
    assert not rig.thread.is_alive()
    assert rig.jobs_waiting() == 1  # back on the queue for another worker
    assert rig.storage.read_outcome(job.job_id) is None
    assert rig.storage.lost_attempts(job.job_id) == 0  # put back, not lost
    assert [e.state for e in rig.events(job.job_id)][-1] == "queued"


def test_a_lost_connection_mid_job_never_runs_it_twice(rig: Rig) -> None:
    rig.runner.hold = True
    job = rig.job()
    rig.start().publish(job.encode())
    wait_until(lambda: rig.runner.calls, message="the job to start")
    rig.broker.drop_connections()  # the broker requeues the unacked delivery
    rig.conn = rig.broker.connect()
    rig.ch = rig.conn.channel()
    generation = rig.worker.link.generation
    wait_until(lambda: rig.worker.link.generation > generation, timeout=30,
               message="the worker to reconnect")
    rig.runner.release()
    wait_until(lambda: rig.storage.read_outcome(job.job_id) is not None and rig.settled(),
               timeout=30, message="the redelivery to be acked as a duplicate")
    assert rig.runner.calls == [job.job_id]
    assert "stopped" in [e.state for e in rig.events(job.job_id)]


def test_a_redelivery_of_a_job_running_elsewhere_waits_for_it(rig: Rig) -> None:
    job = rig.job()
    rig.storage.job_dir(job.job_id).mkdir(parents=True)
    with open(rig.storage.lock_path(job.job_id), "a+b") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another worker's run of the same job
        rig.start().publish(job.encode())
        wait_until(lambda: rig.worker.parked is not None, message="the delivery to park")
        assert rig.runner.calls == [] and rig.unacked() == 1
    wait_until(lambda: rig.runner.calls == [job.job_id] and rig.settled(),
               message="the parked delivery to run once the lock is free")


def test_a_control_message_reaches_the_running_job(rig: Rig) -> None:
    rig.runner.hold = True
    job = rig.job()
    rig.start().publish(job.encode())
    wait_until(lambda: job.job_id in rig.runner.controls, message="the job to start")
    stop = ControlMessage(job_id=job.job_id, action="stop")
    wait_until(lambda: rig.worker.link.online() and rig.worker.current, message="binding")
    rig.ch.basic_publish(rig.topology.control_exchange, stop.routing_key, stop.encode())
    wait_until(lambda: rig.storage.read_outcome(job.job_id) is not None and rig.settled(),
               message="the stop")
    assert rig.storage.read_outcome(job.job_id).outcome == Outcome.CANCELLED


def test_a_runner_crash_still_gives_the_job_an_outcome(rig: Rig) -> None:
    rig.runner.crash = True
    job = rig.job()
    rig.start().publish(job.encode())
    wait_until(lambda: rig.storage.read_outcome(job.job_id) is not None and rig.settled(),
               message="the failed outcome")
    record = rig.storage.read_outcome(job.job_id)
    assert record.state == State.FAILED and "runner bug" in record.error
