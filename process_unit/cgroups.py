"""A control group per job: the kernel enforces its memory, process count and CPU time.

One cgroup per run, made under the worker's own cgroup, for either layout:

* **v2** (unified): one folder with ``memory.max`` + ``memory.swap.max``, ``pids.max``,
  ``cpu.max``; ``cgroup.kill`` ends every process in it at once; ``memory.events``
  counts OOM kills.
* **v1**: one folder per controller (``memory``, ``pids``, ``cpu``) with
  ``memory.limit_in_bytes`` + ``memory.memsw.limit_in_bytes``, ``pids.max``,
  ``cpu.cfs_quota_us``; ``memory.oom_control`` counts OOM kills; no kill file, so every
  pid in ``cgroup.procs`` gets SIGKILL until none is left; ``cpuacct`` (where mounted)
  only counts CPU time.

Both count what the run used, to the end and whatever exited meanwhile: CPU time
(``cpu.stat`` ``usage_usec``, v1 ``cpuacct.usage``) and the memory high-water mark
(``memory.peak``, v1 ``memory.max_usage_in_bytes``).

The job's launcher writes its own pid into every ``cgroup.procs`` before it drops to
the job's uid and execs, so the job cannot start a single process outside it. The
RSS polling of the runner stays as the last layer on hosts without a memory cgroup.
``root`` is a parameter so tests can check both layouts against a plain folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from labq.shared.settings import MIB

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
CPU_PERIOD_US = 100_000


def own_paths(proc_cgroup: str) -> dict[str, str]:
    """``/proc/self/cgroup`` → {controller: path}; the v2 hierarchy is key ``""``."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            paths[controller] = parts[2]
    return paths


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


def detect(root: Path = ROOT, proc_cgroup: str | None = None) -> str | None:
    """The layout this process can make job cgroups in: "v2", "v1" or None.

    v2 needs the memory and pids controllers enabled for our subtree; a hybrid host
    whose unified hierarchy has no controllers (only ``cgroup.kill``) uses v1.
    """
    text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    paths = own_paths(text)
    unified = root if (root / "cgroup.controllers").exists() else root / "unified"
    if "" in paths and (unified / "cgroup.controllers").exists():
        base = unified / paths[""].lstrip("/")
        controllers = (base / "cgroup.subtree_control").read_text().split() \
            if (base / "cgroup.subtree_control").exists() else []
        if {"memory", "pids"} <= set(controllers) and _writable(base):
            return "v2"
    if all(_writable(root / c / paths.get(c, "/").lstrip("/")) for c in ("memory", "pids")):
        return "v1"
    return None


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True  # gone


