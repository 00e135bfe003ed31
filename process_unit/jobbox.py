"""The sandbox of one worker's host, and the box of one run inside it.

:class:`HostSandbox` is made once when a worker starts: it probes the layers
(:func:`labq.process_unit.isolation.probe`), logs them, picks the job interpreter and a
work dir job uids can reach, and owns the uid pool. For every run,
:meth:`HostSandbox.open` gives a :class:`JobBox`: a leased uid, a cgroup, the rlimits,
and the :class:`~labq.process_unit.sandbox.Jail` the command is built with. Closing the
box kills every process of the run (cgroup, then uid), removes the cgroup and gives
the uid back; the runner then removes the workspace.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from labq.process_unit import cgroups, isolation, proctree, quicklaunch, uidpool
from labq.process_unit.cgroups import JobCgroup
from labq.process_unit.envcache import BuildBox
from labq.process_unit.netbox import RESOLV_CONF, JobNetwork
from labq.process_unit.sandbox import Jail
from labq.shared import mounts
from labq.shared.errors import LabqError
from labq.shared.settings import MIB, Settings

log = logging.getLogger(__name__)


def _chown_tree(path: Path, uid: int) -> None:
    os.lchown(path, uid, uid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, uid)


@dataclass
class JobBox:
    """One run's uid, cgroup and limits; use as a context manager or call close()."""

    jail: Jail
    lease: uidpool.Lease | None = None
    cgroup: JobCgroup | None = None
    memory_limit_mb: int = 0
    #: A network-enabled run's route out (None: the job has no network at all).
    network: JobNetwork | None = None
    #: Bytes the job may print to its log in this run (0: no cap).
    output_limit: int = 0
    closed: bool = field(default=False, repr=False)

    def started(self) -> None:
        """Call right after the job's process started: a network job gets its route out
        before its code runs (the sandbox waits for it)."""
        if self.network is not None:
            self.network.start()

    def processes(self) -> dict[int, proctree.Proc] | None:
        """Every process of the run (None: no uid or cgroup to tell, use the tree walk)."""
        pids: set[int] = set()
        if self.cgroup is not None:
            pids |= self.cgroup.pids()
        elif self.lease is not None:  # a cgroup holds them all: no walk of /proc needed
            pids |= set(uidpool.pids_of_uid(self.lease.uid))
        if self.cgroup is None and self.lease is None:
            return None
        procs = {}
        for pid in pids:
            proc = proctree.read_proc(pid)
            if proc is not None and proc.state != "Z":
                procs[pid] = proc
        return procs

    def kill(self) -> None:
        # With a cgroup, every process the job started is in it (a job's uid cannot move
        # a process out: the cgroup files are root's), so the uid need not be swept.
        if self.cgroup is not None:
            self.cgroup.kill()
        elif self.lease is not None:
            uidpool.kill_uid(self.lease.uid)

    def out_of_memory(self) -> bool:
        return self.cgroup is not None and self.cgroup.out_of_memory()

    def cpu_seconds(self) -> float | None:
        """The run's CPU time to the end, as its cgroup counted it (None: no count)."""
        return self.cgroup.cpu_seconds() if self.cgroup is not None else None

    def peak_bytes(self) -> int | None:
        """The run's memory high-water mark, as its cgroup counted it (None: none)."""
        return self.cgroup.peak_bytes() if self.cgroup is not None else None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        swept = False
        try:
            # Without a cgroup the uid's processes are killed by the lease's release
            # below (one walk of /proc); with one, removing it (it waits until the group
            # is empty) ends them all, and the walk is not needed at all.
            if self.cgroup is not None:
                self.cgroup.kill()
            if self.network is not None:
                self.network.close()
            if self.cgroup is not None:
                swept = self.cgroup.remove()
        finally:
            if self.lease is not None:
                self.lease.release(kill=not swept)

    def __enter__(self) -> JobBox:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class HostSandbox:
    """The layers this worker uses, for the life of the worker."""

    def __init__(self, settings: Settings, layers: isolation.Layers) -> None:
        self.layers = layers
        work = isolation.work_dir(settings, layers)
        python = isolation.job_python(settings, layers)
        self.settings = settings.replace(work_dir=work, job_python=python)
        isolation.prepare_work_dir(work, layers)
        # With bwrap a job cannot write to the host's /tmp, /var/tmp or /dev/shm: no
        # need to sweep them after it.
        self.pool = uidpool.UidPool(uidpool.parse_range(settings.sandbox_uids),
                                    self._lock_dir(work), reclaim=not layers.bwrap) \
            if layers.uid_pool else None
        self.bwrap = isolation.bwrap_binary() if layers.bwrap else None
        #: Runs start through the system's tools, not a Python launcher, when it can
        #: (process_unit/quicklaunch.py).
        self.tools = quicklaunch.Tools.find() if self.bwrap and layers.uid_pool else None
        if self.bwrap and layers.uid_pool and self.tools is None:
            log.info("jobs start through the Python launcher: sh, nice, prlimit or "
                     "setpriv is missing (install util-linux and coreutils)")

    @classmethod
    def start(cls, settings: Settings) -> HostSandbox:
        """Probe, log loudly what is active and what is not, and get ready."""
        layers = isolation.probe(settings)
        level = logging.INFO if layers.complete else logging.WARNING
        log.log(level, "%s", layers.describe())
        if layers.cgroup:
            cgroups.sweep_stale(layers.cgroup)
        sandbox = cls(settings, layers)
        # Workers on several hosts share the data dir: say what its mount cannot give.
        mounts.check_worker_dirs(settings.data_dir, sandbox.settings.resolved_work_dir)
        return sandbox

    @classmethod
    def off(cls, settings: Settings) -> HostSandbox:
        return cls(settings, isolation.Layers(mode="off", missing=("LABQ_SANDBOX=off",)))

    @staticmethod
    def _lock_dir(work: Path) -> Path:
        # Host-local and shared by every worker of this host, whatever their data dir:
        # uids are a host resource. /run is a tmpfs, so a reboot frees every lease.
        run = Path("/run")
        if os.access(run, os.W_OK):
            return run / "labq" / "uids"
        return work / ".uids"

    def build_box(self) -> BuildBox | None:
        """How environment builds are boxed here: as the build uid (root) or the worker's
        (bwrap alone), with a job's cgroup limits and rlimits. None: unboxed, as the
        worker (the sandbox is off, or this host gives neither a uid nor bubblewrap)."""
        if self.layers.mode == "off" or not (self.layers.uid_pool or self.bwrap):
            return None
        settings, cgroup = self.settings, self.layers.cgroup
        # The memory a job gets by default; NPROC only without a pids cgroup (the build
        # uid is shared by every build of this host, so it bounds them all together).
        memory_mb = settings.default_memory_mb
        rlimits = self._rlimits(memory_mb, settings.env_cache_max_bytes,
                                own_uid=self.layers.uid_pool and not cgroup,
                                memory_cgroup=bool(cgroup))
        return BuildBox(uid=settings.build_uid if self.layers.uid_pool else None,
                        bwrap=self.bwrap, cgroup=cgroup, memory_mb=memory_mb,
                        max_procs=settings.job_max_procs, rlimits=rlimits,
                        slirp=self.layers.slirp4netns)

    def report(self) -> dict:
        return {"host": socket.gethostname(), **self.layers.to_json()}

    def _rlimits(self, memory_mb: int, max_output_bytes: int, *, own_uid: bool,
                 memory_cgroup: bool) -> tuple[tuple[str, int], ...]:
        """The rlimits backstop of one run."""
        rlimits = [("CORE", 0), ("NOFILE", self.settings.job_max_open_files)]
        if max_output_bytes:
            rlimits.append(("FSIZE", output_cap(max_output_bytes)))
        if own_uid:  # NPROC counts per uid: only meaningful with our own
            rlimits.append(("NPROC", self.settings.job_max_procs))
        if not memory_cgroup and memory_mb:
            # Address space is a blunt stand-in for a memory cgroup: threads reserve
            # much more than they use, so leave generous room.
            rlimits.append(("AS", max(memory_mb * 4, 1024) * MIB))
        return tuple(rlimits)

    def open(self, *, workspace: Path, memory_mb: int, cpus: int, max_output_bytes: int,
             network: bool, name: str) -> JobBox:
        """Lease a uid, make the cgroup, and hand the workspace to the job's uid."""
        settings = self.settings
        if network and not settings.allow_network:
            raise LabqError("this job asks for network access (network = true) but the "
                            "server does not allow it (LABQ_ALLOW_NETWORK)")
        if network and not self.bwrap:
            raise LabqError("this job asks for network access, and this worker cannot give "
                            "it a network of its own (no bubblewrap): it is not run")
        lease = self.pool.acquire() if self.pool else None
        cgroup = None
        net = None
        try:
            if self.layers.cgroup:
                cgroup = JobCgroup.create(name, layout=self.layers.cgroup, memory_mb=memory_mb,
                                          max_procs=settings.job_max_procs, cpus=cpus)
            rlimits = self._rlimits(memory_mb, max_output_bytes, own_uid=lease is not None,
                                    memory_cgroup=cgroup is not None)
            if lease is not None:
                _chown_tree(workspace, lease.uid)
                os.chmod(workspace, 0o700)
            resolv = None
            if network:
                net = JobNetwork.prepare()
                resolv = workspace / ".resolv.conf"
                resolv.write_text(RESOLV_CONF)
                os.chmod(resolv, 0o644)
            jail = Jail(uid=lease.uid if lease else None, bwrap=self.bwrap,
                        net_fds=net.child_fds() if net else None, resolv_conf=resolv,
                        tmp_mb=settings.job_tmp_mb,
                        cgroup_procs=tuple(cgroup.procs_files()) if cgroup else (),
                        rlimits=rlimits, nice=max(0, min(19, settings.job_nice)),
                        tools=self.tools,
                        # Without bwrap, a root launcher gives the job an empty network
                        # namespace of its own (isolation.py, "network isolation").
                        empty_network=self.layers.network_isolation and not self.bwrap)
        except BaseException:
            JobBox(Jail(uid=None, bwrap=None), lease, cgroup, memory_mb, net).close()
            raise
        return JobBox(jail, lease, cgroup, memory_mb, net,
                      output_limit=output_cap(max_output_bytes))


def output_cap(max_output_bytes: int) -> int:
    """The most one run may print to its log, and the largest file it may write (FSIZE):
    its output cap, 64 MiB at least (0: no cap)."""
    return max(max_output_bytes, 64 * MIB) if max_output_bytes else 0


def write_report(data_dir: Path, worker: str, report: dict) -> Path:
    """Publish this worker's sandbox layers where the backend finds them (``/readyz``,
    stats): ``<data_dir>/workers/<worker>.json``, touched while the worker lives."""
    folder = data_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{worker}.json"
    tmp = folder / f".{worker}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({**report, "worker": worker, "at": time.time()}))
    os.replace(tmp, path)
    return path
