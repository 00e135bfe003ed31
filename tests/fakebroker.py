"""An in-memory stand-in for RabbitMQ behind pika's BlockingConnection, for unit tests.

It implements only what labq's services use, with RabbitMQ's rules for it: direct, topic
and fanout exchanges; durable, exclusive and server-named queues; dead-lettering of
rejected messages (``x-dead-letter-exchange``); prefetch; redelivery (``redelivered``) of
what a nack requeues or a closed channel leaves unacked; a channel closed by the broker
for an ack of an unknown delivery tag; ``UnroutableError`` for a mandatory publish that no
queue takes when confirms are on; ``add_callback_threadsafe``. ``tests/integration/
test_broker_contract.py`` runs the same checks on this fake and on the real broker, so a
rule the fake gets wrong fails there.

``FakeBroker.drop_connections()`` plays a broker that goes away: every connection's next
call raises ``StreamLostError`` and its unacked messages go back to their queues.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pika.exceptions


@dataclass
class _Message:
    body: bytes
    routing_key: str
    exchange: str
    properties: Any
    redelivered: bool = False


@dataclass
class _Queue:
    name: str
    arguments: dict[str, Any]
    exclusive_to: FakeConnection | None = None
    auto_delete: bool = False
    messages: deque[_Message] = field(default_factory=deque)
    consumers: list[tuple[FakeChannel, str]] = field(default_factory=list)


def topic_matches(pattern: str, key: str) -> bool:
    """RabbitMQ topic matching: ``*`` is one word, ``#`` zero or more."""
    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and (p[0] in ("*", k[0])) and match(p[1:], k[1:])
    return match(pattern.split("."), key.split("."))


class FakeBroker:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.exchanges: dict[str, str] = {"": "direct"}
        self.bindings: dict[str, list[tuple[str, str]]] = {}  # exchange -> [(queue, key)]
        self.queues: dict[str, _Queue] = {}
        self.connections: list[FakeConnection] = []
        self._names = itertools.count(1)

    # -- what tests use ----------------------------------------------------------------
    def connect(self, *_args: Any, **_kwargs: Any) -> FakeConnection:
        conn = FakeConnection(self)
        with self.lock:
            self.connections.append(conn)
        return conn

    def drop_connections(self) -> None:
        with self.lock:
            for conn in list(self.connections):
                conn._lose()

    def message_count(self, queue: str) -> int:
        with self.lock:
            return len(self.queues[queue].messages)

    def bodies(self, queue: str) -> list[bytes]:
        with self.lock:
            return [m.body for m in self.queues[queue].messages]

    # -- routing ------------------------------------------------------------------------
    def route(self, exchange: str, key: str) -> list[_Queue]:
        if exchange == "":
            queue = self.queues.get(key)
            return [queue] if queue else []
        kind = self.exchanges[exchange]
        found = []
        for queue_name, binding in self.bindings.get(exchange, []):
            if kind == "fanout" or (kind == "direct" and binding == key) or (
                    kind == "topic" and topic_matches(binding, key)):
                queue = self.queues.get(queue_name)
                if queue is not None and queue not in found:
                    found.append(queue)
        return found

    def enqueue(self, queue: _Queue, message: _Message, front: bool = False) -> None:
        if front:
            queue.messages.appendleft(message)
        else:
            queue.messages.append(message)

    def dead_letter(self, queue: _Queue, message: _Message) -> None:
        dlx = queue.arguments.get("x-dead-letter-exchange")
        if dlx is None or dlx not in self.exchanges:
            return
        for target in self.route(dlx, message.routing_key):
            self.enqueue(target, _Message(message.body, message.routing_key, dlx,
                                          message.properties))

    def new_name(self, prefix: str) -> str:
        return f"{prefix}{next(self._names)}"

    def forget(self, conn: FakeConnection) -> None:
        with self.lock:
            if conn in self.connections:
                self.connections.remove(conn)
            for name, queue in list(self.queues.items()):
                if queue.exclusive_to is conn:
                    del self.queues[name]
                    for bindings in self.bindings.values():
                        bindings[:] = [b for b in bindings if b[0] != name]


