"""RabbitMQ topology: names, declarations and connection parameters.

All names derive from ``LABQ_PREFIX`` so test runs never see each other's messages::

    <p>.jobs            direct exchange → durable queue <p>.jobs (claim-check job messages)
    <p>.dead            fanout exchange → durable queue <p>.jobs.dead (dead letters)
    <p>.events          topic exchange; routing keys <job id>.lifecycle / <job id>.status
    <p>.events.backend  durable queue bound to *.lifecycle: the backend applies these
    <p>.control         topic exchange; <job id>.control reaches the worker holding the job

Job messages and lifecycle events are persistent; status events are transient (one a
second, only useful live). Every declaration is idempotent, so each service declares
what it uses at every (re)connect, in any start order.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import pika

from labq.shared.errors import ConfigError
from labq.shared.settings import Settings

log = logging.getLogger(__name__)

PERSISTENT = pika.DeliveryMode.Persistent
TRANSIENT = pika.DeliveryMode.Transient
JOB_ROUTING_KEY = "job"
#: RabbitMQ >= 3.12 honours a per-queue consumer timeout; older nodes ignore the argument.
#: labq does not rely on it (see consumer/ for the run lock that makes long jobs safe),
#: it only spares a needless redelivery of jobs that run for days.
CONSUMER_TIMEOUT_MS = 30 * 24 * 3600 * 1000
QUEUE_TYPES = ("classic", "quorum")


@dataclass(frozen=True)
class Topology:
    prefix: str
    #: ``classic`` or ``quorum`` for the durable queues (jobs, dead letters, backend
    #: events). Per-connection queues (control, broadcasts) are always classic and
    #: exclusive: they die with their connection, which is what they are for.
    queue_type: str = "classic"

    def __post_init__(self) -> None:
        if self.queue_type not in QUEUE_TYPES:
            raise ConfigError(f"LABQ_QUEUE_TYPE={self.queue_type!r}: use classic or quorum")

    def _durable_arguments(self, **extra: object) -> dict:
        # A queue's type is fixed when it is first declared; declaring it again with
        # another type fails with PRECONDITION_FAILED (the log says so at start-up).
        args = {"x-queue-type": self.queue_type} if self.queue_type == "quorum" else {}
        return {**args, **extra}

    @property
    def jobs_exchange(self) -> str:
        return f"{self.prefix}.jobs"

    @property
    def jobs_queue(self) -> str:
        return f"{self.prefix}.jobs"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.prefix}.jobs.dead"

    @property
    def events_exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def events_queue(self) -> str:
        return f"{self.prefix}.events.backend"

    @property
    def control_exchange(self) -> str:
        return f"{self.prefix}.control"

    def declare_jobs(self, channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
        channel.exchange_declare(self.dead_exchange, "fanout", durable=True)
        channel.queue_declare(self.dead_queue, durable=True, arguments=self._durable_arguments())
        channel.queue_bind(self.dead_queue, self.dead_exchange)
        channel.exchange_declare(self.jobs_exchange, "direct", durable=True)
        channel.queue_declare(
            self.jobs_queue,
            durable=True,
            arguments=self._durable_arguments(**{
                "x-dead-letter-exchange": self.dead_exchange,
                "x-consumer-timeout": CONSUMER_TIMEOUT_MS,
            }),
        )
        channel.queue_bind(self.jobs_queue, self.jobs_exchange, JOB_ROUTING_KEY)

    def declare_events(self, channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
        channel.exchange_declare(self.events_exchange, "topic", durable=True)
        channel.queue_declare(self.events_queue, durable=True,
                              arguments=self._durable_arguments())
        channel.queue_bind(self.events_queue, self.events_exchange, "*.lifecycle")

    def declare_control(self, channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
        channel.exchange_declare(self.control_exchange, "topic", durable=True)

    def declare_all(self, channel: pika.adapters.blocking_connection.BlockingChannel) -> None:
        self.declare_jobs(channel)
        self.declare_events(channel)
        self.declare_control(channel)

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(settings.prefix, settings.queue_type.strip().lower() or "classic")


def connection_parameters(settings: Settings, name: str) -> list[pika.URLParameters]:
    """Parameters for one connection, one per broker node: heartbeats on, fail fast
    (callers retry with backoff). Several nodes are tried in a shuffled order so the
    connections of many processes spread over a cluster and a stopped node is skipped."""
    urls = settings.rabbitmq_urls
    if not urls:
        raise ConfigError("LABQ_RABBITMQ_URL is empty: give the broker's amqp:// URL")
    if len(urls) > 1:
        urls = random.sample(urls, len(urls))
    out = []
    for url in urls:
        params = pika.URLParameters(url)
        params.heartbeat = settings.heartbeat_s
        params.blocked_connection_timeout = 60
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.client_properties = {"connection_name": name}
        out.append(params)
    return out


def connect(settings: Settings, name: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(connection_parameters(settings, name))


def close_quietly(conn: pika.BlockingConnection) -> None:
    """Close a connection that may already be broken (closing it then may fail any way)."""
    try:
        if conn.is_open:
            conn.close()
    except Exception:  # noqa: BLE001
        log.debug("closing a broken connection failed", exc_info=True)