@dataclass
class JobCgroup:
    """The cgroup(s) of one run. Build with :meth:`create`; always :meth:`remove`."""

    layout: str
    #: The folders: one for v2, one per controller for v1.
    dirs: dict[str, Path]
    memory_limit_bytes: int = 0
    _oom_before: int = field(default=0, repr=False)

    @classmethod
    def create(cls, name: str, *, layout: str, memory_mb: int, max_procs: int, cpus: int,
               root: Path = ROOT, proc_cgroup: str | None = None) -> JobCgroup:
        text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
        paths = own_paths(text)
        if layout == "v2":
            unified = root if (root / "cgroup.controllers").exists() else root / "unified"
            dirs = {"": unified / paths.get("", "/").lstrip("/") / name}
        else:
            dirs = _v1_dirs(root, paths, name, cpus)
        group = cls(layout, dirs, memory_mb * MIB if memory_mb else 0)
        for folder in dirs.values():
            folder.mkdir(exist_ok=True)
        group._limit(memory_mb, max_procs, cpus)
        group._oom_before = group.oom_kills()
        return group

    def _file(self, controller: str, name: str) -> Path:
        return self.dirs["" if self.layout == "v2" else controller] / name

    def _write(self, controller: str, name: str, value: str, required: bool = True) -> None:
        path = self._file(controller, name)
        if self.layout == "v1" and controller not in self.dirs:
            return
        try:
            path.write_text(value)
        except OSError as exc:
            if required:
                raise OSError(f"cannot set {path} to {value}: {exc}") from exc
            log.debug("optional cgroup file %s not set: %s", path, exc)

    def _limit(self, memory_mb: int, max_procs: int, cpus: int) -> None:
        if self.layout == "v2":
            if memory_mb:
                self._write("memory", "memory.max", str(memory_mb * MIB))
                self._write("memory", "memory.swap.max", "0", required=False)
            if max_procs:
                self._write("pids", "pids.max", str(max_procs))
            if cpus:
                self._write("cpu", "cpu.max", f"{cpus * CPU_PERIOD_US} {CPU_PERIOD_US}",
                            required=False)
            return
        if memory_mb:
            self._write("memory", "memory.limit_in_bytes", str(memory_mb * MIB))
            # memsw (memory + swap) must be set after memory and be >= it; absent
            # when swap accounting is off, and then there is no swap to escape to.
            self._write("memory", "memory.memsw.limit_in_bytes", str(memory_mb * MIB),
                        required=False)
        if max_procs:
            self._write("pids", "pids.max", str(max_procs))
        if cpus:
            self._write("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US), required=False)
            self._write("cpu", "cpu.cfs_quota_us", str(cpus * CPU_PERIOD_US), required=False)

    # -- the launcher joins these ------------------------------------------------
    def procs_files(self) -> list[Path]:
        return [folder / "cgroup.procs" for folder in self.dirs.values()]

    # -- while and after it runs ---------------------------------------------------
    def pids(self) -> set[int]:
        """Live processes in the group (zombies are dead already: only reaping is left)."""
        found: set[int] = set()
        for path in self.procs_files():
            with contextlib.suppress(OSError, ValueError):
                found |= {int(x) for x in path.read_text().split()}
        return {pid for pid in found if not _zombie(pid)}

    def oom_kills(self) -> int:
        """How many processes the kernel killed for exceeding the memory limit."""
        name = "memory.events" if self.layout == "v2" else "memory.oom_control"
        try:
            text = self._file("memory", name).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def out_of_memory(self) -> bool:
        return self.oom_kills() > self._oom_before

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) of every process that ran in the group, those that
        exited included; None where this host does not count it."""
        try:
            if self.layout == "v2":
                for line in (self.dirs[""] / "cpu.stat").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "usage_usec":
                        return int(value) / 1e6
                return None
            for controller in ("cpuacct", "cpu"):  # cpuacct may share cpu's folder
                folder = self.dirs.get(controller)
                if folder is not None and (folder / "cpuacct.usage").exists():
                    return int((folder / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return None
        return None

    def peak_bytes(self) -> int | None:
        name = "memory.peak" if self.layout == "v2" else "memory.max_usage_in_bytes"
        try:
            return int(self._file("memory", name).read_text())
        except (OSError, ValueError):
            return None

    def kill(self, rounds: int = 200) -> None:
        """End every process in the group (v2: ``cgroup.kill``; v1: SIGKILL each)."""
        if self.layout == "v2":
            self._write("", "cgroup.kill", "1", required=False)
        for pause in _pauses(rounds):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(pause)
        log.error("processes of cgroup %s survived %d rounds of SIGKILL", self.dirs, rounds)

    def remove(self) -> bool:
        """Kill what is left and remove the folders; True when every one is gone (the
        kernel refuses to remove a cgroup that still holds a process)."""
        self.kill()
        gone = True
        for folder in self.dirs.values():
            for pause in _pauses(60):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # still busy for a moment after the last exit
                    time.sleep(pause)
            else:
                gone = False
        return gone


def _v1_dirs(root: Path, paths: dict[str, str], name: str, cpus: int) -> dict[str, Path]:
    """The run's folder in each v1 hierarchy it needs: memory and pids; cpu only with a
    CPU limit (one folder and one join less per run); cpuacct to count CPU time, unless
    it is mounted together with a cpu folder made anyway (``cpu,cpuacct``)."""
    dirs: dict[str, Path] = {}
    mounts: set[Path] = set()
    for controller in V1_CONTROLLERS:
        if (controller == "cpu" and not cpus) or not (root / controller).is_dir():
            continue
        mount = (root / controller).resolve()
        if controller == "cpuacct" and mount in mounts:
            continue
        mounts.add(mount)
        dirs[controller] = root / controller / paths.get(controller, "/").lstrip("/") / name
    return dirs


def _pauses(rounds: int) -> Iterator[float]:
    """Waits between tries: the last process of a job is usually gone within a
    millisecond of its parent's exit, so start short (0.5 ms), double up to 10 ms.
    (A generator: most runs need one try, and every run's cgroup is killed.)"""
    pause = 0.0005
    for _ in range(rounds):
        yield pause
        pause = min(pause * 2, 0.01)


#: Job cgroups are named ``labq-<worker pid>-<worker start time>-<run>`` so a worker can
#: tell the ones left behind by a worker that died (SIGKILL) from its neighbours'.
_NAME = re.compile(r"^labq-(\d+)-(\d+)-")


def run_name(run: str) -> str:
    """This worker's name for a run's cgroup."""
    from labq.process_unit.proctree import own_start_time

    return f"labq-{os.getpid()}-{own_start_time()}-{run}"


def sweep_stale(layout: str, root: Path = ROOT, proc_cgroup: str | None = None) -> int:
    """Remove job cgroups whose worker is gone (killing what is left in them); returns
    how many. Run when a worker starts: a SIGKILLed worker cannot clean up itself."""
    from labq.process_unit.proctree import read_proc

    text = proc_cgroup if proc_cgroup is not None else Path("/proc/self/cgroup").read_text()
    paths = own_paths(text)
    if layout == "v2":
        unified = root if (root / "cgroup.controllers").exists() else root / "unified"
        parents = {"": unified / paths.get("", "/").lstrip("/")}
    else:
        parents = {c: root / c / paths.get(c, "/").lstrip("/") for c in V1_CONTROLLERS}
    removed = 0
    for controller, parent in parents.items():
        try:
            children = [p for p in parent.iterdir() if p.is_dir()]
        except OSError:
            continue
        for child in children:
            match = _NAME.match(child.name)
            if not match:
                continue
            worker = read_proc(int(match.group(1)))
            if worker is not None and worker.start == int(match.group(2)) \
                    and worker.state != "Z":
                continue  # a live worker's run
            JobCgroup(layout, {controller: child}).remove()
            removed += not child.exists()
    if removed:
        log.info("removed %d job cgroup(s) left by workers that died", removed)
    return removed
