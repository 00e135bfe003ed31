"""Test helpers: bundles built on the fly, a real labq system in subprocesses, waiting.

``LabqSystem`` starts ``labq backend`` and N ``labq worker`` processes exactly as a lab
admin would (real gunicorn, real RabbitMQ, real subprocesses), each with its own data
dir and a unique queue prefix, and tears them down and deletes its queues afterwards.
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pika
import requests

from labq.shared.settings import Settings
from labq.shared.topology import Topology

REPO = Path(__file__).resolve().parent.parent
RABBITMQ_URL = os.environ.get("LABQ_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_zip(files: dict[str, str | bytes], root: str | None = "proj") -> bytes:
    """A bundle zip in memory: ``files`` maps relative paths to contents."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            arcname = f"{root}/{name}" if root else name
            zf.writestr(arcname, content)
    return buf.getvalue()


def write_zip(path: Path, files: dict[str, str | bytes], root: str | None = "proj") -> Path:
    path.write_bytes(make_zip(files, root))
    return path


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (read from /proc, not from labq)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def signed_in_client(app: Any) -> Any:
    """Flask's test client for ``app``, sending the admin token labq made on first start."""
    client = app.test_client()
    token = (app.extensions["labq"].settings.data_dir / "admin-token").read_text().strip()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return client


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1,
               message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def delete_topology(prefix: str, url: str = RABBITMQ_URL) -> None:
    topo = Topology(prefix)
    try:
        conn = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError:
        return
    try:
        ch = conn.channel()
        for queue in (topo.jobs_queue, topo.dead_queue, topo.events_queue):
            ch.queue_delete(queue)
        for exchange in (topo.jobs_exchange, topo.dead_exchange, topo.events_exchange,
                         topo.control_exchange):
            ch.exchange_delete(exchange)
    finally:
        conn.close()


def isolated_database_url(url: str, schema: str) -> str:
    """On PostgreSQL, a URL whose tables live in a schema of their own (one per system),
    so test systems sharing one database never see each other's jobs."""
    if not url.startswith("postgresql"):
        return url
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    engine.dispose()
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


