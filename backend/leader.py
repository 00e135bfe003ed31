"""The one process of a host's backend that runs the background work only one should do.

``labq backend`` runs several processes (one per core). Each serves requests and
streams, with its own event feed, log watcher and status broadcaster. The event applier,
outbox relay and reconciler run in one of them only: two appliers consuming one queue
would each get some of a job's events and apply them out of order, the later one first,
dropping the earlier as stale (a stream would never see ``initialized``). Whichever
process takes the host-local lock file first leads; the others try again every
``RETRY_S``, so when the leader dies (the lock goes with it) another takes over, and
gunicorn starts a replacement.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from labq.shared.settings import Settings

log = logging.getLogger(__name__)

RETRY_S = 2.0


def lock_path(settings: Settings) -> Path:
    """Host-local (a data dir on NFS is shared by hosts that each need a leader), and
    one per labq: its queue prefix and database."""
    digest = hashlib.sha256(
        f"{Path(settings.data_dir).resolve()}|{settings.resolved_database_url}".encode()
    ).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"labq-backend-{settings.prefix}-{digest}.lock"


class Leader(threading.Thread):
    """Waits for the lock, then starts ``make()``'s threads and keeps them until stop."""

    def __init__(self, path: Path, stop: threading.Event,
                 make: Callable[[], list[threading.Thread]]) -> None:
        super().__init__(name="labq-leader", daemon=True)
        self.path = path
        self.stop_event = stop
        self.make = make
        self.threads: list[threading.Thread] = []
        self.leading = threading.Event()

    def _try_lock(self) -> int | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def run(self) -> None:
        fd = None
        while fd is None and not self.stop_event.is_set():
            try:
                fd = self._try_lock()
            except OSError:
                log.warning("cannot open the leader lock %s", self.path, exc_info=True)
            if fd is None:
                self.stop_event.wait(RETRY_S)
        if fd is None:
            return
        try:
            self.threads = self.make()
            for thread in self.threads:
                thread.start()
            self.leading.set()
            log.info("this backend process applies events (%s)",
                     ", ".join(t.name for t in self.threads))
            self.stop_event.wait()
            for thread in self.threads:
                thread.join(5.0)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)  # releases the lock
