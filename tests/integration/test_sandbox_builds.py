"""Environment builds in their box: what a package's own code (a ``.pth`` file, a
``setup.py``) could do to the worker and to other users' builds, tried for real.

The packages come from a local wheelhouse (``LABQ_UV_FIND_LINKS``, offline), built by
hand: wheels with any files, and sdists whose in-tree build backend runs test code in
the build box, as a malicious ``setup.py`` would.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from helpers import LabqSystem, wait_until
from sandbox_kit import BOXED_ENV, layers_of, make_sdist, make_wheel, require_sandbox_host, run

from labq.process_unit import isolation
from labq.process_unit.envbuild import Network, UvCommand
from labq.process_unit.envcache import EnvCache
from labq.process_unit.jobbox import HostSandbox
from labq.process_unit.uidpool import pids_of_uid
from labq.shared.errors import EnvironmentBuildError
from labq.shared.settings import Settings

pytestmark = pytest.mark.integration

BUILD_UID = 59999
#: Runs at every start of an interpreter of the environment it is installed in: notes
#: the uid it ran as in a folder of the host (a job, in its box, cannot see that folder).
PTH_CODE = """
try:
    open(os.path.join({folder!r}, f"uid-{{os.getuid()}}-{{os.getpid()}}"), "w").close()
except OSError:
    pass
os.environ["PTHRAN"] = str(os.getuid())
"""
#: A build backend that rewrites every cached copy of labqdemo it can reach, and tries to
#: plant a file in uv's cache: its own (UV_CACHE_DIR) and the worker's shared one.
POISON_CODE = """
import os, pathlib
report = []
for cache in sorted({{os.environ.get("UV_CACHE_DIR", ""), {shared!r}}} - {{""}}):
    for path in pathlib.Path(cache).rglob("labqdemo.py"):
        try:
            path.write_text("VALUE = 'POISONED'\\n")
            report.append("poisoned " + str(path))
        except OSError as exc:
            report.append(f"denied {{path}} {{exc.errno}}")
    try:
        (pathlib.Path(cache) / "POISON").write_text("x")
        report.append("planted " + cache)
    except OSError as exc:
        report.append(f"cannot plant {{cache}} {{exc.errno}}")
