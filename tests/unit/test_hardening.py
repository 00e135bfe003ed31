"""protect_process hides a service's environment from other processes of its user."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

import labq.shared.hardening

NOBODY = 65534
#: A system interpreter that the unprivileged user may run (the venv lives under /root
#: or /work, which nobody cannot enter).
SYSTEM_PYTHON = "/usr/bin/python3"
HOLDER = """
import sys, time
sys.path.insert(0, {folder!r})
from hardening import protect_process
if {protect}:
    assert protect_process()
print("ready", flush=True)
time.sleep(30)
"""


def _as_nobody() -> None:
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _peek(pid: int) -> str:
    code = f"print(open('/proc/{pid}/environ', 'rb').read().count(b'LABQ_RABBITMQ_URL'))"
    run = subprocess.run([SYSTEM_PYTHON, "-c", code], preexec_fn=_as_nobody,
                         capture_output=True, text=True, timeout=20)
    return run.stdout.strip() or run.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
                    reason="needs root (to run two processes as nobody) and /usr/bin/python3")
@pytest.mark.parametrize("protect", [False, True])
def test_another_process_of_the_same_user_cannot_read_the_services_environment(protect):
    # Given a service process (as nobody) holding a broker URL in its environment
    folder = tempfile.mkdtemp(prefix="labq-hardening-")  # pytest's tmp_path is root-only
    shutil.copy(labq.shared.hardening.__file__, os.path.join(folder, "hardening.py"))
    os.chmod(folder, 0o755)
    holder = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", HOLDER.format(folder=folder, protect=protect)],
        cwd="/",
        env={"LABQ_RABBITMQ_URL": "amqp://u:secret@h/", "PATH": os.environ["PATH"]},
        preexec_fn=_as_nobody, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        # When a job of the same user reads its /proc/<pid>/environ
        seen = _peek(holder.pid)
        # Then it sees the secret only if the service did not protect itself
        if protect:
            assert "PermissionError" in seen, seen
        else:
            assert seen == "1", seen
    finally:
        holder.kill()
        holder.wait()
        shutil.rmtree(folder)
