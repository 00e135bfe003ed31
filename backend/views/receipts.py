"""``/api/v1/jobs/<id>/receipt`` and ``/usage``: what exactly ran, and how it used the host.

The receipt names everything needed to reproduce a run: the bundle's sha256, the
entrypoint, arguments, environment variables and limits, the exact package set of the
environment (``uv pip freeze`` recorded by the worker, not the requirements), the Python
and labq versions, the worker, the timestamps, the exit code and the sha256 of every
result file. The worker writes ``environment.json`` and ``usage.json`` beside the outcome.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, jsonify

from labq.backend.registry import iso
from labq.backend.scope import visible_job
from labq.backend.services import services
from labq.shared import db
from labq.shared.blobstore import content_sha256
from labq.shared.durations import durations
from labq.shared.errors import NotFoundError
from labq.shared.storage import Storage

bp = Blueprint("receipts", __name__, url_prefix="/api/v1/jobs")

RECEIPT_VERSION = 1


def read_job_json(storage: Storage, job_id: str, name: str) -> dict[str, Any] | None:
    handle = storage.open_job_file(job_id, name)
    if handle is None:
        return None
    with handle:
        try:
            data = json.loads(handle.read())
        except ValueError:
            return None
    return data if isinstance(data, dict) else None


def result_hashes(storage: Storage, job_id: str) -> list[dict[str, Any]]:
    """sha256 and size of every result file: the sha256 the worker recorded when it
    stored the file in an object store, else (the volume) hashed from the content."""
    found = []
    for relative, listed in storage.result_files(job_id):
        info = listed if storage.on_volume else storage.blobs.info(listed.key)
        sha = info.sha256 if info is not None else None
        if sha is None:
            sha = content_sha256(storage.blobs, listed.key)
        if sha is not None:  # None: removed since it was listed
            found.append({"path": relative, "size": listed.size, "sha256": sha})
    return found


def build_receipt(storage: Storage, row: dict[str, Any]) -> dict[str, Any]:
    spec = json.loads(row["spec"])
    env = read_job_json(storage, row["id"], "environment.json") or {}
    ended = row["state"] in ("stopped", "failed")
    return {
        "receipt_version": RECEIPT_VERSION,
        "job_id": row["id"],
        "name": row["name"],
        "bundle_sha256": row["bundle_sha256"],
        "entrypoint": spec.get("entrypoint"),
        "args": spec.get("args", []),
        "env": spec.get("env", {}),
        "limits": {k: spec.get(k) for k in ("timeout_s", "memory_mb", "cpus",
                                            "max_output_bytes")},
        "environment": {"python": env.get("python"), "env_key": env.get("env_key"),
                        "packages": env.get("packages")},
        "worker": row["worker"],
        "worker_host": env.get("worker_host"),
        "labq_version": env.get("labq_version"),
        "rerun_of": row.get("rerun_of"),
        "group_id": row.get("group_id"),
        "timestamps": {column: iso(row[column]) for column in db.STATE_TIMESTAMPS.values()},
        "durations": durations(row),
        "state": row["state"],
        "outcome": row["outcome"],
        "exit_code": row["exit_code"],
        "peak_rss_mb": row.get("peak_rss_mb"),
        "cpu_s": row.get("cpu_s"),
        "results": result_hashes(storage, row["id"]) if ended else [],
        "complete": ended and bool(env),
    }


@bp.get("/<job_id>/receipt")
def receipt(job_id: str) -> Response:
    svc = services()
    return jsonify(build_receipt(svc.storage, visible_job(job_id)))


@bp.get("/<job_id>/usage")
def usage(job_id: str) -> Response:
    svc = services()
    job = visible_job(job_id)
    data = read_job_json(svc.storage, job_id, "usage.json")
    if data is None:
        raise NotFoundError(f"job {job_id} has no usage samples (it is {job['state']}); "
                            "they are stored when the job ends; live samples come as "
                            "status events", job_id=job_id)
    return jsonify({"job_id": job_id, **data})
