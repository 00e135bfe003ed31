"""The ``labq`` CLI against a real labq (backend + workers + RabbitMQ), as a researcher
runs it: a subprocess with LABQ_URL set, exit codes and output checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, LabqSystem, write_zip

pytestmark = pytest.mark.integration

JOB_ID = re.compile(r"\b[0-9a-f]{32}\b")


def labq(system: LabqSystem, *args: str, timeout: float = 120.0,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABQ_")}
    env["LABQ_URL"] = system.url
    env["LABQ_TOKEN"] = system.token  # a researcher's machine: a token, no data dir
    env["XDG_CONFIG_HOME"] = str(system.tmp / "config")
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "labq.client.cli", *args], cwd=cwd or REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def first_id(text: str) -> str:
    match = JOB_ID.search(text)
    assert match, text
    return match.group(0)


@pytest.fixture(scope="module")
def hello(system: LabqSystem) -> str:
    """`labq submit examples/hello --wait`: exit 0, prints the id and the log."""
    result = labq(system, "submit", str(REPO / "examples" / "hello"), "--wait")
    assert result.returncode == 0, (result.stdout, result.stderr, system.read_logs())
    job_id = first_id(result.stdout.splitlines()[0])
    assert "hello" in result.stdout.splitlines()[0]
    assert "Hello from labq!" in result.stdout
    assert "succeeded" in result.stderr
    return job_id


def test_submit_wait_succeeds(system, hello):
    job = system.job(hello)
    assert (job["state"], job["outcome"], job["exit_code"]) == ("stopped", "succeeded", 0)
    assert job["name"] == "hello"


def test_submit_wait_of_a_failing_bundle_exits_non_zero(system):
    result = labq(system, "submit", str(REPO / "examples" / "fails"), "--wait")
    assert result.returncode != 0
    job_id = first_id(result.stdout)
    assert "about to fail on purpose" in result.stdout
    assert "error" in result.stderr and "exit code 3" in result.stderr
    job = system.job(job_id)
    assert (job["outcome"], job["exit_code"]) == ("error", 3)


def test_submit_a_zip_without_wait_prints_id_and_state(system, tmp_path):
    bundle = write_zip(tmp_path / "zipped.zip", {"code.py": "print('from a zip')\n"},
                       root="zipped")
    result = labq(system, "submit", str(bundle))
    assert result.returncode == 0, result.stderr
    job_id = first_id(result.stdout)
    assert re.search(r"\b(created|queued|initialized|started|completed|stopped)\b",
                     result.stdout)
    assert system.wait_done(job_id)["outcome"] == "succeeded"


def test_a_bad_bundle_is_one_readable_line(system, tmp_path):
    bundle = write_zip(tmp_path / "noentry.zip", {"readme.txt": "no script here"},
                       root="noentry")
    result = labq(system, "submit", str(bundle), "--wait")
    assert result.returncode != 0
    assert result.stderr.startswith("labq: ")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_ls_lists_the_job(system, hello):
    result = labq(system, "ls")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "NAME", "STATE", "OUTCOME"]
    row = next(line for line in lines if hello in line)
    assert "hello" in row and "stopped" in row and "succeeded" in row
    only = labq(system, "ls", "--name", "hello", "--state", "stopped", "--limit", "1")
    assert only.returncode == 0, only.stderr
    assert len(only.stdout.splitlines()) == 2


def test_status_shows_outcome_and_exit_code(system, hello):
    result = labq(system, "status", hello)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"^state:\s+stopped$", out, re.M), out
    assert re.search(r"^outcome:\s+succeeded$", out, re.M), out
    assert re.search(r"^exit code:\s+0$", out, re.M), out
    assert re.search(r"^attempts:\s+1$", out, re.M), out
    assert "created_at" in out or "created" in out


def test_status_of_an_unknown_job_is_a_clear_error(system):
    result = labq(system, "status", "0" * 32)
    assert result.returncode != 0
    assert result.stderr.startswith("labq: ") and "labq ls" in result.stderr


def test_logs_prints_the_log(system, hello):
    result = labq(system, "logs", hello)
    assert result.returncode == 0, result.stderr
    assert "Hello from labq!" in result.stdout
    followed = labq(system, "logs", "-f", hello, timeout=30)
    assert followed.returncode == 0, followed.stderr
    assert "Hello from labq!" in followed.stdout


def test_results_unpacks_output(system, hello, tmp_path):
    dest = tmp_path / "res"
    result = labq(system, "results", hello, "-o", str(dest))
    assert result.returncode == 0, result.stderr
    assert (dest / "hello.txt").read_text().startswith("Hello from labq!")
    default = labq(system, "results", hello, cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert (tmp_path / f"hello-{hello[:8]}-results" / "hello.txt").exists()


def test_stop_a_running_job(system):
    result = labq(system, "submit", str(REPO / "examples" / "long-counter"))
    assert result.returncode == 0, result.stderr
    job_id = first_id(result.stdout)
    system.wait_for_state(job_id, "started", timeout=60)
    stopped = labq(system, "stop", job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert job_id in stopped.stdout
    job = system.wait_done(job_id, timeout=60)
    assert job["outcome"] == "cancelled"
    again = labq(system, "pause", job_id)
    assert again.returncode != 0 and again.stderr.startswith("labq: ")


def test_submit_options_override_the_manifest(system):
    result = labq(system, "submit", str(REPO / "examples" / "hello"), "--wait", "-q",
                  "--name", "renamed-hello", "--timeout-s", "120", "--cpus", "1")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "Hello from labq!" not in result.stdout  # -q: no log
    job = system.job(first_id(result.stdout))
    assert (job["name"], job["outcome"]) == ("renamed-hello", "succeeded")
    too_much = labq(system, "submit", str(REPO / "examples" / "hello"),
                    "--timeout-s", str(10 * 365 * 24 * 3600))
    assert too_much.returncode != 0
    assert "timeout_s" in too_much.stderr and "Traceback" not in too_much.stderr
