"""The one place that builds a job's command line and environment.

Everything the job process gets is decided here, from scratch: no variable of the
worker's own environment (broker URL, database URL, credentials, other ``LABQ_*``)
reaches user code. With a :class:`Jail` the command is

    launch.py (root: join the cgroup, set rlimits, drop to the job's uid, arm the
    death signal) → bwrap (new user, pid, ipc, uts, mount and network namespaces) →
    the job's interpreter

so bwrap is never run as root (root inside would keep its capabilities). Where bwrap
cannot run (user namespaces blocked), a root launcher still gives the job an empty
network namespace (``Jail.empty_network``) before it drops to the job's uid. Inside bwrap
the job sees its workspace (writable), its environment and the host's /usr and /etc
(read-only), a private /tmp and /dev/shm of ``tmp_mb`` each, its own /proc — and
nothing else: not the data dir, other jobs, the database or labq's settings.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from labq.process_unit import quicklaunch

LAUNCHER = Path(__file__).resolve().parent / "launch.py"
#: Variable that marks every process of one run, so the supervisor finds processes
#: that left the tree (setsid + double fork) and a later worker can sweep orphans.
#: Deliberately not ``LABQ_*``: the job sees only LABQ_JOB_ID and LABQ_ATTEMPT of those.
TOKEN_VAR = "LABQRUN"
#: Libraries that start one thread per CPU unless told otherwise.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class Jail:
    """How to box one run (see :mod:`labq.process_unit.isolation` for the layers)."""

    #: The job's own uid (None: run as the worker, no uid layer).
    uid: int | None = None
    #: Path of bwrap (None: no namespaces).
    bwrap: str | None = None
    #: A route out through slirp4netns (jobs the server lets reach the network): the
    #: (ready, block) fds the launcher reports its own network namespace on (netbox.py).
    net_fds: tuple[int, int] | None = None
    #: The job's /etc/resolv.conf when it has a network (slirp4netns's DNS).
    resolv_conf: Path | None = None
    #: Size of the private /tmp and /dev/shm, each.
    tmp_mb: int = 256
    #: ``cgroup.procs`` files the launcher joins before dropping privileges.
    cgroup_procs: tuple[Path, ...] = ()
    #: Resource limits the launcher sets: (name, value), e.g. ("NOFILE", 4096).
    rlimits: tuple[tuple[str, int], ...] = ()
    #: Niceness of the job's processes (0: the worker's own).
    nice: int = 0
    #: The launcher (still root) gives the job an empty network namespace: where bwrap
    #: cannot, so the job never shares the host's loopback.
    empty_network: bool = False
    #: The system tools that launch a run instead of launch.py (quicklaunch.py), when
    #: this host has them.
    tools: quicklaunch.Tools | None = None


def bwrap_argv(bwrap: str, *, workspace: Path, project: Path, env_dir: Path, tmp_mb: int,
               own_network: bool = False, resolv_conf: Path | None = None) -> list[str]:
    """bwrap's options: what the job sees. Paths keep their host names so the cached
    environment (built at that path) works unchanged. Every job has a network namespace
    of its own: bwrap's empty one, or (``own_network``) the one its launcher made and
    the worker routed out (netbox.py)."""
    from labq.process_unit.isolation import system_links

    size = str(tmp_mb * 1024 * 1024)
    resolv = ["--ro-bind", str(resolv_conf), "/etc/resolv.conf"] if resolv_conf else []
    return [
        bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", *([] if own_network else ["--unshare-net"]),
        "--die-with-parent", "--new-session", "--hostname", "labq-job",
        "--ro-bind", "/usr", "/usr", *system_links(), "--ro-bind", "/etc", "/etc", *resolv,
        "--proc", "/proc", "--dev", "/dev",
        "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/dev/shm",
        "--ro-bind", str(env_dir), str(env_dir),
        "--bind", str(workspace), str(workspace),
        # The root is bwrap's own tmpfs: read-only, so the job writes only its workspace
        # and its bounded /tmp and /dev/shm.
        "--remount-ro", "/",
        "--chdir", str(project),
    ]


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    #: File descriptors the job's launcher inherits (the network pipes).
    pass_fds: tuple[int, ...] = ()


def choose_cpus(cpus: int) -> list[int]:
    """The first ``cpus`` CPUs this worker may use (all of them for 0 or too many)."""
    allowed = sorted(os.sched_getaffinity(0))
    if cpus <= 0 or cpus >= len(allowed):
        return allowed
    return allowed[:cpus]


def _quick(jail: Jail, cpus: int) -> bool:
    """The run can start through the system's tools (quicklaunch.py): boxed by bwrap as
    a uid of its own, with no network of its own to set up first."""
    return (jail.tools is not None and jail.bwrap is not None and jail.uid is not None
            and not jail.net_fds and not jail.empty_network
            and (cpus <= 0 or jail.tools.taskset is not None))


def _launch_argv(jail: Jail, cpus: int, env: dict[str, str]) -> list[str]:
    """The launcher's command line for one run (launch.py's options, in its order, or
    the same steps by the system's tools), to which the boxed program is appended."""
    chosen = choose_cpus(cpus)
    if cpus > 0:
        for name in _THREAD_VARS:
            env.setdefault(name, str(len(chosen)))
    if _quick(jail, cpus):
        assert jail.tools is not None and jail.uid is not None
        return quicklaunch.launch_argv(
            jail.tools, cgroup_procs=tuple(str(p) for p in jail.cgroup_procs),
            cpus=chosen if cpus > 0 else None, nice=jail.nice, rlimits=jail.rlimits,
            uid=jail.uid)
    return _python_launcher_argv(jail, chosen if cpus > 0 else [])