class FakeConnection:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.channels: list[FakeChannel] = []
        self.callbacks: deque[Any] = deque()
        self._open = True
        self._lost = False

    @property
    def is_open(self) -> bool:
        return self._open and not self._lost

    @property
    def is_closed(self) -> bool:
        return not self.is_open

    def _check(self) -> None:
        if self._lost:
            raise pika.exceptions.StreamLostError("the fake broker dropped the connection")
        if not self._open:
            raise pika.exceptions.ConnectionWrongStateError("connection is closed")

    def channel(self) -> FakeChannel:
        self._check()
        channel = FakeChannel(self)
        self.channels.append(channel)
        return channel

    def add_callback_threadsafe(self, callback: Any) -> None:
        if not self.is_open:
            raise pika.exceptions.ConnectionWrongStateError("connection is closed")
        self.callbacks.append(callback)

    def process_data_events(self, time_limit: float = 0) -> None:
        self._check()
        deadline = time.monotonic() + (time_limit or 0)
        while True:
            did = self._run_callbacks() + self._deliver()
            self._check()
            if did == 0:
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.005)

    def _run_callbacks(self) -> int:
        count = 0
        while self.callbacks:
            self.callbacks.popleft()()
            count += 1
        return count

    def _deliver(self) -> int:
        count = 0
        for channel in list(self.channels):
            count += channel._deliver()
        return count

    def close(self) -> None:
        if not self._open:
            raise pika.exceptions.ConnectionWrongStateError("connection already closed")
        self._shutdown()

    def _shutdown(self) -> None:
        self._open = False
        with self.broker.lock:
            for channel in self.channels:
                channel._drop()
        self.broker.forget(self)

    def _lose(self) -> None:
        self._lost = True
        self._shutdown()


