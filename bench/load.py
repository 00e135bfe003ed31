"""Load run of labq (issue 4): N submissions from C concurrent clients, then wait for
every outcome and print what happened.

    .venv/bin/python bench/load.py                     # 1,000 jobs, 20 clients, 4 workers
    .venv/bin/python bench/load.py --jobs 200 --concurrency 10 --workers 2
    .venv/bin/python bench/load.py --url http://127.0.0.1:8080 --backend-pid 1234

Without ``--url`` it starts its own labq (backend + workers, as ``tests/helpers.py``'s
``LabqSystem`` does: real gunicorn, real workers) on the broker at ``LABQ_RABBITMQ_URL``
(default the local one), with a fresh data dir and a unique queue prefix, and removes
them at the end. Loopback only: it refuses a ``--url`` on another host. Bounded: at
most ``--jobs`` uploads and ``--timeout`` seconds of waiting.

Printed: accepted, refused (by HTTP status), completed (by outcome), lost (accepted
but never terminal), duplicates (jobs with attempts > 1 or more than one recorded run),
p50/p99 of the submit latency and of submit→stopped, and the backend's RSS (the
process and its children, from /proc/<pid>/status) at start, middle and end.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

TERMINAL = {"stopped", "failed"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}

JOB = r'''
import json, os, time
path = os.path.join(os.environ["BENCH_DIR"], os.environ["LABQ_JOB_ID"])
with open(path, "a") as handle:
    handle.write(json.dumps({"pid": os.getpid(), "attempt": os.environ.get("LABQ_ATTEMPT"),
                             "t": time.time()}) + "\n")
os.makedirs("output", exist_ok=True)
with open("output/ok.txt", "w") as handle:
    handle.write("ok\n")
print("bench job done")
'''


def bundle(runs_dir: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bench/code.py", JOB)
        zf.writestr("bench/labq.toml", f'[env]\nBENCH_DIR = "{runs_dir}"\n')
    return buf.getvalue()


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


def tree_rss_kib(pid: int | None) -> int | None:
    """VmRSS of ``pid`` and all its descendants (gunicorn master + workers), in KiB."""
    if not pid:
        return None
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo, seen = 0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
        todo.extend(children.get(current, []))
    return total if seen else None


def fmt_rss(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def server_duration(job: dict[str, Any]) -> float | None:
    """submit→stopped from the server's timestamps, whatever shape the job JSON has."""
    stamps = job.get("timestamps") if isinstance(job.get("timestamps"), dict) else {}
    created = stamps.get("created") or job.get("created_at")
    ended = stamps.get("stopped") or job.get("stopped_at")
    start, end = _when(created), _when(ended)
    if start is None or end is None:
        return None
    return end - start


