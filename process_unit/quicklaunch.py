"""Starting a boxed job with the system's small tools instead of a Python launcher.

The launcher (launch.py) is a Python interpreter of its own: starting it cost a job
about 11 ms of CPU, as much as the job's own interpreter. For the common run (bubblewrap,
a uid of its own, no network of its own) the same steps are taken, in the same order,
by programs that start in a fraction of a millisecond, each ``exec``'ing the next in the
same process:

    /bin/sh      (root) write our pid into the run's cgroup.procs files, then exec
    taskset -c   pin to the job's CPUs (only when ``cpus`` is set)
    nice -n      the job's niceness (absolute, as the launcher's)
    prlimit      the job's rlimits (soft = hard)
    setpriv      drop every group and become the job's uid; SIGKILL when the worker's
                 job thread dies (PR_SET_PDEATHSIG, armed after the uid change)
    bwrap        the job's namespaces, then its interpreter

so no process of the job ever runs outside its cgroup, without its limits or as root.
Everything is ``util-linux`` and ``coreutils`` (essential on Debian); where one is
missing the Python launcher is used, as before. A failure to join the cgroup exits 71,
as the launcher did.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

#: Joins every cgroup.procs given before "--", then runs the rest.
_JOIN_CGROUPS = ('while [ "$1" != "--" ]; do echo $$ > "$1" || exit 71; shift; done; '
                 'shift; exec "$@"')
#: launch.py's rlimit names → prlimit's options.
_PRLIMIT = {"CORE": "--core", "NOFILE": "--nofile", "FSIZE": "--fsize", "NPROC": "--nproc",
            "AS": "--as"}


@dataclass(frozen=True)
class Tools:
    """Paths of the programs of a quick launch."""

    sh: str
    nice: str
    prlimit: str
    setpriv: str
    taskset: str | None

    @classmethod
    def find(cls) -> Tools | None:
        """The tools on this host; None when one that every run needs is missing."""
        found = {name: shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
                 for name in ("sh", "nice", "prlimit", "setpriv", "taskset")}
        if not all(found[name] for name in ("sh", "nice", "prlimit", "setpriv")):
            return None
        return cls(sh=found["sh"], nice=found["nice"], prlimit=found["prlimit"],
                   setpriv=found["setpriv"], taskset=found["taskset"])


def launch_argv(tools: Tools, *, cgroup_procs: tuple[str, ...], cpus: list[int] | None,
                nice: int, rlimits: tuple[tuple[str, int], ...], uid: int) -> list[str]:
    """The command line that boxes what follows it (append bwrap's argv)."""
    argv = [tools.sh, "-c", _JOIN_CGROUPS, "labq-launch", *cgroup_procs, "--"]
    if cpus:
        if tools.taskset is None:
            raise LookupError("taskset is missing")
        argv += [tools.taskset, "-c", ",".join(str(c) for c in cpus)]
    # nice(1) adds to the niceness we have (this thread's: the worker's own, 5 by
    # default); the job's is absolute, as the launcher's setpriority made it.
    step = nice - os.getpriority(os.PRIO_PROCESS, 0)
    if step:
        argv += [tools.nice, "-n", str(step)]
    argv += [tools.prlimit, *(f"{_PRLIMIT[name]}={value}:{value}" for name, value in rlimits),
             "--"]
    argv += [tools.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
             "--pdeathsig=KILL", "--"]
    return argv
