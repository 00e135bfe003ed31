"""Limits from labq.toml enforced by the worker: time, memory, CPUs, output size, signals."""

from __future__ import annotations

import os

import pytest

from labq.shared.storage import Storage

pytestmark = pytest.mark.integration


def test_timeout(system):
    job = system.submit({"code.py": "import time\nprint('sleeping', flush=True)\ntime.sleep(60)\n",
                         "labq.toml": "timeout_s = 2\n"})
    done = system.wait_done(job["id"], timeout=30)
    assert (done["state"], done["outcome"]) == ("stopped", "timeout")
    assert "sleeping" in system.log(job["id"])


def test_memory_limit(system):
    script = ("import time\nblocks = []\nwhile True:\n"
              "    blocks.append(bytearray(20 * 1024 * 1024))\n"
              "    for i in range(0, len(blocks[-1]), 4096):\n        blocks[-1][i] = 1\n"
              "    time.sleep(0.05)\n")
    job = system.submit({"code.py": script, "labq.toml": "memory_mb = 100\n"})
    done = system.wait_done(job["id"], timeout=30)
    assert (done["state"], done["outcome"]) == ("stopped", "error")
    assert done["error"].startswith("out of memory (limit 100 MB)"), done["error"]


def test_a_job_printing_past_its_output_cap_is_stopped(system):
    # The cap is max_output_mb, 64 MB at least: the worker counts what it copies.
    script = ("import sys\nprint('before the flood', flush=True)\n"
              "while True:\n    sys.stdout.write('y' * 1048575 + '\\n')\n")
    job = system.submit({"code.py": script, "labq.toml": "max_output_mb = 1\n"})
    done = system.wait_done(job["id"], timeout=120)
    assert (done["state"], done["outcome"]) == ("stopped", "error"), done
    assert done["error"] == ("the job printed more than 64 MB to its log (its output cap: "
                             "max_output_mb, 64 MB at least)"), done
    log_path = Storage(system.data_dir).log_path(job["id"])
    assert 64 << 20 < log_path.stat().st_size < (64 << 20) + 64 * 1024
    with open(log_path, "rb") as handle:
        handle.seek(-2000, os.SEEK_END)
        tail = handle.read().decode()
    assert f"labq: {done['error']}; stopping the job\n" in tail, tail


def test_a_signal_killed_job_names_the_signal(system):
    job = system.submit({"code.py": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"})
    done = system.wait_done(job["id"])
    assert (done["outcome"], done["exit_code"]) == ("error", -9)
    assert "killed by SIGKILL" in done["error"]


def test_cpus_pin_the_job(system):
    job = system.submit({"code.py": "import os\nprint('CPUS', len(os.sched_getaffinity(0)),"
                                    " os.environ['OMP_NUM_THREADS'])\n",
                         "labq.toml": "cpus = 1\n"})
    done = system.wait_done(job["id"])
    assert done["outcome"] == "succeeded"
    assert "CPUS 1 1" in system.log(job["id"])


def test_output_larger_than_allowed(system):
    script = ("import os, pathlib\npathlib.Path('output').mkdir(exist_ok=True)\n"
              "pathlib.Path('output/big.bin').write_bytes(os.urandom(2 * 1024 * 1024))\n")
    job = system.submit({"code.py": script, "labq.toml": "max_output_mb = 1\n"})
    done = system.wait_done(job["id"])
    assert done["outcome"] == "error" and "output/ is larger" in done["error"]
