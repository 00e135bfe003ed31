"""A job cannot reach labq's own settings or credentials."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration

SNOOP = r"""
import os
found = []
for key, value in os.environ.items():
    if key.startswith("LABQ_") and key not in ("LABQ_JOB_ID", "LABQ_ATTEMPT"):
        found.append("own env: " + key)
pid = os.getppid()
while pid > 1:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            if b"LABQ_RABBITMQ_URL" in handle.read():
                found.append(f"environ of ancestor {pid}")
    except OSError:
        pass
    with open(f"/proc/{pid}/stat") as handle:
        pid = int(handle.read().rsplit(")", 1)[1].split()[1])
print("LEAKS:", found)
"""


def test_a_job_finds_no_labq_settings_in_its_env(system):
    # Given a job that looks for broker credentials in its own environment and in the
    # environment of every process above it (the worker, labq up, the test runner)
    job = system.submit({"code.py": SNOOP})
    done = system.wait_done(job["id"])
    assert done["outcome"] == "succeeded", system.log(job["id"])
    log = system.log(job["id"])
    assert "LEAKS:" in log
    leaks = log.split("LEAKS:", 1)[1].splitlines()[0]
    # Then its own environment holds nothing of labq's
    assert "own env" not in leaks, leaks
    # The ancestors' environ is protected only against a job of another user than root
    # (tests/unit/test_hardening.py); these tests run jobs as root, who reads anything.
    if os.geteuid() != 0:
        worker_pids = {str(p.pid) for p in system.workers}
        assert not any(f"ancestor {pid}'" in leaks for pid in worker_pids), leaks
