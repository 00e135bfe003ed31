"""Health, readiness, statistics and Prometheus metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify

from labq.backend.errors import error_response
from labq.backend.scope import owner_filter
from labq.backend.services import Services, services
from labq.backend.waiting import Workers, busy_workers
from labq.shared.errors import BrokerUnavailableError

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
    return jsonify({"status": "ready", "checks": checks,
                    "sandbox": sandbox_reports(svc.settings.data_dir)})


#: A worker touches its report every 30 s; older ones belong to workers that are gone.
REPORT_FRESH_S = 120.0


def sandbox_reports(data_dir: Path) -> dict[str, Any]:
    """Which sandbox layers each live worker uses (``<data_dir>/workers/<name>.json``,
    written by the worker at start): a lab admin sees at a glance if one degraded."""
    reports: dict[str, Any] = {}
    now = time.time()
    for path in sorted((Path(data_dir) / "workers").glob("*.json")):
        try:
            if now - path.stat().st_mtime > REPORT_FRESH_S:
                continue
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        reports[path.stem] = {key: data.get(key) for key in (
            "host", "mode", "complete", "uid_pool", "bwrap", "network_isolation",
            "slirp4netns", "cgroup", "rlimits", "missing")}
    return reports


def queue_stats(svc: Services) -> dict[str, Any]:
    name = svc.publisher.topology.jobs_queue
    try:
        messages, consumers = svc.publisher.queue_info(name)
    except BrokerUnavailableError as exc:
        return {"name": name, "messages": None, "consumers": None, "workers": None,
                "error": exc.message}
    # A busy worker keeps its consumer on (Workers.count): consumers are idle + busy.
    busy, _ = busy_workers(svc.engine)
    return {"name": name, "messages": messages, "consumers": consumers,
            "busy_workers": busy, "workers": Workers.count(consumers, busy).total}


@bp.get("/api/v1/stats")
def stats() -> Response:
    svc = services()
    return jsonify({"queue": queue_stats(svc), "jobs": svc.registry.counts(owner_filter()),
                    "sandbox": sandbox_reports(svc.settings.data_dir)})


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
                  f"labq_queue_consumers {queue['consumers']}",
                  "# HELP labq_workers Workers connected (idle consumers + busy workers).",
                  "# TYPE labq_workers gauge",
                  f"labq_workers {queue['workers']}"]
    lines += ["# HELP labq_event_streams Open server-sent event streams.",
              "# TYPE labq_event_streams gauge",
              f"labq_event_streams {svc.streams.count('events')}",
              "# HELP labq_streams_open Open live streams (events and logs), all backend "
              "processes.",
              "# TYPE labq_streams_open gauge", f"labq_streams_open {len(svc.streams)}",
              "# HELP labq_streams_limit Most live streams the backend keeps open.",
              "# TYPE labq_streams_limit gauge", f"labq_streams_limit {svc.streams.limit}"]
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")
