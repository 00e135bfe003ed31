"""`labq up` (what `make run` runs): starts a backend and LABQ_WORKERS workers, runs a job,
reports a worker that dies, and stops everything cleanly on SIGTERM with exit code 0."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import requests
from helpers import (
    RABBITMQ_URL,
    REPO,
    delete_topology,
    free_port,
    pid_alive,
    unique_prefix,
    wait_until,
)

pytestmark = pytest.mark.integration


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry.name))
    return kids




class Up:
    def __init__(self, tmp: Path, workers: int = 2, labq: list[str] | None = None) -> None:
        """``labq up`` in ``tmp``; ``labq``: how to call the CLI (default: this checkout)."""
        self.port = free_port()
        self.prefix = unique_prefix()
        # Reachable by job uids (pytest's tmp is not), and removed at close.
        self.work_dir = Path(tempfile.mkdtemp(prefix=f"labq-work-{self.prefix}-",
                                              dir="/var/tmp"))
        os.chmod(self.work_dir, 0o711)
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LABQ_")}
        self.env.update({
            "LABQ_RABBITMQ_URL": RABBITMQ_URL, "LABQ_PORT": str(self.port),
            "LABQ_PREFIX": self.prefix, "LABQ_DATA_DIR": str(tmp / "data"),
            "LABQ_WORK_DIR": str(self.work_dir),
            "LABQ_WORKERS": str(workers), "LABQ_SHUTDOWN_GRACE_S": "5",
            "LABQ_STOP_GRACE_S": "2", "LABQ_UV_OFFLINE": "1", "LABQ_URL": self.url,
        })
        if labq is None:
            self.env["PYTHONPATH"] = str(REPO)
        self.labq = labq or [sys.executable, "-m", "labq.client.cli"]
        self.proc = subprocess.Popen(
            [*self.labq, "up"], cwd=tmp, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        def seen() -> bool:
            if text in self.output:
                return True
            if self.proc.poll() is not None:
                raise AssertionError(f"labq up exited {self.proc.returncode}:\n{self.output}")
            return False

        try:
            wait_until(seen, timeout=timeout, message=repr(text))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.output}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        delete_topology(self.prefix, RABBITMQ_URL)
        shutil.rmtree(self.work_dir, ignore_errors=True)


def test_up_runs_jobs_restarts_a_dead_worker_and_stops_cleanly(broker, tmp_path):
    up = Up(tmp_path, workers=2)
    try:
        up.wait_for(f"labq is running at {up.url} (2 workers) — Ctrl-C to stop")
        assert requests.get(f"{up.url}/healthz", timeout=5).status_code == 200
        kids = children_of(up.proc.pid)
        assert len(kids) == 3, up.output  # backend + 2 workers

        env = {**up.env}
        result = subprocess.run(
            [sys.executable, "-m", "labq.client.cli", "submit", str(REPO / "examples" / "hello"),
             "--wait"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (result.stdout, result.stderr, up.output)
        # Data went to LABQ_DATA_DIR, relative to where `labq up` ran.
        assert (tmp_path / "data" / "jobs").is_dir()

        # A worker that dies (a crash, or a job that killed it) is reported and restarted.
        worker_pid = max(kids)
        os.kill(worker_pid, signal.SIGKILL)
        up.wait_for("exited with code -9; restarting it in 1 s", timeout=20)
        up.wait_for("restarted worker", timeout=20)
        wait_until(lambda: len(children_of(up.proc.pid)) == 3, timeout=20,
                   message="backend + 2 workers again")
        kids = children_of(up.proc.pid)
        assert worker_pid not in kids
        assert up.proc.poll() is None

        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=60) == 0, up.output
        wait_until(lambda: not [k for k in kids if pid_alive(k)], timeout=10,
                   message=f"the services to be gone\n{up.output}")
    finally:
        up.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_up_restarts_a_backend_that_dies(broker, tmp_path):
    up = Up(tmp_path, workers=1)
    try:
        up.wait_for(f"labq is running at {up.url} (1 worker) — Ctrl-C to stop")
        backend = next(k for k in children_of(up.proc.pid) if " backend" in _cmdline(k))
        # When the backend dies (a crash, or a job that managed to kill it)
        os.kill(backend, signal.SIGKILL)
        # Then labq up says so, starts it again and the API comes back
        up.wait_for(f"backend (pid {backend}) exited with code -9; restarting it in 1 s",
                    timeout=20)
        up.wait_for("restarted backend", timeout=30)

        def serving() -> bool:
            try:
                return requests.get(f"{up.url}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(serving, timeout=90, message=f"the backend back\n{up.output}")
        again = [k for k in children_of(up.proc.pid) if " backend" in _cmdline(k)]
        assert len(again) == 1 and again[0] != backend, up.output
        # and it works: a job goes through it end to end
        result = subprocess.run(
            [sys.executable, "-m", "labq.client.cli", "submit", str(REPO / "examples" / "hello"),
             "--wait"], cwd=REPO, env={**up.env}, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (result.stdout, result.stderr, up.output)
        assert up.proc.poll() is None
    finally:
        up.close()


def test_up_refuses_a_port_in_use(broker, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABQ_")}
        env.update({"LABQ_PORT": str(port), "LABQ_DATA_DIR": str(tmp_path / "d"),
                    "LABQ_RABBITMQ_URL": RABBITMQ_URL, "PYTHONPATH": str(REPO)})
        result = subprocess.run([sys.executable, "-m", "labq.client.cli", "up"], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"port {port}" in result.stderr and "LABQ_PORT" in result.stderr
