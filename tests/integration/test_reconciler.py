"""An accepted job is never lost, even when its message is: purging or deleting the jobs
queue (as a job holding the broker's credentials once did) leaves no job queued forever."""

from __future__ import annotations

import pika
import pytest
from helpers import RABBITMQ_URL, LabqSystem

from labq.shared.topology import Topology

pytestmark = pytest.mark.integration


@pytest.fixture()
def idle(broker: str, tmp_path):
    # No worker yet, so the jobs stay queued while we take their messages away.
    system = LabqSystem(tmp_path, workers=0, env={"LABQ_RECONCILE_AFTER_S": "1",
                                                  "LABQ_RECONCILE_INTERVAL_S": "0.5"})
    try:
        system.start()
        yield system
    finally:
        system.stop()


def _on_channel(action):
    conn = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        action(conn.channel())
    finally:
        conn.close()


@pytest.mark.parametrize("attack", ["purge", "delete"])
def test_jobs_whose_messages_were_purged_or_deleted_still_run(idle: LabqSystem, attack: str):
    # Given two accepted jobs, queued
    jobs = [idle.submit({"code.py": f"print('job {i}')"}) for i in range(2)]
    for job in jobs:
        idle.wait_for_state(job["id"], "queued", timeout=20)
    queue = Topology(idle.prefix).jobs_queue
    # When someone purges the jobs queue (or deletes it)
    if attack == "purge":
        _on_channel(lambda ch: ch.queue_purge(queue))
    else:
        _on_channel(lambda ch: ch.queue_delete(queue))
    # Then, once a worker is there, both still run, once each
    idle.start_worker()
    for job in jobs:
        done = idle.wait_done(job["id"], timeout=60)
        assert done["outcome"] == "succeeded", idle.log(job["id"])
        assert idle.log(job["id"]).count("=== labq: attempt") == 1
