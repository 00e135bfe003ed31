"""A pool of numeric uids, one per running job, so no job can touch another's files.

Jobs run as a uid taken from ``LABQ_SANDBOX_UIDS`` (``FIRST-LAST``). No passwd entry is
needed: the kernel only knows numbers. A uid is leased with an exclusive ``flock`` on
``<lock dir>/uid-N.lock`` in a host-local folder, so two workers on one host never
share a uid; the lock dies with its worker, so a crashed worker frees its uid too.

Taking a lease first kills whatever still runs as that uid (leftovers of a worker that
died mid-job) and removes its files from the host's shared scratch folders; giving it
back does the same. Nothing a job started outlives its lease.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from labq.shared.errors import ConfigError, LabqError

log = logging.getLogger(__name__)

#: Folders every uid may write to on a host: reclaimed after each job (with bwrap the
#: job sees private ones, but a fallback job without bwrap sees the host's).
SCRATCH_DIRS = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))


CLEAN, BUSY = b"clean", b"busy"


class NoFreeUidError(LabqError):
    """Raised when every uid of the pool is leased (more workers than uids on a host)."""

    code = "no_free_uid"
    status = 503


def parse_range(text: str) -> range:
    """``"60000-60999"`` → range(60000, 61000); refuses root, system uids and nonsense."""
    try:
        first_s, _, last_s = text.strip().partition("-")
        first, last = int(first_s), int(last_s or first_s)
    except ValueError:
        raise ConfigError(f"LABQ_SANDBOX_UIDS={text!r} is not FIRST-LAST, e.g. 60000-60999") \
            from None
    if first < 1000 or last < first or last >= 2**31:
        raise ConfigError(f"LABQ_SANDBOX_UIDS={text!r}: use uids from 1000 up that no account "
                          "uses, FIRST <= LAST, e.g. 60000-60999")
    return range(first, last + 1)


def uid_of(pid: int) -> int | None:
    """Real uid of a live process (None once it is gone, or a zombie: dead already, only
    waiting for its parent to reap it, so no signal can or need reach it)."""
    uid = None
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                if line.startswith(b"State:") and line.split()[1] == b"Z":
                    return None
                if line.startswith(b"Uid:"):
                    uid = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        return None
    return uid


def pids_of_uid(uid: int) -> list[int]:
    """Live processes running as ``uid``."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and uid_of(int(name)) == uid:
            pids.append(int(name))
    return pids


def kill_uid(uid: int, rounds: int = 200) -> int:
    """SIGKILL every process running as ``uid`` until none is left (new forks included).

    A job cannot leave its uid (it has no privilege to change it), so this finds every
    process it started, whatever it did with sessions, parents or its environment.
    Returns how many processes were killed.
    """
    killed = 0
    for _ in range(rounds):
        pids = pids_of_uid(uid)
        if not pids:
            return killed
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.01)
    log.error("processes of uid %d survived %d rounds of SIGKILL", uid, rounds)
    return killed


def reclaim_files(uid: int, dirs: tuple[Path, ...] = SCRATCH_DIRS) -> int:
    """Remove what ``uid`` left in the host's shared scratch folders (top level only:
    a job's files there are its own folders and files). Returns how many were removed."""
    removed = 0
    for folder in dirs:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed += 1
            except OSError:
                continue
    return removed


@dataclass
class Lease:
    """One uid held by this worker until :meth:`release`."""

    uid: int
    _handle: object = field(repr=False, default=None)
    #: Also sweep the host's scratch folders (not needed when jobs cannot see them).
    reclaim: bool = True

    def _mark(self, state: bytes) -> None:
        # The lock file says whether the last holder cleaned up, so the next one can
        # skip a sweep of /proc when it did (a worker killed mid-job leaves "busy").
        fd = self._handle.fileno()  # type: ignore[attr-defined]
        os.ftruncate(fd, 0)
        os.pwrite(fd, state, 0)

    def _was_clean(self) -> bool:
        return os.pread(self._handle.fileno(), 16, 0) == CLEAN  # type: ignore[attr-defined]

    def clean(self, kill: bool = True) -> None:
        killed = kill_uid(self.uid) if kill else 0
        removed = reclaim_files(self.uid) if self.reclaim else 0
        if killed or removed:
            log.info("uid %d: killed %d leftover processes, removed %d leftover files",
                     self.uid, killed, removed)

    def release(self, kill: bool = True) -> None:
        """Give the uid back, killing what still runs as it first (``kill=False``: the
        caller knows none is left, e.g. the job's cgroup was removed, hence empty)."""
        if self._handle is None:
            return
        self.clean(kill)
        self._mark(CLEAN)
        handle, self._handle = self._handle, None
        handle.close()  # type: ignore[attr-defined]  # closing drops the flock


class UidPool:
    """Leases uids of ``uids`` using lock files in ``lock_dir`` (host-local)."""

    def __init__(self, uids: range, lock_dir: Path, reclaim: bool = True) -> None:
        self.uids = uids
        self.lock_dir = lock_dir
        self.reclaim = reclaim

    def acquire(self) -> Lease:
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Start at a random place so workers rarely contend for the same first uids.
        start = random.randrange(len(self.uids))
        for i in range(len(self.uids)):
            uid = self.uids[(start + i) % len(self.uids)]
            handle = open(self.lock_dir / f"uid-{uid}.lock", "a+b")  # noqa: SIM115
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            lease = Lease(uid, handle, self.reclaim)
            if not lease._was_clean():
                lease.clean()  # leftovers of a worker that died holding it
            lease._mark(BUSY)
            return lease
        raise NoFreeUidError(f"all {len(self.uids)} job uids of this host are in use; "
                             "widen LABQ_SANDBOX_UIDS or run fewer workers")
