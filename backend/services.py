"""The backend's long-lived objects, built once per process and kept on the Flask app.

Views reach them with :func:`services` (``current_app.extensions["labq"]``); the
background threads (event applier, outbox relay, status broadcaster) are started here
when the app is served, and stopped by :meth:`Services.shutdown`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from flask import current_app
from sqlalchemy import Engine, text

from backend.applier import EventApplier
from backend.broadcast import StatusBroadcaster
from backend.hub import Hub
from backend.registry import Registry
from producer.outbox import OutboxRelay
from producer.publisher import Publisher
from shared.db import make_engine
from shared.settings import Settings
from shared.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: Engine
    storage: Storage
    registry: Registry
    publisher: Publisher
    hub: Hub = field(default_factory=Hub)
    #: Set on shutdown: background threads and open streams end.
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        storage = Storage(settings.data_dir).ensure()
        engine = make_engine(settings)
        return cls(settings=settings, engine=engine, storage=storage,
                   registry=Registry(engine, storage),
                   publisher=Publisher(settings, name="labq-backend-publisher"))

    def start_background(self) -> None:
        if self.threads:
            return
        self.threads = [
            EventApplier(self.settings, self.registry, self.hub, self.stop),
            OutboxRelay(self.settings, self.engine, self.publisher, self.stop),
            StatusBroadcaster(self.settings, self.hub, self.stop),
        ]
        # Declare the queues now (the publisher declares them on connect) so the jobs
        # queue exists from start-up, before the first upload; a broker that is down is
        # fine here: the outbox relay keeps trying.
        if not self.publisher.ping():
            log.warning("RabbitMQ is not reachable yet; jobs will be queued when it is")
        for thread in self.threads:
            thread.start()
        log.info("background threads started: %s", ", ".join(t.name for t in self.threads))

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout_s)
        self.publisher.close()
        self.engine.dispose()

    def database_ok(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            log.warning("database check failed", exc_info=True)
            return False


def services() -> Services:
    return current_app.extensions["labq"]
