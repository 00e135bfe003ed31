"""Workers alone against the real broker: the backend's part is played by the test.

The test stores bundles, publishes ``JobMessage``s and reads the lifecycle events the
workers publish, so the worker's contract (docs/internals.md, "Worker") is checked
without a backend: duplicate delivery, cancel marker, poison job, undecodable message,
SIGTERM, two workers in parallel.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from helpers import RABBITMQ_URL, REPO, delete_topology, pid_alive, unique_prefix, wait_until

from labq.shared.manifest import JobSpec
from labq.shared.messages import JobMessage, decode_event
from labq.shared.storage import Storage, new_job_id, sha256_of
from labq.shared.topology import PERSISTENT, Topology

pytestmark = pytest.mark.integration


class Workers:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.prefix = unique_prefix()
        self.data = tmp / "data"
        self.storage = Storage(self.data).ensure()
        self.topology = Topology(self.prefix)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.events: list = []
        self.conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        self.ch = self.conn.channel()
        self.topology.declare_all(self.ch)
        self.ch.confirm_delivery()

    def wname(self, name: str) -> str:
        """The worker's real name: unique on a broker other test runs share."""
        return f"{self.prefix}-{name}"

    def start(self, name: str, **env: str) -> subprocess.Popen[bytes]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("LABQ_")}
        environ.update({"LABQ_RABBITMQ_URL": RABBITMQ_URL, "LABQ_DATA_DIR": str(self.data),
                        "LABQ_PREFIX": self.prefix, "LABQ_WORKER_NAME": self.wname(name),
                        "LABQ_STOP_GRACE_S": "1", "LABQ_SHUTDOWN_GRACE_S": "2",
                        "LABQ_UV_OFFLINE": "1",
                        # These jobs play a worker's faults (kill their worker, leave pid
                        # files on the host), which the job sandbox rightly forbids; the
                        # sandbox has its own tests (test_sandbox.py).
                        "LABQ_SANDBOX": "off", **env})
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "labq.client.cli", "worker"], cwd=REPO,
                                env=environ, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in self.tmp.glob("*.log"))

    def job(self, files: dict[str, str], **fields) -> JobMessage:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, text in files.items():
                zf.writestr(f"proj/{name}", text)
        staged = self.storage.tmp / f"{new_job_id()}.zip"
        staged.write_bytes(buf.getvalue())
        sha = sha256_of(staged)
        self.storage.store_bundle(staged, sha)
        return JobMessage(job_id=new_job_id(), name="proj", bundle_sha256=sha,
                          spec=JobSpec("code.py", **fields))

    def publish(self, body: bytes) -> None:
        self.ch.basic_publish(self.topology.jobs_exchange, "job", body,
                              pika.BasicProperties(delivery_mode=PERSISTENT), mandatory=True)

    def pump(self) -> list:
        while True:
            method, _props, body = self.ch.basic_get(self.topology.events_queue, auto_ack=True)
            if method is None:
                return self.events
            self.events.append(decode_event(body))

    def states(self, job_id: str) -> list[str]:
        return [e.state for e in self.pump() if e.job_id == job_id]

    def wait_final(self, job_id: str, timeout: float = 60) -> object:
        def final():
            return next((e for e in self.pump() if e.job_id == job_id
                         and e.state in ("stopped", "failed")), None)
        try:
            return wait_until(final, timeout=timeout, message=f"job {job_id} to end")
        except AssertionError:
            raise AssertionError(self.logs()) from None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.conn.close()
        delete_topology(self.prefix)


@pytest.fixture()
def workers(broker, tmp_path) -> Iterator[Workers]:
    w = Workers(tmp_path)
    try:
        yield w
    finally:
        w.close()


def test_a_job_runs_and_a_duplicate_delivery_runs_once(workers):
    workers.start("w1")
    job = workers.job({"code.py": "import pathlib\npathlib.Path('output').mkdir(exist_ok=True)\n"
                                  "pathlib.Path('output/x').write_text('hi')\nprint('RUN')\n"})
    workers.publish(job.encode())
    workers.publish(job.encode())
    final = workers.wait_final(job.job_id)
    assert final.outcome == "succeeded" and final.worker == workers.wname("w1")
    time.sleep(1.5)  # let the duplicate come through
    workers.pump()
    states = workers.states(job.job_id)
    assert states[:4] == ["initialized", "started", "completed", "stopped"]
    assert states.count("started") == 1 and states.count("stopped") == 2
    seqs = [e.seq for e in workers.events if e.job_id == job.job_id]
    assert seqs[:4] == sorted(seqs[:4])
    log = workers.storage.log_path(job.job_id).read_text()
    assert log.count("RUN") == 1
    assert log.count(f"=== labq: attempt 1 on {workers.wname('w1')} ===") == 1
    assert (workers.storage.results_dir(job.job_id) / "x").read_text() == "hi"
    q = workers.ch.queue_declare(workers.topology.jobs_queue, passive=True)
    assert q.method.message_count == 0


