"""What the job sandbox adds to a job's start: ``print('ok')`` with it and without it.

Each round builds the same environment-less command two ways, interleaved so machine
noise falls on both alike, and times from "box requested" to the job's exit:

* **off**: the launcher, then the job's interpreter (labq without a sandbox);
* **on**: a uid leased from the pool, a cgroup made, the workspace handed over, the
  launcher (cgroup join, rlimits, uid switch), bubblewrap's namespaces, the interpreter;
  then everything torn down again (cgroup removed, uid released).

Prints the medians and p90s and exits non-zero when the sandbox adds more than the
target (30 ms at the median). Needs root and bubblewrap: ``sudo .venv/bin/python
bench/sandbox_start.py [--rounds 40]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from labq.process_unit import isolation
from labq.process_unit.jobbox import HostSandbox
from labq.process_unit.sandbox import build_command
from labq.process_unit.supervisor import Supervisor
from labq.shared.settings import Settings

TARGET_MS = 30.0


def one_run(sandbox: HostSandbox | None, root: Path, env_dir: Path, n: int
            ) -> dict[str, float]:
    """One job, timed in parts (ms): ``open`` (uid lease, cgroup, workspace handed over),
    ``run`` (launcher to the job's exit), ``close`` (cgroup removed, uid given back)."""
    workspace = root / f"ws-{n}"
    project = workspace / "project"
    project.mkdir(parents=True)
    (project / "code.py").write_text("print('ok')\n")
    for folder in ("home", "tmp"):
        (workspace / folder).mkdir()
    t0 = time.perf_counter()
    box = sandbox.open(workspace=workspace, memory_mb=256, cpus=0, max_output_bytes=0,
                       network=False, name=f"labq-bench-{os.getpid()}-{n}") if sandbox else None
    t1 = time.perf_counter()
    command = build_command(env_dir=env_dir, project=project, workspace=workspace,
                            entrypoint="code.py", args=[], user_env={}, job_id="bench",
                            attempt=1, token=f"bench{n}", jail=box.jail if box else None)
    with open(root / "log.txt", "ab") as log:
        sup = Supervisor(command, log.fileno(), finder=box.processes if box else None)
        sup.start()
        code = sup.wait()
    t2 = time.perf_counter()
    if box:
        box.close()
    t3 = time.perf_counter()
    shutil.rmtree(workspace, ignore_errors=True)
    if code != 0:
        sys.exit(f"the job failed (exit {code}); see {root / 'log.txt'}")
    return {"open": (t1 - t0) * 1000, "run": (t2 - t1) * 1000, "close": (t3 - t2) * 1000,
            "total": (t3 - t0) * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="labq-bench-sandbox-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    try:
        settings = Settings(data_dir=root / "data", work_dir=root)
        layers = isolation.probe(settings)
        if not layers.complete:
            print(f"the sandbox is not complete here ({layers.describe()}); "
                  "run as root with bubblewrap installed")
            return 2
        on = HostSandbox(settings, layers)
        # An environment-less interpreter stands in for the job's venv: both runs use it.
        env_dir = root / "env"
        (env_dir / "bin").mkdir(parents=True)
        os.symlink(isolation.job_python(settings, layers), env_dir / "bin" / "python")
        os.chmod(env_dir, 0o755)
        times: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
        for n in range(args.rounds):
            times["off"].append(one_run(None, root, env_dir, 2 * n))
            times["on"].append(one_run(on, root, env_dir, 2 * n + 1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report(times, args.rounds, layers.describe())


def report(times: dict[str, list[dict[str, float]]], rounds: int, layers: str) -> int:
    def med(kind: str, part: str) -> float:
        return statistics.median(r[part] for r in times[kind])

    def p90(kind: str) -> float:
        return sorted(r["total"] for r in times[kind])[int(len(times[kind]) * 0.9) - 1]

    added = med("on", "total") - med("off", "total")
    print(f"sandbox start, {rounds} rounds of print('ok'), load {os.getloadavg()[0]:.2f}")
    print(f"  off (baseline): median {med('off', 'total'):6.1f} ms   p90 {p90('off'):6.1f} ms")
    print(f"  on  ({layers})")
    print(f"                  median {med('on', 'total'):6.1f} ms   p90 {p90('on'):6.1f} ms")
    print(f"    where: open {med('on', 'open'):.1f} ms (uid lease, cgroup, chown), run "
          f"{med('on', 'run'):.1f} ms (vs {med('off', 'run'):.1f} ms without; launcher, "
          f"bwrap, job), close {med('on', 'close'):.1f} ms (cgroup removed, uid released)")
    print(f"  added by the sandbox: {added:+.1f} ms at the median (target <= {TARGET_MS:.0f})")
    return 0 if added <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
