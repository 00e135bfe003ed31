"""The workload and the checks of the multi-host test, run on the client host (h4).

``cluster.sh run`` starts it inside h4's namespace once the cluster is up; it talks to the
backend only over the namespaces' network, through labq's SDK, and asks ``cluster.sh`` for
the faults. Phases, each with its figures printed as ``FIGURE name value``:

1. **spread**: a batch of short jobs runs on both worker hosts (``worker_host`` h2 and h3);
2. **worker host killed**: while a long job runs, every process of its host is killed; the
   job runs again on the other host and ends once (attempts 2, one terminal event, its
   results from attempt 2); then the host comes back;
3. **broker node killed**: the node leading the jobs queue is killed while jobs run and wait;
   submissions go on during the outage; every accepted job ends, once;
4. **backend restarted**: the backend is killed (SIGKILL) while jobs run; they finish
   meanwhile; after the restart every job of the run is there, ended as it should.

Exit status 0 only when every check held; a failed check says what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labq.client.api import Client
from labq.client.errors import ClientError

CLUSTER = os.environ["LQ_CLUSTER"]
RUN = Path(os.environ["LQ_RUN"])
WORKER_HOSTS = {"h2", "h3"}
TERMINAL = {"stopped", "failed"}
T0 = time.monotonic()

CODE = """\
import os, time
seconds = float(os.environ.get("SLEEP_S", "1"))
print("attempt", os.environ["LABQ_ATTEMPT"], "sleeping", seconds, flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    time.sleep(0.1)
os.makedirs("output", exist_ok=True)
with open("output/ran.txt", "w") as f:
    f.write(os.environ["LABQ_ATTEMPT"])
print("done", flush=True)
"""


class CheckFailed(Exception):
    pass


def say(text: str) -> None:
    print(f"{time.monotonic() - T0:6.1f}s driver: {text}", flush=True)


def figure(name: str, value: float | int | str) -> None:
    print(f"FIGURE {name} {value}", flush=True)


def check(ok: bool, what: str) -> None:
    if not ok:
        raise CheckFailed(what)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except ClientError as exc:  # the backend may be down on purpose
            last_error = exc
        time.sleep(interval)
    raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}"
                      + (f" (last error: {last_error})" if last_error else ""))


def cluster(*args: str) -> float:
    began = time.monotonic()
    subprocess.run(["bash", CLUSTER, *args], check=True)
    return time.monotonic() - began


class Workload:
    def __init__(self, client: Client, folder: Path) -> None:
        self.client = client
        self.folder = folder
        self.jobs: dict[str, str] = {}  # id → phase
        self.expected_attempts: dict[str, int] = {}

    def bundle(self, seconds: float) -> Path:
        path = self.folder / f"sleep{seconds:g}"
        if not path.exists():
            path.mkdir()
            (path / "code.py").write_text(CODE)
            (path / "labq.toml").write_text(f'[env]\nSLEEP_S = "{seconds}"\n')
        return path

    def submit(self, phase: str, seconds: float) -> dict[str, Any]:
        job = self.client.submit(self.bundle(seconds))
        self.jobs[job["id"]] = phase
        self.expected_attempts[job["id"]] = 1
        return job

    def get(self, job_id: str) -> dict[str, Any]:
        return self.client.job(job_id)

    def all_done(self, ids: list[str]) -> list[dict[str, Any]] | None:
        jobs = [self.get(i) for i in ids]
        return jobs if all(j["state"] in TERMINAL for j in jobs) else None

    def wait_done(self, ids: list[str], timeout: float) -> list[dict[str, Any]]:
        return wait_for(lambda: self.all_done(ids), timeout, f"{len(ids)} jobs to end")

    def check_succeeded_once(self, jobs: list[dict[str, Any]]) -> None:
        for job in jobs:
            want = self.expected_attempts[job["id"]]
            check(job["state"] == "stopped" and job["outcome"] == "succeeded",
                  f"job {job['id']} ended {job['state']}/{job['outcome']}: {job.get('error')}")
            check(job["attempts"] == want,
                  f"job {job['id']} took {job['attempts']} attempts, expected {want}")
            check(job.get("worker_host") in WORKER_HOSTS,
                  f"job {job['id']} names no worker host: {job.get('worker_host')!r}")
            ran = (RUN / "volume" / "jobs" / job["id"] / "results" / "ran.txt").read_text()
            check(ran == str(want), f"job {job['id']}'s results come from attempt {ran}")


def job_processes(job_id: str, attempt: int) -> list[int]:
    """Pids of the machine whose environment says they run ``attempt`` of ``job_id``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LABQ_JOB_ID={job_id}".encode() in env and \
                f"LABQ_ATTEMPT={attempt}".encode() in env:
            found.append(int(entry.name))
    return found


def ready_workers(client: Client) -> set[str]:
    reports = client.ready().get("sandbox") or {}
    return {name for name, r in reports.items() if r.get("host") in WORKER_HOSTS}


def phase_spread(w: Workload) -> None:
    say("phase 1: a batch of short jobs spreads over both worker hosts")
    began = time.monotonic()
    ids = [w.submit("spread", 1)["id"] for _ in range(8)]
    jobs = w.wait_done(ids, 90)
    w.check_succeeded_once(jobs)
    hosts = {j["worker_host"] for j in jobs}
    per_host = {h: sum(j["worker_host"] == h for j in jobs) for h in sorted(hosts)}
    figure("spread_jobs_per_host", json.dumps(per_host, separators=(",", ":")))
    figure("spread_batch_s", f"{time.monotonic() - began:.1f}")
    check(hosts == WORKER_HOSTS, f"8 jobs ran only on {sorted(hosts)}")


def phase_worker_host_killed(w: Workload) -> None:
    say("phase 2: a worker host is killed while it runs a job")
    job = w.submit("host-kill", 8)
    job_id = job["id"]
    started = wait_for(lambda: (j := w.get(job_id))["state"] == "started" and j, 60,
                       "the long job to start")
    victim = started["worker_host"]
    survivor = (WORKER_HOSTS - {victim}).pop()
    say(f"job {job_id[:8]} runs on {victim}; killing every process of {victim}")
    killed_at = time.monotonic()
    cluster("kill-host", victim)
    w.expected_attempts[job_id] = 2
    wait_for(lambda: not job_processes(job_id, 1), 15, "attempt 1's processes to be gone")
    figure("host_kill_attempt1_gone_s", f"{time.monotonic() - killed_at:.1f}")
    again = wait_for(lambda: (j := w.get(job_id))["attempts"] >= 2
                     and j["state"] in ("started", "stopped") and j, 90,
                     "the job to start again on the other host")
    figure("host_kill_restarted_after_s", f"{time.monotonic() - killed_at:.1f}")
    check(again["worker_host"] == survivor,
          f"attempt 2 ran on {again['worker_host']}, not {survivor}")
    [done] = w.wait_done([job_id], 60)
    figure("host_kill_finished_after_s", f"{time.monotonic() - killed_at:.1f}")
    w.check_succeeded_once([done])
    log, _ = w.client.log(job_id)
    check(f"attempt 1 on {victim}-" in log and f"attempt 2 on {survivor}-" in log,
          "the log does not show attempt 1 on the killed host and attempt 2 on the other")
    check(log.count("\ndone\n") + log.startswith("done\n") == 1,
          f"the job's script finished {log.count('done')} times, expected once")
    terminal = [e for e in job_events(w, job_id) if e in TERMINAL]
    check(terminal == ["stopped"], f"the job's terminal events: {terminal}")
    say(f"bringing {victim} back (its RabbitMQ node and workers)")
    figure("host_restart_s", f"{cluster('start-host', victim):.1f}")
    wait_for(lambda: len(ready_workers(w.client)) >= 2 * len(WORKER_HOSTS), 60,
             "all workers to report again")


def job_events(_w: Workload, job_id: str) -> list[str]:
    """The states of the job's stored events, oldest first, read from PostgreSQL on h1."""
    import psycopg

    with psycopg.connect("host=h1 dbname=labq user=postgres", connect_timeout=10) as conn:
        rows = conn.execute("SELECT state FROM events WHERE job_id = %s ORDER BY id",
                            (job_id,)).fetchall()
    return [state for (state,) in rows]


def cluster_output(*args: str) -> str:
    return subprocess.run(["bash", CLUSTER, *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def connections(via: str) -> list[tuple[str, str]]:
    """(connection name, host of its node) of every client of the cluster."""
    lines = cluster_output("connections", via).splitlines()
    return [tuple(line.split("\t", 1)) for line in lines if "\t" in line]


def phase_broker_node_killed(w: Workload) -> None:
    # The node the backend publishes through: submissions must fail over to another.
    node = cluster_output("node-of-connection", "labq-backend-publisher")
    check(node in {"h1", "h2", "h3"}, f"no node serves the backend's publisher: {node!r}")
    leader = cluster_output("node-of-queue", "lqmh.jobs")
    figure("broker_kill_node", node)
    figure("broker_kill_node_led_jobs_queue", "yes" if leader == node else "no")
    say(f"phase 3: the RabbitMQ node on {node} (serving the backend's publisher; the jobs "
        f"queue's leader is on {leader}) is killed under load")
    before = [w.submit("broker-kill", 3)["id"] for _ in range(6)]
    wait_for(lambda: sum(w.get(i)["state"] == "started" for i in before) >= 2, 60,
             "two jobs to run")
    on_node = sorted(name for name, host in connections(node) if host == node)
    figure("broker_kill_connections_on_node", len(on_node))
    killed_at = time.monotonic()
    cluster("kill-node", node)
    during, errors, latencies, held = [], [], [], 0
    for _ in range(6):
        t = time.monotonic()
        try:
            job = w.submit("broker-kill", 1)
            latencies.append(time.monotonic() - t)
            during.append(job["id"])
            held += job["state"] == "created"  # accepted; the outbox publishes it later
        except ClientError as exc:
            errors.append(str(exc))
    figure("broker_kill_submissions_accepted", f"{len(during)}/6")
    figure("broker_kill_submissions_left_to_outbox", held)
    figure("broker_kill_submit_max_s", f"{max(latencies or [0]):.2f}")
    check(not errors, f"submissions failed during the outage: {errors}")
    jobs = w.wait_done(before + during, 120)
    figure("broker_kill_all_done_after_s", f"{time.monotonic() - killed_at:.1f}")
    w.check_succeeded_once(jobs)
    figure("broker_kill_jobs_lost", 0)
    # Every service that was on the dead node is connected again, to another node.
    survivor = "h2" if node != "h2" else "h3"
    back = wait_for(lambda: (now := dict(connections(survivor))) and
                    all(now.get(name) not in (None, node) for name in on_node) and now,
                    30, f"the connections of {on_node} on another node")
    figure("broker_kill_reconnected", ",".join(f"{n.split()[-1]}->{back[n]}" for n in on_node))


def phase_backend_restarted(w: Workload) -> None:
    say("phase 4: the backend is killed (SIGKILL) while jobs run, and started again")
    ids = [w.submit("backend-restart", 2)["id"] for _ in range(4)]
    wait_for(lambda: any(w.get(i)["state"] == "started" for i in ids), 60, "a job to run")
    stopped_at = time.monotonic()
    cluster("kill-backend")
    outcome = RUN / "volume" / "jobs"
    wait_for(lambda: all((outcome / i / "outcome.json").exists() for i in ids), 60,
             "the jobs to end while the backend is down")
    figure("backend_down_s", f"{time.monotonic() - stopped_at:.1f}")
    cluster("start-backend")
    wait_for(lambda: w.client.health(), 60, "the backend to answer again")
    figure("backend_back_after_s", f"{time.monotonic() - stopped_at:.1f}")
    jobs = w.wait_done(ids, 60)
    figure("backend_restart_all_applied_after_s", f"{time.monotonic() - stopped_at:.1f}")
    w.check_succeeded_once(jobs)


def final_count(w: Workload) -> None:
    listed = {j["id"]: j for j in w.client.iter_jobs()}
    missing = set(w.jobs) - set(listed)
    check(not missing, f"jobs missing after the run: {sorted(missing)}")
    w.check_succeeded_once([listed[i] for i in w.jobs])
    figure("jobs_total", len(w.jobs))
    figure("jobs_succeeded_once", len(w.jobs))


def main() -> int:
    token = Path(os.environ["LQ_ADMIN_TOKEN_FILE"]).read_text().strip()
    client = Client(os.environ["LABQ_URL"], token=token, timeout_s=20)
    wait_for(lambda: len(ready_workers(client)) >= 4, 60, "4 workers on h2 and h3")
    figure("workers_ready", len(ready_workers(client)))
    with tempfile.TemporaryDirectory() as tmp:
        w = Workload(client, Path(tmp))
        try:
            phase_spread(w)
            phase_worker_host_killed(w)
            phase_broker_node_killed(w)
            phase_backend_restarted(w)
            final_count(w)
        except CheckFailed as exc:
            say(f"FAILED: {exc}")
            return 1
    say("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