return report
"""
#: A build that would run for five minutes (a big C extension, or a build that hangs).
SLOW_CODE = """
import time
time.sleep(300)
return []
"""


@pytest.fixture(scope="module")
def builds(broker: str, tmp_path_factory: pytest.TempPathFactory):
    require_sandbox_host()
    system = LabqSystem(tmp_path_factory.mktemp("builds"), workers=1, env=BOXED_ENV)
    wheels = system.work_dir / "wheels"
    marks = Path(tempfile.mkdtemp(prefix="labq-pth-", dir="/var/tmp"))
    os.chmod(marks, 0o1777)  # anyone may note that it ran: root, the worker, a job
    pth = "import os; exec(" + repr(PTH_CODE.format(folder=str(marks))) + ")\n"
    make_wheel(wheels, "labqdemo", "1.0", {"labqdemo.py": "VALUE = 42\n"})
    make_wheel(wheels, "labqpth", "1.0", {"labqpth.pth": pth, "labqpth.py": "X = 1\n"})
    make_sdist(wheels, "poisoner", "1.0", POISON_CODE.format(shared=str(
        system.work_dir / "uv-cache")))
    make_sdist(wheels, "slowpkg", "1.0", SLOW_CODE)
    make_sdist(wheels, "srconly", "1.0", "return ['built']")
    os.chmod(wheels, 0o755)
    system.env["LABQ_UV_FIND_LINKS"] = str(wheels)
    system.marks = marks  # type: ignore[attr-defined]
    try:
        system.start()
        assert layers_of(system, 1)[0].get("complete"), layers_of(system, 1)
        yield system
    finally:
        system.stop()
        shutil.rmtree(marks, ignore_errors=True)


def test_no_interpreter_of_a_job_environment_runs_outside_the_box(builds: LabqSystem):
    # Given a package carrying a .pth file, which runs at every start of the interpreter
    code = "import os, labqpth\nprint('PTHRAN', os.environ.get('PTHRAN'), os.getuid())\n"
    done, log = run(builds, code, **{"requirements.txt": "labqpth==1.0\n"})
    # Then it ran in the job (as the job's uid, in its box) ...
    assert done["outcome"] == "succeeded", log
    ran_as, job_uid = log.split("PTHRAN ", 1)[1].split()[:2]
    assert ran_as == job_uid and int(job_uid) >= 60000, log
    # ... and never outside it: not as root, not as the worker (listing the packages
    # for the receipt reads the files, it does not start the interpreter)
    outside = sorted(p.name for p in builds.marks.iterdir())  # type: ignore[attr-defined]
    assert not [m for m in outside if m.split("-")[1] in ("0", str(os.getuid()))], outside
    # and the receipt still lists the exact packages
    receipt = builds.http.get(builds.api(f"/api/v1/jobs/{done['id']}/receipt"),
                              timeout=10).json()
    assert receipt["environment"]["packages"] == ["labqpth==1.0"], receipt


def test_a_build_from_source_cannot_poison_the_cache_for_later_builds(builds: LabqSystem):
    shared = builds.work_dir / "uv-cache"
    value = "import labqdemo\nprint('VALUE', labqdemo.VALUE)\n"
    # Given labqdemo in the shared cache (someone's earlier build) ...
    done, log = run(builds, value, **{"requirements.txt": "labqdemo==1.0\n"})
    assert "VALUE 42" in log, log
    assert list(shared.rglob("labqdemo.py")), "the wheels-only install fills the shared cache"
    # ... when another user's package, built from source, rewrites every cached copy
    # of labqdemo it can reach and tries to plant a file in uv's cache
    done, log = run(builds, "import poisoner\nprint('REPORT', poisoner.REPORT)\n",
                    **{"requirements.txt": "poisoner==1.0\n"})
    assert done["outcome"] == "succeeded", log
    report = log.split("REPORT ", 1)[1].splitlines()[0]
    assert f"planted {shared}" not in report and str(shared / "archive") not in report, report
    # Then the shared cache is untouched, and a later build of a third user gets the
    # true labqdemo from it
    assert not (shared / "POISON").exists()
    assert all(p.read_text() == "VALUE = 42\n" for p in shared.rglob("labqdemo.py"))
    done, log = run(builds, value, **{"requirements.txt": "labqdemo>=1.0\n"})
    assert done["outcome"] == "succeeded" and "VALUE 42" in log, log
    assert "reusing environment" not in log, "a new environment, built from the cache"


def test_a_stop_during_a_build_from_source_ends_the_build_and_cancels_the_job(
        builds: LabqSystem):
    # Given a job whose requirements build a package that takes five minutes
    job = builds.submit({"code.py": "print('never')\n", "requirements.txt": "slowpkg==1.0\n"})
    wait_until(lambda: "Building slowpkg" in builds.log(job["id"]), timeout=60,
               message="uv building slowpkg")
    wait_until(lambda: pids_of_uid(BUILD_UID), timeout=10, message="the build running")
    # When its owner stops it through the API
    asked = time.monotonic()
    assert builds.set_state(job["id"], "stopped").status_code in (200, 202)
    # Then the build ends at once, nothing of it is left, and the job is cancelled
    done = builds.wait_done(job["id"], timeout=60)
    assert (done["state"], done["outcome"]) == ("stopped", "cancelled"), done
    assert time.monotonic() - asked < 30
    wait_until(lambda: not pids_of_uid(BUILD_UID), timeout=10, message="no build process")
    # A job still queued for the backend is marked stopped at once; the worker's note
    # that the build ended follows when it has ended it.
    wait_until(lambda: "stopped by the user while its environment was being built"
               in builds.log(job["id"]), timeout=30, message="the worker's note")


def _host_cache(builds: LabqSystem, work: Path, **changes: object) -> tuple[HostSandbox,
                                                                               EnvCache]:
    settings = Settings(data_dir=work / "data", work_dir=work,
                        uv_find_links=builds.env["LABQ_UV_FIND_LINKS"],
                        **{"uv_offline": True, **changes})
    sandbox = HostSandbox(settings, isolation.probe(settings))
    return sandbox, EnvCache(sandbox.settings, box=sandbox.build_box())


@pytest.fixture()
def work() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="labq-buildwork-", dir="/var/tmp"))
    os.chmod(folder, 0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _requirements(work: Path, text: str) -> Path:
    project = work / "project"
    project.mkdir(exist_ok=True)
    os.chmod(project, 0o755)
    path = project / "requirements.txt"
    path.write_text(text)
    os.chmod(path, 0o644)
    return path


def test_the_build_time_limit_ends_a_slow_build_with_a_clear_error(builds: LabqSystem,
                                                                   work: Path):
    _, cache = _host_cache(builds, work, env_build_timeout_s=3)
    started = time.monotonic()
    requirements = _requirements(work, "slowpkg==1.0\n")
    with open(work / "log", "w+b") as log, pytest.raises(EnvironmentBuildError) as info, \
            cache.acquire(requirements, log):
        pass
    assert time.monotonic() - started < 30
    assert "build time limit of 3 s (LABQ_ENV_BUILD_TIMEOUT_S)" in info.value.message
    wait_until(lambda: not pids_of_uid(BUILD_UID), timeout=10, message="no build process")
    assert not [p for p in (work / "envs").iterdir() if not p.name.startswith(".")]


BUILD_PROBE = """
import os, resource, socket
print("BUILD UID", os.getuid())
for name in ("CORE", "NOFILE", "FSIZE", "NPROC", "AS"):
    print("RLIMIT", name, resource.getrlimit(getattr(resource, "RLIMIT_" + name))[0])
for path in DATA:
    print("SEES" if os.path.exists(path) else "HIDDEN", path)