def _python_launcher_argv(jail: Jail, cpus: list[int]) -> list[str]:
    launch = [sys.executable, "-I", "-S", str(LAUNCHER), "--parent", str(os.getpid())]
    if cpus:
        launch += ["--cpus", ",".join(str(c) for c in cpus)]
    for path in jail.cgroup_procs:
        launch += ["--cgroup", str(path)]
    for name, value in jail.rlimits:
        launch += ["--rlimit", f"{name}={value}"]
    if jail.nice:
        launch += ["--nice", str(jail.nice)]
    if jail.empty_network and not jail.bwrap and not jail.net_fds:
        launch += ["--no-network", "1"]
    if jail.uid is not None:
        launch += ["--uid", str(jail.uid)]
    if jail.net_fds:
        launch += ["--netns", ",".join(str(fd) for fd in jail.net_fds)]
    return [*launch, "--"]


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
    jail: Jail | None = None,
) -> Command:
    """argv + env + cwd of one job run (see docs/internals.md, "The job's process")."""
    jail = jail or Jail()
    home = workspace / "home"
    tmp = workspace / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    python = env_dir / "bin" / "python"
    env = {
        **user_env,  # the manifest cannot name reserved variables (shared.manifest)
        "PATH": f"{env_dir / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": "/tmp" if jail.bwrap else str(tmp),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "VIRTUAL_ENV": str(env_dir),
        "LABQ_JOB_ID": job_id,
        "LABQ_ATTEMPT": str(attempt),
        TOKEN_VAR: token,
    }
    launch = _launch_argv(jail, cpus, env)
    program = [str(python), "-u", entrypoint, *args]
    if jail.bwrap:
        program = [*bwrap_argv(jail.bwrap, workspace=workspace, project=project,
                               env_dir=env_dir, tmp_mb=jail.tmp_mb,
                               own_network=bool(jail.net_fds), resolv_conf=jail.resolv_conf),
                   *program]
    return Command(argv=[*launch, *program], env=env, cwd=project,
                   pass_fds=tuple(jail.net_fds or ()))
