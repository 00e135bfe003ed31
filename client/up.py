"""``labq up``: the whole of labq on one machine, in the foreground (what ``make run`` runs).

Ensures the broker, then starts ``labq backend`` and ``LABQ_WORKERS`` ``labq worker``
processes as children with the same environment. A child that dies (a crash, or a job
that managed to kill it) is reported and restarted with backoff: 1 s, then twice as
long each time it dies again within a minute, up to a minute between tries.
Ctrl-C or SIGTERM sends SIGTERM to every child, waits for them (workers finish or put
back their current job within ``LABQ_SHUTDOWN_GRACE_S``) and exits 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import requests

from labq.client.broker import BrokerError, ensure_broker, mask_url
from labq.shared.settings import Settings

log = logging.getLogger("labq.up")

_PR_SET_PDEATHSIG = 1


#: Backoff between restarts of a child that keeps dying (seconds).
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 60.0
#: A child that ran this long before dying starts its backoff over.
RESTART_RESET_S = 60.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    command: str = ""
    extra: dict[str, str] | None = None
    started: float = 0.0
    backoff_s: float = 0.0
    restart_at: float | None = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM if ``labq up`` itself is killed, so none is orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def local_url(settings: Settings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("", "::") else "0.0.0.0", port))
            return True
        except OSError:
            return False


class Up:
    def __init__(self, settings: Settings, workers: int | None = None) -> None:
        self.settings = settings
        self.n_workers = settings.workers if workers is None else workers
        self.children: list[Child] = []
        self.stopping = False
        self.url = local_url(settings)

    # -- children ------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Every child must agree on where data lives, whatever its working directory.
        env["LABQ_DATA_DIR"] = str(Path(self.settings.data_dir).resolve())
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _popen(self, command: str, extra: dict[str, str] | None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "labq.client.cli", command],
            env={**self._env(), **(extra or {})},
            # Own process group: Ctrl-C reaches only us; we stop the children in order.
            process_group=0,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def _spawn(self, name: str, command: str, extra: dict[str, str] | None = None) -> Child:
        child = Child(name, self._popen(command, extra), command, extra, time.monotonic())
        self.children.append(child)
        log.info("started %s (pid %d)", name, child.proc.pid)
        return child

    def _died(self, child: Child, code: int) -> None:
        """Report a dead child and schedule its restart with backoff."""
        now = time.monotonic()
        if now - child.started >= RESTART_RESET_S:
            child.backoff_s = 0.0
        child.backoff_s = min(RESTART_MAX_S, child.backoff_s * 2 or RESTART_FIRST_S)
        child.restart_at = now + child.backoff_s
        log.error("%s (pid %d) exited with code %s; restarting it in %.0f s",
                  child.name, child.proc.pid, code, child.backoff_s)

    def _restart(self, child: Child) -> None:
        child.proc = self._popen(child.command, child.extra)
        child.started, child.restart_at = time.monotonic(), None
        log.info("restarted %s (pid %d)", child.name, child.proc.pid)

    def _wait_healthy(self, backend: Child, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stopping:
            if backend.proc.poll() is not None:
                return False
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.2)
        return False

    # -- signals ---------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("%s received: stopping labq", signal.Signals(signum).name)
        self.stopping = True

    def shutdown(self) -> None:
        """SIGTERM the workers and wait (they finish or put back their job), then the
        backend, so it still applies the workers' last events while they stop."""
        workers = [c for c in self.children if c.name != "backend"]
        backend = [c for c in self.children if c.name == "backend"]
        grace = self.settings.shutdown_grace_s + self.settings.stop_grace_s + 15
        self._terminate(workers, grace)
        self._terminate(backend, 30.0)

    def _terminate(self, children: list[Child], grace: float) -> None:
        alive = [c for c in children if c.proc.poll() is None]
        for child in alive:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in alive:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within %.0fs: killing it",
                            child.name, child.proc.pid, grace)
                child.proc.kill()
                child.proc.wait()

    # -- main ------------------------------------------------------------------------
    def run(self) -> int:
        from labq.shared.hardening import protect_process

        # Its environment holds the broker and database credentials its children get:
        # no job (or other process of this user) may read them from /proc.
        protect_process()
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        if self.n_workers < 0:
            log.error("LABQ_WORKERS must be 0 or more, got %d", self.n_workers)
            return 2
        try:
            started = ensure_broker(self.settings.rabbitmq_url)
        except BrokerError as exc:
            log.error("%s", exc)
            return 1
        log.info("RabbitMQ %s at %s", "started" if started else "reachable",
                 mask_url(self.settings.rabbitmq_url))
        if not _port_free(self.settings.host, self.settings.port):
            log.error("port %d on %s is already in use (another `labq up`?); stop it or set "
                      "LABQ_PORT", self.settings.port, self.settings.host)
            return 1
        Path(self.settings.data_dir).mkdir(parents=True, exist_ok=True)
        try:
            backend = self._spawn("backend", "backend")
            if not self._wait_healthy(backend):
                if not self.stopping:
                    log.error("the backend did not become healthy at %s/healthz (exit code "
                              "%s); see its log above", self.url, backend.proc.poll())
                self.shutdown()
                return 0 if self.stopping else 1
            host = socket.gethostname()
            for i in range(1, self.n_workers + 1):
                extra = {}
                if not os.environ.get("LABQ_WORKER_NAME"):
                    extra["LABQ_WORKER_NAME"] = f"{host}-w{i}"
                self._spawn(f"worker {i}", "worker", extra)
            print(f"labq is running at {self.url} ({self.n_workers} worker"
                  f"{'s' if self.n_workers != 1 else ''}) — Ctrl-C to stop", flush=True)
            return self._supervise(backend)
        finally:
            if any(c.proc.poll() is None for c in self.children):
                self.shutdown()

    def _supervise(self, backend: Child) -> int:
        while not self.stopping:
            for child in self.children:
                if child.restart_at is not None:
                    if time.monotonic() >= child.restart_at and not self.stopping:
                        self._restart(child)
                    continue
                code = child.proc.poll()
                if code is not None:
                    self._died(child, code)
            time.sleep(0.2)
        self.shutdown()
        log.info("labq stopped")
        return 0


def run(settings: Settings, workers: int | None = None) -> int:
    return Up(settings, workers).run()