class LabqSystem:
    """A backend and workers of labq, started as real processes for one test module."""

    def __init__(self, tmp: Path, workers: int = 2, env: dict[str, str] | None = None,
                 rabbitmq_url: str = RABBITMQ_URL) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = unique_prefix()
        # Jobs run as their own uids inside bwrap, which must reach the work dir: pytest's
        # tmp (under a 0700 folder) will not do, so the work dir lives in /var/tmp.
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"labq-work-{self.prefix}-",
                                              dir="/var/tmp"))
        os.chmod(self.work_dir, 0o711)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LABQ_")},
            "LABQ_RABBITMQ_URL": rabbitmq_url,
            "LABQ_DATA_DIR": str(self.data_dir),
            "LABQ_WORK_DIR": str(self.work_dir),
            "LABQ_PREFIX": self.prefix,
            "LABQ_PORT": str(self.port),
            "LABQ_URL": self.url,
            "LABQ_STOP_GRACE_S": "2",
            "LABQ_SHUTDOWN_GRACE_S": "5",
            "LABQ_OUTBOX_INTERVAL_S": "0.5",
            "LABQ_UV_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            # `labq login` saves tokens here: never the tester's own ~/.config/labq.
            "XDG_CONFIG_HOME": str(tmp / "config"),
            **(env or {}),
        }
        if os.environ.get("LABQ_DATABASE_URL"):
            self.env["LABQ_DATABASE_URL"] = isolated_database_url(
                os.environ["LABQ_DATABASE_URL"], self.prefix)
        self.settings = Settings.from_env(self.env)
        #: A requests session signed in as the admin labq creates on its first start.
        self.http = requests.Session()
        self.token = ""
        self.backend: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        #: More `labq backend` processes (start_extra_backend), stopped with the system.
        self.extra_backends: list[subprocess.Popen[bytes]] = []
        self._n_workers = workers
        self._logs: list[Path] = []

    # -- processes -------------------------------------------------------------
    def _spawn(self, name: str, *args: str, extra_env: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        self._logs.append(log)
        handle = open(log, "ab")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [sys.executable, "-m", "labq.client.cli", *args],
            cwd=REPO, env={**self.env, **(extra_env or {})},
            stdout=handle, stderr=subprocess.STDOUT,
        )

    def start_backend(self) -> None:
        self.backend = self._spawn("backend", "backend")
        wait_until(self._healthy, timeout=30, message=f"backend on {self.url}")
        # Written before the backend serves anything (first start, no users yet).
        self.token = (self.data_dir / "admin-token").read_text().strip()
        self.http.headers["Authorization"] = f"Bearer {self.token}"

    def start_extra_backend(self) -> str:
        """One more ``labq backend`` on a port of its own, on the same database, data dir
        and broker (several backends behind one address); returns its URL."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = self._spawn(f"backend-{port}", "backend",
                           extra_env={"LABQ_PORT": str(port), "LABQ_URL": url})
        self.extra_backends.append(proc)

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"backend on {url} exited:\n{self.read_logs()}")
            try:
                return requests.get(f"{url}/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(healthy, timeout=30, message=f"backend on {url}")
        return url

    # -- accounts ----------------------------------------------------------------
    def labq(self, *args: str, input: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the ``labq`` CLI against this system (server-side commands included)."""
        return subprocess.run([sys.executable, "-m", "labq.client.cli", *args], cwd=REPO,
                              env={**self.env, **(env or {})}, input=input, text=True,
                              capture_output=True, timeout=60)

    def add_user(self, name: str, admin: bool = False, password: str | None = None) -> str:
        """Create a user with ``labq user add`` (and a password); return their API token."""
        done = self.labq("user", "add", name, *(["--admin"] if admin else []))
        assert done.returncode == 0, done.stderr
        if password is not None:
            passwd = self.labq("user", "passwd", name, input=f"{password}\n")
            assert passwd.returncode == 0, passwd.stderr
        return done.stdout.strip().splitlines()[-1]

    def session_for(self, token: str) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {token}"
        return session

    def start_worker(self, name: str | None = None) -> subprocess.Popen[bytes]:
        name = name or f"w{len(self.workers) + 1}"
        proc = self._spawn(f"worker-{name}", "worker",
                           extra_env={"LABQ_WORKER_NAME": f"{self.prefix}-{name}"})
        self.workers.append(proc)
        return proc

    def start(self) -> LabqSystem:
        self.start_backend()
        for _ in range(self._n_workers):
            self.start_worker()
        return self

    def _healthy(self) -> bool:
        if self.backend is not None and self.backend.poll() is not None:
            raise AssertionError(f"backend exited:\n{self.read_logs()}")
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        procs = [p for p in [*self.workers, self.backend, *self.extra_backends]
                 if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        delete_topology(self.prefix, self.env["LABQ_RABBITMQ_URL"])
        shutil.rmtree(self.work_dir, ignore_errors=True)
        url = self.env.get("LABQ_DATABASE_URL", "")
        if url.startswith("postgresql"):
            import sqlalchemy

            engine = sqlalchemy.create_engine(url.split("?")[0])
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{self.prefix}" CASCADE'))
            engine.dispose()

    def read_logs(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.read_text(errors='replace')[-6000:]}"
                         for p in self._logs if p.exists())

    # -- API helpers -------------------------------------------------------------
    def api(self, path: str) -> str:
        return f"{self.url}{path}"

    def submit(self, files: dict[str, str | bytes] | bytes, root: str | None = "proj",
               **form: str) -> dict[str, Any]:
        body = files if isinstance(files, bytes) else make_zip(files, root)
        resp = self.http.post(self.api("/api/v1/jobs"), files={"bundle": ("b.zip", body)},
                              data=form, timeout=30)
        assert resp.status_code == 201, resp.text
        return resp.json()

    def job(self, job_id: str) -> dict[str, Any]:
        resp = self.http.get(self.api(f"/api/v1/jobs/{job_id}"), timeout=10)
        resp.raise_for_status()
        return resp.json()

    def wait_for_state(self, job_id: str, states: Iterable[str] | str,
                       timeout: float = 60.0) -> dict[str, Any]:
        wanted = {states} if isinstance(states, str) else set(states)
        last: dict[str, Any] = {}

        def reached() -> bool:
            nonlocal last
            last = self.job(job_id)
            return last["state"] in wanted

        try:
            wait_until(reached, timeout=timeout, interval=0.2,
                       message=f"job {job_id} to reach {sorted(wanted)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last: {last}\n{self.read_logs()}") from None
        return last

    def wait_done(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_for_state(job_id, {"stopped", "failed"}, timeout)

    def log(self, job_id: str) -> str:
        return self.http.get(self.api(f"/api/v1/jobs/{job_id}/log"), timeout=10).text

    def set_state(self, job_id: str, state: str) -> requests.Response:
        return self.http.put(self.api(f"/api/v1/jobs/{job_id}/state"), json={"state": state},
                             timeout=10)


class Receiver:
    """An HTTP server on 127.0.0.1 answering ``statuses`` in turn (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