for host in ("127.0.0.1", "10.0.2.2"):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, 5672)); print("REACHED", host)
    except OSError:
        print("BLOCKED", host)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.connect(("10.0.2.3", 53)); print("route out", u.getsockname()[0])
except OSError as e:
    print("no route", e.errno)
"""


def _probe(cache: EnvCache, code: str, network: Network, work: Path) -> str:
    cmd = UvCommand(["run", "--no-project", "--offline", "--python", "/usr/bin/python3",
                     "python", "-c", code], "probe", cache.uv_cache, network=network)
    cache.uv_cache.mkdir(parents=True, exist_ok=True)
    os.chown(cache.uv_cache, BUILD_UID, BUILD_UID)
    with open(work / "probe.log", "w+b") as log:
        try:
            cache.runner.run(cmd, log, deadline=time.monotonic() + 60,
                             cancelled=lambda: False)
        finally:
            log.seek(0)
            print(log.read().decode())
        log.seek(0)
        return log.read().decode()


def test_a_build_runs_boxed_as_the_build_uid_with_a_jobs_limits(builds: LabqSystem,
                                                                work: Path):
    # What a package's setup.py could do while uv builds it, run by uv in the build box
    sandbox, cache = _host_cache(builds, work)
    code = BUILD_PROBE.replace("DATA", repr([str(builds.data_dir), "/var/run/postgresql",
                                             str(builds.work_dir / "uv-cache")]))
    out = _probe(cache, code, Network.OWN, work)
    assert f"BUILD UID {BUILD_UID}" in out, out
    assert "SEES" not in out and out.count("HIDDEN") == 3, out
    assert "REACHED" not in out and out.count("BLOCKED") == 2, out
    assert "route out 10.0.2." in out, out
    settings = sandbox.settings
    # NPROC is left as the host has it (the build uid is shared: the pids cgroup bounds
    # each build), AS too (a memory cgroup exists: AS would break threaded builds).
    inherited = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    for name, value in (("CORE", 0), ("NOFILE", settings.job_max_open_files),
                        ("FSIZE", settings.env_cache_max_bytes), ("NPROC", inherited),
                        ("AS", -1)):
        assert f"RLIMIT {name} {value}\n" in out, (name, out)
    # A build without a network of its own gets none at all
    assert "no route" in _probe(cache, code, Network.NONE, work)


def test_a_build_is_held_to_a_jobs_memory_and_process_limits(builds: LabqSystem,
                                                             work: Path):
    sandbox, cache = _host_cache(builds, work)
    assert cache.box is not None and cache.box.cgroup, "the cgroup layer is needed here"
    cache.runner.box = dataclasses.replace(cache.box, memory_mb=64, max_procs=16)
    with pytest.raises(EnvironmentBuildError) as info:
        _probe(cache, "b = bytearray(300 * 1024 * 1024)", Network.NONE, work)
    assert "ran out of memory (limit 64 MB" in info.value.message, info.value.message
    forks = ("import os, time\nmade = 0\nfor _ in range(100):\n    try:\n"
             "        pid = os.fork()\n    except OSError:\n        break\n"
             "    if pid == 0:\n        time.sleep(20); os._exit(0)\n    made += 1\n"
             "print('FORKED', made)\n")
    out = _probe(cache, forks, Network.NONE, work)
    assert int(out.split("FORKED ", 1)[1].split()[0]) < 16, out
    wait_until(lambda: not pids_of_uid(BUILD_UID), timeout=10, message="no build process")


def test_a_build_from_source_without_a_network_of_its_own_is_refused(builds: LabqSystem,
                                                                     work: Path):
    # Given a worker that reaches the package index, but has no slirp4netns to give a
    # build from source a network without the host's loopback
    _, cache = _host_cache(builds, work, uv_offline=False)
    assert cache.box is not None
    cache.box = cache.runner.box = dataclasses.replace(cache.box, slirp=False)
    requirements = _requirements(work, "--no-index\nsrconly==1.0\n")
    with open(work / "log", "w+b") as log, pytest.raises(EnvironmentBuildError) as info, \
            cache.acquire(requirements, log):
        pass
    # Then the build is refused, saying why and what to do
    assert "must be built from source" in info.value.message
    assert "slirp4netns" in info.value.message and "loopback" in info.value.message
    # while wheels alone (no package code runs) install as before
    with open(work / "log", "w+b") as log, \
            cache.acquire(_requirements(work, "--no-index\nlabqdemo==1.0\n"), log) as env:
        assert (env / "labq-lock.txt").read_text() == "labqdemo==1.0\n"
    # and a worker without bubblewrap (user namespaces blocked) refuses it too
    cache.box = cache.runner.box = dataclasses.replace(cache.box, bwrap=None, slirp=True)
    requirements = _requirements(work, "--no-index\nsrconly==1.0\n")
    with open(work / "log", "w+b") as log, pytest.raises(EnvironmentBuildError) as info, \
            cache.acquire(requirements, log):
        pass
    assert "no bubblewrap" in info.value.message, info.value.message