def test_cancel_marker_poison_and_undecodable(workers):
    cancelled = workers.job({"code.py": "print('MUST NOT RUN')\n"})
    workers.storage.job_dir(cancelled.job_id).mkdir(parents=True)
    workers.storage.mark_cancelled(cancelled.job_id)
    poison = workers.job({"code.py": "print('MUST NOT RUN')\n"})
    for _ in range(3):
        workers.storage.record_attempt(poison.job_id, "gone")
    workers.publish(b"not json at all")
    workers.publish(cancelled.encode())
    workers.publish(poison.encode())
    workers.start("w1")
    first = workers.wait_final(cancelled.job_id)
    assert (first.state, first.outcome) == ("stopped", "cancelled")
    second = workers.wait_final(poison.job_id)
    assert (second.state, second.outcome) == ("failed", "failed")
    assert "lost 3 times" in second.error
    for job in (cancelled, poison):
        assert "MUST NOT RUN" not in (workers.storage.job_dir(job.job_id) / "log.txt").read_text(
        ) if (workers.storage.job_dir(job.job_id) / "log.txt").exists() else True
    dead = wait_until(lambda: workers.ch.queue_declare(workers.topology.dead_queue, passive=True)
                      .method.message_count == 2, timeout=10, message="2 dead letters")
    assert dead


def test_sigterm_puts_a_long_job_back_and_exits_zero(workers):
    proc = workers.start("w1")
    job = workers.job({"code.py": "import time\nprint('go', flush=True)\ntime.sleep(60)\n"})
    workers.publish(job.encode())
    wait_until(lambda: "started" in workers.states(job.job_id), timeout=30, message="started")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert workers.states(job.job_id)[-1] == "queued"
    q = workers.ch.queue_declare(workers.topology.jobs_queue, passive=True)
    assert q.method.message_count == 1
    assert workers.storage.lost_attempts(job.job_id) == 0
    # Another worker takes it: attempt 2.
    workers.start("w2", LABQ_SHUTDOWN_GRACE_S="0")
    wait_until(lambda: any(e.job_id == job.job_id and e.attempt == 2 and e.state == "started"
                           for e in workers.pump()), timeout=30, message="attempt 2")


def test_two_workers_run_two_jobs_at_once_each_one_at_a_time(workers):
    workers.start("w1")
    workers.start("w2")
    script = ("import time, json, pathlib\nstart = time.time()\ntime.sleep(1.5)\n"
              "pathlib.Path('output').mkdir(exist_ok=True)\n"
              "pathlib.Path('output/t.json').write_text(json.dumps([start, time.time()]))\n")
    jobs = [workers.job({"code.py": script}) for _ in range(4)]
    for job in jobs:
        workers.publish(job.encode())
    finals = {job.job_id: workers.wait_final(job.job_id) for job in jobs}
    spans = {}
    for job in jobs:
        spans[job.job_id] = (finals[job.job_id].worker, json.loads(
            (workers.storage.results_dir(job.job_id) / "t.json").read_text()))
    by_worker: dict[str, list] = {}
    for worker, span in spans.values():
        by_worker.setdefault(worker, []).append(span)
    assert set(by_worker) == {workers.wname("w1"), workers.wname("w2")}
    for worker_spans in by_worker.values():
        worker_spans.sort()
        for a, b in zip(worker_spans, worker_spans[1:], strict=False):
            assert a[1] <= b[0], "one worker ran two jobs at once"
    a, b = by_worker[workers.wname("w1")][0], by_worker[workers.wname("w2")][0]
    assert a[0] < b[1] and b[0] < a[1], "the two workers did not overlap"


GRANDCHILD = """
import os, time, pathlib
pathlib.Path('output').mkdir(exist_ok=True)
attempt = os.environ['LABQ_ATTEMPT']
if attempt == '1':
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            pathlib.Path('/TMPDIR/grandchild.pid').write_text(str(os.getpid()))
            while True:
                time.sleep(0.1)
        os._exit(0)
    pathlib.Path('/TMPDIR/main.pid').write_text(str(os.getpid()))
    time.sleep(60)
print('finished attempt', attempt)
"""




