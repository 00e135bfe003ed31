"""A boxed run starts through sh, nice, prlimit and setpriv (process_unit/quicklaunch.py)
— the same steps as the Python launcher, in the same order — and through launch.py
wherever those tools cannot give the whole box. (The box itself is proven on a real job
by tests/integration/test_isolation.py and test_sandbox.py.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from labq.process_unit import quicklaunch
from labq.process_unit.quicklaunch import Tools, launch_argv
from labq.process_unit.sandbox import LAUNCHER, Jail, build_command

TOOLS = Tools(sh="/bin/sh", nice="/usr/bin/nice", prlimit="/usr/bin/prlimit",
              setpriv="/usr/bin/setpriv", taskset="/usr/bin/taskset")


def test_the_steps_come_in_the_launchers_order():
    argv = launch_argv(TOOLS, cgroup_procs=("/cg/a/cgroup.procs", "/cg/b/cgroup.procs"),
                       cpus=[0, 1], nice=os.getpriority(os.PRIO_PROCESS, 0) + 10,
                       rlimits=(("CORE", 0), ("NOFILE", 4096), ("FSIZE", 1 << 26)),
                       uid=60123)
    assert argv[:3] == ["/bin/sh", "-c", quicklaunch._JOIN_CGROUPS]
    cut = argv.index("--")
    assert argv[4:cut] == ["/cg/a/cgroup.procs", "/cg/b/cgroup.procs"]
    rest = argv[cut + 1:]
    # cgroups (as root) -> CPUs -> niceness -> rlimits -> uid and death signal
    assert rest[:3] == ["/usr/bin/taskset", "-c", "0,1"]
    assert rest[3:6] == ["/usr/bin/nice", "-n", "10"]
    assert rest[6:10] == ["/usr/bin/prlimit", "--core=0:0", "--nofile=4096:4096",
                          f"--fsize={1 << 26}:{1 << 26}"]
    assert rest[10:] == ["--", "/usr/bin/setpriv", "--reuid=60123", "--regid=60123",
                         "--clear-groups", "--pdeathsig=KILL", "--"]


def test_the_niceness_is_absolute_whatever_the_workers_own():
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    argv = launch_argv(TOOLS, cgroup_procs=(), cpus=None, nice=mine, rlimits=(), uid=1)
    assert "/usr/bin/nice" not in argv  # already at the job's niceness: no step
    argv = launch_argv(TOOLS, cgroup_procs=(), cpus=None, nice=mine + 3, rlimits=(), uid=1)
    assert argv[argv.index("/usr/bin/nice") + 1:][:2] == ["-n", "3"]


def test_a_cgroup_that_cannot_be_joined_stops_the_run_before_anything_runs(tmp_path: Path):
    marker = tmp_path / "ran"
    argv = [*launch_argv(TOOLS, cgroup_procs=(str(tmp_path / "no" / "cgroup.procs"),),
                         cpus=None, nice=os.getpriority(os.PRIO_PROCESS, 0), rlimits=(),
                         uid=os.getuid())[:6], "/usr/bin/touch", str(marker)]
    done = subprocess.run(argv, capture_output=True, timeout=30)
    assert done.returncode == 71 and not marker.exists()


def _command(tmp_path: Path, jail: Jail, cpus: int = 0) -> list[str]:
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True, exist_ok=True)
    project = tmp_path / "ws" / "project"
    project.mkdir(parents=True, exist_ok=True)
    return build_command(env_dir=env, project=project, workspace=tmp_path / "ws",
                         entrypoint="code.py", args=[], user_env={}, job_id="j" * 32,
                         attempt=1, token="t", cpus=cpus, jail=jail).argv


@pytest.mark.parametrize("jail, quick", [
    (Jail(uid=60001, bwrap="/usr/bin/bwrap", tools=TOOLS), True),
    (Jail(uid=60001, bwrap="/usr/bin/bwrap", tools=None), False),  # a tool missing
    (Jail(uid=None, bwrap="/usr/bin/bwrap", tools=TOOLS), False),  # no uid to switch to
    (Jail(uid=60001, bwrap=None, tools=TOOLS, empty_network=True), False),  # no bwrap
    (Jail(uid=60001, bwrap="/usr/bin/bwrap", tools=TOOLS, net_fds=(5, 6)), False),  # net
])
def test_the_python_launcher_is_used_where_the_tools_cannot_box_the_run(tmp_path, jail,
                                                                       quick):
    argv = _command(tmp_path, jail)
    assert (argv[0] == "/bin/sh") is quick
    assert (str(LAUNCHER) in argv) is not quick


def test_cpus_without_taskset_go_through_the_launcher(tmp_path):
    no_taskset = Tools(sh="/bin/sh", nice="/usr/bin/nice", prlimit="/usr/bin/prlimit",
                       setpriv="/usr/bin/setpriv", taskset=None)
    jail = Jail(uid=60001, bwrap="/usr/bin/bwrap", tools=no_taskset)
    assert str(LAUNCHER) in _command(tmp_path, jail, cpus=1)
    assert str(LAUNCHER) not in _command(tmp_path, jail, cpus=0)


def test_the_tools_are_found_on_this_host():
    assert Tools.find() is not None  # util-linux and coreutils: essential on Debian
