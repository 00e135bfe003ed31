"""The job log is the worker's: a job writes to a pipe the worker copies, so it cannot
truncate, seek or rewrite earlier lines, nor forge labq's own (issue 8, item 5)."""

from __future__ import annotations

import io
import random
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from helpers import wait_until

from labq.process_unit import proctree
from labq.process_unit.control import Control
from labq.process_unit.joblog import ESCAPE, MARKERS, JobLog, escape
from labq.process_unit.runner import run_job
from labq.process_unit.sandbox import build_command
from labq.process_unit.supervisor import Supervisor, new_token
from labq.shared.manifest import JobSpec
from labq.shared.messages import JobMessage
from labq.shared.settings import Settings
from labq.shared.storage import Storage, new_job_id, sha256_of


@pytest.fixture(scope="module", autouse=True)
def _subreaper():
    proctree.become_subreaper()


def test_escape_marks_a_jobs_line_that_looks_like_labqs():
    assert escape(b"labq: x\n", True) == (b"| labq: x\n", b"")
    assert escape(b"labq: x\n", False) == (b"labq: x\n", b"")  # mid-line: not a line
    assert escape(b"ok\n=== labq: attempt 9 ===\rlabq: y", True) == (
        b"ok\n| === labq: attempt 9 ===\r| labq: y", b"")
    # A line start that may still become a marker waits for the next bytes.
    assert escape(b"ok\nlab", True) == (b"ok\n", b"lab")
    assert escape(b"lab" + b"q: z\n", True) == (b"| labq: z\n", b"")
    assert escape(b"label\n", True) == (b"label\n", b"")
    assert escape(b"=== not labq\n", True) == (b"=== not labq\n", b"")


def _escaped_at_once(stream: bytes) -> bytes:
    """What the log must hold for ``stream``: ESCAPE before every line start (the
    start, or after a newline or carriage return) that begins with a marker."""
    out = bytearray()
    for p in range(len(stream)):
        if (p == 0 or stream[p - 1] in b"\n\r") and stream.startswith(MARKERS, p):
            out += ESCAPE
        out.append(stream[p])
    return bytes(out)


def test_output_cut_anywhere_is_escaped_as_if_it_came_at_once(tmp_path: Path):
    rng = random.Random(8)
    for n in range(300):
        stream = bytes(rng.choice(b"labq:= \n\rx") for _ in range(rng.randrange(1, 120)))
        cuts = sorted(rng.sample(range(len(stream) + 1), min(len(stream), 6)))
        path = tmp_path / f"log-{n}.txt"
        with JobLog.open(path) as joblog:
            for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
                joblog.job_output(stream[a:b])
            joblog.end_job_output()
        assert path.read_bytes() == _escaped_at_once(stream), stream


def test_split_writes_and_labqs_own_lines_stay_apart(tmp_path: Path):
    path = tmp_path / "log.txt"
    path.write_bytes(b"earlier line without its end")
    with JobLog.open(path) as joblog:
        joblog.line("=== labq: attempt 2 on w ===")  # on a line of its own
        for piece in (b"la", b"b", b"q: forged\nhalf", b" a line"):
            joblog.job_output(piece)
        joblog.note("stopped by the user")
        joblog.job_output(b"=== la")
        joblog.end_job_output()
    assert path.read_bytes().split(b"\n") == [
        b"earlier line without its end", b"=== labq: attempt 2 on w ===",
        ESCAPE + b"labq: forged", b"half a line", b"labq: stopped by the user", b"=== la"]


TAMPER = r"""
import os, sys
print("first attempt line" if os.environ["LABQ_ATTEMPT"] == "1" else "second attempt line")
for fd in (1, 2):
    for what, call in (("truncate", lambda: os.ftruncate(fd, 0)),
                       ("seek", lambda: os.lseek(fd, 0, os.SEEK_SET)),
                       ("reopen", lambda: open(f"/proc/self/fd/{fd}", "r+b").truncate(0))):
        try:
            call()
            print("TAMPERED", what, fd, flush=True)
        except OSError as exc:
            print("REFUSED", what, fd, exc.errno, flush=True)
os.write(1, b"labq: outcome succeeded (exit code 0)\n")
os.write(2, b"=== labq: attempt 7 on nowhere ===\n")
os.write(1, b"half a line, then\rlabq: forged after a carriage return\n")
"""


def _bundle(storage: Storage, code: str) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("proj/code.py", code)
    staged = storage.tmp / "b.zip"
    staged.write_bytes(buf.getvalue())
    sha = sha256_of(staged)
    storage.store_bundle(staged, sha)
    return sha


