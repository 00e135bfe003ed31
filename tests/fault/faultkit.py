"""Helpers of the fault-injection suite: a throwaway RabbitMQ node, probe jobs that
record every run, and the checks every fault test makes (one outcome, no overlap).

Probe jobs get ``FAULT_DIR`` (a folder the test owns) through the manifest's ``[env]``
and append JSON lines to ``<FAULT_DIR>/<job id>.runs``: ``start`` and ``end`` records
and a ``beat`` every 0.1 s while they run, each with the pid, the attempt
(``LABQ_ATTEMPT``) and the time. A run is the set of records of one pid; two runs of
the same job overlap when their [first record, last record] intervals intersect.
A run killed with its worker simply stops beating, so its interval still ends at its
last sign of life: the check needs nothing from the run itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pika
from helpers import LabqSystem, make_zip, wait_until

from labq.shared.manifest import JobSpec
from labq.shared.messages import JobMessage
from labq.shared.topology import JOB_ROUTING_KEY, PERSISTENT, Topology

HERE = Path(__file__).resolve().parent
#: The kit's script (shared by the team) or the copy next to this file (for CI).
KIT_SCRIPT = Path("/work/shared/kit/throwaway-rabbitmq")
LOCAL_SCRIPT = HERE / "throwaway-rabbitmq"


# -- the throwaway broker ---------------------------------------------------------------
def rabbitmq_installed() -> bool:
    return any(
        shutil.which(name) or Path(f"/usr/sbin/{name}").exists()
        for name in ("rabbitmq-server",)
    )


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port() -> int:
    """A port in 5800-5899 whose AMQP and distribution ports (+20000) are free and whose
    node folder nobody else is using (other sessions start throwaway nodes too)."""
    candidates = list(range(5800, 5900))
    random.shuffle(candidates)
    tmp = os.environ.get("TMPDIR", "/tmp")
    for port in candidates:
        if (_port_free(port) and _port_free(port + 20000)
                and not Path(tmp, f"labq-rabbit-{port}").exists()):
            return port
    raise RuntimeError("no free port in 5800-5899 for a throwaway RabbitMQ node")


class ThrowawayBroker:
    """One RabbitMQ node of our own: ``down()``/``up()`` stop and start the broker
    application (the Erlang node stays), ``stop()`` removes everything."""

    def __init__(self, conf: Iterable[str] = (), tick_interval_ms: int | None = None) -> None:
        self.script = str(KIT_SCRIPT if KIT_SCRIPT.exists() else LOCAL_SCRIPT)
        self.conf = list(conf)
        self.tick_interval_ms = tick_interval_ms
        self.port = pick_port()
        self.node = f"labq{self.port}@localhost"
        self.dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"labq-rabbit-{self.port}"
        self.url = ""
        self.is_up = False
        self.env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}

    def _run(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run(
            [self.script, *args], env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(f"throwaway-rabbitmq {' '.join(args)} failed: "
                               f"{out.stdout}\n{out.stderr}")
        return out.stdout.strip()

    def start(self) -> ThrowawayBroker:
        try:
            self.url = self._run("start", str(self.port), *self.conf).splitlines()[-1]
        except (RuntimeError, subprocess.TimeoutExpired):
            # The kit waits only 1 s before `await_startup`, which fails at once when
            # the node has not registered yet (a busy machine): wait for it ourselves,
            # and never leave a half-started node behind.
            if not self._await_startup(90):
                self.stop()
                raise
            self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.is_up = True
        if self.tick_interval_ms:
            # RabbitMQ 3.x checks the consumer timeout on a channel "tick", every
            # 60 s by default: a 5 s consumer_timeout would bite only after a minute.
            # Each channel reads the interval when it arms its timer, so setting it
            # before labq connects makes the timeout bite within a second of expiry.
            subprocess.run(
                ["rabbitmqctl", "-n", self.node, "eval",
                 f"application:set_env(rabbit, channel_tick_interval, {self.tick_interval_ms})."],
                env=self.env, check=True, capture_output=True, timeout=60,
            )
        return self

    def _await_startup(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = subprocess.run(
                ["rabbitmqctl", "-n", self.node, "await_startup", "--timeout", "30"],
                env=self.env, capture_output=True, timeout=60,
            )
            if done.returncode == 0:
                return True
            time.sleep(1)
        return False

    def down(self) -> None:
        self._run("stop_app", str(self.port))
        self.is_up = False

    def up(self) -> None:
        self._run("start_app", str(self.port))
        self.is_up = True

    def stop(self) -> None:
        self._run("stop", str(self.port))
        self.is_up = False

    def log_text(self) -> str:
        texts = []
        for path in sorted((self.dir / "log").glob("*.log")):
            texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)


#: Settings every fault system uses: quick shutdown and a small poison bound.
FAULT_ENV = {
    "LABQ_SHUTDOWN_GRACE_S": "2",
    "LABQ_MAX_ATTEMPTS": "2",
    # These tests watch their probe jobs through a host folder (heartbeats, run counts
    # across attempts), which the job sandbox rightly hides from jobs: the sandbox is
    # tested by tests/integration/test_sandbox.py and every other integration test.
    "LABQ_SANDBOX": "off",
}


class Broker:
    """What the ``broker_node`` fixture yields: the URL and the fault switches."""

    def __init__(self, node: ThrowawayBroker) -> None:
        self.node = node
        self.url = node.url

    def broker_down(self) -> None:
        self.node.down()

    def broker_up(self) -> None:
        self.node.up()


# -- probe jobs -------------------------------------------------------------------------
PROBE = r'''
import json, os, subprocess, sys, time

RUNS = os.path.join(os.environ["FAULT_DIR"], os.environ["LABQ_JOB_ID"] + ".runs")
ATTEMPT = os.environ.get("LABQ_ATTEMPT", "?")
SECONDS = float(os.environ.get("FAULT_SECONDS", "0"))


def record(kind, **extra):
    line = json.dumps({"kind": kind, "pid": os.getpid(), "attempt": ATTEMPT,
                       "t": time.time(), **extra})
    with open(RUNS, "a") as handle:
        handle.write(line + "\n")


if len(sys.argv) > 1 and sys.argv[1] == "child":
    # A grandchild of the worker that keeps writing: it must die with the job's tree.
    while True:
        record("child-beat")
        time.sleep(0.1)

child = None
if os.environ.get("FAULT_CHILD") == "1":
    child = subprocess.Popen([sys.executable, __file__, "child"])
    record("child", child_pid=child.pid)

if os.environ.get("FAULT_KILL_WORKER") == "1":
    # Poison: SIGKILL the labq worker that runs us (an ancestor process).
    pid = os.getppid()
    while pid > 1:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmd = handle.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        if b"labq.client.cli" in cmd and b"worker" in cmd:
            record("kill-worker", worker_pid=pid)
            os.kill(pid, 9)
            break
        pid = ppid
    time.sleep(30)

record("start")
began = time.time()
while time.time() - began < SECONDS:
    record("beat")
    time.sleep(0.1)
os.makedirs("output", exist_ok=True)
with open(os.path.join("output", "result.txt"), "w") as handle:
    handle.write(f"done by pid {os.getpid()} attempt {ATTEMPT}\n")
if child is not None:
    child.kill()
    child.wait()
record("end")
print("probe done", os.getpid(), ATTEMPT, flush=True)
'''


def probe_bundle(fault_dir: Path, seconds: float = 0.0, child: bool = False,
                 kill_worker: bool = False, tag: str = "") -> bytes:
    """A probe job's zip. ``tag`` makes the bytes (so the stored bundle) unique."""
    env = {"FAULT_DIR": str(fault_dir), "FAULT_SECONDS": str(seconds)}
    if child:
        env["FAULT_CHILD"] = "1"
    if kill_worker:
        env["FAULT_KILL_WORKER"] = "1"
    manifest = "[env]\n" + "".join(f'{k} = "{v}"\n' for k, v in env.items())
    return make_zip({"code.py": PROBE + f"\n# {tag}\n", "labq.toml": manifest})


