"""The researcher's day against a real labq (backend, two workers, RabbitMQ): pause-aware
run time and time limit, output/ present, workers counted, queue place, peak memory and
CPU, results offered only when there are some."""

from __future__ import annotations

import pytest
from helpers import LabqSystem, wait_until

pytestmark = pytest.mark.integration

READY = "import time\nprint('ready', flush=True)\n"


def wait_log(system: LabqSystem, job_id: str, text: str, timeout: float = 60) -> None:
    wait_until(lambda: text in system.log(job_id), timeout=timeout,
               message=f"{text!r} in the log of {job_id}")


def test_output_folder_exists_without_being_in_the_bundle(system):
    job = system.submit({"code.py": "open('output/hello.txt', 'w').write('hi')\n"})
    done = system.wait_done(job["id"])
    assert done["outcome"] == "succeeded", system.log(job["id"])
    assert done["has_results"] is True
    files = system.http.get(system.api(f"/api/v1/jobs/{job['id']}/results/files"),
                         timeout=10).json()["files"]
    assert [f["path"] for f in files] == ["hello.txt"]


def test_a_job_that_left_nothing_offers_no_results(system):
    done = system.wait_done(system.submit({"code.py": "print('nothing')\n"})["id"])
    assert done["outcome"] == "succeeded" and done["has_results"] is False


def test_paused_time_counts_neither_as_run_time_nor_toward_the_time_limit(system):
    # 2.5 s of running under a 4 s limit, with a longer pause in between: it succeeds.
    script = READY + "for _ in range(25):\n    time.sleep(0.1)\nprint('done')\n"
    job = system.submit({"code.py": script, "labq.toml": "timeout_s = 4\n"})
    wait_log(system, job["id"], "ready")
    assert system.set_state(job["id"], "paused").status_code == 200
    system.wait_for_state(job["id"], "paused")
    wait_until(lambda: system.job(job["id"])["durations"]["paused_s"] >= 4.5, timeout=30,
               message="a pause longer than the time limit")
    assert system.set_state(job["id"], "started").status_code == 200
    done = system.wait_done(job["id"])
    assert (done["outcome"], done["exit_code"]) == ("succeeded", 0), system.log(job["id"])
    d = done["durations"]
    assert d["paused_s"] >= 4.5
    assert 2.0 <= d["run_s"] < 4.0, d
    assert d["total_s"] >= d["run_s"] + d["paused_s"]
    assert done["started_at"] < done["paused_at"], "resume must not move started_at"


def test_busy_workers_are_counted_and_a_waiting_job_knows_its_place(system):
    sleeper = READY + "time.sleep(120)\n"
    running = [system.submit({"code.py": sleeper}, name=f"busy{i}")["id"] for i in range(2)]
    waiting = None
    try:
        for job_id in running:
            system.wait_for_state(job_id, "started")
        waiting = system.submit({"code.py": "print(1)\n"}, name="waiter")["id"]
        stats = system.http.get(system.api("/api/v1/stats"), timeout=10).json()
        assert stats["queue"]["workers"] == 2 and stats["queue"]["busy_workers"] == 2
        job = system.job(waiting)
        assert job["state"] == "queued" and job["queue_position"] == 1
        assert job["waiting_reason"] == "0 jobs ahead, 2 workers busy"
        assert job["estimated_start_at"] is not None
        assert system.job(running[0])["queue_position"] is None
    finally:
        for job_id in [*running, waiting]:
            if job_id:
                system.set_state(job_id, "stopped")
        for job_id in [*running, waiting]:
            if job_id:
                system.wait_done(job_id)


def test_peak_memory_cpu_time_and_usage_samples(system):
    script = ("import time\nblock = bytearray(60 * 1024 * 1024)\n"
              "for i in range(0, len(block), 4096):\n    block[i] = 1\n"
              "end = time.process_time() + 1.5\nwhile time.process_time() < end:\n    pass\n")
    done = system.wait_done(system.submit({"code.py": script})["id"])
    assert done["outcome"] == "succeeded"
    assert done["peak_rss_mb"] >= 55, done
    assert done["cpu_s"] >= 0.95 * 1.5, done  # measured at its end, not the last sample
    assert done["durations"]["env_s"] is not None
    usage = system.http.get(system.api(f"/api/v1/jobs/{done['id']}/usage"), timeout=10).json()
    assert usage["columns"] == ["t_s", "rss_mb", "cpu_s"] and usage["samples"]


def test_out_of_memory_reports_limit_and_peak(system):
    script = ("import time\nblocks = []\nwhile True:\n"
              "    blocks.append(bytearray(20 * 1024 * 1024))\n"
              "    for i in range(0, len(blocks[-1]), 4096):\n        blocks[-1][i] = 1\n"
              "    time.sleep(0.05)\n")
    done = system.wait_done(system.submit({"code.py": script,
                                           "labq.toml": "memory_mb = 100\n"})["id"])
    assert done["outcome"] == "error" and done["error"].startswith("out of memory")
    # The kernel (memory cgroup) stops it at its limit, so its peak is close to 100 MB.
    assert done["spec"]["memory_mb"] == 100 and done["peak_rss_mb"] > 50
