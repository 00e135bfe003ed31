"""Queue types and cluster URLs: labq's durable queues as quorum queues on the real broker,
and a list of node URLs that skips a node that does not answer."""

from __future__ import annotations

import pika
import pytest
from helpers import RABBITMQ_URL, delete_topology, unique_prefix

from labq.shared.errors import ConfigError
from labq.shared.settings import Settings
from labq.shared.topology import Topology, connect, connection_parameters

pytestmark = pytest.mark.integration

DEAD_NODE = "amqp://guest:guest@127.0.0.1:1/%2F"


def test_quorum_topology_declares_quorum_queues_on_the_broker(broker):
    # Given a quorum topology, when it is declared on RabbitMQ,
    # then the jobs, dead-letter and events queues are quorum queues.
    prefix = unique_prefix()
    topo = Topology(prefix, "quorum")
    conn = pika.BlockingConnection(pika.URLParameters(broker))
    try:
        ch = conn.channel()
        topo.declare_all(ch)
        topo.declare_all(ch)  # declaring again is a no-op, as every service does at start
        for queue in (topo.jobs_queue, topo.dead_queue, topo.events_queue):
            # A passive declare with the other type would not tell; a classic re-declare
            # of a quorum queue is refused, which proves its type.
            probe = conn.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                probe.queue_declare(queue, durable=True)
            assert refused.value.reply_code == 406  # PRECONDITION_FAILED: x-queue-type
    finally:
        conn.close()
        delete_topology(prefix)


def test_a_cluster_url_list_skips_a_node_that_does_not_answer(broker):
    settings = Settings(rabbitmq_url=f"{DEAD_NODE}, {RABBITMQ_URL}")
    for _ in range(4):  # whichever order the shuffle picks, the live node is reached
        conn = connect(settings, "cluster-test")
        assert conn.is_open
        conn.close()


def test_settings_split_node_urls_and_reject_unknown_queue_types():
    settings = Settings(rabbitmq_url=" amqp://a/%2F ,amqp://b/%2F,", queue_type="quorum")
    assert settings.rabbitmq_urls == ["amqp://a/%2F", "amqp://b/%2F"]
    assert {p.host for p in connection_parameters(settings, "x")} == {"a", "b"}
    assert Topology.from_settings(settings).queue_type == "quorum"
    with pytest.raises(ConfigError, match="classic or quorum"):
        Topology("p", "mirrored")
    with pytest.raises(ConfigError, match="empty"):
        connection_parameters(Settings(rabbitmq_url=" , "), "x")
