"""Which layers of the job sandbox this host allows, decided once when a worker starts.

The layers (README, "What a job can reach"):

* **uid** — each job runs as its own uid from the pool (needs root, to switch uid);
* **bwrap** — bubblewrap namespaces (pid, ipc, uts, mount, user): the job sees only
  its own folder, its environment and read-only system folders;
* **network isolation** — a network namespace with nothing but its own loopback:
  bwrap's, or where bwrap fails, one the root launcher makes before the uid switch;
* **slirp4netns** — a route out without the host's loopback, for network jobs and for
  builds that run a package's code while reaching the package index;
* **cgroup** — v2 or v1 limits on memory, processes and CPU, and a kill that misses
  nothing;
* **rlimits** — FSIZE, NOFILE, CORE=0, NPROC (with the job's own uid), AS (only
  without a memory cgroup: it breaks threaded code).

``LABQ_SANDBOX=auto`` uses every layer that works here and logs which; ``required``
refuses to start without all of them (slirp4netns included); ``off`` runs jobs as the
worker (development).
The report is published with the worker's status so ``/readyz`` and the stats show it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from labq.process_unit import cgroups
from labq.process_unit.netbox import slirp_binary
from labq.process_unit.uidpool import parse_range
from labq.shared.errors import ConfigError
from labq.shared.settings import Settings

log = logging.getLogger(__name__)

MODES = ("auto", "required", "off")
#: Where a job's interpreter must live so every uid can run it (bound read-only).
SYSTEM_PREFIX = Path("/usr")


@dataclass(frozen=True)
class Layers:
    mode: str
    uid_pool: bool = False
    bwrap: bool = False
    network_isolation: bool = False
    slirp4netns: bool = False
    cgroup: str | None = None  # "v2", "v1" or None
    rlimits: bool = True
    #: Why a layer is missing, for the log and /readyz.
    missing: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return (self.uid_pool and self.bwrap and self.network_isolation
                and self.slirp4netns and bool(self.cgroup))

    def to_json(self) -> dict:
        data = asdict(self)
        data["missing"] = list(self.missing)
        data["complete"] = self.complete
        return data

    def describe(self) -> str:
        on = [name for name, active in (("uid pool", self.uid_pool), ("bwrap", self.bwrap),
                                        ("network isolation", self.network_isolation),
                                        ("slirp4netns", self.slirp4netns),
                                        (f"cgroup {self.cgroup}", bool(self.cgroup)),
                                        ("rlimits", self.rlimits)) if active]
        text = f"sandbox {self.mode}: " + (", ".join(on) or "no layer")
        return text + (f"; missing: {'; '.join(self.missing)}" if self.missing else "")


def bwrap_binary() -> str | None:
    return shutil.which("bwrap") or next(
        (p for p in ("/usr/bin/bwrap", "/bin/bwrap") if os.access(p, os.X_OK)), None)


def _bwrap_works(bwrap: str, uid: int | None) -> tuple[bool, bool, str]:
    """(bwrap runs, network namespace works, why not) — tried as the job uid."""
    def drop() -> None:  # pragma: no cover - runs in the child
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    base = [bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
            *system_links(), "--proc", "/proc", "--dev", "/dev", "/usr/bin/true"]
    try:
        ran = subprocess.run(base, preexec_fn=drop, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, False, f"bwrap did not run: {exc}"
    if ran.returncode != 0:
        why = ran.stderr.decode(errors="replace").strip() or f"exit {ran.returncode}"
        return False, False, f"bwrap failed ({why}); user namespaces may be blocked"
    return True, True, ""


def _empty_network_works() -> tuple[bool, str]:
    """(the launcher can give a job an empty network namespace, why not): tried for real,
    as a job's launcher does it."""
    from labq.process_unit.sandbox import LAUNCHER

    argv = [sys.executable, "-I", "-S", str(LAUNCHER), "--no-network", "1", "--",
            shutil.which("true") or "/bin/true"]
    try:
        ran = subprocess.run(argv, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"the launcher did not run: {exc}"
    if ran.returncode != 0:
        why = ran.stderr.decode(errors="replace").strip() or f"exit {ran.returncode}"
        return False, f"no network namespace for jobs without bwrap ({why})"
    return True, ""


def system_links() -> list[str]:
    """bwrap arguments recreating /bin, /sbin, /lib* as on the host (merged /usr: links)."""
    args: list[str] = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    return args


def _probe_namespaces(uid: int | None, root: bool, missing: list[str]) -> tuple[bool, bool]:
    """(bwrap works, the job gets a network of its own), adding what is missing."""
    bwrap = bwrap_binary()
    bwrap_ok = net_ok = False
    if bwrap is None:
        missing.append("bwrap: bubblewrap is not installed (apt-get install bubblewrap)")
    else:
        bwrap_ok, net_ok, why = _bwrap_works(bwrap, uid)
        if not bwrap_ok:
            missing.append(f"bwrap: {why}")
    if not net_ok and root:
        net_ok, why = _empty_network_works()
        if not net_ok:
            missing.append(f"network isolation: {why}")
    elif not net_ok:
        missing.append("network isolation: needs bwrap or a root worker")
    return bwrap_ok, net_ok


def probe(settings: Settings) -> Layers:
    """The layers this host allows under ``settings.sandbox``; raises ConfigError when
    ``required`` cannot be met or the settings are wrong."""
    mode = settings.sandbox.strip().lower()
    if mode not in MODES:
        raise ConfigError(f"LABQ_SANDBOX={settings.sandbox!r}: use auto, required or off")
    if mode == "off":
        return Layers(mode="off", rlimits=True, missing=("LABQ_SANDBOX=off",))
    uids = parse_range(settings.sandbox_uids)
    missing: list[str] = []
    root = os.geteuid() == 0
    if not root:
        missing.append("uid pool: the worker is not root, so jobs run as its own uid")
    bwrap_ok, net_ok = _probe_namespaces(uids[0] if root else None, root, missing)
    slirp = slirp_binary() is not None
    if not slirp:
        missing.append("slirp4netns: not installed (apt-get install slirp4netns), so no "
                       "network job can run and no package can be built from source unless "
                       "LABQ_UV_OFFLINE (a build must not share the host's loopback)")
    layout = cgroups.detect() if root else None
    if layout is None:
        missing.append("cgroup: no writable memory and pids cgroup for this worker")
    layers = Layers(mode=mode, uid_pool=root, bwrap=bwrap_ok, network_isolation=net_ok,
                    slirp4netns=slirp, cgroup=layout, rlimits=True, missing=tuple(missing))
    if mode == "required" and not layers.complete:
        raise ConfigError("LABQ_SANDBOX=required but this host lacks: " + "; ".join(missing))
    return layers


def job_python(settings: Settings, layers: Layers) -> str:
    """The interpreter job environments are built from.

    A sandboxed job sees only ``/usr`` of the host, and its uid cannot enter private
    folders (a Python under /root is mode 700), so it must be a system interpreter.
    """
    if settings.job_python:
        return settings.job_python
    if not layers.uid_pool and not layers.bwrap:
        return sys.executable
    real = Path(sys.executable).resolve()
    if real.is_relative_to(SYSTEM_PREFIX):
        return str(real)
    for candidate in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}",
                      "/usr/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("sandboxed jobs need a Python under /usr that every user can run: "
                      "install python3 (apt-get install python3) or set LABQ_JOB_PYTHON")


