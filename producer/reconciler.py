"""The reconciler: an accepted job is never lost, even if its message is.

A job is ``queued`` in the database once the broker confirmed its message. That message
can still vanish afterwards: someone purges or deletes the jobs queue (a job holding the
broker's credentials did exactly that before the sandbox), or a broker node is lost with
it. Every ``reconcile_interval_s`` this thread makes sure the queue exists (declaring it
again if it was deleted) and, when it holds no ready message, publishes again every job
that has been ``queued`` longer than ``reconcile_after_s`` and that no worker is running
(its run lock on the data dir is free). Publishing twice is harmless: the worker that
gets a job already finished, or already running elsewhere, acks it as a duplicate or
parks it (docs/internals.md, "Run lock").
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time

from sqlalchemy import Engine, select

from labq.producer.jobs import job_message
from labq.producer.publisher import Publisher
from labq.shared import db
from labq.shared.errors import BrokerUnavailableError
from labq.shared.lifecycle import State
from labq.shared.settings import Settings
from labq.shared.storage import Storage
from labq.shared.topology import JOB_ROUTING_KEY

log = logging.getLogger(__name__)

BATCH = 500


def running_somewhere(storage: Storage, job_id: str) -> bool:
    """True while a worker holds the job's run lock (it took the message and runs it)."""
    path = storage.lock_path(job_id)
    if not path.exists():
        return False
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


class Reconciler(threading.Thread):
    def __init__(self, settings: Settings, engine: Engine, publisher: Publisher,
                 storage: Storage, stop: threading.Event | None = None) -> None:
        super().__init__(name="labq-reconciler", daemon=True)
        self.settings = settings
        self.engine = engine
        self.publisher = publisher
        self.storage = storage
        self.stop_event = stop or threading.Event()

    def stale_queued(self) -> list[dict]:
        cutoff = time.time() - self.settings.reconcile_after_s
        with db.read(self.engine) as conn:
            rows = conn.execute(
                select(db.jobs).where(db.jobs.c.state == State.QUEUED,
                                      db.jobs.c.queued_at < cutoff)
                .order_by(db.jobs.c.queued_at).limit(BATCH)
            ).mappings().all()
        return [dict(r) for r in rows]

    def reconcile_once(self) -> int:
        """Re-publish what the queue lost; return how many jobs were published again."""
        queue = self.publisher.topology.jobs_queue
        try:
            ready, _consumers = self.publisher.queue_info(queue)
        except BrokerUnavailableError as exc:
            if "does not exist" not in exc.message:
                raise
            log.warning("reconciler: the jobs queue %s was deleted; declaring it again", queue)
            self.publisher.redeclare()
            ready = 0
        if ready:
            return 0  # messages are waiting: workers will get to them (and to ours)
        published = 0
        for row in self.stale_queued():
            if running_somewhere(self.storage, row["id"]):
                continue
            self.publisher.publish(self.publisher.topology.jobs_exchange, JOB_ROUTING_KEY,
                                   job_message(row).encode())
            published += 1
        if published:
            log.warning("reconciler: %d queued job(s) had no message on the queue (purged or "
                        "lost); published them again", published)
        return published

    def run(self) -> None:
        interval = max(self.settings.reconcile_interval_s, 0.5)
        while not self.stop_event.wait(interval):
            try:
                self.reconcile_once()
            except BrokerUnavailableError as exc:
                log.info("reconciler: broker unavailable (%s); next try later", exc.message)
            except Exception:
                log.exception("reconciler: unexpected error; retrying")
