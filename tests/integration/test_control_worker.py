"""Control messages straight to a worker (no backend): pause, resume, stop, status events."""

from __future__ import annotations

import pika
import pytest
from helpers import wait_until
from test_pipeline_worker import Workers

from labq.shared.messages import ControlMessage, StatusEvent

pytestmark = pytest.mark.integration


@pytest.fixture()
def workers(broker, tmp_path):
    w = Workers(tmp_path)
    try:
        yield w
    finally:
        w.close()


def control(workers: Workers, job_id: str, action: str) -> None:
    workers.ch.basic_publish(workers.topology.control_exchange, f"{job_id}.control",
                             ControlMessage(job_id=job_id, action=action).encode(),
                             mandatory=True)


def test_pause_resume_stop_and_status_events(workers):
    status_q = workers.ch.queue_declare("", exclusive=True).method.queue
    workers.ch.queue_bind(status_q, workers.topology.events_exchange, "*.status")
    workers.start("w1")
    job = workers.job({"code.py": "import time\nwhile True:\n    time.sleep(0.05)\n"})
    workers.publish(job.encode())
    wait_until(lambda: "started" in workers.states(job.job_id), timeout=30, message="started")

    def statuses() -> list[StatusEvent]:
        out = []
        while True:
            method, _p, body = workers.ch.basic_get(status_q, auto_ack=True)
            if method is None:
                return out
            out.append(StatusEvent.decode(body))

    wait_until(lambda: statuses(), timeout=5, message="a status event")
    control(workers, job.job_id, "pause")
    wait_until(lambda: workers.states(job.job_id)[-1] == "paused", timeout=10, message="paused")
    while_paused: list[StatusEvent] = []

    def paused_ticks() -> bool:
        while_paused.extend(s for s in statuses() if s.state == "paused")
        return len(while_paused) >= 3

    wait_until(paused_ticks, timeout=15, message="status ticks while paused")
    assert while_paused[0].elapsed_s == while_paused[-1].elapsed_s  # pauses don't count
    control(workers, job.job_id, "resume")
    wait_until(lambda: workers.states(job.job_id)[-1] == "started", timeout=10, message="resumed")
    control(workers, job.job_id, "stop")
    final = workers.wait_final(job.job_id)
    assert (final.state, final.outcome) == ("stopped", "cancelled")
    assert workers.states(job.job_id) == ["initialized", "started", "paused", "started",
                                          "stopped"]
    # The worker unbinds the job's control key once it settled the delivery (just after
    # the final event): from then on a control message is unroutable.
    def unroutable() -> bool:
        try:
            control(workers, job.job_id, "pause")
        except pika.exceptions.UnroutableError:
            return True
        return False

    wait_until(unroutable, timeout=10, message="the control key to be unbound")
