"""Control messages (pause / resume / stop) for the worker holding a job.

Published on ``<p>.control`` with routing key ``<job id>.control``, ``mandatory``: the
worker binds its control queue to that key only while it runs the job, so a returned
message means no worker holds it and the request fails with a 503 instead of silently
doing nothing.
"""

from __future__ import annotations

from labq.producer.publisher import Publisher, UnroutableError
from labq.shared.errors import LabqError
from labq.shared.messages import ControlMessage


class WorkerUnreachableError(LabqError):
    """Raised when no worker is bound to receive a job's control message."""

    code = "worker_unreachable"
    status = 503


def send_control(publisher: Publisher, job_id: str, action: str) -> None:
    message = ControlMessage(job_id=job_id, action=action)
    try:
        publisher.publish(publisher.topology.control_exchange, message.routing_key,
                          message.encode(), persistent=False, mandatory=True)
    except UnroutableError as exc:
        raise WorkerUnreachableError(
            f"no worker is listening for job {job_id} right now, so it cannot be told to "
            f"{action}; try again in a moment",
            job_id=job_id,
        ) from exc
