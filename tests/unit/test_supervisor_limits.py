"""run_job end to end without a broker: limits, outcomes, results, events, control."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from pathlib import Path

import pytest
from helpers import wait_until

from labq.process_unit import proctree
from labq.process_unit.control import Control
from labq.process_unit.runner import run_job
from labq.shared.manifest import JobSpec
from labq.shared.messages import JobMessage
from labq.shared.settings import Settings
from labq.shared.storage import Storage, new_job_id, sha256_of


@pytest.fixture(scope="module", autouse=True)
def _subreaper():
    proctree.become_subreaper()


def bundle(storage: Storage, files: dict[str, str]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(f"proj/{name}", text)
    staged = storage.tmp / "b.zip"
    staged.write_bytes(buf.getvalue())
    sha = sha256_of(staged)
    storage.store_bundle(staged, sha)
    return sha


def run(tmp: Path, files: dict[str, str], control: Control | None = None, **limits):
    settings = Settings(data_dir=tmp / "data", stop_grace_s=1, uv_offline=True)
    storage = Storage(settings.data_dir).ensure()
    job = JobMessage(job_id=new_job_id(), name="t", bundle_sha256=bundle(storage, files),
                     spec=JobSpec("code.py", **limits))
    events: list[tuple[str, dict]] = []
    final = run_job(job, settings, lambda state, **f: events.append((state, f)),
                    control or Control(), attempt=1, worker="w-test", storage=storage)
    return final, events, storage.read_outcome(job.job_id), storage, job


def test_success_stores_output_and_walks_the_lifecycle(tmp_path):
    final, events, outcome, storage, job = run(tmp_path, {
        "code.py": "import pathlib\npathlib.Path('output/sub').mkdir(parents=True)\n"
                   "pathlib.Path('output/sub/r.txt').write_text('result')\nprint('done!')\n",
        "output/keep.txt": "x"})
    assert final == "stopped"
    assert [s for s, _ in events] == ["initialized", "started", "completed", "stopped"]
    assert outcome.outcome == "succeeded" and outcome.exit_code == 0
    assert (storage.results_dir(job.job_id) / "sub" / "r.txt").read_text() == "result"
    assert zipfile.ZipFile(storage.results_zip(job.job_id)).namelist() == ["keep.txt",
                                                                           "sub/r.txt"]
    log = storage.log_path(job.job_id).read_text()
    assert log.startswith("=== labq: attempt 1 on w-test ===") and "done!" in log
    assert not (Settings(data_dir=tmp_path / "data").resolved_work_dir
                / f"{job.job_id}-1").exists()


def test_timeout(tmp_path):
    t0 = time.monotonic()
    _, events, outcome, _, _ = run(tmp_path, {"code.py": "import time\ntime.sleep(60)\n"},
                                   timeout_s=1)
    assert time.monotonic() - t0 < 15
    assert outcome.outcome == "timeout" and events[-1][0] == "stopped"
    assert "time limit of 1 s" in outcome.error


def test_memory_limit(tmp_path):
    _, _, outcome, storage, job = run(tmp_path, {"code.py": (
        "import time\nblocks = []\nwhile True:\n"
        "    blocks.append(bytearray(20 * 1024 * 1024))\n"
        "    for i in range(0, len(blocks[-1]), 4096): blocks[-1][i] = 1\n"
        "    time.sleep(0.05)\n")}, memory_mb=100)
    assert outcome.outcome == "error"
    assert outcome.error.startswith("out of memory (limit 100 MB): the job used ")


def test_signal_killed_job(tmp_path):
    _, _, outcome, _, _ = run(tmp_path, {"code.py": "import os\nos.abort()\n"})
    assert outcome.outcome == "error" and outcome.exit_code == -6
    assert "killed by SIGABRT" in outcome.error


def test_bad_bundle_fails_with_readable_error(tmp_path):
    final, events, outcome, _, _ = run(tmp_path, {"code.py": "print(1)\n",
                                                  "requirements.txt": "no-such-pkg-labq==1\n"})
    assert final == "failed" and events[-1][0] == "failed"
    assert outcome.outcome == "failed" and "no-such-pkg-labq" in outcome.error


def test_pause_resume_stop_through_control(tmp_path):
    control = Control()
    script = ("import time, pathlib\nn = 0\nwhile True:\n    n += 1\n"
              "    pathlib.Path('output').mkdir(exist_ok=True)\n"
              "    pathlib.Path('output/n').write_text(str(n))\n    time.sleep(0.05)\n")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(zip(
        ("final", "events", "outcome", "storage", "job"), run(tmp_path, {"code.py": script},
                                                             control), strict=True)))
    thread.start()

    def status_is(state: str) -> bool:
        return control.status is not None and control.status.state == state

    def refreshed_twice() -> bool:
        # The job thread publishes a new Status object on every supervision round; `seen`
        # keeps each one alive, so distinct ids are distinct rounds.
        if not seen or seen[-1] is not control.status:
            seen.append(control.status)
        return len(seen) >= 3

    try:
        wait_until(lambda: status_is("started") and control.status.elapsed_s > 0.3, timeout=20,
                   message="the script to run")
        control.request("pause")
        wait_until(lambda: status_is("paused"), timeout=10, message="the pause")
        paused_at = control.status.elapsed_s
        seen: list = []
        wait_until(refreshed_twice, timeout=10, interval=0.05, message="status rounds while paused")
        assert status_is("paused") and control.status.elapsed_s == paused_at  # pauses don't count
        control.request("resume")
        wait_until(lambda: status_is("started"), timeout=10, message="the resume")
    finally:
        # Stopped on failure too: a job left running would keep pytest from exiting.
        control.request("stop")
        thread.join(20)
    states = [s for s, _ in result["events"]]
    assert states == ["initialized", "started", "paused", "started", "stopped"]
    assert result["outcome"].outcome == "cancelled"


class _EndsDuringWait:
    """A supervisor whose job exits while the runner waits for a control request."""

    started_at = time.monotonic()
    output_over_limit = False

    def __init__(self) -> None:
        self.polls = 0
        self.killed = False

    def poll(self):
        self.polls += 1
        return None if self.polls == 1 else 0

    def processes(self):
        return []

    def kill(self, _grace):
        self.killed = True


@pytest.mark.parametrize("action", ["shutdown", "stop"])
def test_a_job_that_ends_as_shutdown_arrives_keeps_its_end(tmp_path, action):
    """A job that finished just as the worker's grace ran out is not put back and run
    again (seen once in CI: a 2 s job and a 2 s shutdown grace ran the job twice)."""
    from labq.process_unit.runner import _Run, _supervise

    settings = Settings(data_dir=tmp_path / "data", stop_grace_s=1)
    control = Control()
    control.request(action)
    job = JobMessage(job_id=new_job_id(), name="t", bundle_sha256="0" * 64,
                     spec=JobSpec("code.py"))
    run_ = _Run(job, settings, Storage(settings.data_dir).ensure(), lambda *a, **k: None,
                control, attempt=1, worker="w-test")
    sup = _EndsDuringWait()
    assert _supervise(run_, sup, io.BytesIO()) == "exited"
    assert not sup.killed
