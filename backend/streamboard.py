"""How many processes one ``labq backend`` runs, and their open streams, counted in
shared memory.

Kept apart from backend/streams.py (Flask) because the board is made in gunicorn's
master process, before it forks the workers and before gevent patches them, where as
little as possible is imported.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os

from labq.shared.settings import Settings

#: Processes when LABQ_BACKEND_PROCESSES is 0: one per core, up to this many.
MAX_DEFAULT_PROCESSES = 4
#: Database connections all the processes of a backend open at most, together (under
#: PostgreSQL's default max_connections of 100, with room for the CLI and the tools).
DATABASE_CONNECTIONS = 60


def process_count(settings: Settings) -> int:
    if settings.backend_processes > 0:
        return settings.backend_processes
    return max(1, min(MAX_DEFAULT_PROCESSES, os.cpu_count() or 1))


def pool_sizes(settings: Settings) -> dict[str, int]:
    """``make_engine`` pool sizes for one process: its share of the connections."""
    share = max(4, DATABASE_CONNECTIONS // process_count(settings))
    return {"pool_size": share // 2, "max_overflow": share - share // 2}


class StreamBoard:
    """How many streams and connections each process of one ``labq backend`` has open,
    in memory the processes share (made before gunicorn forks them), so the stream cap
    and the gauges count them all, and the processes can share the clients evenly
    (:meth:`over_share`). Each process writes only its own slot; a slot whose process
    died is taken over, counts cleared, by the next process that starts.
    """

    KINDS = ("events", "logs")

    def __init__(self, processes: int) -> None:
        self.size = max(1, processes) * 2  # room for replacements of dead processes
        self._pids = multiprocessing.RawArray(ctypes.c_long, self.size)
        self._counts = multiprocessing.RawArray(ctypes.c_long, self.size * len(self.KINDS))
        #: Open client connections per slot (streams among them).
        self._conns = multiprocessing.RawArray(ctypes.c_long, self.size)
        self._lock = multiprocessing.Lock()
        self.slot = -1

    def claim(self) -> None:
        """Take a slot for this process (gunicorn's post_fork)."""
        with self._lock:
            for slot in range(self.size):
                pid = self._pids[slot]
                if pid == 0 or not _alive(pid):
                    self._pids[slot] = os.getpid()
                    for k in range(len(self.KINDS)):
                        self._counts[slot * len(self.KINDS) + k] = 0
                    self._conns[slot] = 0
                    self.slot = slot
                    return
        raise RuntimeError("no free stream slot for this backend process")

    def add(self, kind: str, delta: int) -> None:
        self._counts[self.slot * len(self.KINDS) + self.KINDS.index(kind)] += delta

    def add_connection(self, delta: int) -> None:
        if self.slot >= 0:
            self._conns[self.slot] += delta

    def _clients(self, slot: int) -> int:
        """Connections of a slot that are not streams: the ones that send requests."""
        streams = sum(self._counts[slot * len(self.KINDS) + k] for k in range(len(self.KINDS)))
        return self._conns[slot] - streams

    def over_share(self, slack: int) -> bool:
        """This process serves more clients than the least busy other live process plus
        ``slack``: it should let the others accept new connections for now. (Never true
        of the least busy one, so someone always accepts.)"""
        if self.slot < 0:
            return False
        others = [self._clients(slot) for slot in range(self.size)
                  if slot != self.slot and self._pids[slot] and _alive(self._pids[slot])]
        return bool(others) and self._clients(self.slot) > min(others) + slack

    def total(self, kind: str | None = None) -> int:
        kinds = range(len(self.KINDS)) if kind is None else [self.KINDS.index(kind)]
        return sum(self._counts[slot * len(self.KINDS) + k]
                   for slot in range(self.size) if self._pids[slot] for k in kinds)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
