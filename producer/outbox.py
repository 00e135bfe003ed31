"""The outbox relay: publishes jobs the upload request could not (broker down).

A background thread wakes every ``settings.outbox_interval_s``, releases jobs fair share
held back whose owner now has room (:mod:`producer.fairshare`), and publishes every job
still ``created`` (and not held) a couple of seconds after its upload (younger ones belong to the
request that is publishing them right now). While the broker is down it backs off
exponentially, so a long outage does not turn into a connect storm.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import Engine, select

from labq.producer import fairshare
from labq.producer.jobs import publish_job_id
from labq.producer.publisher import Publisher
from labq.shared import db
from labq.shared.errors import BrokerUnavailableError
from labq.shared.lifecycle import State
from labq.shared.settings import Settings

log = logging.getLogger(__name__)

#: A job this young is still being published by its upload request.
MIN_AGE_S = 2.0
MAX_BACKOFF_S = 10.0
BATCH = 200


class OutboxRelay(threading.Thread):
    def __init__(self, settings: Settings, engine: Engine, publisher: Publisher,
                 stop: threading.Event | None = None) -> None:
        super().__init__(name="labq-outbox", daemon=True)
        self.settings = settings
        self.engine = engine
        self.publisher = publisher
        self.stop_event = stop or threading.Event()

    def pending(self) -> list[str]:
        cutoff = time.time() - MIN_AGE_S
        with db.read(self.engine) as conn:
            rows = conn.execute(
                select(db.jobs.c.id)
                .where(db.jobs.c.state == State.CREATED, db.jobs.c.created_at < cutoff,
                       db.jobs.c.hold_reason.is_(None))
                .order_by(db.jobs.c.created_at)
                .limit(BATCH)
            ).all()
        return [r.id for r in rows]

    def relay_once(self) -> int:
        """Release what fair share now allows, publish what is pending; return how many
        jobs were queued. Raises when the broker is down."""
        fairshare.release_held(self.engine, self.settings)
        queued = 0
        for job_id in self.pending():
            if publish_job_id(self.engine, self.publisher, job_id):
                queued += 1
                log.info("outbox: job %s published and queued", job_id)
        return queued

    def run(self) -> None:
        interval = max(self.settings.outbox_interval_s, 0.1)
        delay = interval
        while not self.stop_event.wait(delay):
            try:
                self.relay_once()
                self.publisher.keepalive()
                delay = interval
            except BrokerUnavailableError as exc:
                delay = min(max(delay * 2, interval), MAX_BACKOFF_S)
                log.warning("outbox: broker unavailable (%s); next try in %.1fs",
                            exc.message, delay)
            except Exception:
                log.exception("outbox: unexpected error; retrying")
                delay = min(max(delay * 2, interval), MAX_BACKOFF_S)
