"""A job cannot reach labq's own settings or credentials: not in its own environment,
and not in the environment of any labq process (``labq up``, the backend and its
gunicorn workers, the workers), which are all non-dumpable.

The second test runs a whole ``labq up`` as ``nobody``, as a lab may deploy it: there a
job, and any other process of that user, shares the services' uid, so only the
non-dumpable flag keeps ``/proc/<pid>/environ`` (broker and database passwords) closed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from helpers import RABBITMQ_URL, delete_topology, free_port, make_zip, unique_prefix, wait_until
from test_cli_up import children_of

pytestmark = pytest.mark.integration

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"

SNOOP = r"""
import os, sys
found = []
for key, value in os.environ.items():
    if key.startswith("LABQ_") and key not in ("LABQ_JOB_ID", "LABQ_ATTEMPT"):
        found.append("own env: " + key)
for pid in sys.argv[1:]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            if b"LABQ_RABBITMQ_URL" in handle.read():
                found.append(f"environ of {pid}")
    except OSError:
        pass
print("LEAKS:", found)
"""


def _leaks(log: str) -> str:
    assert "LEAKS:" in log, log
    return log.split("LEAKS:", 1)[1].splitlines()[0]


def test_a_job_finds_no_labq_settings_in_its_env_or_in_labq_processes(system):
    # Given a job that looks for broker credentials in its own environment and in the
    # environment of the backend and of every worker
    pids = [system.backend.pid, *(p.pid for p in system.workers)]
    toml = f"args = {json.dumps([str(p) for p in pids])}\n"
    job = system.submit({"code.py": SNOOP, "labq.toml": toml})
    done = system.wait_done(job["id"])
    log = system.log(job["id"])
    assert done["outcome"] == "succeeded", log
    # Then it finds nothing of labq's anywhere
    assert _leaks(log).strip() == "[]", log


def _descendants(pid: int) -> list[int]:
    found = []
    for child in children_of(pid):
        found += [child, *_descendants(child)]
    return found


def _as_nobody() -> None:  # pragma: no cover - runs in the child
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


class NobodyUp:
    """``labq up`` (backend + one worker) running as nobody, from this checkout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port, self.prefix = free_port(), unique_prefix()
        self.url = f"http://127.0.0.1:{self.port}"
        site = root / "site"  # the venv's packages for the system interpreter
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            f"import site\nsite.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
        for folder in ("data", "work"):
            (root / folder).mkdir()
            os.chown(root / folder, NOBODY, NOBODY)
        for path in [root, site, *site.iterdir()]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "LANG": "C.UTF-8",
               "LABQ_RABBITMQ_URL": RABBITMQ_URL, "LABQ_PORT": str(self.port),
               "LABQ_PREFIX": self.prefix, "LABQ_DATA_DIR": str(root / "data"),
               "LABQ_WORK_DIR": str(root / "work"), "LABQ_WORKERS": "1",
               "LABQ_UV_OFFLINE": "1", "LABQ_SHUTDOWN_GRACE_S": "5"}
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-m", "labq.client.cli", "up"], cwd=root, env=env,
            preexec_fn=_as_nobody, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        delete_topology(self.prefix, RABBITMQ_URL)


@pytest.fixture()
def nobody_up(broker: str) -> Iterator[NobodyUp]:
    if os.geteuid() != 0:
        pytest.skip("needs root, to start labq as nobody")
    found = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                           capture_output=True, text=True, check=False).stdout.strip()
    if found != str(tuple(sys.version_info[:2])):
        pytest.skip(f"needs {SYSTEM_PYTHON} of Python {sys.version_info[0]}."
                    f"{sys.version_info[1]} (the venv's packages), found {found or 'none'}")
    root = Path(tempfile.mkdtemp(prefix="labq-nobody-", dir="/var/tmp"))
    up = NobodyUp(root)
    try:
        wait_until(lambda: "labq is running at" in up.output or up.proc.poll() is not None,
                   timeout=90, message="labq up as nobody")
        assert up.proc.poll() is None, up.output
        # The worker's sandbox report is written once it is set up (protected included).
        wait_until(lambda: list((root / "data" / "workers").glob("*.json")), timeout=60,
                   message=f"the worker ready\n{up.output}")
        yield up
    finally:
        up.close()
        shutil.rmtree(root, ignore_errors=True)


PEEK = ("import sys\nfor pid in sys.argv[1:]:\n    try:\n"
        "        open(f'/proc/{pid}/environ', 'rb').read(); print('READ', pid)\n"
        "    except OSError as exc:\n        print('DENIED', pid, type(exc).__name__)\n")


def test_labq_processes_are_non_dumpable_and_no_job_of_their_user_reads_them(
        nobody_up: NobodyUp):
    # Given labq up, its backend (gunicorn master and worker) and its worker, as nobody
    pids = [nobody_up.proc.pid, *_descendants(nobody_up.proc.pid)]
    assert len(pids) >= 4, nobody_up.output
    for pid in pids:
        assert _uid_of(pid) == NOBODY, pid
        # Non-dumpable: the kernel hands the process's /proc files to root
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert os.stat(f"/proc/{pid}/environ").st_uid == 0, f"{pid} is dumpable: {cmdline}"
    # When another process of that same user, outside any box, reads their environ
    peek = subprocess.run([SYSTEM_PYTHON, "-c", PEEK, *map(str, pids)], preexec_fn=_as_nobody,
                          capture_output=True, text=True, timeout=30, cwd="/")
    # Then it is refused for every one of them
    assert "READ" not in peek.stdout and peek.stdout.count("DENIED") == len(pids), peek
    # and a job of that labq (its user, in its box) finds nothing either
    token = (nobody_up.root / "data" / "admin-token").read_text().strip()
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {token}"
    toml = f"args = {json.dumps([str(p) for p in pids])}\n"
    resp = http.post(f"{nobody_up.url}/api/v1/jobs", timeout=30, files={
        "bundle": ("b.zip", make_zip({"code.py": SNOOP, "labq.toml": toml}))})
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["id"]
    done = wait_until(lambda: (j := http.get(f"{nobody_up.url}/api/v1/jobs/{job_id}",
                                             timeout=10).json())["state"] in ("stopped",
                                                                              "failed") and j,
                      timeout=90, message="the snooping job")
    log = http.get(f"{nobody_up.url}/api/v1/jobs/{job_id}/log", timeout=10).text
    assert done["outcome"] == "succeeded", log
    assert _leaks(log).strip() == "[]", log
