"""The backend's long-lived objects, built once per process and kept on the Flask app.

Views reach them with :func:`services` (``current_app.extensions["labq"]``); the
background threads are started here when the app is served, and stopped by
:meth:`Services.shutdown`: in every process the event feed and log watcher that serve
its open streams and the status broadcaster; in one process per host (backend/leader.py)
the event applier, outbox relay and reconciler.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from flask import current_app
from sqlalchemy import Engine, text

from labq.backend.applier import EventApplier
from labq.backend.broadcast import StatusBroadcaster
from labq.backend.feed import EventFeed, Owners
from labq.backend.hub import Hub
from labq.backend.jobfields import JobJsonMemo
from labq.backend.leader import Leader, lock_path
from labq.backend.logwatch import LogWatcher
from labq.backend.notify import Notifier
from labq.backend.registry import Registry
from labq.backend.streamboard import pool_sizes
from labq.backend.streams import StreamSlots
from labq.backend.tokenmemo import TokenMemo
from labq.producer.outbox import OutboxRelay
from labq.producer.publisher import Publisher
from labq.producer.reconciler import Reconciler
from labq.shared import db
from labq.shared.db import make_engine
from labq.shared.settings import Settings
from labq.shared.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    engine: Engine
    storage: Storage
    registry: Registry
    publisher: Publisher
    #: Who owns each API token, remembered a few seconds (backend/tokenmemo.py).
    tokens: TokenMemo
    hub: Hub = field(default_factory=Hub)
    #: Open SSE streams, capped (backend/streams.py).
    streams: StreamSlots = field(default_factory=lambda: StreamSlots(1))
    #: Set on shutdown: background threads and open streams end.
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    notifier: Notifier | None = None
    #: Job id → owner, shared by the event feed and the status broadcaster.
    owners: Owners | None = None
    #: What of the job JSON only the row decides, made once (backend/jobfields.py).
    job_json: JobJsonMemo = field(default_factory=JobJsonMemo)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        storage = Storage.from_settings(settings).ensure()
        engine = make_engine(settings, **pool_sizes(settings))
        owners = Owners(engine)
        return cls(settings=settings, engine=engine, storage=storage,
                   registry=Registry(engine, storage, settings),
                   publisher=Publisher(settings, name="labq-backend-publisher"),
                   hub=Hub(owner_of=owners), owners=owners,
                   streams=StreamSlots(settings.max_streams),
                   tokens=TokenMemo(engine, settings.data_dir))

    def start_background(self) -> None:
        if self.threads:
            return
        self.notifier = Notifier(self.settings, self.stop)
        feed = EventFeed(self.engine, self.hub, self.owners or Owners(self.engine), self.stop)
        feed.start_at_latest()

        def leader_threads() -> list[threading.Thread]:
            # One process per host runs these (backend/leader.py).
            return [
                EventApplier(self.settings, self.registry, self.hub, self.stop,
                             notifier=self.notifier),
                OutboxRelay(self.settings, self.engine, self.publisher, self.stop),
                Reconciler(self.settings, self.engine, self.publisher, self.storage,
                           self.stop),
            ]

        self.threads = [
            feed,
            LogWatcher(self.engine, self.storage, self.hub, self.stop),
            StatusBroadcaster(self.settings, self.hub, self.stop),
            Leader(lock_path(self.settings), self.stop, leader_threads),
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
        self.hub.close_all()
        for thread in self.threads:
            thread.join(timeout_s)
        if self.notifier is not None:
            self.notifier.shutdown()
        self.publisher.close()
        self.engine.dispose()

    def database_ok(self) -> bool:
        try:
            with db.read(self.engine) as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            log.warning("database check failed", exc_info=True)
            return False


def services() -> Services:
    return current_app.extensions["labq"]
