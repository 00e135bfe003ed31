"""The whole pipeline through the REST API: upload → RabbitMQ → worker → results."""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from collections.abc import Iterator

import pika
import pytest
from helpers import LabqSystem, make_zip
from unit.test_envcache import make_wheel  # a hand-written wheel: no network

from labq.shared.manifest import JobSpec
from labq.shared.messages import JobMessage
from labq.shared.storage import Storage
from labq.shared.topology import PERSISTENT, Topology

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def system(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabqSystem]:
    """Backend + two workers whose uv finds packages only in a local wheel folder."""
    tmp = tmp_path_factory.mktemp("labq")
    sys_ = LabqSystem(tmp, workers=2, env={"LABQ_UV_OFFLINE": "1"})
    # Beside the work dir, where the build uid (in its sandbox) can read the wheels.
    make_wheel(sys_.work_dir / "wheels")
    sys_.env["LABQ_UV_FIND_LINKS"] = str(sys_.work_dir / "wheels")
    try:
        sys_.start()
        yield sys_
    finally:
        sys_.stop()


WRITE_OUTPUT = """
import pathlib
out = pathlib.Path("output")
(out / "deep" / "er").mkdir(parents=True, exist_ok=True)
(out / "deep" / "er" / "data.bin").write_bytes(bytes(range(256)) * 100)
(out / "hello.txt").write_text("hello from the job\\n")
print("wrote output")
"""


def test_output_comes_back_intact(system):
    job = system.submit({"code.py": WRITE_OUTPUT, "output/given.txt": "shipped in the bundle"})
    done = system.wait_done(job["id"])
    assert (done["state"], done["outcome"], done["exit_code"]) == ("stopped", "succeeded", 0)
    resp = system.http.get(system.api(f"/api/v1/jobs/{job['id']}/results"), timeout=10)
    assert resp.status_code == 200
    with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
        assert sorted(zf.namelist()) == ["deep/er/data.bin", "given.txt", "hello.txt"]
        assert zf.read("deep/er/data.bin") == bytes(range(256)) * 100
        assert zf.read("given.txt") == b"shipped in the bundle"
    log = system.log(job["id"])
    assert "=== labq: attempt 1 on " in log and "wrote output" in log


def test_failing_script_reports_error_exit_code_and_output(system):
    job = system.submit({"code.py": "import sys\nprint('about to fail')\n"
                                    "print('bad thing', file=sys.stderr)\nsys.exit(7)\n"})
    done = system.wait_done(job["id"])
    assert (done["state"], done["outcome"], done["exit_code"]) == ("stopped", "error", 7)
    log = system.log(job["id"])
    assert "about to fail" in log and "bad thing" in log


def test_requirements_from_a_local_wheel_and_env_reuse(system):
    files = {"requirements.txt": "labqdemo==1.0\n",
             "code.py": "import labqdemo\nprint('VALUE', labqdemo.VALUE)\n"}
    first = system.wait_done(system.submit(files)["id"])
    assert first["outcome"] == "succeeded", system.log(first["id"])
    second = system.wait_done(system.submit(files)["id"])
    assert second["outcome"] == "succeeded"
    assert "VALUE 42" in system.log(first["id"]) and "VALUE 42" in system.log(second["id"])
    assert "building environment" in system.log(first["id"])
    assert "reusing environment" in system.log(second["id"])
    assert "building environment" not in system.log(second["id"])
    envs = [p for p in (system.work_dir / "envs").iterdir()
            if not p.name.startswith(".") and (p / "bin").exists()]
    # One env with the wheel (plus the empty one of the requirement-less jobs).
    assert len({p.name for p in envs}) <= 2


def test_uninstallable_requirements_fail_with_uvs_message(system):
    job = system.submit({"requirements.txt": "labq-not-a-package==1\n", "code.py": "print(1)\n"})
    done = system.wait_done(job["id"])
    assert (done["state"], done["outcome"]) == ("failed", "failed")
    assert "labq-not-a-package" in done["error"]


def test_no_requirements_runs_isolated_from_labq(system):
    done = system.wait_done(system.submit({"code.py": "import flask\n"})["id"])
    assert done["outcome"] == "error"
    assert "No module named 'flask'" in system.log(done["id"])


def test_two_workers_run_in_parallel_each_one_at_a_time(system):
    script = ("import time, json, os, pathlib\nstart = time.time()\ntime.sleep(1.5)\n"
              "pathlib.Path('output').mkdir(exist_ok=True)\n"
              "pathlib.Path('output/t.json').write_text(json.dumps([start, time.time()]))\n")
    ids = [system.submit({"code.py": script})["id"] for _ in range(4)]
    done = [system.wait_done(i) for i in ids]
    spans: dict[str, list[tuple[float, float]]] = {}
    for job in done:
        assert job["outcome"] == "succeeded"
        data = system.http.get(system.api(f"/api/v1/jobs/{job['id']}/results/files/t.json"),
                            timeout=10)
        assert data.status_code == 200
        spans.setdefault(job["worker"], []).append(tuple(json.loads(data.text)))
    assert len(spans) == 2
    for worker_spans in spans.values():
        worker_spans.sort()
        for a, b in zip(worker_spans, worker_spans[1:], strict=False):
            assert a[1] <= b[0], "a worker ran two jobs at once"
    (a, *_), (b, *_) = spans.values()
    assert a[0] < b[1] and b[0] < a[1], "the workers never ran at the same time"


def test_duplicate_delivery_runs_once(system):
    bundle = make_zip({"code.py": "print('RAN ONCE')\n"})
    resp = system.http.post(system.api("/api/v1/jobs"), files={"bundle": ("b.zip", bundle)},
                         timeout=30)
    assert resp.status_code == 201
    job_id = resp.json()["id"]
    done = system.wait_done(job_id)
    message = JobMessage(job_id=job_id, name="proj", bundle_sha256=hashlib.sha256(bundle)
                         .hexdigest(), spec=JobSpec("code.py"))
    conn = pika.BlockingConnection(pika.URLParameters(system.settings.rabbitmq_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for _ in range(2):
            ch.basic_publish(Topology(system.prefix).jobs_exchange, "job", message.encode(),
                             pika.BasicProperties(delivery_mode=PERSISTENT), mandatory=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            queue = ch.queue_declare(Topology(system.prefix).jobs_queue, passive=True)
            if queue.method.message_count == 0:
                break
            time.sleep(0.2)
    finally:
        conn.close()
    time.sleep(1.0)
    again = system.job(job_id)
    assert (again["state"], again["outcome"], again["attempts"]) == ("stopped", "succeeded", 1)
    assert again["stopped_at"] == done["stopped_at"]
    assert system.log(job_id).count("RAN ONCE") == 1
    assert Storage(system.data_dir).attempts(job_id) == 1