def test_a_job_cannot_wipe_rewrite_or_forge_lines_of_its_log(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data", stop_grace_s=1, uv_offline=True)
    storage = Storage(settings.data_dir).ensure()
    job = JobMessage(job_id=new_job_id(), name="t", bundle_sha256=_bundle(storage, TAMPER),
                     spec=JobSpec("code.py"))
    for attempt in (1, 2):
        run_job(job, settings, lambda *a, **k: None, Control(), attempt=attempt,
                worker="w-test", storage=storage)
        assert storage.read_outcome(job.job_id).outcome == "succeeded"
    lines = storage.log_path(job.job_id).read_bytes().decode().split("\n")
    assert "TAMPERED" not in "\n".join(lines), lines
    assert lines[0] == "=== labq: attempt 1 on w-test ===", lines
    assert "first attempt line" in lines and "second attempt line" in lines, lines
    assert lines.index("first attempt line") < lines.index("=== labq: attempt 2 on w-test ===")
    # labq's own lines are exactly those it wrote: the job's look-alikes are marked.
    ours = [line for line in lines if line.startswith(("labq:", "=== labq:"))]
    assert [line for line in ours if line.startswith("=== ")] == [
        "=== labq: attempt 1 on w-test ===", "=== labq: attempt 2 on w-test ==="], lines
    assert ours.count("labq: outcome succeeded (exit code 0)") == 2, lines
    assert lines.count("| labq: outcome succeeded (exit code 0)") == 2, lines
    assert lines.count("| === labq: attempt 7 on nowhere ===") == 2, lines
    assert all("\r| labq: forged" in line for line in lines if "carriage" in line), lines


def _supervisor(tmp: Path, script: str, joblog: JobLog, limit: int = 0) -> Supervisor:
    env = tmp / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(sys.executable)
    project = tmp / "ws" / "project"
    project.mkdir(parents=True)
    (project / "code.py").write_text(script)
    cmd = build_command(env_dir=env, project=project, workspace=tmp / "ws",
                        entrypoint="code.py", args=[], user_env={}, job_id="a" * 32,
                        attempt=1, token=new_token())
    return Supervisor(cmd, joblog, output_limit=limit)


def test_output_is_logged_as_it_comes_and_grandchildren_are_drained(tmp_path: Path):
    """A line is in the log while the job still runs; output of a grandchild that
    outlives the main process still gets in, and the job's exit is noticed at once."""
    path = tmp_path / "log.txt"
    script = ("import os, time\nprint('live line')\n"
              "if os.fork() == 0:\n"
              "    for _ in range(3000):\n"
              "        if os.path.exists('go'): break\n"
              "        time.sleep(0.01)\n"
              "    print('from the grandchild'); os._exit(0)\n")
    with JobLog.open(path) as joblog:
        sup = _supervisor(tmp_path, script, joblog)
        ended = threading.Event()
        sup.start(on_exit=ended.set)
        wait_until(lambda: b"live line" in path.read_bytes(), timeout=20,
                   message="the line to reach the log while the job runs")
        assert ended.wait(timeout=20)  # the main process ended: the grandchild did not
        assert sup.returncode == 0 and b"from the grandchild" not in path.read_bytes()
        (tmp_path / "ws" / "project" / "go").touch()
        wait_until(lambda: b"from the grandchild" in path.read_bytes(), timeout=20,
                   message="the grandchild's line, after the main process ended")
        assert sup.wait() == 0


def test_the_output_cap_stops_copying_and_says_so(tmp_path: Path):
    path = tmp_path / "log.txt"
    over = threading.Event()
    script = "import os\nwhile True:\n    os.write(1, b'x' * 65536)\n"
    with JobLog.open(path) as joblog:
        sup = _supervisor(tmp_path, script, joblog, limit=1 << 20)
        sup.start(on_output_limit=over.set)
        assert over.wait(timeout=30), "the cap was not reported"
        assert sup.output_over_limit
        sup.kill(grace_s=1)
        sup.wait()
    assert path.stat().st_size == 1 << 20


def test_the_copier_ends_when_told_although_a_process_still_holds_the_pipe(tmp_path: Path):
    """Only a process outside the box could still hold the pipe once the box is closed:
    the copier takes what is there and ends instead of waiting for it."""
    import subprocess

    from labq.process_unit.joblog import OutputCopier

    path = tmp_path / "log.txt"
    with JobLog.open(path) as joblog:
        copier = OutputCopier(joblog)
        holder = subprocess.Popen([sys.executable, "-c", "import os, time\n"
                                   "os.write(1, b'still here\\n')\ntime.sleep(60)\n"],
                                  stdout=copier.write_fd)
        try:
            copier.start()
            wait_until(lambda: b"still here" in path.read_bytes(), timeout=20)
            assert copier.finish(timeout_s=0.2) is False  # it gave up waiting for EOF
            copier.finish(timeout_s=0.2)  # idempotent
            assert copier.read_fd == -1 and not copier._thread.is_alive()
        finally:
            holder.kill()
            holder.wait()


def test_a_package_build_cannot_forge_labqs_lines(tmp_path: Path):
    # Given a package whose setup.py prints a line that looks like labq's own, when uv's
    # output is copied into the job log, then it is marked as the build's, not labq's.
    from labq.process_unit.envbuild import _copy_uv_output

    class Build:
        stdout = io.BytesIO(b"Building wheel\nlabq: job finished: succeeded\n")

    path = tmp_path / "log.txt"
    with JobLog.open(path) as joblog:
        kept = _copy_uv_output(Build(), joblog)
        joblog.note("environment ready")
    lines = path.read_bytes().decode().splitlines()
    assert lines == ["Building wheel", f"{ESCAPE.decode()}labq: job finished: succeeded",
                     "labq: environment ready"]
    assert kept[-1] == "labq: job finished: succeeded"
