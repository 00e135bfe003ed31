"""The supervisor with real processes: pause/resume, stop of a whole tree, limits, signals."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import pid_alive, wait_until

from labq.process_unit import proctree
from labq.process_unit.sandbox import TOKEN_VAR, build_command
from labq.process_unit.supervisor import Supervisor, classify, new_token

ALL_LABQ = ("LABQ_RABBITMQ_URL", "LABQ_DATABASE_URL", "LABQ_DATA_DIR", "LABQ_PREFIX")


@pytest.fixture(scope="module", autouse=True)
def _subreaper():
    proctree.become_subreaper()


def fake_env(tmp: Path) -> Path:
    env = tmp / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(sys.executable)
    return env


def start(tmp: Path, script: str, **kw) -> tuple[Supervisor, Path, object]:
    project = tmp / "ws" / "project"
    project.mkdir(parents=True)
    (project / "code.py").write_text(textwrap.dedent(script))
    cmd = build_command(env_dir=fake_env(tmp), project=project, workspace=tmp / "ws",
                        entrypoint="code.py", args=[], user_env=kw.pop("user_env", {}),
                        job_id="a" * 32, attempt=1, token=new_token(), **kw)
    log = open(tmp / "log.txt", "ab")  # noqa: SIM115
    sup = Supervisor(cmd, log.fileno())
    sup.start()
    return sup, tmp / "log.txt", log






COUNTER = """
    import time, pathlib
    n = 0
    while True:
        n += 1
        pathlib.Path("count").write_text(str(n))
        time.sleep(0.02)
"""


def read_count(tmp: Path) -> int:
    try:
        return int((tmp / "ws" / "project" / "count").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_pause_freezes_the_counter_and_resume_continues(tmp_path):
    sup, _, log = start(tmp_path, COUNTER)
    try:
        wait_until(lambda: read_count(tmp_path) > 3)
        sup.pause()
        time.sleep(0.1)
        frozen = read_count(tmp_path)
        time.sleep(0.5)
        assert read_count(tmp_path) == frozen
        assert all(p.state == "T" for p in sup.processes().values())
        sup.resume()
        wait_until(lambda: read_count(tmp_path) > frozen + 3)
    finally:
        sup.kill_now()
        log.close()


def test_stop_kills_a_grandchild_that_left_the_session(tmp_path):
    script = """
        import os, time, pathlib
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                pathlib.Path("grandchild.pid").write_text(str(os.getpid()))
                while True:
                    time.sleep(0.1)
            os._exit(0)
        while True:
            time.sleep(0.1)
    """
    sup, _, log = start(tmp_path, script)
    try:
        pidfile = tmp_path / "ws" / "project" / "grandchild.pid"
        wait_until(pidfile.exists)
        grandchild = int(wait_until(lambda: pidfile.read_text()))
        assert grandchild in sup.processes()
        assert proctree.read_proc(grandchild).ppid != sup.pid  # really left the tree
        t0 = time.monotonic()
        sup.kill(grace_s=2)
        assert time.monotonic() - t0 < 5
        wait_until(lambda: not pid_alive(grandchild))
        assert sup.wait() == -15
    finally:
        sup.kill_now()
        log.close()


def test_sigterm_ignored_then_sigkill_after_grace(tmp_path):
    sup, _, log = start(tmp_path, """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        while True:
            time.sleep(0.1)
    """)
    try:
        wait_until(lambda: b"ready" in (tmp_path / "log.txt").read_bytes())
        t0 = time.monotonic()
        sup.kill(grace_s=0.5)
        assert 0.4 < time.monotonic() - t0 < 4
        assert classify(sup.wait()).signal_text == "killed by SIGKILL"
    finally:
        log.close()


def test_signal_killed_job_names_the_signal(tmp_path):
    sup, _, log = start(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    try:
        result = classify(sup.wait())
        assert result.exit_code == -11 and result.signal_text == "killed by SIGSEGV"
    finally:
        log.close()


def test_exit_code_and_output_go_to_the_log(tmp_path):
    sup, logfile, log = start(tmp_path, "import sys\nprint('hello out')\n"
                                        "print('hello err', file=sys.stderr)\nsys.exit(3)\n")
    try:
        assert classify(sup.wait()).exit_code == 3
        text = logfile.read_text()
        assert "hello out" in text and "hello err" in text
    finally:
        log.close()


def test_memory_of_the_tree_is_measured(tmp_path):
    sup, _, log = start(tmp_path, """
        import time
        block = bytearray(80 * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        print("allocated", flush=True)
        time.sleep(30)
    """)
    try:
        wait_until(lambda: b"allocated" in (tmp_path / "log.txt").read_bytes())
        assert sup.memory_bytes() > 70 * 1024 * 1024
    finally:
        sup.kill_now()
        log.close()


def test_environment_is_built_from_scratch(tmp_path, monkeypatch):
    for name in ALL_LABQ:
        monkeypatch.setenv(name, "secret")
    sup, logfile, log = start(tmp_path, """
        import os, json
        print("ENV=" + json.dumps(dict(os.environ)))
    """, user_env={"SEED": "42"}, cpus=1)
    try:
        assert sup.wait() == 0
        line = next(x for x in logfile.read_text().splitlines() if x.startswith("ENV="))
        import json

        env = json.loads(line[4:])
        assert not any(name in env for name in ALL_LABQ)
        assert {k for k in env if k.startswith("LABQ_")} == {"LABQ_JOB_ID", "LABQ_ATTEMPT"}
        assert env["SEED"] == "42" and env["PYTHONUNBUFFERED"] == "1"
        assert env["HOME"].startswith(str(tmp_path)) and env["TMPDIR"].startswith(str(tmp_path))
        assert env["OMP_NUM_THREADS"] == "1" and TOKEN_VAR in env
    finally:
        log.close()


def test_cpu_limit_pins_the_job(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    sup, logfile, log = start(tmp_path, "import os\nprint('CPUS', len(os.sched_getaffinity(0)))\n",
                              cpus=1)
    try:
        assert sup.wait() == 0
        assert "CPUS 1" in logfile.read_text()
    finally:
        log.close()


def test_sweep_kills_processes_of_a_dead_worker(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    import subprocess

    token = "999999999:1:deadbeef"  # no worker with that pid: an orphan of a dead worker
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={TOKEN_VAR: token, "PATH": "/usr/bin:/bin"})
    try:
        # Any worker starting on this host meanwhile (other tests start many) sweeps this
        # orphan too, maybe before we even see its environment: gone counts as seen.
        wait_until(lambda: proc.poll() is not None
                 or proctree.environ_value(proc.pid, TOKEN_VAR) == token)
        proctree.sweep_orphans(TOKEN_VAR)
        assert proc.wait(timeout=5) == -9
    finally:
        proc.kill()
        proc.wait()


def test_sweep_leaves_processes_of_another_pid_namespace_alone():
    # A job of a worker in a container: its token's pid is the container's, which names
    # no (or another) process here; the host's workers must not kill it.
    import subprocess

    foreign = "999999999:1:deadbeef:1"  # pid namespace inode 1: not this one
    assert proctree.pid_namespace() not in ("", "1")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={TOKEN_VAR: foreign, "PATH": "/usr/bin:/bin"})
    try:
        wait_until(lambda: proctree.environ_value(proc.pid, TOKEN_VAR) == foreign)
        assert proc.pid not in proctree.sweep_orphans(TOKEN_VAR)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_a_new_token_names_its_pid_namespace():
    from labq.process_unit.supervisor import new_token

    pid, _start, _rand, ns = new_token().split(":")
    assert int(pid) == os.getpid() and ns == proctree.pid_namespace()
