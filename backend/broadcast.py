"""The status broadcaster: live ``<id>.status`` events fanned out to SSE streams.

Status events are transient and only useful live, so this thread binds an exclusive,
auto-deleted queue of its own to ``*.status`` on the events exchange (every backend
process sees every tick) and hands each one to the in-process :class:`Hub`, which
passes it to the streams of the job's owner and of admins.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from labq.backend.hub import Hub
from labq.backend.reconnect import run_forever
from labq.shared.errors import DecodeError
from labq.shared.messages import StatusEvent
from labq.shared.settings import Settings
from labq.shared.topology import Topology, close_quietly, connect

log = logging.getLogger(__name__)


class StatusBroadcaster(threading.Thread):
    def __init__(self, settings: Settings, hub: Hub, stop: threading.Event) -> None:
        super().__init__(name="labq-status", daemon=True)
        self.settings = settings
        self.hub = hub
        self.stop_event = stop
        self.topology = Topology.from_settings(settings)

    def run(self) -> None:
        run_forever("status broadcaster", self.stop_event, self._session)

    def _session(self) -> None:
        conn = connect(self.settings, "labq-backend-status")
        try:
            channel = conn.channel()
            channel.exchange_declare(self.topology.events_exchange, "topic", durable=True)
            ok = channel.queue_declare("", exclusive=True, auto_delete=True)
            queue = ok.method.queue
            channel.queue_bind(queue, self.topology.events_exchange, "*.status")
            channel.basic_consume(queue, self._on_message, auto_ack=True)
            while not self.stop_event.is_set():
                conn.process_data_events(time_limit=0.5)
        finally:
            close_quietly(conn)

    def _on_message(self, _channel: Any, _method: Any, _props: Any, body: bytes) -> None:
        try:
            event = StatusEvent.decode(body)
        except DecodeError as exc:
            log.debug("ignoring an undecodable status event: %s", exc.message)
            return
        self.hub.publish_status(event.to_dict())
