"""Finding, freezing and killing a job's process tree through /proc.

A job's processes are the descendants of its main process (a ppid walk) together
with every process whose environment carries the run's token: a process that did
``setsid`` and a double fork is no descendant any more (it was re-parented to the
worker, a child subreaper, or to init) but still carries the token it inherited.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    state: str
    start: int  # clock ticks since boot: tells a pid apart from a later one reusing it


def become_subreaper() -> bool:
    """Make orphaned descendants of this process re-parent to it instead of init."""
    libc = ctypes.CDLL(None, use_errno=True)
    ok = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    if not ok:
        log.warning("could not become a child subreaper (errno %d)", ctypes.get_errno())
    return ok


def read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        return Proc(pid=pid, ppid=int(rest[1]), state=rest[0], start=int(rest[19]))
    except (IndexError, ValueError):
        return None


def all_procs() -> dict[int, Proc]:
    procs: dict[int, Proc] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            proc = read_proc(int(name))
            if proc is not None:
                procs[proc.pid] = proc
    return procs


def environ_value(pid: int, name: str) -> str | None:
    """The value of ``name`` in a process's (initial) environment, None if absent."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for item in data.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode("utf-8", "replace")
    return None


def tree(root: int | None, token_var: str, token: str) -> dict[int, Proc]:
    """Live (non-zombie) processes of one run: descendants of ``root`` ∪ token holders."""
    procs = all_procs()
    found: dict[int, Proc] = {}
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    todo = [root] if root and root in procs else []
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found[pid] = procs[pid]
        todo.extend(children.get(pid, ()))
    me = os.getpid()
    for proc in procs.values():
        if proc.pid not in found and proc.pid != me and environ_value(proc.pid, token_var) == token:
            found[proc.pid] = proc
            # Its own descendants belong to the run as well, whatever their environment.
            todo = list(children.get(proc.pid, ()))
            while todo:
                pid = todo.pop()
                if pid not in found:
                    found[pid] = procs[pid]
                    todo.extend(children.get(pid, ()))
    return {pid: p for pid, p in found.items() if p.state not in ("Z", "X")}


def signal_all(pids: list[int] | dict[int, Proc], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def rss_bytes(pids: list[int] | dict[int, Proc]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as handle:
                total += int(handle.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def reap_zombies(skip: set[int] | frozenset[int] = frozenset()) -> tuple[float, int]:
    """Collect zombie children of this process (orphans re-parented to the subreaper);
    returns the CPU seconds they and their reaped descendants used, and the largest
    resident size (bytes) one of those processes reached.

    ``skip`` holds pids a ``subprocess.Popen`` still owns: reaping those behind its
    back would hide their exit status.
    """
    me = os.getpid()
    cpu, rss = 0.0, 0
    for proc in all_procs().values():
        if proc.ppid == me and proc.state == "Z" and proc.pid not in skip:
            with contextlib.suppress(ChildProcessError):
                pid, _, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    cpu += usage.ru_utime + usage.ru_stime
                    rss = max(rss, usage.ru_maxrss * 1024)  # Linux counts in KiB
    return cpu, rss


def own_start_time() -> int:
    proc = read_proc(os.getpid())
    return proc.start if proc else 0


def pid_namespace() -> str:
    """This process's pid namespace (the inode of /proc/self/ns/pid), "" if unknown."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def sweep_orphans(token_var: str) -> list[int]:
    """SIGKILL job processes whose worker is gone; return their pids.

    Tokens look like ``<worker pid>:<worker start time>:<random>[:<pid namespace>]``;
    the worker is gone when no process with that pid and start time exists (a reused
    pid does not count). A token of another pid namespace belongs to a worker in a
    container on this machine, whose pid means nothing here: it is not ours to judge.
    """
    killed: list[int] = []
    procs = all_procs()
    own_ns = pid_namespace()
    for proc in procs.values():
        token = environ_value(proc.pid, token_var)
        if not token:
            continue
        try:
            wpid, wstart, *rest = token.split(":")
            if len(rest) > 1 and rest[1] != own_ns:
                continue
            worker = procs.get(int(wpid))
            alive = worker is not None and worker.start == int(wstart) and worker.state != "Z"
        except ValueError:
            continue
        if not alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
    if killed:
        log.warning("killed %d leftover job process(es) of dead workers: %s", len(killed), killed)
    return killed


def kill_job_leftovers(job_id: str, token_var: str, timeout_s: float = 5.0) -> list[int]:
    """SIGKILL every process left from earlier attempts of ``job_id`` on this host.

    Called by the worker that holds the job's run lock, before it starts a new
    attempt: whoever ran the job before lost the lock (its worker died), so anything
    still carrying the job's id is an orphan that must not write next to the new run.
    """
    killed: set[int] = set()
    me = os.getpid()
    deadline = time.monotonic() + timeout_s
    while True:
        found = [pid for pid in all_procs()
                 if pid != me and environ_value(pid, "LABQ_JOB_ID") == job_id
                 and environ_value(pid, token_var) is not None]
        if not found or time.monotonic() > deadline:
            break
        signal_all(found, signal.SIGKILL)
        killed.update(found)
        time.sleep(0.02)
    if killed:
        log.warning("killed %d leftover process(es) of job %s: %s", len(killed), job_id,
                    sorted(killed))
    return sorted(killed)
