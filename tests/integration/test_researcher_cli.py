"""The researcher's CLI against a real labq: Ctrl-C on submit --wait, a failed install
said once, search, dates and sorting, short ids, receipt, rerun with new arguments, a
sweep waited for and listed, a queued job's place and reason."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import REPO, wait_until
from test_cli import first_id, labq

pytestmark = pytest.mark.integration


def project(tmp: Path, files: dict[str, str]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (tmp / name).write_text(text)
    return tmp


def test_ctrl_c_on_submit_wait_says_the_job_keeps_running(system, tmp_path):
    folder = project(tmp_path / "sleepy", {
        "code.py": "import time\nprint('ready', flush=True)\ntime.sleep(120)\n"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABQ_")}
    env.update(LABQ_URL=system.url, PYTHONPATH=str(REPO), LABQ_TOKEN=system.token,
               XDG_CONFIG_HOME=str(system.tmp / "config"))
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "labq.client.cli", "submit",
                                 str(folder), "--wait"], env=env, stdout=o, stderr=e)
    try:
        wait_until(lambda: "ready" in out.read_text(), timeout=60, message="the job's log")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    job_id = first_id(out.read_text())
    text = err.read_text()
    assert f"job {job_id} keeps running" in text and f"labq logs -f {job_id}" in text, text
    assert "Aborted!" not in text
    assert system.job(job_id)["state"] == "started"
    system.set_state(job_id, "stopped")
    system.wait_done(job_id)


def test_a_failed_install_is_said_once(system, tmp_path):
    folder = project(tmp_path / "badreq", {"code.py": "print(1)\n",
                                           "requirements.txt": "labq-no-such-pkg-xyz==9.9\n"})
    result = labq(system, "submit", str(folder), "--wait")
    assert result.returncode == 1
    text = result.stdout + result.stderr
    job = system.job(first_id(result.stdout))
    assert job["outcome"] == "failed"
    detail = [line for line in job["error"].splitlines()[1:] if line.strip()]
    assert detail, job["error"]  # uv's explanation beyond its first line
    for line in detail:
        assert text.count(line.strip()) == 1, (line, text)
    assert "Activate with" not in text


def test_search_short_ids_receipt_and_rerun(system, tmp_path):
    folder = project(tmp_path / "oscillator", {
        "code.py": "import sys, pathlib\nprint('ARGS', sys.argv[1:])\n"
                   "pathlib.Path('output/r.txt').write_text(' '.join(sys.argv[1:]))\n",
        "labq.toml": 'args = ["--lr=1"]\n'})
    first = labq(system, "submit", str(folder), "--wait")
    assert first.returncode == 0, first.stderr
    job_id = first_id(first.stdout)
    listed = labq(system, "ls", "--q", "OSCILL", "--outcome", "succeeded")
    assert job_id in listed.stdout
    assert job_id not in labq(system, "ls", "--q", "osc", "--outcome", "error").stdout
    status = labq(system, "status", job_id[:8])
    assert status.returncode == 0 and "durations:" in status.stdout and "run " in status.stdout
    receipt = labq(system, "receipt", job_id[:8])
    assert receipt.returncode == 0, receipt.stderr
    assert "python:" in receipt.stdout and "r.txt" in receipt.stdout
    again = labq(system, "rerun", job_id[:8], "--arg", "--lr=2", "--wait")
    assert again.returncode == 0, again.stderr
    assert "ARGS ['--lr=2']" in again.stdout
    new_id = first_id(again.stdout)
    assert system.job(new_id)["rerun_of"] == job_id
    assert f"exact packages of job {job_id}" in system.log(new_id)


def test_submit_wait_waits_for_the_whole_sweep(system, tmp_path):
    folder = project(tmp_path / "sweepy", {
        "code.py": "import os, sys\nprint('RUN', os.environ['seed'], sys.argv[1:])\n",
        "labq.toml": 'args = ["--seed={seed}"]\n[sweep]\nseed = [1, 2, 3]\n'})
    result = labq(system, "submit", str(folder), "--wait")
    assert result.returncode == 0, (result.stdout, result.stderr)
    for seed in (1, 2, 3):
        assert f"RUN {seed} ['--seed={seed}']" in result.stdout
    assert "all 3 jobs succeeded" in result.stderr


def _listed(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The job ids of a `labq ls` table, in its order."""
    assert result.returncode == 0, result.stderr
    return [line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()]