def runs(fault_dir: Path, job_id: str) -> list[dict[str, Any]]:
    path = fault_dir / f"{job_id}.runs"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a SIGKILL mid-write
    return out


def main_records(fault_dir: Path, job_id: str) -> list[dict[str, Any]]:
    return [r for r in runs(fault_dir, job_id) if not r["kind"].startswith("child")]


def intervals(fault_dir: Path, job_id: str) -> list[tuple[float, float, int, str]]:
    """One (first, last, pid, attempt) per run of the job's main process."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for rec in main_records(fault_dir, job_id):
        by_pid.setdefault(rec["pid"], []).append(rec)
    return sorted(
        (min(r["t"] for r in recs), max(r["t"] for r in recs), pid, str(recs[0]["attempt"]))
        for pid, recs in by_pid.items()
    )


def assert_never_concurrent(fault_dir: Path, job_id: str) -> None:
    spans = intervals(fault_dir, job_id)
    for (s1, e1, p1, a1), (s2, e2, p2, a2) in zip(spans, spans[1:], strict=False):
        assert s2 > e1, (
            f"job {job_id} ran twice at once: pid {p1} (attempt {a1}) {s1:.2f}-{e1:.2f} and "
            f"pid {p2} (attempt {a2}) {s2:.2f}-{e2:.2f}"
        )


def ends(fault_dir: Path, job_id: str) -> list[dict[str, Any]]:
    return [r for r in runs(fault_dir, job_id) if r["kind"] == "end"]


def wait_running(fault_dir: Path, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the job's probe is beating; return its latest record."""
    def beating() -> dict[str, Any] | None:
        recs = [r for r in main_records(fault_dir, job_id) if r["kind"] in ("beat", "start")]
        return recs[-1] if recs else None

    return wait_until(beating, timeout=timeout, interval=0.1,
                      message=f"job {job_id} to start running")


