"""The log watcher: one backend thread telling log streams when their log grew or their
job ended, so a followed log costs no query and no timer of its own.

Every ``POLL_S`` it looks at the size of each followed job's log (one ``stat`` per job,
however many streams follow it; the data dir may be NFS, where no change notification
reaches us), reads what was added once for all of them (up to ``SHARED_READ``; a stream
elsewhere in the log reads for itself) and, every ``STATE_EVERY_S``, reads the states of
all followed jobs in one query: a job that ended is announced even if its lifecycle
event never reached this process's feed.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from sqlalchemy import Engine, select

from labq.backend.hub import Hub
from labq.shared import db
from labq.shared.lifecycle import is_terminal
from labq.shared.storage import Storage

log = logging.getLogger(__name__)

POLL_S = 0.25
STATE_EVERY_S = 1.0
#: Job ids per state query (bounded IN lists).
CHUNK = 500
#: Most new bytes of one log read once for all its streams.
SHARED_READ = 64 * 1024


class LogWatcher(threading.Thread):
    def __init__(self, engine: Engine, storage: Storage, hub: Hub,
                 stop: threading.Event) -> None:
        super().__init__(name="labq-logwatch", daemon=True)
        self.engine = engine
        self.storage = storage
        self.hub = hub
        self.stop_event = stop
        self.sizes: dict[str, int] = {}
        self._states_at = 0.0

    def run(self) -> None:
        while not self.stop_event.wait(POLL_S):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the thread
                log.warning("log watcher: check failed; retrying", exc_info=True)
        log.info("log watcher: stopped")

    def tick(self) -> None:
        jobs = self.hub.followed_jobs()
        self.sizes = {j: s for j, s in self.sizes.items() if j in jobs}
        for job_id in jobs:
            try:
                size = os.lstat(self.storage.log_path(job_id)).st_size
            except OSError:
                size = 0
            before = self.sizes.get(job_id, -1)
            if size != before:
                self.sizes[job_id] = size
                grown = self._read(job_id, before, size) if 0 <= before < size else None
                self.hub.publish_job(job_id, "log", grown)
        now = time.monotonic()
        if jobs and now - self._states_at >= STATE_EVERY_S:
            self._states_at = now
            for job_id in self.ended(jobs):
                self.hub.publish_job(job_id, "ended")

    def _read(self, job_id: str, start: int, end: int) -> tuple[int, bytes] | None:
        """(``start``, the bytes from there) when few enough to share, else None."""
        if end - start > SHARED_READ:
            return None
        handle = self.storage.open_job_file(job_id, self.storage.log_path(job_id).name)
        if handle is None:
            return None
        with handle:
            handle.seek(start)
            return start, handle.read(end - start)

    def ended(self, jobs: list[str]) -> list[str]:
        done: list[str] = []
        with db.read(self.engine) as conn:
            for start in range(0, len(jobs), CHUNK):
                rows = conn.execute(select(db.jobs.c.id, db.jobs.c.state)
                                    .where(db.jobs.c.id.in_(jobs[start:start + CHUNK])))
                done += [row.id for row in rows if is_terminal(row.state)]
        return done