class FakeChannel:
    def __init__(self, conn: FakeConnection) -> None:
        self.conn = conn
        self.broker = conn.broker
        self._open = True
        self.confirms = False
        self.prefetch = 0
        self.consumers: dict[str, tuple[str, Any, bool]] = {}
        self.unacked: dict[int, tuple[_Queue, _Message]] = {}
        self._tags = itertools.count(1)

    @property
    def is_open(self) -> bool:
        return self._open and self.conn.is_open

    @property
    def is_closed(self) -> bool:
        return not self.is_open

    def _check(self) -> None:
        self.conn._check()
        if not self._open:
            raise pika.exceptions.ChannelWrongStateError("channel is closed")

    # -- declarations -------------------------------------------------------------------
    def confirm_delivery(self) -> None:
        self._check()
        self.confirms = True

    def basic_qos(self, prefetch_count: int = 0, **_kwargs: Any) -> None:
        self._check()
        self.prefetch = prefetch_count

    def exchange_declare(self, exchange: str, exchange_type: str = "direct",
                         **_kwargs: Any) -> None:
        self._check()
        with self.broker.lock:
            self.broker.exchanges.setdefault(exchange, exchange_type)

    def queue_declare(self, queue: str, passive: bool = False, durable: bool = False,
                      exclusive: bool = False, auto_delete: bool = False,
                      arguments: dict[str, Any] | None = None) -> Any:
        self._check()
        with self.broker.lock:
            if passive:
                if queue not in self.broker.queues:
                    self._close_by_broker()
                    raise pika.exceptions.ChannelClosedByBroker(404, f"NOT_FOUND - {queue}")
            else:
                name = queue or self.broker.new_name("amq.gen-")
                if name not in self.broker.queues:
                    self.broker.queues[name] = _Queue(
                        name, dict(arguments or {}), self.conn if exclusive else None,
                        auto_delete)
                queue = name
            q = self.broker.queues[queue]
            return SimpleNamespace(method=SimpleNamespace(
                queue=queue, message_count=len(q.messages), consumer_count=len(q.consumers)))

    def queue_bind(self, queue: str, exchange: str, routing_key: str | None = None) -> None:
        self._check()
        with self.broker.lock:
            bindings = self.broker.bindings.setdefault(exchange, [])
            if (queue, routing_key or "") not in bindings:
                bindings.append((queue, routing_key or ""))

    def queue_unbind(self, queue: str, exchange: str, routing_key: str | None = None) -> None:
        self._check()
        with self.broker.lock:
            bindings = self.broker.bindings.get(exchange, [])
            if (queue, routing_key or "") in bindings:
                bindings.remove((queue, routing_key or ""))

    def queue_delete(self, queue: str) -> None:
        self._check()
        with self.broker.lock:
            self.broker.queues.pop(queue, None)

    def exchange_delete(self, exchange: str) -> None:
        self._check()
        with self.broker.lock:
            self.broker.exchanges.pop(exchange, None)
            self.broker.bindings.pop(exchange, None)

    def queue_purge(self, queue: str) -> None:
        self._check()
        with self.broker.lock:
            self.broker.queues[queue].messages.clear()

    # -- consuming ----------------------------------------------------------------------
    def basic_consume(self, queue: str, on_message_callback: Any, auto_ack: bool = False,
                      **_kwargs: Any) -> str:
        self._check()
        tag = self.broker.new_name("ctag-")
        with self.broker.lock:
            self.consumers[tag] = (queue, on_message_callback, auto_ack)
            self.broker.queues[queue].consumers.append((self, tag))
        return tag

    def basic_cancel(self, consumer_tag: str) -> None:
        self._check()
        with self.broker.lock:
            queue, _, _ = self.consumers.pop(consumer_tag, (None, None, None))
            if queue in self.broker.queues:
                q = self.broker.queues[queue]
                q.consumers = [c for c in q.consumers if c != (self, consumer_tag)]

    def _deliver(self) -> int:
        count = 0
        for tag, (queue_name, callback, auto_ack) in list(self.consumers.items()):
            while self._open and tag in self.consumers:
                with self.broker.lock:
                    queue = self.broker.queues.get(queue_name)
                    if queue is None or not queue.messages:
                        break
                    if not auto_ack and self.prefetch and len(self.unacked) >= self.prefetch:
                        break
                    message = queue.messages.popleft()
                    delivery_tag = next(self._tags)
                    if not auto_ack:
                        self.unacked[delivery_tag] = (queue, message)
                method = SimpleNamespace(delivery_tag=delivery_tag, redelivered=message.redelivered,
                                         routing_key=message.routing_key,
                                         exchange=message.exchange, consumer_tag=tag)
                callback(self, method, message.properties, message.body)
                count += 1
        return count

    def _settle(self, delivery_tag: int) -> tuple[_Queue, _Message] | None:
        self._check()
        with self.broker.lock:
            found = self.unacked.pop(delivery_tag, None)
        if found is None:
            # RabbitMQ closes the channel: PRECONDITION_FAILED - unknown delivery tag.
            self._close_by_broker()
        return found

    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None:
        self._settle(delivery_tag)

    def basic_nack(self, delivery_tag: int = 0, multiple: bool = False,
                   requeue: bool = True) -> None:
        found = self._settle(delivery_tag)
        if found is not None:
            self._put_back(*found, requeue=requeue)

    def basic_reject(self, delivery_tag: int = 0, requeue: bool = True) -> None:
        found = self._settle(delivery_tag)
        if found is not None:
            self._put_back(*found, requeue=requeue)

    def _put_back(self, queue: _Queue, message: _Message, requeue: bool) -> None:
        with self.broker.lock:
            if requeue:
                message.redelivered = True
                self.broker.enqueue(queue, message, front=True)
            else:
                self.broker.dead_letter(queue, message)

    # -- publishing ---------------------------------------------------------------------
    def basic_publish(self, exchange: str, routing_key: str, body: bytes,
                      properties: Any = None, mandatory: bool = False) -> None:
        self._check()
        with self.broker.lock:
            if exchange not in self.broker.exchanges:
                self._close_by_broker()
                raise pika.exceptions.ChannelClosedByBroker(404, f"NOT_FOUND - {exchange}")
            targets = self.broker.route(exchange, routing_key)
            for queue in targets:
                self.broker.enqueue(queue, _Message(bytes(body), routing_key, exchange,
                                                    properties))
        if not targets and mandatory and self.confirms:
            raise pika.exceptions.UnroutableError([SimpleNamespace(body=body)])

    # -- closing ------------------------------------------------------------------------
    def close(self) -> None:
        self._check()
        with self.broker.lock:
            self._drop()

    def _close_by_broker(self) -> None:
        with self.broker.lock:
            self._drop()

    def _drop(self) -> None:
        """Cancel consumers and requeue what is unacked, as the broker does."""
        self._open = False
        for tag in list(self.consumers):
            queue, _, _ = self.consumers.pop(tag)
            if queue in self.broker.queues:
                q = self.broker.queues[queue]
                q.consumers = [c for c in q.consumers if c != (self, tag)]
        for _tag, (queue, message) in sorted(self.unacked.items(), reverse=True):
            message.redelivered = True
            self.broker.enqueue(queue, message, front=True)
        self.unacked.clear()
