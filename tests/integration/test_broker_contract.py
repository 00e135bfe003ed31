"""The broker rules labq relies on, checked on RabbitMQ and on the in-memory fake alike.

The worker's unit tests (tests/unit/test_worker_rules.py) run against
``tests/fakebroker.py``; these tests keep that fake honest: each rule passes on the real
broker (127.0.0.1:5672) and on the fake, or the fake is wrong.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest
from fakebroker import FakeBroker

pytestmark = pytest.mark.integration


class Side:
    """One broker (real or fake) with uniquely named exchanges and queues."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self.connect = connect
        self.prefix = f"contract-{uuid.uuid4().hex[:8]}"
        self.conns: list[Any] = []
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def channel(self, confirms: bool = True) -> tuple[Any, Any]:
        conn = self.connect()
        self.conns.append(conn)
        ch = conn.channel()
        if confirms:
            ch.confirm_delivery()
        return conn, ch

    def name(self, what: str) -> str:
        return f"{self.prefix}.{what}"

    def setup(self, ch: Any, kind: str = "direct", key: str = "job",
              dead_letter: bool = False) -> tuple[str, str, str]:
        exchange, queue, dead = self.name("x"), self.name("q"), self.name("dead")
        args = {}
        if dead_letter:
            ch.exchange_declare(self.name("dlx"), "fanout", durable=False, auto_delete=False)
            ch.queue_declare(dead, durable=False)
            ch.queue_bind(dead, self.name("dlx"), "")
            args["x-dead-letter-exchange"] = self.name("dlx")
            self.exchanges.append(self.name("dlx"))
            self.queues.append(dead)
        ch.exchange_declare(exchange, kind, durable=False, auto_delete=False)
        ch.queue_declare(queue, durable=False, arguments=args)
        ch.queue_bind(queue, exchange, key)
        self.exchanges.append(exchange)
        self.queues.append(queue)
        return exchange, queue, dead

    def close(self) -> None:
        conn = self.connect()
        try:
            ch = conn.channel()
            for q in self.queues:
                ch.queue_delete(q)
            for x in self.exchanges:
                ch.exchange_delete(x)
        finally:
            conn.close()
        for c in self.conns:
            if c.is_open:
                c.close()


@pytest.fixture(params=["rabbitmq", "fake"])
def side(request: pytest.FixtureRequest, broker: str) -> Iterator[Side]:
    if request.param == "rabbitmq":
        s = Side(lambda: pika.BlockingConnection(pika.URLParameters(broker)))
    else:
        fake = FakeBroker()
        s = Side(fake.connect)
    try:
        yield s
    finally:
        s.close()


def pump_until(conn: Any, done: Callable[[], bool], limit_s: float = 5.0) -> None:
    for _ in range(int(limit_s / 0.05)):
        if done():
            return
        conn.process_data_events(time_limit=0.05)
    assert done(), "nothing arrived in time"


def depth(ch: Any, queue: str) -> int:
    return ch.queue_declare(queue, passive=True).method.message_count


def consume(ch: Any, queue: str, got: list) -> str:
    return ch.basic_consume(queue, lambda c, m, p, b: got.append((m, b)), auto_ack=False)


def test_a_published_message_is_delivered_once_and_ack_removes_it(side: Side) -> None:
    conn, ch = side.channel()
    exchange, queue, _ = side.setup(ch)
    ch.basic_publish(exchange, "job", b"one", pika.BasicProperties(delivery_mode=2),
                     mandatory=True)
    ch.basic_qos(prefetch_count=1)
    got: list = []
    consume(ch, queue, got)
    pump_until(conn, lambda: len(got) == 1)
    method, body = got[0]
    assert body == b"one" and method.redelivered is False
    ch.basic_ack(method.delivery_tag)
    conn.process_data_events(time_limit=0.2)
    assert depth(ch, queue) == 0 and len(got) == 1


