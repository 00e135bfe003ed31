"""How one uv command of an environment build runs: boxed, limited, watched, stoppable.

With a :class:`BuildBox` (a sandboxed worker) uv — and whatever a package's build runs —
goes through the job launcher: in a cgroup of its own with a job's memory and process
limits, with a job's rlimits, as the build uid, inside bubblewrap, seeing the system
read-only plus the folders named for that one command (never the data dir). Its
network is one of :class:`Network`: none at all, its own namespace routed out by
slirp4netns without the host's loopback, or (uv alone, no package code) the host's.
The build's time limit and the user's stop end it, and with it everything it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from labq.process_unit.netbox import RESOLV_CONF, JobNetwork
from labq.shared.errors import EnvironmentBuildError
from labq.shared.settings import Settings

#: Variables a boxed build keeps from the worker's environment: uv's own settings, CA
#: certificates and proxies (how to reach the index), nothing else.
BUILD_ENV_KEEP = ("UV_", "SSL_CERT_", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY",
                  "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
#: Lines of uv's output left out of the job log: terminal advice about a temporary path.
UV_TERMINAL_HINTS = ("Activate with:",)
#: How much of uv's message goes into the job's ``error`` field.
ERROR_TAIL_CHARS = 1500


class BuildStoppedError(EnvironmentBuildError):
    """Raised when the user stopped a job while its environment was being built."""

    code = "build_stopped"


class Network(StrEnum):
    """The network one uv command gets."""

    NONE = "none"  #: an empty namespace: making a venv, offline installs
    OWN = "own"  #: its own namespace, routed out by slirp4netns, host loopback cut off
    HOST = "host"  #: the host's: only for uv alone (no package code runs), no slirp4netns


@dataclass(frozen=True)
class BuildBox:
    """How builds are boxed (made by the worker's HostSandbox)."""

    #: The build uid (None: the worker's own, a worker that is not root).
    uid: int | None = None
    #: bubblewrap (None: no namespaces, user namespaces are blocked here).
    bwrap: str | None = None
    #: Cgroup layout ("v1"/"v2") for a cgroup per uv command (None: no cgroup layer).
    cgroup: str | None = None
    memory_mb: int = 0
    max_procs: int = 0
    #: The launcher's rlimits, as for a job.
    rlimits: tuple[tuple[str, int], ...] = (("CORE", 0),)
    #: slirp4netns is installed: a build that needs the index gets a network of its own.
    slirp: bool = False


@dataclass
class UvCommand:
    """One uv invocation of a build."""

    args: list[str]
    #: What it does, for messages: "installing requirements.txt".
    what: str
    #: uv's cache for this command (the shared one, or one of this build alone).
    cache: Path
    binds: list[Path] = field(default_factory=list)
    ro_binds: list[Path] = field(default_factory=list)
    network: Network = Network.NONE


def uv_binary() -> str:
    try:
        from uv import find_uv_bin  # the PyPI package ships the binary

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found:
            return found
    raise EnvironmentBuildError("uv is not installed on this worker")


class UvRunner:
    """Runs :class:`UvCommand` s for one EnvCache, boxed by ``box`` (None: as is)."""

    def __init__(self, settings: Settings, box: BuildBox | None) -> None:
        self.settings = settings
        self.box = box
        self.bin_dir = settings.resolved_work_dir / "bin"

    def env(self, cache: Path) -> dict[str, str]:
        # uv needs no labq setting; keep broker/database URLs away from it too.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABQ_")}
        if self.box is not None:
            # Boxed: from scratch, keeping only how to reach the package index.
            env = {k: v for k, v in env.items() if k.startswith(BUILD_ENV_KEEP)}
            env.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME="/tmp", LANG="C.UTF-8",
                       # The cache and the environment are separate bind mounts (no
                       # hardlinks across them), and jobs never see the cache: copy.
                       UV_LINK_MODE="copy")
        env.pop("VIRTUAL_ENV", None)
        env["UV_CACHE_DIR"] = str(cache)
        env["UV_PYTHON_DOWNLOADS"] = "never"
        env["UV_NO_PROGRESS"] = "1"
        return env

    def argv(self, cmd: UvCommand, net: JobNetwork | None,
             cgroup_procs: list[Path]) -> list[str]:
        """uv's argv: as is, or through the launcher (cgroup, rlimits, build uid) inside
        bwrap, which shows the system read-only and ``cmd``'s folders only."""
        box = self.box
        if box is None:
            return [uv_binary(), *cmd.args]
        from labq.process_unit.isolation import system_links
        from labq.process_unit.sandbox import LAUNCHER

        uv = self._uv_copy()
        launch = [sys.executable, "-I", "-S", str(LAUNCHER), "--parent", str(os.getpid())]
        for path in cgroup_procs:
            launch += ["--cgroup", str(path)]
        for name, value in box.rlimits:
            launch += ["--rlimit", f"{name}={value}"]
        if box.uid is not None:
            launch += ["--uid", str(box.uid)]
        if net is not None:
            launch += ["--netns", ",".join(str(fd) for fd in net.child_fds())]
        launch.append("--")
        if not box.bwrap:
            return [*launch, uv, *cmd.args]
        resolv = ["--ro-bind", str(self._resolv_conf()), "/etc/resolv.conf"] if net else []
        jail = [box.bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc",
                "--unshare-uts", "--unshare-cgroup-try",
                *(["--unshare-net"] if cmd.network == Network.NONE else []),
                "--die-with-parent", "--new-session",
                "--ro-bind", "/usr", "/usr", *system_links(), "--ro-bind", "/etc", "/etc",
                *resolv, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                "--ro-bind", uv, uv]
        for path in cmd.ro_binds:
            jail += ["--ro-bind", str(path), str(path)]
        for path in [*cmd.binds, cmd.cache]:
            jail += ["--bind", str(path), str(path)]
        return [*launch, *jail, "--remount-ro", "/", uv, *cmd.args]

    def _resolv_conf(self) -> Path:
        path = self.bin_dir / "resolv.conf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(RESOLV_CONF)
            os.chmod(path, 0o644)
        return path

    def _uv_copy(self) -> str:
        """uv, copied where the build uid may run it (labq's own venv may be private)."""
        target = self.bin_dir / "uv"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".uv.{os.getpid()}")
            shutil.copy2(uv_binary(), tmp)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        return str(target)

    def run(self, cmd: UvCommand, log_file: BinaryIO, *, deadline: float,
            cancelled: Callable[[], bool]) -> list[str]:
        """Run ``cmd`` with its output copied line by line into the job log, minus lines
        that only make sense in a terminal; returns them. Raises BuildStoppedError
        (the user's stop), EnvironmentBuildError (time limit, out of memory, failure)."""
        log_file.flush()
        with self._cgroup() as cgroup:
            proc, net = self._start(cmd, cgroup)

            def kill_all() -> None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                if cgroup is not None:  # what left uv's process group too
                    cgroup.kill()

            watch = _BuildWatch(max(0.0, deadline - time.monotonic()), cancelled, kill_all)
            try:
                kept = _copy_uv_output(proc, log_file)
                returncode = proc.wait()
            finally:
                watch.close()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if net is not None:
                    net.close()
            out_of_memory = cgroup is not None and cgroup.out_of_memory()
        self._check(cmd, watch, out_of_memory, returncode, kept)
        return kept

    def _check(self, cmd: UvCommand, watch: _BuildWatch, out_of_memory: bool,
               returncode: int, kept: list[str]) -> None:
        if watch.stopped.is_set():
            raise BuildStoppedError(f"{cmd.what} was stopped by the user")
        if watch.expired.is_set():
            raise EnvironmentBuildError(
                f"{cmd.what} did not finish within the build time limit of "
                f"{self.settings.env_build_timeout_s} s (LABQ_ENV_BUILD_TIMEOUT_S); gave up")
        if out_of_memory:
            raise EnvironmentBuildError(
                f"{cmd.what} ran out of memory (limit {self.box.memory_mb if self.box else 0}"
                " MB for a build, LABQ_DEFAULT_MEMORY_MB)")
        if returncode != 0:
            # uv's chatter about which interpreter it uses says nothing about the failure.
            lines = [line for line in kept if line.strip()
                     and not line.startswith(("Using Python", "Using CPython"))]
            tail = "\n".join(lines)[-ERROR_TAIL_CHARS:] or f"uv exited {returncode}"
            raise EnvironmentBuildError(f"{cmd.what} failed: {tail}")

    @contextlib.contextmanager
    def _cgroup(self):  # noqa: ANN202 - a context manager of JobCgroup | None
        """A cgroup for one uv command (a job's memory and process limits), removed after:
        whatever the build started dies with it."""
        if self.box is None or not self.box.cgroup:
            yield None
            return
        from labq.process_unit.cgroups import JobCgroup, run_name

        group = JobCgroup.create(run_name(f"build-{threading.get_ident()}"),
                                 layout=self.box.cgroup, memory_mb=self.box.memory_mb,
                                 max_procs=self.box.max_procs, cpus=0)
        try:
            yield group
        finally:
            group.remove()

    def _start(self, cmd: UvCommand, cgroup: object) -> tuple[subprocess.Popen,
                                                               JobNetwork | None]:
        net = JobNetwork.prepare() if self.box and cmd.network == Network.OWN else None
        procs = cgroup.procs_files() if cgroup is not None else []  # type: ignore[attr-defined]
        proc = None
        try:
            proc = subprocess.Popen(
                self.argv(cmd, net, procs),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=self.env(cmd.cache), start_new_session=True,
                pass_fds=net.child_fds() if net else ())
            if net is not None:
                net.start()
        except BaseException:
            if proc is not None:
                proc.kill()
                proc.wait()
            if net is not None:
                net.close()
            raise
        return proc, net


