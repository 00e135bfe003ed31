"""A labq of its own for one benchmark: the backend and N workers as separate processes.

Started the way a lab runs labq (``labq backend`` and ``labq worker``, authentication on:
the backend writes its admin token to ``$LABQ_DATA_DIR/admin-token`` on first start), on
the broker at ``LABQ_RABBITMQ_URL`` (default the local one), with a fresh data dir, work
dir and a unique queue prefix, all removed by :meth:`Stack.close`. Workers can be added
and stopped while the backend runs (the scale-out run changes their number). Completions
are followed on one ``/api/v1/events`` stream, not by polling every job. Nothing here
comes from ``tests/``: a benchmark stands on labq alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pika
import requests

from labq.client.sse import iter_sse
from labq.shared.topology import Topology

REPO = Path(__file__).resolve().parent.parent
RABBITMQ_URL = os.environ.get("LABQ_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
TERMINAL = ("stopped", "failed")


def bundle(files: dict[str, str], root: str = "bench") -> bytes:
    """A bundle zip in memory: ``files`` maps paths under ``root/`` to their text."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(f"{root}/{name}", text)
    return buf.getvalue()


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))]


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """CPU time of ``pid`` (user + system, with its reaped children's), and with
    ``tree`` of every live descendant too (gunicorn's workers under its master)."""
    pids = [pid]
    if tree:
        children: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and (fields := _stat(int(name))):
                children.setdefault(int(fields[1]), []).append(int(name))
        todo = [pid]
        while todo:
            kids = children.get(todo.pop(), [])
            pids += kids
            todo += kids
    total = 0
    for one in pids:
        fields = _stat(one)
        if fields:
            total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return total / TICKS


