"""Which file system a folder is on, and what labq can tell from its mount options.

With workers on several hosts the data dir is a network file system, and labq relies on
what docs/admin.md ("What the shared volume must provide") lists. Part of it shows in
``/proc/self/mountinfo``: an NFS mount whose locks stay on each host (``nolock``,
``local_lock=flock`` or ``all``) would let two hosts run one job at once, NFSv3 keeps a
dead host's locks until that host is back, and a cached "no such file" hides a stop
marker for up to a minute. A worker says so when it starts (it cannot know whether other
hosts share the folder, so it warns instead of refusing); it also warns when its work dir,
which must be local, is on a network file system.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

NFS_TYPES = {"nfs", "nfs4"}
#: File systems shared over a network: flock and rename depend on the server there.
NETWORK_TYPES = NFS_TYPES | {"cifs", "smb3", "ceph", "fuse.ceph", "glusterfs",
                             "fuse.glusterfs", "lustre", "gpfs", "9p", "fuse.sshfs",
                             "beegfs", "fuse.s3fs", "fuse.rclone", "fuse.juicefs"}


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    #: The mount's and the file system's options (NFS puts its own among the latter).
    options: dict[str, str] = field(default_factory=dict)

    @property
    def network(self) -> bool:
        return self.fstype in NETWORK_TYPES


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...).
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def _options(*parts: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in parts:
        for item in part.split(","):
            if item:
                key, _, value = item.partition("=")
                out[key] = value
    return out


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts from ``/proc/self/mountinfo`` text (proc(5)); malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 2:
            continue
        super_options = tail[2] if len(tail) > 2 else ""
        mounts.append(Mount(_unescape(fields[4]), tail[0], _options(fields[5], super_options)))
    return mounts


def mount_of(path: Path | str, mounts: list[Mount]) -> Mount | None:
    """The mount holding ``path``: the last-mounted one with the longest matching point."""
    target = Path(path).resolve()
    best: Mount | None = None
    for mount in mounts:
        point = Path(mount.point)
        if (target == point or point in target.parents) and \
                (best is None or len(point.parts) >= len(Path(best.point).parts)):
            best = mount
    return best


def data_dir_warnings(mount: Mount) -> list[str]:
    """What this mount cannot give the data dir, for the log (empty: nothing seen)."""
    if not mount.network:
        return []
    where = f"the data dir is on {mount.fstype} ({mount.point})"
    if mount.fstype not in NFS_TYPES:
        return [f"{where}: labq needs flock that every host sees and atomic renames there; "
                "check that this file system gives them (docs/admin.md, 'What the shared "
                "volume must provide')"]
    opts = mount.options
    warnings = []
    if "nolock" in opts or opts.get("local_lock") in ("flock", "all"):
        warnings.append(f"{where} with locks local to this host (nolock or local_lock="
                        f"{opts.get('local_lock', 'all')}): with workers on other hosts a job "
                        "can run twice at once; remount without nolock/local_lock")
    version = opts.get("vers", "4" if mount.fstype == "nfs4" else "")
    if version.startswith(("2", "3")):
        warnings.append(f"{where} over NFSv{version}: a dead host's locks stay until it boots "
                        "again, so its jobs wait that long to run elsewhere; use NFSv4")
    if opts.get("lookupcache") not in ("pos", "positive", "none"):
        warnings.append(f"{where} without lookupcache=positive: a stop marker or outcome "
                        "written on another host can stay unseen here for up to a minute")
    return warnings


def work_dir_warnings(mount: Mount) -> list[str]:
    if not mount.network:
        return []
    return [f"the work dir is on {mount.fstype} ({mount.point}): environments and "
            "workspaces belong on local disk; set LABQ_WORK_DIR to a local folder"]


def check_worker_dirs(data_dir: Path | str, work_dir: Path | str,
                      mountinfo: str | None = None) -> list[str]:
    """Log and return what the mounts of a worker's data dir and work dir lack."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return []
    mounts = parse_mountinfo(mountinfo)
    warnings: list[str] = []
    data, work = mount_of(data_dir, mounts), mount_of(work_dir, mounts)
    if data is not None:
        warnings += data_dir_warnings(data)
    if work is not None:
        warnings += work_dir_warnings(work)
    for text in warnings:
        log.warning("%s", text)
    return warnings
