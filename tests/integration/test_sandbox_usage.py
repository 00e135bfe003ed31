"""A job's CPU time and peak memory are measured to its end, in every kind of box.

The job thread samples memory and CPU once a second at most, so a figure taken from the
last sample loses the run's tail (seen in CI: cpu_s 0.93 for a job that burned 1.5 s).
Here no sample is taken at all (the sampling interval is an hour): what the job reports
is what the worker measured at its end — the cgroup's counters, or wait4's — while a
busy loop keeps the other core loaded.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_kit import require_sandbox_host

from labq.process_unit import isolation, proctree, runner
from labq.process_unit.control import Control
from labq.process_unit.jobbox import HostSandbox
from labq.shared.manifest import JobSpec
from labq.shared.messages import JobMessage
from labq.shared.settings import Settings
from labq.shared.storage import Storage, new_job_id, sha256_of

pytestmark = pytest.mark.integration

#: CPU seconds the job burns: BURN_S in its main process, BURN_S / 2 in a child it waits
#: for; and a 150 MB block it touches and frees before it burns.
BURN_S = 1.0
JOB = f"""
import os, time
block = bytearray(150 * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
del block

def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

pid = os.fork()
if pid == 0:
    burn({BURN_S / 2})
    os._exit(0)
burn({BURN_S})
os.waitpid(pid, 0)
print("burned")
"""


@pytest.fixture(scope="module", autouse=True)
def _subreaper():
    proctree.become_subreaper()


@pytest.fixture()
def host_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="labq-usage-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def busy_core() -> Iterator[None]:
    """A busy loop (bounded: 120 s at most) competing with the job for the CPUs."""
    loop = subprocess.Popen([sys.executable, "-c", "import time\nend = time.monotonic() + 120\n"
                             "while time.monotonic() < end:\n    pass\n"])
    try:
        yield
    finally:
        loop.kill()
        loop.wait()


def _sandbox(kind: str, settings: Settings) -> HostSandbox:
    if kind == "off":
        return HostSandbox.off(settings)
    require_sandbox_host()
    layers = isolation.probe(settings)
    if kind == "no cgroup":
        layers = dataclasses.replace(layers, cgroup=None)
    elif not layers.cgroup:
        pytest.fail(f"this root host has no cgroup for jobs: {layers.describe()}")
    return HostSandbox(settings, layers)


@pytest.mark.parametrize("kind", ["sandbox", "no cgroup", "off"])
def test_cpu_time_and_peak_are_measured_to_the_end_without_a_sample(
        kind: str, host_root: Path, busy_core: None, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(runner, "POLL_S", 3600.0)
    monkeypatch.setattr(runner, "CGROUP_SAMPLE_S", 3600.0)
    settings = Settings(data_dir=host_root / "data", work_dir=host_root / "work",
                        uv_offline=True, stop_grace_s=1)
    storage = Storage(settings.data_dir).ensure()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("proj/code.py", JOB)
    (storage.tmp / "b.zip").write_bytes(buf.getvalue())
    sha = sha256_of(storage.tmp / "b.zip")
    storage.store_bundle(storage.tmp / "b.zip", sha)
    job = JobMessage(job_id=new_job_id(), name="burn", bundle_sha256=sha,
                     spec=JobSpec("code.py", memory_mb=1024))
    runner.run_job(job, settings, lambda *a, **k: None, Control(), attempt=1, worker="w",
                   storage=storage, sandbox=_sandbox(kind, settings))
    outcome = storage.read_outcome(job.job_id)
    log = storage.log_path(job.job_id).read_text()
    assert outcome.outcome == "succeeded" and "burned" in log, log
    assert outcome.cpu_s >= 0.95 * 1.5 * BURN_S, outcome
    # The cgroup's high-water mark; without one, the largest process wait4 reaped.
    assert outcome.peak_rss_mb >= 140, outcome
