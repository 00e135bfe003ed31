"""Workers alone against the real broker: the backend's part is played by the test.

The test stores bundles, publishes ``JobMessage``s and reads the lifecycle events the
workers publish: a job through a real worker process, two workers in parallel each one
job at a time, a connection the broker closes mid-job, a worker waiting for its broker.
The delivery rules one by one are unit tests (tests/unit/test_worker_rules.py, on the
fake broker); SIGKILL, SIGTERM, poison, undecodable and duplicate deliveries end to end,
with the backend, are tests/fault/test_worker_faults.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from helpers import RABBITMQ_URL, REPO, delete_topology, unique_prefix, wait_until

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


def test_a_job_runs_through_a_real_worker_process(workers):
    workers.start("w1")
    job = workers.job({"code.py": "import pathlib\npathlib.Path('output').mkdir(exist_ok=True)\n"
                                  "pathlib.Path('output/x').write_text('hi')\nprint('RUN')\n"})
    workers.publish(job.encode())
    final = workers.wait_final(job.job_id)
    assert final.outcome == "succeeded" and final.worker == workers.wname("w1")
    states = workers.states(job.job_id)
    assert states == ["initialized", "started", "completed", "stopped"]
    seqs = [e.seq for e in workers.events if e.job_id == job.job_id]
    assert seqs[:4] == sorted(seqs[:4])
    log = workers.storage.log_path(job.job_id).read_text()
    assert log.count("RUN") == 1
    assert log.count(f"=== labq: attempt 1 on {workers.wname('w1')} ===") == 1
    assert (workers.storage.results_dir(job.job_id) / "x").read_text() == "hi"
    q = workers.ch.queue_declare(workers.topology.jobs_queue, passive=True)
    assert q.method.message_count == 0


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
    wait_until(lambda: workers.ch.queue_declare(workers.topology.jobs_queue, passive=True)
               .method.consumer_count == 1, timeout=30, message="w2 to consume")
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
    # w2's parked redelivery becomes a duplicate ack.
    wait_until(lambda: "already has an outcome" in workers.logs(), timeout=30,
               message="w2 to ack the redelivery as a duplicate")
    assert workers.storage.log_path(job.job_id).read_text().count("RUN") == 1
    q = workers.ch.queue_declare(workers.topology.jobs_queue, passive=True)
    assert q.method.message_count == 0 and q.method.consumer_count == 2
    logs = workers.logs()
    assert "parking" in logs and "dead channel" in logs


def test_a_worker_waits_for_the_broker_and_stops_cleanly(workers):
    proc = workers.start("w1", LABQ_RABBITMQ_URL="amqp://guest:guest@127.0.0.1:1/%2F")
    wait_until(lambda: workers.logs().count("broker unreachable") >= 2, timeout=30,
               message="the worker to retry")
    assert proc.poll() is None, "the worker gave up instead of retrying with backoff"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
