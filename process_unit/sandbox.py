"""The one place that builds a job's command line and environment.

Everything the job process gets is decided here, from scratch: no variable of the
worker's own environment (broker URL, database URL, credentials, other ``LABQ_*``)
reaches user code. A later step can wrap ``argv`` with bubblewrap and a user switch
without touching the supervisor.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

LAUNCHER = Path(__file__).resolve().parent / "launch.py"
#: Variable that marks every process of one run, so the supervisor finds processes
#: that left the tree (setsid + double fork) and a later worker can sweep orphans.
#: Deliberately not ``LABQ_*``: the job sees only LABQ_JOB_ID and LABQ_ATTEMPT of those.
TOKEN_VAR = "LABQRUN"
#: Libraries that start one thread per CPU unless told otherwise.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]
    cwd: Path


def choose_cpus(cpus: int) -> list[int]:
    """The first ``cpus`` CPUs this worker may use (all of them for 0 or too many)."""
    allowed = sorted(os.sched_getaffinity(0))
    if cpus <= 0 or cpus >= len(allowed):
        return allowed
    return allowed[:cpus]


def build_command(
    *,
    env_dir: Path,
    project: Path,
    workspace: Path,
    entrypoint: str,
    args: list[str],
    user_env: dict[str, str],
    job_id: str,
    attempt: int,
    token: str,
    cpus: int = 0,
) -> Command:
    """argv + env + cwd of one job run (see docs/internals.md, "The job's process")."""
    home = workspace / "home"
    tmp = workspace / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    python = env_dir / "bin" / "python"
    env = {
        **user_env,  # the manifest cannot name reserved variables (shared.manifest)
        "PATH": f"{env_dir / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "VIRTUAL_ENV": str(env_dir),
        "LABQ_JOB_ID": job_id,
        "LABQ_ATTEMPT": str(attempt),
        TOKEN_VAR: token,
    }
    launch = [sys.executable, "-I", "-S", str(LAUNCHER), "--parent", str(os.getpid())]
    chosen = choose_cpus(cpus)
    if cpus > 0:
        launch += ["--cpus", ",".join(str(c) for c in chosen)]
        for name in _THREAD_VARS:
            env.setdefault(name, str(len(chosen)))
    argv = [*launch, "--", str(python), "-u", entrypoint, *args]
    return Command(argv=argv, env=env, cwd=project)
