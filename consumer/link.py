"""The worker's side of the broker: one connection, its channel, and the event outbox.

:class:`BrokerLink` knows pika and nothing about jobs. It opens the connection (any
callable returning a ``BlockingConnection``-like object: the real one, or the in-memory
fake in unit tests), declares the topology, consumes the jobs queue with prefetch 1 and
a private control queue, settles delivery tags only on the channel they came on (the
``generation`` tells), binds a job's control key, and publishes lifecycle events from an
outbox in order, each confirmed. The outbox may be filled from any thread; only the
connection thread flushes it.

Events go out on a channel of their own. A quorum queue nacks what it is sent while it
has no leader (a node of the cluster just went down), and RabbitMQ 3.10 goes on nacking
on that same channel after a new leader is elected: the publishing channel is then
replaced, which leaves the deliveries (and the running job's tag) untouched.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from labq.consumer.delivery import Delivery, Settle
from labq.shared.messages import LifecycleEvent, StatusEvent
from labq.shared.topology import PERSISTENT, TRANSIENT, Topology

log = logging.getLogger(__name__)

BROKER_ERRORS = (pika.exceptions.AMQPError, OSError)
Callback = Callable[[Any, Any, Any, bytes], None]


class BrokerLink:
    def __init__(self, topology: Topology, connect: Callable[[], Any]) -> None:
        self.topology = topology
        self._connect = connect
        self.conn: Any = None
        self.channel: Any = None
        self.pub_channel: Any = None  # events and status ticks (confirm mode)
        self.generation = 0
        self.consumer_tag: str | None = None
        self.control_queue: str | None = None
        #: Control keys of finished jobs still to unbind: (channel generation, key).
        self._released: list[tuple[int, str]] = []
        self._outbox: deque[tuple[str, bytes, pika.BasicProperties]] = deque()
        self._outbox_lock = threading.Lock()

    # -- connection ---------------------------------------------------------------------
    def open(self, on_control: Callback) -> None:
        """Connect, declare, and listen on a private control queue; raises BROKER_ERRORS."""
        conn = self._connect()
        try:
            channel = conn.channel()
            channel.confirm_delivery()
            self.topology.declare_all(channel)
            channel.basic_qos(prefetch_count=1)
            declared = channel.queue_declare("", exclusive=True, auto_delete=True)
            control_queue = declared.method.queue
            channel.basic_consume(control_queue, on_control, auto_ack=True)
            pub_channel = conn.channel()
            pub_channel.confirm_delivery()
        except BaseException:
            with contextlib.suppress(Exception):
                conn.close()
            raise
        self.conn, self.channel, self.control_queue = conn, channel, control_queue
        self.pub_channel = pub_channel
        self.generation += 1
        self.consumer_tag = None
        log.info("connected to the broker (channel generation %d)", self.generation)

    def drop(self) -> None:
        conn, self.conn, self.channel, self.pub_channel = self.conn, None, None, None
        self.consumer_tag = None
        self.control_queue = None
        if conn is not None:
            with contextlib.suppress(Exception):
                if conn.is_open:
                    conn.close()

    def online(self) -> bool:
        return self.channel is not None and self.channel.is_open \
            and self.pub_channel is not None and self.pub_channel.is_open

    def process(self, time_limit: float) -> None:
        """Serve the connection for up to ``time_limit`` seconds; raises when it is lost."""
        assert self.conn is not None
        self.conn.process_data_events(time_limit=time_limit)
        if not self.online():
            # The broker closed our channel (e.g. its consumer timeout bit) without
            # closing the connection; pika does not raise for that. Start over.
            raise pika.exceptions.ChannelClosed(0, "the broker closed the channel")

    # -- jobs queue ---------------------------------------------------------------------
    def consume(self, on_delivery: Callback) -> None:
        if self.consumer_tag is None and self.online():
            self.consumer_tag = self.channel.basic_consume(
                self.topology.jobs_queue, on_delivery, auto_ack=False)

    def stop_consuming(self) -> None:
        if self.consumer_tag is not None and self.online():
            tag, self.consumer_tag = self.consumer_tag, None
            self.channel.basic_cancel(tag)

    def settle(self, d: Delivery, how: Settle) -> bool:
        """Ack / nack (requeue) / reject (dead-letter) — only on the channel the tag came
        on; False when that channel is gone (the broker redelivers the message)."""
        if d.generation != self.generation or not self.online():
            log.info("not settling job %s: its delivery tag belongs to a dead channel",
                     d.job.job_id)
            return False
        if how == Settle.ACK:
            self.channel.basic_ack(d.tag)
        elif how == Settle.NACK:
            self.channel.basic_nack(d.tag, requeue=True)
        else:
            self.channel.basic_reject(d.tag, requeue=False)
        return True

    # -- control ------------------------------------------------------------------------
    def bind_control(self, d: Delivery) -> None:
        d.control_key = f"{d.job.job_id}.control"
        if self.online() and self.control_queue:
            self.channel.queue_bind(self.control_queue, self.topology.control_exchange,
                                    d.control_key)

    def unbind_control(self, d: Delivery) -> None:
        if d.control_key and self.online() and self.control_queue:
            self.channel.queue_unbind(self.control_queue, self.topology.control_exchange,
                                      d.control_key)
        d.control_key = ""

    def release_control(self, d: Delivery) -> None:
        """Unbind ``d``'s control key later (:meth:`unbind_released`): not on the way from
        one job's ack to the next delivery. Until then a control message for that job
        still reaches us and is ignored, as for any job we do not run."""
        if d.control_key:
            self._released.append((self.generation, d.control_key))
        d.control_key = ""

    def unbind_released(self, keep: str = "") -> None:
        """Unbind the keys :meth:`release_control` set aside (never ``keep``: the job
        running now may be the same job again). Keys of an earlier channel died with
        its control queue."""
        while self._released and self.online() and self.control_queue:
            generation, key = self._released.pop()
            if generation == self.generation and key != keep:
                self.channel.queue_unbind(self.control_queue,
                                          self.topology.control_exchange, key)

    # -- events -------------------------------------------------------------------------
    def publish_event(self, event: LifecycleEvent) -> None:
        """Queue a lifecycle event for the connection thread (any thread may call)."""
        props = pika.BasicProperties(content_type="application/json",
                                     delivery_mode=PERSISTENT)
        with self._outbox_lock:
            self._outbox.append((event.routing_key, event.encode(), props))

    def pending(self) -> int:
        with self._outbox_lock:
            return len(self._outbox)

    def wake(self) -> None:
        """Ask the connection thread to flush soon (any thread may call)."""
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.add_callback_threadsafe(self.flush)

    def flush(self) -> None:
        """Publish buffered lifecycle events in order, each confirmed (connection thread)."""
        if not self.online():
            return
        while True:
            with self._outbox_lock:
                if not self._outbox:
                    return
                routing_key, body, props = self._outbox[0]
            try:
                self.pub_channel.basic_publish(self.topology.events_exchange, routing_key,
                                               body, props)
            except pika.exceptions.NackError:
                log.warning("the broker refused an event (a queue without a leader?); "
                            "retrying on a fresh channel")
                self._renew_pub_channel()
                return
            with self._outbox_lock:
                self._outbox.popleft()

    def _renew_pub_channel(self) -> None:
        old, self.pub_channel = self.pub_channel, None
        with contextlib.suppress(Exception):
            if old is not None and old.is_open:
                old.close()
        channel = self.conn.channel()  # raises BROKER_ERRORS when the connection is gone
        channel.confirm_delivery()
        self.pub_channel = channel

    def publish_status(self, event: StatusEvent) -> None:
        """A live status tick: transient, and lost without harm when nobody listens."""
        props = pika.BasicProperties(content_type="application/json",
                                     delivery_mode=TRANSIENT)
        with contextlib.suppress(pika.exceptions.NackError, pika.exceptions.UnroutableError):
            self.pub_channel.basic_publish(self.topology.events_exchange, event.routing_key,
                                           event.encode(), props)
