"""A thread-safe publisher: one pika connection and confirm-mode channel behind a lock.

pika's BlockingConnection is not thread-safe, and the backend publishes from many
request threads, so every use of the connection goes through ``self._lock``. Every
publish is confirmed (``confirm_delivery``), ``mandatory`` and, unless asked otherwise,
persistent; anything short of a broker confirmation raises
:class:`shared.errors.BrokerUnavailableError` so the caller keeps the job in the outbox.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pika
import pika.exceptions
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from labq.shared.errors import BrokerUnavailableError, LabqError
from labq.shared.settings import Settings
from labq.shared.topology import PERSISTENT, TRANSIENT, Topology, close_quietly, connect

log = logging.getLogger(__name__)

#: After a failed connect, request threads do not try again for this long, so a broker
#: outage costs each upload nothing instead of a connect timeout each.
RECONNECT_COOLDOWN_S = 2.0


class UnroutableError(LabqError):
    """Raised when the broker returned a mandatory message: no queue is bound for it."""

    code = "unroutable"
    status = 503


class Publisher:
    """Publishes with confirms; reconnects on demand, with backoff, under one lock."""

    def __init__(self, settings: Settings, name: str = "labq-publisher",
                 connect_attempts: int = 2) -> None:
        self.settings = settings
        self.topology = Topology.from_settings(settings)
        self.name = name
        self.connect_attempts = connect_attempts
        self._lock = threading.Lock()
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._down_until = 0.0

    # -- connection -----------------------------------------------------------
    def _open(self) -> None:
        conn = connect(self.settings, self.name)
        try:
            channel = conn.channel()
            channel.confirm_delivery()
            self.topology.declare_all(channel)
        except BaseException:
            close_quietly(conn)
            raise
        self._conn, self._channel = conn, channel
        log.info("publisher connected to RabbitMQ")

    def _ensure(self, force: bool = False, attempts: int | None = None) -> None:
        if self._conn is not None and self._conn.is_open and self._channel is not None \
                and self._channel.is_open:
            return
        self._drop()
        if not force and time.monotonic() < self._down_until:
            raise BrokerUnavailableError("RabbitMQ is unreachable (retrying in the background)")
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(attempts or self.connect_attempts),
                wait=wait_exponential(multiplier=0.2, max=2),
                retry=retry_if_exception_type(pika.exceptions.AMQPError),
                reraise=True,
            ):
                with attempt:
                    self._open()
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._down_until = time.monotonic() + RECONNECT_COOLDOWN_S
            raise BrokerUnavailableError(f"RabbitMQ is unreachable: {exc!r}") from exc
        self._down_until = 0.0

    def _drop(self) -> None:
        if self._conn is not None:
            close_quietly(self._conn)
        self._conn, self._channel = None, None

    # -- API ------------------------------------------------------------------
    def publish(self, exchange: str, routing_key: str, body: bytes, *,
                persistent: bool = True, mandatory: bool = True) -> None:
        """Publish and wait for the broker's confirm; raise if it does not come."""
        props = pika.BasicProperties(
            delivery_mode=PERSISTENT if persistent else TRANSIENT,
            content_type="application/json",
        )
        with self._lock:
            # One retry: an idle connection may have been closed by the broker (missed
            # heartbeats between requests); a fresh one usually works at once.
            for retry in (True, False):
                self._ensure()
                try:
                    self._channel.basic_publish(exchange, routing_key, body, props,
                                                mandatory=mandatory)
                    return
                except pika.exceptions.UnroutableError as exc:
                    raise UnroutableError(
                        f"nothing is bound to receive {routing_key!r} on {exchange!r}"
                    ) from exc
                except pika.exceptions.NackError as exc:
                    # A quorum queue nacks while it has no leader (a cluster node just
                    # went down), and RabbitMQ 3.10 goes on nacking on that channel after
                    # a new leader is elected: the next publish takes a fresh connection.
                    self._drop()
                    raise BrokerUnavailableError("RabbitMQ refused the message (nack)") from exc
                except (pika.exceptions.AMQPError, OSError) as exc:
                    self._drop()
                    if not retry:
                        raise BrokerUnavailableError(
                            f"publishing to RabbitMQ failed: {exc!r}") from exc
                    log.info("publish failed (%r); reconnecting once", exc)

    def queue_info(self, queue: str) -> tuple[int, int]:
        """(messages, consumers) of ``queue`` via a passive declare; raises if unreachable."""
        with self._lock:
            self._ensure(force=True, attempts=1)
            try:
                channel = self._conn.channel()
                try:
                    ok = channel.queue_declare(queue, passive=True)
                    return ok.method.message_count, ok.method.consumer_count
                finally:
                    if channel.is_open:
                        channel.close()
            except pika.exceptions.ChannelClosedByBroker as exc:
                raise BrokerUnavailableError(f"queue {queue!r} does not exist") from exc
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._drop()
                raise BrokerUnavailableError(f"RabbitMQ is unreachable: {exc!r}") from exc

    def redeclare(self) -> None:
        """Declare the topology again (a queue someone deleted comes back, empty)."""
        with self._lock:
            self._ensure(force=True, attempts=1)
            try:
                self.topology.declare_all(self._channel)
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._drop()
                raise BrokerUnavailableError(f"RabbitMQ is unreachable: {exc!r}") from exc

    def ping(self) -> bool:
        """True when the broker answers now (connects if needed); keeps heartbeats going."""
        with self._lock:
            try:
                self._ensure(force=True, attempts=1)
                self._conn.process_data_events(0)
                return True
            except (BrokerUnavailableError, pika.exceptions.AMQPError, OSError):
                self._drop()
                return False

    def keepalive(self) -> None:
        """Serve heartbeats of an idle connection (called by the outbox thread)."""
        with self._lock:
            if self._conn is not None and self._conn.is_open:
                try:
                    self._conn.process_data_events(0)
                except (pika.exceptions.AMQPError, OSError):
                    self._drop()

    def close(self) -> None:
        with self._lock:
            self._drop()