def test_ls_by_dates_and_sorted_by_duration(system, tmp_path):
    tag = uuid.uuid4().hex[:8]
    ids = {}
    for name, seconds in (("short", 0.1), ("long", 2.5)):
        folder = project(tmp_path / f"dur{name}-{tag}", {
            "code.py": f"import time\ntime.sleep({seconds})\n"})
        done = labq(system, "submit", str(folder), "--wait")
        assert done.returncode == 0, done.stderr
        ids[name] = first_id(done.stdout)
    short, long = (system.job(ids[n]) for n in ("short", "long"))
    assert short["durations"]["run_s"] < long["durations"]["run_s"], (short, long)
    both = ["--q", tag]
    assert _listed(labq(system, "ls", *both, "--sort", "duration")) == [short["id"], long["id"]]
    assert _listed(labq(system, "ls", *both, "--sort", "-duration")) == [long["id"], short["id"]]
    assert _listed(labq(system, "ls", *both, "--sort", "created")) == [short["id"], long["id"]]
    assert _listed(labq(system, "ls", *both)) == [long["id"], short["id"]]  # newest first
    # --since is inclusive and --until exclusive, on the created time
    assert _listed(labq(system, "ls", *both, "--since", long["created_at"])) == [long["id"]]
    assert _listed(labq(system, "ls", *both, "--until", long["created_at"])) == [short["id"]]
    today = short["created_at"][:10]
    assert len(_listed(labq(system, "ls", *both, "--since", today))) == 2
    nothing = labq(system, "ls", *both, "--until", today)
    assert nothing.returncode == 0 and nothing.stdout.strip() == "no jobs match"
    bad = labq(system, "ls", "--since", "last tuesday")
    assert bad.returncode != 0 and "since must be a date like 2024-05-01" in bad.stderr


def test_group_lists_a_sweeps_jobs(system, tmp_path):
    folder = project(tmp_path / f"grouped-{uuid.uuid4().hex[:6]}", {
        "code.py": "import os\nprint('seed', os.environ['seed'])\n",
        "labq.toml": "[sweep]\nseed = [1, 2]\n"})
    result = labq(system, "submit", str(folder), "--wait")
    assert result.returncode == 0, (result.stdout, result.stderr)
    group_id = system.job(first_id(result.stdout))["group_id"]
    members = system.http.get(system.api(f"/api/v1/groups/{group_id}"), timeout=10).json()
    shown = labq(system, "group", group_id)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"group {group_id} ({folder.name}): 2 jobs, done", lines
    rows = sorted(line.split()[:3] for line in lines[1:])
    assert rows == sorted([j["id"][:8], "stopped", "succeeded"] for j in members["jobs"])
    missing = labq(system, "group", uuid.uuid4().hex)
    assert missing.returncode != 0 and "there is no group" in missing.stderr


def test_status_of_a_queued_job_shows_its_place_and_why(system):
    blocker = {"code.py": "import time\nprint('ready', flush=True)\ntime.sleep(120)\n"}
    busy = [system.submit(blocker)["id"] for _ in range(2)]
    waiting = None
    try:
        for job_id in busy:
            system.wait_for_state(job_id, "started")
        waiting = system.submit({"code.py": "print(1)\n"})["id"]
        system.wait_for_state(waiting, "queued")
        shown = labq(system, "status", waiting[:8])
        assert shown.returncode == 0, shown.stderr
        fields = dict(line.split(":", 1) for line in shown.stdout.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        assert fields["state"] == "queued"
        assert fields["queue"] == "#1, 0 jobs ahead, 2 workers busy", shown.stdout
        assert fields["estimated start"].startswith(time.strftime("%Y-", time.gmtime()))
        running = labq(system, "status", busy[0][:8]).stdout.splitlines()
        assert not [line for line in running if line.startswith(("queue:", "estimated"))]
    finally:
        for job_id in [*busy, waiting]:
            if job_id:
                system.set_state(job_id, "stopped")
        for job_id in [*busy, waiting]:
            if job_id:
                system.wait_done(job_id)