class _BuildWatch:
    """Ends a running uv when it outlives its time limit or the user stops the job."""

    def __init__(self, timeout_s: float, cancelled: Callable[[], bool],
                 kill: Callable[[], None]) -> None:
        self.kill = kill
        self.cancelled = cancelled
        self.expired = threading.Event()
        self.stopped = threading.Event()
        self.done = threading.Event()
        self.timer = threading.Timer(timeout_s, self._expire)
        self.timer.start()
        threading.Thread(target=self._watch_stop, name="labq-build-stop", daemon=True).start()

    def _expire(self) -> None:
        self.expired.set()
        self.kill()

    def _watch_stop(self) -> None:
        while not self.done.wait(0.2):
            if self.cancelled():
                self.stopped.set()
                self.kill()
                return

    def close(self) -> None:
        self.done.set()
        self.timer.cancel()


def _copy_uv_output(proc: subprocess.Popen, log_file: BinaryIO) -> list[str]:
    """Copy uv's output into the job log as it comes; return the lines kept.

    A package's build (``setup.py``) prints through uv: into the job log it goes as the
    job's own output (:meth:`JobLog.job_output`), so it cannot forge labq's lines."""
    kept: list[str] = []
    assert proc.stdout is not None
    put = getattr(log_file, "job_output", None)
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        if line.lstrip().startswith(UV_TERMINAL_HINTS):
            continue
        if put is not None:
            put(raw)
        else:
            log_file.write(raw)
            log_file.flush()
        kept.append(line.rstrip("\n"))
    end = getattr(log_file, "end_job_output", None)
    if end is not None:
        end()
    return kept
