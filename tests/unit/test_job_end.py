"""How the end of a job is handled: the job thread learns of the exit from the process
itself (no polling), the supervisor kills only its own process, and a finished job's
control key is unbound after the ack, never the running job's (issue 10, item 5)."""

from __future__ import annotations

import io
import sys
import threading
from pathlib import Path

import pytest
from fakebroker import FakeBroker
from helpers import wait_until

from labq.consumer.delivery import Delivery
from labq.consumer.link import BrokerLink
from labq.process_unit import proctree, runner
from labq.process_unit.control import Control
from labq.process_unit.sandbox import build_command
from labq.process_unit.supervisor import Supervisor, new_token
from labq.shared.lifecycle import Action
from labq.shared.manifest import JobSpec
from labq.shared.messages import JobMessage
from labq.shared.settings import Settings
from labq.shared.storage import Storage, new_job_id
from labq.shared.topology import Topology


@pytest.fixture(scope="module", autouse=True)
def _subreaper():
    proctree.become_subreaper()


def supervisor(tmp: Path, script: str) -> Supervisor:
    env = tmp / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(sys.executable)
    project = tmp / "ws" / "project"
    project.mkdir(parents=True)
    (project / "code.py").write_text(script)
    cmd = build_command(env_dir=env, project=project, workspace=tmp / "ws",
                        entrypoint="code.py", args=[], user_env={}, job_id="a" * 32,
                        attempt=1, token=new_token())
    log = open(tmp / "log.txt", "ab")  # noqa: SIM115 - closed by the test's tmp cleanup
    return Supervisor(cmd, log.fileno())


def test_interrupt_ends_a_waiting_take_without_a_request() -> None:
    control = Control()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(control.take(timeout=120)))
    waiter.start()
    control.interrupt()
    waiter.join(timeout=30)
    assert not waiter.is_alive() and got == [None]
    assert control.take() is None  # the interrupt was used up
    control.request(Action.PAUSE)
    control.interrupt()
    assert control.take() == Action.PAUSE  # a request still comes first


def test_the_supervisor_says_when_the_job_ended_without_being_polled(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "print('ok')\n")
    ended = threading.Event()
    sup.start(on_exit=ended.set)
    assert ended.wait(timeout=60), "on_exit was not called"  # nobody called poll()
    assert sup.exited.is_set() and sup.wait() == 0


def test_kill_main_kills_its_own_process_and_nothing_once_it_is_gone(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "import time\ntime.sleep(600)\n")
    sup.start()
    sup.kill_main()
    assert sup.wait() == -9
    sup.kill_main()  # reaped and its pidfd closed: no signal can reach another process


def test_supervising_returns_at_the_exit_not_at_the_next_sample(tmp_path: Path,
                                                               monkeypatch) -> None:
    """With samples an hour apart, a polling loop would sleep an hour after the exit."""
    monkeypatch.setattr(runner, "POLL_S", 3600.0)
    settings = Settings(data_dir=tmp_path / "data")
    job = JobMessage(job_id=new_job_id(), name="t", bundle_sha256="0" * 64,
                     spec=JobSpec("code.py"))
    control = Control()
    run = runner._Run(job, settings, Storage(settings.data_dir).ensure(),
                      lambda *a, **k: None, control, attempt=1, worker="w-test")
    sup = supervisor(tmp_path, "import time\ntime.sleep(0.5)\n")
    sup.start(on_exit=control.interrupt)
    run.next_sample = sup.started_at + 3600
    verdict: list[object] = []
    loop = threading.Thread(target=lambda: verdict.append(
        runner._supervise(run, sup, io.BytesIO())))
    loop.start()
    loop.join(timeout=60)
    assert not loop.is_alive() and verdict == ["exited"]
    assert sup.wait() == 0


def test_a_finished_jobs_control_key_is_unbound_later_and_never_the_running_one() -> None:
    broker = FakeBroker()
    topology = Topology("t")
    link = BrokerLink(topology, broker.connect)
    link.open(lambda *_: None)

    def delivery() -> Delivery:
        job = JobMessage(job_id=new_job_id(), name="p", bundle_sha256="b" * 64,
                         spec=JobSpec("code.py"))
        return Delivery(1, link.generation, job)

    def bound(key: str) -> bool:
        return bool(broker.route(topology.control_exchange, key))

    done, again = delivery(), delivery()
    link.bind_control(done)
    key = done.control_key
    link.release_control(done)
    assert done.control_key == "" and bound(key)  # no round trip at the ack
    again.job = done.job  # the same job delivered again, now running
    link.bind_control(again)
    link.unbind_released(keep=again.control_key)
    assert bound(key), "the running job's own key was unbound"
    link.unbind_control(again)
    other = delivery()
    link.bind_control(other)
    link.release_control(other)
    link.unbind_released()
    assert not bound(f"{other.job.job_id}.control")
    # A key released on an earlier channel died with its control queue: nothing to do.
    stale = delivery()
    link.bind_control(stale)
    link.release_control(stale)
    link.drop()
    link.open(lambda *_: None)
    link.unbind_released()
    wait_until(lambda: not bound(f"{stale.job.job_id}.control"), timeout=10,
               message="the old control queue's bindings to go with it")