def _when(value: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO-8601 string ("...Z")."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4,
                        help="workers of the labq this script starts (ignored with --url)")
    parser.add_argument("--url", help="target a running labq instead (loopback only)")
    parser.add_argument("--backend-pid", type=int,
                        help="backend pid for RSS figures when using --url")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds to wait for all outcomes after the last upload")
    args = parser.parse_args()
    if not 0 < args.jobs <= 10_000 or not 0 < args.concurrency <= 200:
        parser.error("--jobs must be 1..10000 and --concurrency 1..200")

    tmp = Path(tempfile.mkdtemp(prefix="labq-bench-"))
    runs_dir = tmp / "runs"
    runs_dir.mkdir()
    runs_dir.chmod(0o777)
    system = None
    if args.url:
        host = urlparse(args.url).hostname or ""
        if host not in LOOPBACK:
            parser.error(f"--url must be on this machine (loopback), not {host!r}")
        base, backend_pid = args.url.rstrip("/"), args.backend_pid
        from labq.client.credentials import find_token

        token = find_token(base)[0] or ""  # LABQ_TOKEN, `labq login`, or the admin-token file
    else:
        from helpers import LabqSystem

        system = LabqSystem(tmp / "labq", workers=args.workers,
                            env={"LABQ_LOG_LEVEL": "WARNING"})
        print(f"starting labq: backend + {args.workers} workers, data {system.data_dir}",
              flush=True)
        system.start()
        base, backend_pid = system.url, system.backend.pid if system.backend else None
        token = system.token
    auth = {"Authorization": f"Bearer {token}"} if token else {}

    body = bundle(runs_dir)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    rss: dict[str, int | None] = {"start": tree_rss_kib(backend_pid)}
    done_uploads = 0
    local = threading.local()

    def submit(i: int) -> None:
        nonlocal done_uploads
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.headers.update(auth)
        began = time.time()
        try:
            resp = session.post(f"{base}/api/v1/jobs", files={"bundle": ("b.zip", body)},
                                timeout=60)
            status: int | str = resp.status_code
            job = resp.json() if resp.status_code == 201 else None
            detail = "" if job else resp.text[:200]
        except requests.RequestException as exc:
            status, job, detail = f"error:{type(exc).__name__}", None, str(exc)[:200]
        took = time.time() - began
        with lock:
            results.append({"i": i, "status": status, "job": job, "latency": took,
                            "submitted": began, "detail": detail})
            done_uploads += 1
            if done_uploads == args.jobs // 2:
                rss["middle"] = tree_rss_kib(backend_pid)

    try:
        t0 = time.time()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(submit, range(args.jobs)))
        upload_s = time.time() - t0
        accepted = {r["job"]["id"]: r for r in results if r["job"]}
        print(f"uploaded {args.jobs} in {upload_s:.1f}s; waiting for outcomes", flush=True)

        final: dict[str, dict[str, Any]] = {}
        seen_done: dict[str, float] = {}
        deadline = time.monotonic() + args.timeout
        session = requests.Session()
        session.headers.update(auth)

        def poll(job_id: str) -> tuple[str, dict[str, Any] | None]:
            try:
                resp = session.get(f"{base}/api/v1/jobs/{job_id}", timeout=30)
                return job_id, resp.json() if resp.status_code == 200 else None
            except requests.RequestException:
                return job_id, None

        with ThreadPoolExecutor(8) as pool:
            while time.monotonic() < deadline:
                pending = [j for j in accepted if j not in final]
                if not pending:
                    break
                for job_id, job in pool.map(poll, pending):
                    if job and job.get("state") in TERMINAL:
                        final[job_id] = job
                        seen_done[job_id] = time.time()
                if len(final) < len(accepted):
                    time.sleep(1)
        rss["end"] = tree_rss_kib(backend_pid)
        total_s = time.time() - t0
    finally:
        if system is not None:
            system.stop()

    refused = Counter(str(r["status"]) for r in results if not r["job"])
    outcomes = Counter(str(j.get("outcome")) for j in final.values())
    lost = [j for j in accepted if j not in final]
    duplicates = []
    for job_id, job in final.items():
        path = runs_dir / job_id
        n_runs = len(path.read_text().splitlines()) if path.exists() else 0
        if (job.get("attempts") or 0) > 1 or n_runs > 1:
            duplicates.append((job_id, job.get("attempts"), n_runs))
    submit_lat = [r["latency"] for r in results if r["job"]]
    to_stop, sources = [], Counter()
    for job_id, job in final.items():
        server = server_duration(job)
        sources["server" if server is not None else "client"] += 1
        to_stop.append(server if server is not None
                       else seen_done[job_id] - accepted[job_id]["submitted"])

    print()
    print(f"jobs requested      {args.jobs} from {args.concurrency} concurrent clients")
    print(f"accepted (201)      {len(accepted)}")
    print(f"refused             {sum(refused.values())} {dict(refused) or ''}")
    print(f"completed           {len(final)} {dict(outcomes)}")
    print(f"lost                {len(lost)}" + (f" e.g. {lost[:3]}" if lost else ""))
    print(f"duplicates          {len(duplicates)}"
          + (f" e.g. {duplicates[:3]}" if duplicates else ""))
    print(f"submit latency      p50 {percentile(submit_lat, 50) * 1000:.0f} ms   "
          f"p99 {percentile(submit_lat, 99) * 1000:.0f} ms")
    print(f"submit->stopped     p50 {percentile(to_stop, 50):.2f} s   "
          f"p99 {percentile(to_stop, 99):.2f} s   (timestamps: {dict(sources)})")
    print(f"backend RSS         start {fmt_rss(rss.get('start'))}   "
          f"middle {fmt_rss(rss.get('middle'))}   end {fmt_rss(rss.get('end'))}")
    print(f"wall time           uploads {upload_s:.1f} s, total {total_s:.1f} s")
    if refused:
        sample = next(r for r in results if not r["job"])
        print(f"first refusal       {sample['status']}: {sample['detail']}")
    summary = {
        "accepted": len(accepted), "refused": dict(refused), "completed": len(final),
        "outcomes": dict(outcomes), "lost": len(lost), "duplicates": len(duplicates),
        "submit_p50_s": percentile(submit_lat, 50), "submit_p99_s": percentile(submit_lat, 99),
        "to_stopped_p50_s": percentile(to_stop, 50), "to_stopped_p99_s": percentile(to_stop, 99),
        "rss_kib": rss,
    }
    print(json.dumps(summary))
    ok = not lost and not duplicates and len(final) == len(accepted)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