def test_prefetch_one_holds_the_second_message_until_the_first_is_settled(side: Side) -> None:
    conn, ch = side.channel()
    exchange, queue, _ = side.setup(ch)
    for body in (b"a", b"b"):
        ch.basic_publish(exchange, "job", body, mandatory=True)
    ch.basic_qos(prefetch_count=1)
    got: list = []
    consume(ch, queue, got)
    pump_until(conn, lambda: len(got) == 1)
    conn.process_data_events(time_limit=0.3)
    assert [b for _, b in got] == [b"a"]
    ch.basic_ack(got[0][0].delivery_tag)
    pump_until(conn, lambda: len(got) == 2)
    assert got[1][1] == b"b"


def test_nack_requeue_redelivers_marked_redelivered(side: Side) -> None:
    conn, ch = side.channel()
    exchange, queue, _ = side.setup(ch)
    ch.basic_publish(exchange, "job", b"again", mandatory=True)
    ch.basic_qos(prefetch_count=1)
    got: list = []
    consume(ch, queue, got)
    pump_until(conn, lambda: len(got) == 1)
    ch.basic_nack(got[0][0].delivery_tag, requeue=True)
    pump_until(conn, lambda: len(got) == 2)
    assert got[1][1] == b"again" and got[1][0].redelivered is True


def test_reject_without_requeue_dead_letters(side: Side) -> None:
    conn, ch = side.channel()
    exchange, queue, dead = side.setup(ch, dead_letter=True)
    ch.basic_publish(exchange, "job", b"poison", mandatory=True)
    got: list = []
    consume(ch, queue, got)
    pump_until(conn, lambda: len(got) == 1)
    ch.basic_reject(got[0][0].delivery_tag, requeue=False)
    pump_until(conn, lambda: depth(ch, dead) == 1)
    assert depth(ch, queue) == 0


def test_a_closed_connection_gives_its_unacked_message_back(side: Side) -> None:
    conn, ch = side.channel()
    exchange, queue, _ = side.setup(ch)
    ch.basic_publish(exchange, "job", b"held", mandatory=True)
    got: list = []
    consume(ch, queue, got)
    pump_until(conn, lambda: len(got) == 1)
    conn.close()
    other, ch2 = side.channel()
    again: list = []
    consume(ch2, queue, again)
    pump_until(other, lambda: len(again) == 1)
    assert again[0][1] == b"held" and again[0][0].redelivered is True


def test_an_ack_for_an_unknown_tag_closes_the_channel(side: Side) -> None:
    conn, ch = side.channel()
    side.setup(ch)
    ch.basic_ack(999)
    with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
        conn.process_data_events(time_limit=0.5)
    assert not ch.is_open


def test_a_mandatory_publish_no_queue_takes_is_unroutable(side: Side) -> None:
    _conn, ch = side.channel()
    exchange, _, _ = side.setup(ch, kind="topic", key="*.lifecycle")
    ch.basic_publish(exchange, "abc.lifecycle", b"ok", mandatory=True)
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(exchange, "abc.control", b"nobody", mandatory=True)


def test_topic_bindings_come_and_go(side: Side) -> None:
    conn, ch = side.channel()
    exchange, queue, _ = side.setup(ch, kind="topic", key="#.status")
    ch.queue_bind(queue, exchange, "job1.control")
    ch.basic_publish(exchange, "job1.control", b"stop", mandatory=True)
    ch.basic_publish(exchange, "a.b.status", b"tick", mandatory=True)
    assert depth(ch, queue) == 2
    ch.queue_unbind(queue, exchange, "job1.control")
    with pytest.raises(pika.exceptions.UnroutableError):
        ch.basic_publish(exchange, "job1.control", b"late", mandatory=True)
    del conn


def test_a_server_named_exclusive_queue_goes_with_its_connection(side: Side) -> None:
    conn, ch = side.channel()
    declared = ch.queue_declare("", exclusive=True, auto_delete=True)
    name = declared.method.queue
    assert name.startswith("amq.gen-")
    conn.close()
    _other, ch2 = side.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        ch2.queue_declare(name, passive=True)


def test_callbacks_from_other_threads_run_in_process_data_events(side: Side) -> None:
    conn, _ch = side.channel()
    ran: list[str] = []
    thread = threading.Thread(target=lambda: conn.add_callback_threadsafe(
        lambda: ran.append(threading.current_thread().name)))
    thread.start()
    thread.join()
    pump_until(conn, lambda: bool(ran))
    assert ran == [threading.current_thread().name]