def broker_pid() -> int | None:
    """The local RabbitMQ node's process (beam.smp), if it runs on this machine."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path(f"/proc/{name}/comm").read_text().strip() == "beam.smp":
                    return int(name)
            except OSError:
                continue
    return None


class CpuMeter:
    """CPU seconds used by each part of a Stack (its workers with their jobs, the
    backend, the local broker) between :meth:`start` and :meth:`stop`."""

    def __init__(self, stack: Stack) -> None:
        self.parts: dict[str, tuple[int, bool]] = {
            f"worker {i + 1} (with its jobs)": (w.pid, False)
            for i, w in enumerate(stack.workers)}
        if stack.backend is not None:
            self.parts["backend"] = (stack.backend.pid, True)
        if (broker := broker_pid()) is not None:
            self.parts["broker (all of its work)"] = (broker, False)
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._start = {k: cpu_seconds(pid, tree) for k, (pid, tree) in self.parts.items()}

    def stop(self) -> dict[str, float]:
        self.used = {k: cpu_seconds(pid, tree) - self._start[k]
                     for k, (pid, tree) in self.parts.items()}
        return self.used


def time_budget(seconds: float) -> None:
    """Bound a whole benchmark: past ``seconds`` a TimeoutError is raised wherever it
    is (the Stack's ``with`` block then still tears labq down)."""

    def expired(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"the benchmark ran past its budget of {seconds:.0f} s")

    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Events:
    """One ``/api/v1/events`` stream in a thread: when each job reached each state, as
    this client saw it (``time.monotonic()``). A stream the server ends is opened
    again from the last event id, so nothing is missed."""

    def __init__(self, url: str, token: str) -> None:
        self.seen: dict[str, dict[str, float]] = {}
        self.cond = threading.Condition()
        self.reconnects = 0
        self._url = url
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        self._last_id: str | None = None
        self._closed = False
        self._resp = self._open()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _open(self) -> requests.Response:
        headers = dict(self._headers)
        if self._last_id is not None:
            headers["Last-Event-ID"] = self._last_id
        resp = requests.get(f"{self._url}/api/v1/events", stream=True, timeout=(5, 120),
                            headers=headers)
        resp.raise_for_status()
        return resp

    def _read(self) -> None:
        while not self._closed:
            # It broke, the server ended it, or close() closed it.
            with contextlib.suppress(requests.RequestException, OSError, ValueError,
                                     AttributeError):
                self._consume(self._resp)
            if self._closed:
                return
            time.sleep(0.05)
            self.reconnects += 1
            try:
                self._resp = self._open()
            except requests.RequestException:
                continue  # the backend is away for a moment: waiters time out if it stays

    def _consume(self, resp: requests.Response) -> None:
        for event, data, last_id in iter_sse(resp):
            now = time.monotonic()
            if last_id is not None:
                self._last_id = last_id
            if event != "lifecycle":  # status ticks say "started" too, but later
                continue
            try:
                payload = json.loads(data)
            except ValueError:
                continue
            if not isinstance(payload, dict):
                continue
            job_id, state = payload.get("job_id") or payload.get("id"), payload.get("state")
            if not isinstance(job_id, str) or not isinstance(state, str):
                continue
            with self.cond:
                self.seen.setdefault(job_id, {}).setdefault(state, now)
                self.cond.notify_all()

    def when(self, job_id: str, state: str) -> float | None:
        with self.cond:
            return self.seen.get(job_id, {}).get(state)

    def wait_ended(self, job_ids: list[str], timeout: float) -> dict[str, float]:
        """When each job ended; raises TimeoutError naming how many did not."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                ends = {j: self._end(j) for j in job_ids}
                if all(ends.values()):
                    return ends  # type: ignore[return-value]
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sum(1 for v in ends.values() if not v)
                    raise TimeoutError(f"{missing} of {len(job_ids)} jobs did not end within "
                                       f"{timeout:.0f} s")
                self.cond.wait(left)

    def _end(self, job_id: str) -> float | None:
        states = self.seen.get(job_id, {})
        return next((states[s] for s in TERMINAL if s in states), None)

    def close(self) -> None:
        self._closed = True
        self._resp.close()


class Stack:
    """The backend and workers of one benchmark run (use as a context manager)."""

    def __init__(self, name: str, env: dict[str, str] | None = None) -> None:
        self.prefix = f"b{name[:6]}{uuid.uuid4().hex[:8]}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"labq-bench-{name}-"))
        # Job uids inside bwrap must reach the work dir: /var/tmp, open to all (0711).
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"labq-work-{self.prefix}-",
                                              dir="/var/tmp"))
        os.chmod(self.work_dir, 0o711)
        self.data_dir = self.tmp / "data"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LABQ_")},
            "LABQ_RABBITMQ_URL": RABBITMQ_URL,
            "LABQ_DATA_DIR": str(self.data_dir),
            "LABQ_WORK_DIR": str(self.work_dir),
            "LABQ_PREFIX": self.prefix,
            "LABQ_PORT": str(self.port),
            "LABQ_URL": self.url,
            "LABQ_LOG_LEVEL": "WARNING",
            "LABQ_UV_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "XDG_CONFIG_HOME": str(self.tmp / "config"),
            **(env or {}),
        }
        self.backend: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.token = ""
        self.http = requests.Session()
        self.events: Events | None = None
        self._n = 0

    # -- processes -------------------------------------------------------------------
    def _spawn(self, log_name: str, command: str, extra: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{log_name}.log", "ab")  # noqa: SIM115 - child keeps it
        with log:
            return subprocess.Popen([sys.executable, "-m", "labq.client.cli", command],
                                    cwd=REPO, env={**self.env, **(extra or {})},
                                    stdout=log, stderr=subprocess.STDOUT)

    def start_backend(self) -> None:
        self.backend = self._spawn("backend", "backend")
        deadline = time.monotonic() + 60
        while not self._healthy():
            if self.backend.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the backend did not start:\n{self.log_tail('backend')}")
            time.sleep(0.1)
        self.token = (self.data_dir / "admin-token").read_text().strip()
        self.http.headers["Authorization"] = f"Bearer {self.token}"
        self.events = Events(self.url, self.token)

    def _healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def start_workers(self, n: int, timeout: float = 60.0) -> None:
        """Start ``n`` more workers and wait until every one consumes the jobs queue."""
        for _ in range(n):
            self._n += 1
            self.workers.append(self._spawn(f"worker-{self._n}", "worker",
                                            {"LABQ_WORKER_NAME": f"{self.prefix}-w{self._n}"}))
        deadline = time.monotonic() + timeout
        while self.consumers() < len(self.workers):
            dead = [w for w in self.workers if w.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"workers did not start:\n{self.log_tail('worker-1')}")
            time.sleep(0.05)

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers = []

    def consumers(self) -> int:
        """How many consumers the jobs queue has (a worker consumes once it is ready)."""
        conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        try:
            queue = Topology(self.prefix).jobs_queue
            return conn.channel().queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return 0  # not declared yet
        finally:
            if conn.is_open:
                conn.close()

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The end of a process's log (the data dir goes with close(): errors quote it)."""
        try:
            text = (self.tmp / f"{name}.log").read_text(errors="replace")
        except OSError:
            return f"(no {name}.log)"
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> dict[str, int]:
        out = {f"worker-{i + 1}": w.pid for i, w in enumerate(self.workers)}
        if self.backend is not None:
            out["backend"] = self.backend.pid
        return out

    # -- jobs -------------------------------------------------------------------------
    def submit(self, body: bytes) -> tuple[str, float]:
        """Upload one bundle; returns the job id and when the upload began (monotonic)."""
        began = time.monotonic()
        resp = self.http.post(f"{self.url}/api/v1/jobs", files={"bundle": ("b.zip", body)},
                              timeout=60)
        if resp.status_code != 201:
            raise RuntimeError(f"submit answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()["id"], began

    def job(self, job_id: str) -> dict[str, Any]:
        resp = self.http.get(f"{self.url}/api/v1/jobs/{job_id}", timeout=30)
        resp.raise_for_status()
        return resp.json()

    def check_succeeded(self, job_ids: list[str]) -> None:
        bad = [(j, job.get("outcome")) for j in job_ids
               if (job := self.job(j)).get("outcome") != "succeeded"]
        if bad:
            raise RuntimeError(f"{len(bad)} jobs did not succeed, e.g. {bad[:3]}; "
                               f"see {self.tmp}")

    # -- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)  # a time budget never cuts the teardown
        if self.events is not None:
            self.events.close()
        self.stop_workers()
        if self.backend is not None and self.backend.poll() is None:
            self.backend.send_signal(signal.SIGTERM)
            try:
                self.backend.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.backend.kill()
                self.backend.wait()
        self._delete_topology()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _delete_topology(self) -> None:
        topo = Topology(self.prefix)
        try:
            conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        except pika.exceptions.AMQPError:
            return
        try:
            channel = conn.channel()
            for queue in (topo.jobs_queue, topo.dead_queue, topo.events_queue):
                channel.queue_delete(queue)
            for exchange in (topo.jobs_exchange, topo.dead_exchange, topo.events_exchange,
                             topo.control_exchange):
                channel.exchange_delete(exchange)
        finally:
            conn.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
