"""The producer against the real RabbitMQ: confirms, unroutable control, broker down,
and the outbox relay publishing jobs a request could not."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from helpers import RABBITMQ_URL, delete_topology, unique_prefix, wait_until
from sqlalchemy import update

from labq.backend.registry import Registry
from labq.producer.control import WorkerUnreachableError, send_control
from labq.producer.jobs import publish_job_id
from labq.producer.outbox import OutboxRelay
from labq.producer.publisher import Publisher
from labq.shared import db
from labq.shared.db import make_engine
from labq.shared.errors import BrokerUnavailableError
from labq.shared.manifest import JobSpec
from labq.shared.messages import JobMessage
from labq.shared.settings import Settings
from labq.shared.storage import Storage
from labq.shared.topology import Topology

pytestmark = pytest.mark.integration


@pytest.fixture()
def settings(broker: str, tmp_path: Path) -> Iterator[Settings]:
    s = Settings(data_dir=tmp_path, prefix=unique_prefix(), rabbitmq_url=broker,
                 outbox_interval_s=0.2)
    yield s
    delete_topology(s.prefix, broker)


def depth(settings: Settings) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        ok = conn.channel().queue_declare(Topology(settings.prefix).jobs_queue, passive=True)
        return ok.method.message_count
    finally:
        conn.close()


def test_publish_job_confirms_then_queues(settings):
    engine = make_engine(settings)
    registry = Registry(engine, Storage(settings.data_dir).ensure())
    publisher = Publisher(settings)
    try:
        job, _ = registry.create(name="p", spec=JobSpec("code.py", args=["-v"]),
                                 bundle_sha256="c" * 64, bundle_bytes=3)
        assert publish_job_id(engine, publisher, job["id"])
        assert registry.get(job["id"])["state"] == "queued"
        assert not publish_job_id(engine, publisher, job["id"])  # not created any more
        conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        method, props, body = conn.channel().basic_get(Topology(settings.prefix).jobs_queue,
                                                       auto_ack=True)
        conn.close()
        message = JobMessage.decode(body)
        assert (message.job_id, message.spec.args, props.delivery_mode) == (job["id"], ["-v"], 2)
    finally:
        publisher.close()
        engine.dispose()


def test_control_without_a_worker_is_unroutable(settings):
    publisher = Publisher(settings)
    try:
        with pytest.raises(WorkerUnreachableError) as err:
            send_control(publisher, "a" * 32, "pause")
        assert err.value.status == 503
        # The publisher is still usable afterwards.
        publisher.publish(publisher.topology.jobs_exchange, "job", b"{}")
        assert depth(settings) == 1
    finally:
        publisher.close()


def test_control_reaches_a_bound_queue(settings):
    publisher = Publisher(settings)
    conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        publisher.ping()  # declares the topology
        ch = conn.channel()
        queue = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(queue, publisher.topology.control_exchange, f"{'b' * 32}.control")
        send_control(publisher, "b" * 32, "stop")
        _m, _p, body = ch.basic_get(queue, auto_ack=True)
        assert json.loads(body)["action"] == "stop"
    finally:
        conn.close()
        publisher.close()


def test_broker_down_fails_fast(tmp_path):
    down = Settings(data_dir=tmp_path, prefix="x", rabbitmq_url="amqp://guest:guest@127.0.0.1:1/")
    publisher = Publisher(down)
    began = time.monotonic()
    for _ in range(5):
        with pytest.raises(BrokerUnavailableError):
            publisher.publish("x", "y", b"{}")
    assert time.monotonic() - began < 5
    assert not publisher.ping()


def test_outbox_relay_publishes_created_jobs(settings):
    engine = make_engine(settings)
    registry = Registry(engine, Storage(settings.data_dir).ensure())
    publisher = Publisher(settings)
    stop = threading.Event()
    try:
        old, _ = registry.create(name="old", spec=JobSpec("code.py"), bundle_sha256="d" * 64,
                                 bundle_bytes=1)
        with engine.begin() as conn:  # pretend it was accepted a while ago, broker down
            conn.execute(update(db.jobs).where(db.jobs.c.id == old["id"])
                         .values(created_at=time.time() - 60))
        young, _ = registry.create(name="young", spec=JobSpec("code.py"),
                                   bundle_sha256="d" * 64, bundle_bytes=1)
        relay = OutboxRelay(settings, engine, publisher, stop)
        assert relay.pending() == [old["id"]]  # the young one belongs to its request
        relay.start()
        wait_until(lambda: registry.get(old["id"])["state"] == "queued", timeout=10)
        wait_until(lambda: registry.get(young["id"])["state"] == "queued", timeout=10)
        assert depth(settings) == 2
    finally:
        stop.set()
        publisher.close()
        engine.dispose()