def test_sigkilled_worker_takes_its_job_tree_down_and_the_job_is_retried(workers, tmp_path):
    victim = workers.start("w1")
    job = workers.job({"code.py": GRANDCHILD.replace("/TMPDIR", str(tmp_path))})
    workers.publish(job.encode())
    grand = tmp_path / "grandchild.pid"
    wait_until(lambda: grand.exists() and grand.read_text() and (tmp_path / "main.pid").exists(),
               timeout=30, message="job processes")
    main_pid = int((tmp_path / "main.pid").read_text())
    grandchild = int(grand.read_text())
    victim.kill()
    victim.wait()
    # PR_SET_PDEATHSIG: the job's main process dies with its worker at once.
    wait_until(lambda: not pid_alive(main_pid), timeout=5, message="job main process to die")
    # The next worker sweeps the orphaned grandchild and runs the job again (attempt 2).
    workers.start("w2")
    wait_until(lambda: not pid_alive(grandchild), timeout=15, message="orphan to be swept")
    final = workers.wait_final(job.job_id)
    assert (final.outcome, final.attempt) == ("succeeded", 2)
    assert final.worker == workers.wname("w2")
    assert workers.storage.attempts(job.job_id) == 2


def _close_connection(worker: str) -> bool:
    """Have the broker close one worker's connection (as on a consumer timeout)."""
    try:
        out = subprocess.run(["rabbitmqctl", "list_connections", "pid", "client_properties",
                              "-q", "--no-table-headers"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    for line in out.splitlines():
        if f'"connection_name","labq-worker {worker}"' in line:
            pid = line.split("\t")[0]
            done = subprocess.run(["rabbitmqctl", "close_connection", pid, "test"],
                                  capture_output=True, timeout=30, check=False)
            return done.returncode == 0
    return False


def test_connection_loss_mid_job_never_runs_it_twice(workers):
    """w1's connection dies mid-job: the broker redelivers to w2, which parks until w1
    finishes; w1 never acks its stale tag; w2 then acks the duplicate. One run."""
    workers.start("w1")
    job = workers.job({"code.py": "import time\nprint('RUN', flush=True)\ntime.sleep(4)\n"})
    workers.publish(job.encode())
    wait_until(lambda: "started" in workers.states(job.job_id), timeout=30, message="started")
    workers.start("w2")
    time.sleep(1.0)
    if not _close_connection(workers.wname("w1")):
        why = "rabbitmqctl cannot close connections here (it needs root and a local broker)"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI runs as root beside its broker: this must not pass unseen
        pytest.skip(why)
    final = workers.wait_final(job.job_id)
    assert final.outcome == "succeeded" and final.worker == workers.wname("w1")
    log = workers.storage.log_path(job.job_id).read_text()
    assert log.count("RUN") == 1
    wait_until(lambda: workers.ch.queue_declare(workers.topology.jobs_queue, passive=True)
               .method.message_count == 0, timeout=10, message="queue empty")
    time.sleep(2.5)  # w2's parked redelivery becomes a duplicate ack
    assert workers.storage.log_path(job.job_id).read_text().count("RUN") == 1
    q = workers.ch.queue_declare(workers.topology.jobs_queue, passive=True)
    assert q.method.message_count == 0 and q.method.consumer_count == 2
    logs = workers.logs()
    assert "parking" in logs and "dead channel" in logs


def test_a_job_that_kills_its_worker_every_time_ends_failed(workers):
    job = workers.job({"code.py": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"})
    workers.publish(job.encode())
    for i in range(3):  # max_attempts=2: two lost attempts, then a worker gives up on it
        proc = workers.start(f"w{i}", LABQ_MAX_ATTEMPTS="2")
        if i < 2:
            assert proc.wait(timeout=30) == -9
    final = workers.wait_final(job.job_id)
    assert (final.state, final.outcome) == ("failed", "failed")
    assert "lost 2 times" in final.error
    assert workers.storage.attempts(job.job_id) == 2
    wait_until(lambda: workers.ch.queue_declare(workers.topology.dead_queue, passive=True)
               .method.message_count == 1, timeout=10, message="the poison job dead-lettered")


def test_a_worker_waits_for_the_broker_and_stops_cleanly(workers):
    proc = workers.start("w1", LABQ_RABBITMQ_URL="amqp://guest:guest@127.0.0.1:1/%2F")
    time.sleep(2.0)
    assert proc.poll() is None, "the worker gave up instead of retrying with backoff"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert "broker unreachable" in workers.logs()
