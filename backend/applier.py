"""The event applier: a thread consuming ``<p>.events.backend`` into the registry.

Each lifecycle event is applied through :meth:`Registry.apply_event` and acked only
after its transaction committed, so a crash re-delivers it (and the sequence number
makes the second application a no-op). Undecodable messages are acked and logged:
redelivering them forever would only block the queue.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from labq.backend.hub import Hub
from labq.backend.notify import Notifier
from labq.backend.reconnect import run_forever
from labq.backend.registry import Registry, job_to_json
from labq.shared.errors import DecodeError
from labq.shared.lifecycle import is_terminal
from labq.shared.messages import LifecycleEvent, decode_event
from labq.shared.settings import Settings
from labq.shared.topology import Topology, close_quietly, connect

log = logging.getLogger(__name__)

PREFETCH = 50


class EventApplier(threading.Thread):
    def __init__(self, settings: Settings, registry: Registry, hub: Hub,
                 stop: threading.Event, notifier: Notifier | None = None) -> None:
        super().__init__(name="labq-applier", daemon=True)
        self.settings = settings
        self.registry = registry
        self.hub = hub
        self.stop_event = stop
        self.notifier = notifier
        self.topology = Topology.from_settings(settings)
        self.connected = threading.Event()

    def run(self) -> None:
        run_forever("event applier", self.stop_event, self._session)

    def _session(self) -> None:
        conn = connect(self.settings, "labq-backend-applier")
        try:
            channel = conn.channel()
            self.topology.declare_all(channel)
            channel.basic_qos(prefetch_count=PREFETCH)
            channel.basic_consume(self.topology.events_queue, self._on_message)
            self.connected.set()
            log.info("event applier consuming %s", self.topology.events_queue)
            while not self.stop_event.is_set():
                conn.process_data_events(time_limit=0.5)
        finally:
            self.connected.clear()
            close_quietly(conn)

    def _on_message(self, channel: Any, method: Any, _props: Any, body: bytes) -> None:
        try:
            event = decode_event(body)
        except DecodeError as exc:
            log.warning("dropping an undecodable event (%s): %r", exc.message, body[:200])
            channel.basic_ack(method.delivery_tag)
            return
        # A database error propagates: the session ends unacked and the event comes back.
        if isinstance(event, LifecycleEvent):
            moved = self.registry.apply_event(event)
            if moved is not None:
                self.hub.wake()  # the event feed reads it now
                if self.notifier is not None and is_terminal(event.state) \
                        and moved.get("notify_url"):
                    self.notifier.job_ended(job_to_json(moved))
        channel.basic_ack(method.delivery_tag)
