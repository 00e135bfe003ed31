"""docker-compose.yml, run for real: build the images, bring the stack up with two
workers, run sandboxed jobs through the published port, restart the backend and the
broker under load, and see every job end succeeded, once.

Runs only from ``make test-compose`` (``LABQ_COMPOSE_TEST=1``; it builds images and takes
minutes, so plain ``make test`` skips it). Where no engine can run (not root, no
Podman), it skips and says why. Everything of the project — containers, volumes,
network — is removed afterwards, pass or fail.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from helpers import free_port, wait_until

from labq.client.api import Client
from labq.shared import migrations

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stack as engine  # noqa: E402

if os.environ.get("LABQ_COMPOSE_TEST") != "1":
    pytest.skip("the compose stack test builds images and takes minutes: "
                "run it with `make test-compose`", allow_module_level=True)

pytestmark = pytest.mark.timeout(1500)

WORKERS = 2
SANDBOX_UIDS = range(60000, 61000)
#: A job long enough to be running when a service restarts under it.
SLOW_JOB_S = 8


def _submit(client: Client, tmp: Path, name: str, seconds: float) -> str:
    return client.submit(_job(tmp / name, name, seconds), fields={"name": name})["id"]


def _job(folder: Path, name: str, seconds: float) -> Path:
    """A bundle that says when it starts (counted in the log: a job that ran twice says
    it twice), runs ``seconds`` and leaves output/done.json."""
    folder.mkdir(parents=True)
    (folder / "code.py").write_text(textwrap.dedent(f"""\
        import json, os, time
        from pathlib import Path
        print("START {name}", flush=True)
        deadline = time.monotonic() + {seconds}
        while time.monotonic() < deadline:
            time.sleep(0.5)
        Path("output").mkdir(exist_ok=True)
        Path("output/done.json").write_text(json.dumps({{"name": "{name}"}}))
        print("END {name}", flush=True)
        """))
    return folder


def _probe_job(folder: Path) -> Path:
    """A bundle that reports what the sandbox lets it see and reach."""
    folder.mkdir(parents=True)
    (folder / "code.py").write_text(textwrap.dedent("""\
        import json, os, socket
        from pathlib import Path

        def reach(host, port):
            try:
                socket.create_connection((host, port), timeout=3).close()
                return True
            except OSError:
                return False

        report = {
            "uid": os.getuid(),
            "data_dir_visible": Path("/data").exists(),
            "admin_token_visible": Path("/data/admin-token").exists(),
            "broker_reachable": reach("rabbitmq", 5672),
            "database_reachable": reach("postgres", 5432),
        }
        Path("output").mkdir(exist_ok=True)
        Path("output/report.json").write_text(json.dumps(report))
        print("probe done")
        """))
    return folder


class Stack:
    """The running project, what the tests share."""

    def __init__(self, compose: engine.ComposeStack, url: str, phases: engine.Phases) -> None:
        self.compose = compose
        self.url = url
        self.phases = phases
        self.client: Client | None = None

    def readyz(self) -> dict | None:
        try:
            resp = requests.get(f"{self.url}/readyz", timeout=5)
        except requests.RequestException:
            return None
        return resp.json() if resp.status_code == 200 else None

    def ready_with_workers(self) -> dict | None:
        """/readyz once the backend is ready and every worker reports a full sandbox."""
        ready = self.readyz()
        if not ready:
            return None
        complete = [w for w in ready["sandbox"].values() if w.get("complete")]
        return ready if len(complete) >= WORKERS else None

    def wait_ready(self, timeout: float = 240) -> dict:
        return wait_until(self.ready_with_workers, timeout=timeout, interval=0.5,
                          message=f"/readyz with {WORKERS} sandboxed workers")

    def wait_done(self, job_ids: list[str], timeout: float = 240) -> dict[str, dict]:
        assert self.client is not None
        jobs: dict[str, dict] = {}

        def all_done() -> bool:
            for job_id in job_ids:
                if job_id not in jobs:
                    try:
                        job = self.client.job(job_id)
                    except Exception:  # the backend may be coming back up
                        return False
                    if job["state"] in ("stopped", "failed"):
                        jobs[job_id] = job
            return len(jobs) == len(job_ids)

        wait_until(all_done, timeout=timeout, interval=0.5, message=f"jobs {job_ids} to end")
        return jobs

    def running(self, job_ids: list[str]) -> list[str]:
        assert self.client is not None
        return [j for j in job_ids if self.client.job(j)["state"] == "started"]

    def states(self, job_ids: list[str]) -> str:
        assert self.client is not None
        counts: dict[str, int] = {}
        for job_id in job_ids:
            state = self.client.job(job_id)["state"]
            counts[state] = counts.get(state, 0) + 1
        return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))

    def report(self, what: str, phase: str, before: str, jobs: dict[str, dict]) -> None:
        """One line for the log: what a restart did to the jobs it hit."""
        attempts = sorted(job.get("attempts") for job in jobs.values())
        workers = {job.get("worker") for job in jobs.values()}
        outcomes = sorted({str(job.get("outcome")) for job in jobs.values()})
        print(f"\n{what}: jobs at the restart: {before}; afterwards {len(jobs)} ended "
              f"{'/'.join(outcomes)}, attempts {attempts}, on {len(workers)} worker(s); "
              f"{phase} {self.phases.seconds.get(phase)} s", flush=True)

    def assert_succeeded_once(self, jobs: dict[str, dict], tmp: Path) -> None:
        assert self.client is not None
        for job_id, job in jobs.items():
            assert job["state"] == "stopped" and job["outcome"] == "succeeded", job
            log, _ = self.client.log(job_id)
            name = job["name"]  # set at submission; the job prints it
            assert log.count(f"START {name}\n") == 1, f"{job_id} ran more than once:\n{log}"
            results = self.client.download_results(job_id, tmp / f"{job_id}.zip")
            with zipfile.ZipFile(results) as zf:
                done = json.loads(zf.read("done.json"))
            assert done == {"name": name}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[Stack]:
    why = engine.why_not()
    if why:
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"CI as root must run the compose test, but: {why}")
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("compose")
    port = free_port()
    env_file = tmp / "compose.env"
    # Real credentials, as a lab's .env would have them (compose.env.example).
    env_file.write_text(f"RABBITMQ_USER=labq\nRABBITMQ_PASSWORD={secrets.token_hex(16)}\n"
                        f"POSTGRES_PASSWORD={secrets.token_hex(16)}\n"
                        f"LABQ_PUBLISH=127.0.0.1:{port}\n")
    phases = engine.Phases()
    compose = engine.ComposeStack(f"labqci{secrets.token_hex(4)}", env_file, WORKERS)
    result = Stack(compose, f"http://127.0.0.1:{port}", phases)
    try:
        with phases("debian base image"):
            source = engine.ensure_debian()
        with phases("python, rabbitmq, postgres images"):
            engine.build_bases()
        with phases("labq image (podman-compose build)"):
            compose.build()
        with phases("podman-compose up"):
            compose.up()
        with phases("up to ready (/readyz, 2 sandboxed workers)"):
            result.wait_ready()
        print(f"\ncompose stack {compose.project} ready at {result.url} (base: {source}); "
              f"{phases.report()}", flush=True)
        failed_before = request.session.testsfailed
        yield result
        if request.session.testsfailed > failed_before:
            print(compose.logs(), flush=True)  # what the services said, for the failure
    except BaseException:
        print(compose.logs(), flush=True)
        raise
    finally:
        with phases("teardown (down -v and sweep)"):
            left = compose.down()
        engine.prune_images()
        print(f"\ncompose phases: {phases.report()}", flush=True)
        assert not left, f"left behind by the compose test: {left}"


def test_the_stack_is_ready_with_its_own_credentials_and_schema(stack):
    ready = stack.wait_ready()
    assert ready["checks"] == {"database": "ok", "broker": "ok"}
    workers = {name: w for name, w in ready["sandbox"].items() if w.get("complete")}
    hosts = {w["host"] for w in workers.values()}
    assert len(hosts) == WORKERS, f"each worker container names itself: {workers}"
    for report in workers.values():
        assert report["mode"] == "required" and report["cgroup"] and not report["missing"]
    # Every service's healthcheck, as docker-compose.yml defines it, passes.
    containers = stack.compose.containers()
    assert len(containers) == 3 + WORKERS, containers
    for name in containers:
        assert stack.compose.healthy(name), f"the healthcheck of {name} fails"
    # labq's migrations ran at the backend's start.
    head = stack.compose.exec("postgres", "psql", "-U", "labq", "-d", "labq", "-tAc",
                              "SELECT version_num FROM alembic_version").stdout.strip()
    assert head == migrations.head()
    # The broker has labq's account and no guest; the job queue is a quorum queue.
    users = stack.compose.exec("rabbitmq", "rabbitmqctl", "-q", "list_users").stdout
    assert "labq" in users and "guest" not in users
    queues = stack.compose.exec("rabbitmq", "rabbitmqctl", "-q", "list_queues",
                                "name", "type").stdout
    assert any(line.split() == ["labq.jobs", "quorum"] for line in queues.splitlines()), queues


def test_a_job_runs_sandboxed_through_the_published_port(stack, tmp_path):
    # An account as a lab admin makes one: `labq user add` in the backend's container.
    added = stack.compose.exec("backend", "labq", "user", "add", "ci-researcher").stdout
    token = added.strip().splitlines()[-1]
    stack.client = Client(stack.url, token=token)
    assert stack.client.me()["name"] == "ci-researcher"

    job = stack.client.submit(_probe_job(tmp_path / "probe"))
    done = stack.wait_done([job["id"]])[job["id"]]
    assert done["outcome"] == "succeeded", (done, stack.client.log(job["id"])[0])
    with zipfile.ZipFile(stack.client.download_results(job["id"], tmp_path / "r.zip")) as zf:
        report = json.loads(zf.read("report.json"))
    assert report["uid"] in SANDBOX_UIDS
    assert not report["data_dir_visible"] and not report["admin_token_visible"]
    assert not report["broker_reachable"] and not report["database_reachable"]


def _job_cgroup_limits(stack: Stack) -> list[str]:
    """memory limits of the job cgroups in the worker containers (v1 layout, this VM)."""
    limits = []
    for index in range(1, WORKERS + 1):
        done = run_in_worker(stack, index,
                             "cat /sys/fs/cgroup/memory/labq-*/memory.limit_in_bytes")
        limits += done.stdout.split()
    return limits


def run_in_worker(stack: Stack, index: int, script: str):
    return engine.run(["podman", "exec", stack.compose.container("worker", index),
                       "sh", "-c", script], check=False)


def test_the_job_cgroup_inside_the_container_holds_its_memory(stack, tmp_path):
    folder = tmp_path / "hog"
    folder.mkdir()
    # Waits for the test to find its cgroup, then takes memory until the kernel stops it.
    (folder / "code.py").write_text(textwrap.dedent("""\
        import os, time
        from pathlib import Path
        while not Path("go").exists():
            time.sleep(0.2)
        blocks = []
        while True:
            blocks.append(bytearray(20 * 1024 * 1024))
            for i in range(0, len(blocks[-1]), 4096):
                blocks[-1][i] = 1
        """))
    (folder / "labq.toml").write_text("memory_mb = 100\n")
    job = stack.client.submit(folder)["id"]
    limit = str(100 * 1024 * 1024)
    wait_until(lambda: limit in _job_cgroup_limits(stack), timeout=120, interval=0.5,
               message="the job's memory cgroup (100 MB) in a worker container")
    # Now let it take memory: ./go beside its code, in its workspace on the worker.
    for index in range(1, WORKERS + 1):
        run_in_worker(stack, index, f"find /var/lib/labq-work/{job}-* -name code.py "
                                    "-execdir touch go ';' 2>/dev/null; true")
    done = stack.wait_done([job])[job]
    assert (done["state"], done["outcome"]) == ("stopped", "error"), done
    assert done["error"].startswith("out of memory (limit 100 MB)"), done["error"]


def test_a_backend_restart_loses_nothing(stack, tmp_path):
    client = stack.client
    ids = [_submit(client, tmp_path, f"backend-{i}", SLOW_JOB_S) for i in range(2 * WORKERS)]
    wait_until(lambda: stack.running(ids), timeout=120, interval=0.3,
               message="a job running before the backend restarts")
    before = stack.states(ids)
    phase = "backend restart (podman restart) to ready"
    with stack.phases(phase):
        with stack.phases("podman restart backend"):
            stack.compose.restart("backend")
        stack.wait_ready()
    jobs = stack.wait_done(ids)
    stack.report("backend restart", phase, before, jobs)
    stack.assert_succeeded_once(jobs, tmp_path)
    after = _submit(client, tmp_path, "backend-after", 1)
    stack.assert_succeeded_once(stack.wait_done([after]), tmp_path)


def test_a_broker_restart_loses_nothing(stack, tmp_path):
    client = stack.client
    ids = [_submit(client, tmp_path, f"broker-{i}", SLOW_JOB_S) for i in range(2 * WORKERS)]
    wait_until(lambda: stack.running(ids), timeout=120, interval=0.3,
               message="a job running before the broker restarts")
    before = stack.states(ids)
    phase = "broker stop, submit, start, to ready"
    with stack.phases(phase):
        with stack.phases("podman stop rabbitmq"):
            stack.compose.stop("rabbitmq")
        # Accepted while the broker is away: kept `created`, published when it is back.
        during = _submit(client, tmp_path, "broker-during", 1)
        assert client.job(during)["state"] == "created"
        stack.compose.start("rabbitmq")
        stack.wait_ready()
    jobs = stack.wait_done([*ids, during])
    stack.report("broker stop/start (+1 job submitted while it was down)", phase, before, jobs)
    stack.assert_succeeded_once(jobs, tmp_path)
    after = _submit(client, tmp_path, "broker-after", 1)
    stack.assert_succeeded_once(stack.wait_done([after]), tmp_path)
