"""What the worker's log copier costs a job that prints fast.

A job's stdout and stderr are a pipe the worker copies into the job log
(``process_unit/joblog.py``). This times a job printing ``--mb`` MB (default 50) two
ways, interleaved in rounds so machine noise falls on both alike:

* **file** (the baseline: how jobs printed before the copier): the same command with its
  stdout and stderr opened straight on the log file;
* **pipe**: through :class:`~labq.process_unit.supervisor.Supervisor`, the copier
  thread escaping look-alikes of labq's lines and counting the output cap.

Two jobs: ``lines`` prints 80-byte lines with ``print`` (unbuffered, as every job runs:
one write per line), ``blocks`` does nothing but write 64 KiB at a time (the worst case:
the copier's own work, about a millisecond a MB, is all there is to compare with). Times
run from the start to the whole output being in the log. Prints the medians and their
ratio; exits 1 when the pipe takes more than 1.3 times the file's time for ``lines``, or
2 times for ``blocks``.

    .venv/bin/python bench/job_output.py [--mb 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labq.process_unit import proctree
from labq.process_unit.joblog import JobLog
from labq.process_unit.sandbox import build_command
from labq.process_unit.supervisor import Supervisor

JOBS = {
    "lines": "import sys\nline = 'x' * 79\nfor _ in range({n} // 80):\n    print(line)\n",
    "blocks": "import os\nblock = b'x' * 65536\nfor _ in range({n} // 65536):\n"
              "    os.write(1, block)\n",
}
#: Most the pipe may take, as a multiple of the file's time.
TARGETS = {"lines": 1.3, "blocks": 2.0}


def _command(root: Path, code: str):
    project = root / "ws" / "project"
    project.mkdir(parents=True, exist_ok=True)
    (project / "code.py").write_text(code)
    env = root / "env"
    if not env.exists():
        (env / "bin").mkdir(parents=True)
        (env / "bin" / "python").symlink_to(sys.executable)
    return build_command(env_dir=env, project=project, workspace=root / "ws",
                         entrypoint="code.py", args=[], user_env={}, job_id="bench",
                         attempt=1, token="bench")


def _file(root: Path, code: str) -> float:
    command = _command(root, code)
    log = root / "log-file.txt"
    log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "ab") as handle:
        subprocess.run(command.argv, env=command.env, cwd=command.cwd, stdout=handle,
                       stderr=handle, check=True)
    return time.perf_counter() - t0


def _pipe(root: Path, code: str) -> float:
    command = _command(root, code)
    log = root / "log-pipe.txt"
    log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with JobLog.open(log) as joblog:
        sup = Supervisor(command, joblog, output_limit=1 << 40)
        sup.start()
        if sup.wait() != 0:
            sys.exit(f"the job failed; see {log}")
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    proctree.become_subreaper()
    root = Path(tempfile.mkdtemp(prefix="labq-bench-output-"))
    missed = []
    try:
        load = os.getloadavg()[0]
        print(f"job output, {args.mb} MB a job, {args.rounds} rounds, load {load:.2f}")
        for name, template in JOBS.items():
            code = template.format(n=args.mb * 1_000_000)
            times: dict[str, list[float]] = {"file": [], "pipe": []}
            for _ in range(args.rounds):
                times["file"].append(_file(root, code))
                times["pipe"].append(_pipe(root, code))
            size = (root / "log-pipe.txt").stat().st_size
            if size != (root / "log-file.txt").stat().st_size:
                sys.exit(f"{name}: the pipe's log has {size} bytes, the file's "
                         f"{(root / 'log-file.txt').stat().st_size}")
            file_s, pipe_s = (statistics.median(times[k]) for k in ("file", "pipe"))
            ratio, target = pipe_s / file_s, TARGETS[name]
            mark = "ok" if ratio <= target else "MISSED"
            print(f"  {name:6}: file (baseline) {file_s * 1000:7.0f} ms, "
                  f"pipe {pipe_s * 1000:7.0f} ms: {ratio:.2f}x (target <= {target}x), "
                  f"{(pipe_s - file_s) * 1000 / args.mb:+.2f} ms a MB [{mark}]")
            if ratio > target:
                missed.append(name)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if missed:
        print("job output: MISSED for " + ", ".join(missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