def assert_one_outcome(system: LabqSystem, fault_dir: Path, job: dict[str, Any],
                       outcome: str = "succeeded") -> None:
    """Final state, outcome, exactly one run that ended, never two at once."""
    job_id = job["id"]
    assert job["state"] == "stopped", job
    assert job["outcome"] == outcome, job
    assert_never_concurrent(fault_dir, job_id)
    if outcome == "succeeded":
        assert len(ends(fault_dir, job_id)) == 1, runs(fault_dir, job_id)
        assert job["exit_code"] == 0, job
        outcome_file = system.data_dir / "jobs" / job_id / "outcome.json"
        record = json.loads(outcome_file.read_text())
        assert record["outcome"] == "succeeded", record


# -- processes --------------------------------------------------------------------------


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def worker_running(system: LabqSystem, pid: int) -> subprocess.Popen[bytes]:
    """The worker process (of ``system.workers``) that is an ancestor of ``pid``."""
    mine = {w.pid: w for w in system.workers}
    seen = pid
    while seen > 1:
        if seen in mine:
            return mine[seen]
        seen = parent_of(seen)
    raise AssertionError(f"pid {pid} is not below any worker of the system")


def live_workers(system: LabqSystem) -> list[subprocess.Popen[bytes]]:
    return [w for w in system.workers if w.poll() is None]


def ensure_workers(system: LabqSystem, count: int) -> None:
    while len(live_workers(system)) < count:
        system.start_worker()


def kill(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    proc.send_signal(sig)


# -- broker side ------------------------------------------------------------------------
def channel(system: LabqSystem) -> tuple[pika.BlockingConnection, Any]:
    params = pika.URLParameters(system.env["LABQ_RABBITMQ_URL"])
    params.connection_attempts = 5
    params.retry_delay = 1
    conn = pika.BlockingConnection(params)
    return conn, conn.channel()


def publish_job_raw(system: LabqSystem, body: bytes) -> None:
    conn, ch = channel(system)
    try:
        topo = Topology(system.prefix)
        ch.confirm_delivery()
        ch.basic_publish(topo.jobs_exchange, JOB_ROUTING_KEY, body,
                         pika.BasicProperties(delivery_mode=PERSISTENT), mandatory=True)
    finally:
        conn.close()


def job_message(job: dict[str, Any], bundle: bytes) -> JobMessage:
    return JobMessage(
        job_id=job["id"], name=job.get("name") or "proj",
        bundle_sha256=hashlib.sha256(bundle).hexdigest(), spec=JobSpec("code.py"),
    )


def drain_dead_letters(system: LabqSystem) -> list[bytes]:
    """Every message now in ``<prefix>.jobs.dead`` (taken off the queue)."""
    conn, ch = channel(system)
    bodies = []
    try:
        topo = Topology(system.prefix)
        while True:
            method, _props, body = ch.basic_get(topo.dead_queue, auto_ack=True)
            if method is None:
                break
            bodies.append(body)
    finally:
        conn.close()
    return bodies


def queue_depth(system: LabqSystem, queue: str) -> int:
    conn, ch = channel(system)
    try:
        return ch.queue_declare(queue, passive=True).method.message_count
    finally:
        conn.close()


def sleep_until(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