def reachable_by_all(path: Path) -> bool:
    """Every folder from / down to ``path`` lets other users through (mode o+x)."""
    path = path.resolve()
    for folder in [path, *path.parents]:
        try:
            if not os.stat(folder).st_mode & 0o001:
                return False
        except FileNotFoundError:
            continue
    return True


def work_dir(settings: Settings, layers: Layers) -> Path:
    """Where jobs are unpacked and environments cached: reachable by job uids.

    ``LABQ_WORK_DIR`` when set; else ``<data_dir>/work`` when every parent lets others
    through, else a host-local ``/var/tmp/labq-work-<hash of the data dir>`` (bwrap,
    running as the job's uid, must be able to reach the folders it binds).
    """
    default = settings.resolved_work_dir
    if settings.work_dir or not (layers.uid_pool or layers.bwrap):
        return default
    default.parent.mkdir(parents=True, exist_ok=True)
    if reachable_by_all(default.parent):
        return default
    digest = hashlib.sha256(str(Path(settings.data_dir).resolve()).encode()).hexdigest()[:12]
    chosen = Path("/var/tmp") / f"labq-work-{digest}"
    log.info("work dir %s is not reachable by job uids (a parent folder is private); "
             "using %s (set LABQ_WORK_DIR to choose)", default, chosen)
    return chosen


def prepare_work_dir(path: Path, layers: Layers) -> None:
    """Make the work dir: owned by the worker, others may only pass through (0711)."""
    path.mkdir(parents=True, exist_ok=True)
    if layers.uid_pool or layers.bwrap:
        os.chmod(path, 0o711)
