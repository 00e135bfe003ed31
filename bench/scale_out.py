"""Scale-out (issue 10, item 6): 1-second jobs with 1, 2 and 4 workers.

For each worker count W, ``--per-worker`` × W jobs that each sleep one second are
submitted at once to a labq with W workers; the throughput is the number of jobs over
the time from the first upload to the last ``stopped`` seen on the event stream. The
ideal is W jobs a second; the target is ≥ 0.9× the ideal. The baseline measured in the
same run is the same script run bare, W at a time (what the machine gives without
labq). The jobs sleep rather than compute, so four workers fit on two cores: what is
measured is labq's own cost around each job, not the cores' speed.

labq runs as a lab runs it (``labq backend``, ``labq worker`` processes, the host's
sandbox, authentication on) on the broker at ``LABQ_RABBITMQ_URL``, with a fresh data
dir and queue prefix removed at the end; workers are stopped and started between the
counts. Exits 1 when a count misses the target, 2 when labq fails.

    .venv/bin/python bench/scale_out.py [--workers 1,2,4] [--per-worker 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from figures import Targets
from job_overhead import bare_run, job_python
from stack import Stack, bundle, load_note, time_budget

TARGET = 0.9
CODE = "import time\ntime.sleep(1)\nprint('ok')\n"


def one_count(stack: Stack, body: bytes, workers: int, jobs: int) -> float:
    """Jobs a second with ``workers`` workers (started here, stopped at the end)."""
    assert stack.events is not None
    stack.start_workers(workers)
    try:
        # Uploaded by as many clients as there are workers, so no worker waits for its
        # first job behind the others' uploads.
        with ThreadPoolExecutor(workers) as pool:
            submitted = list(pool.map(lambda _: stack.submit(body), range(jobs)))
        ids = [job_id for job_id, _ in submitted]
        first = min(began for _, began in submitted)
        ends = stack.events.wait_ended(ids, timeout=60 + 3 * jobs / workers)
        stack.check_succeeded(ids[-3:])
        return jobs / (max(ends.values()) - first)
    finally:
        stack.stop_workers()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4",
                        help="worker counts, comma-separated (each 1..8)")
    parser.add_argument("--per-worker", type=int, default=5,
                        help="1-second jobs per worker for each count (1..20)")
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    if not counts or not all(0 < c <= 8 for c in counts) or not 0 < args.per_worker <= 20:
        parser.error("--workers takes counts 1..8, --per-worker 1..20")
    body = bundle({"code.py": CODE})
    python = job_python()
    print(f"scale-out ({load_note()})", flush=True)
    time_budget(150)
    rows = []
    with Stack("scale") as stack:
        try:
            stack.start_backend()
            stack.start_workers(1)  # the first job builds the (empty) environment
            warm, _ = stack.submit(bundle({"code.py": "print('ok')\n"}))
            assert stack.events is not None
            stack.events.wait_ended([warm], timeout=120)
            stack.stop_workers()
            for workers in counts:
                jobs = workers * args.per_worker
                measured = one_count(stack, body, workers, jobs)
                bare_s, _ = bare_run(python, jobs, workers, code=CODE)
                rows.append((workers, measured, jobs / bare_s))
                print(f"  {workers} worker(s), {jobs} jobs: {measured:.2f} jobs/s "
                      f"(ideal {workers:.2f}, bare {jobs / bare_s:.2f})", flush=True)
        except (RuntimeError, TimeoutError) as exc:
            print(f"labq failed: {exc}", file=sys.stderr)
            return 2
    print(f"  after: {load_note()}")
    print("  workers  ideal jobs/s  measured  bare (same parallelism)  measured/ideal")
    for workers, measured, bare in rows:
        print(f"  {workers:7d}  {workers:12.2f}  {measured:8.2f}  {bare:23.2f}  "
              f"{measured / workers:14.2f}")
    targets = Targets("scale-out")
    for workers, measured, _bare in rows:
        targets.check(f"{workers} worker(s): measured/ideal", measured / workers, TARGET,
                      unit="x", at_most=False)
    return targets.exit_code()


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"  ({time.monotonic() - started:.0f} s)")
    sys.exit(code)
