"""Health, readiness, statistics and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from backend.errors import error_response
from backend.services import Services, services
from shared.errors import BrokerUnavailableError

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    svc = services()
    checks = {"database": "ok" if svc.database_ok() else "down",
              "broker": "ok" if svc.publisher.ping() else "down"}
    down = [name for name, status in checks.items() if status != "ok"]
    if down:
        names = {"database": "the database", "broker": "the broker (RabbitMQ)"}
        return error_response(503, "not_ready",
                              " and ".join(names[n] for n in down)
                              + (" are" if len(down) > 1 else " is") + " unreachable",
                              checks=checks)
    return jsonify({"status": "ready", "checks": checks})


def queue_stats(svc: Services) -> dict[str, Any]:
    name = svc.publisher.topology.jobs_queue
    try:
        messages, consumers = svc.publisher.queue_info(name)
    except BrokerUnavailableError as exc:
        return {"name": name, "messages": None, "consumers": None, "error": exc.message}
    return {"name": name, "messages": messages, "consumers": consumers}


@bp.get("/api/v1/stats")
def stats() -> Response:
    svc = services()
    return jsonify({"queue": queue_stats(svc), "jobs": svc.registry.counts()})


@bp.get("/metrics")
def metrics() -> Response:
    svc = services()
    queue = queue_stats(svc)
    lines = ["# HELP labq_jobs Jobs by lifecycle state.", "# TYPE labq_jobs gauge"]
    lines += [f'labq_jobs{{state="{state}"}} {count}'
              for state, count in svc.registry.counts().items()]
    lines += ["# HELP labq_broker_up 1 when RabbitMQ answered.", "# TYPE labq_broker_up gauge",
              f"labq_broker_up {0 if queue['messages'] is None else 1}"]
    if queue["messages"] is not None:
        lines += ["# HELP labq_queue_messages Jobs waiting on the jobs queue.",
                  "# TYPE labq_queue_messages gauge",
                  f"labq_queue_messages {queue['messages']}",
                  "# HELP labq_queue_consumers Workers consuming the jobs queue.",
                  "# TYPE labq_queue_consumers gauge",
                  f"labq_queue_consumers {queue['consumers']}"]
    lines += ["# HELP labq_event_streams Open server-sent event streams.",
              "# TYPE labq_event_streams gauge", f"labq_event_streams {len(svc.hub)}"]
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")
