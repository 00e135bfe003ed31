"""``/api/v1/groups/<id>`` (a sweep's members and one zip of all results) and
``POST /api/v1/jobs/<id>/rerun``."""

from __future__ import annotations

import tempfile
import zipfile
from typing import Any

from flask import Blueprint, Response, jsonify, request, send_file

from labq.backend.auth import current_identity
from labq.backend.groups import create_rerun, group_summary
from labq.backend.jobfields import jobs_json
from labq.backend.scope import visible_group, visible_job
from labq.backend.services import services
from labq.shared.errors import BadRequestError, NotFoundError
from labq.shared.storage import Storage

bp = Blueprint("groups", __name__)
INTEGER_FIELDS = ("timeout_s", "memory_mb", "cpus", "max_output_mb")


@bp.get("/api/v1/groups/<group_id>")
def show(group_id: str) -> Response:
    svc = services()
    rows = visible_group(group_id)
    return jsonify({**group_summary(group_id, rows), "jobs": jobs_json(svc, rows)})


def _add_results(zf: zipfile.ZipFile, storage: Storage, job_id: str, prefix: str) -> int:
    """Add the job's result files, streamed from storage; returns how many."""
    count = 0
    for relative, listed in storage.result_files(job_id):
        blob = storage.blobs.open(listed.key)
        if blob is None:  # removed since it was listed
            continue
        with blob, zf.open(f"{prefix}/{relative}", "w", force_zip64=True) as out:
            for chunk in blob.chunks():
                out.write(chunk)
        count += 1
    return count


@bp.get("/api/v1/groups/<group_id>/results")
def results(group_id: str) -> Response:
    """One zip: a folder per member (``<short id>-<name>/``) holding its output/."""
    svc = services()
    rows = visible_group(group_id)
    handle = tempfile.TemporaryFile(dir=svc.storage.root)  # noqa: SIM115 - sent, then closed
    with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        count = sum(_add_results(zf, svc.storage, r["id"],
                                 f"{r['id'][:8]}-{r['name']}".replace("/", "_"))
                    for r in rows if r["state"] == "stopped")
    if not count:
        handle.close()
        raise NotFoundError(f"no job of group {group_id} has left results yet",
                            group_id=group_id)
    handle.seek(0)
    name = group_summary(group_id, rows)["name"]
    return send_file(handle, mimetype="application/zip", as_attachment=True,
                     download_name=f"{name}-{group_id[:8]}-results.zip", max_age=0)


def _json_integers(overrides: Any) -> Any:
    """JSON has one kind of number: ``5.0`` is the whole number 5 (as JSON Schema, and
    the OpenAPI document, count it), so a limit given that way is taken as 5."""
    if not isinstance(overrides, dict):
        return overrides
    return {k: int(v) if k in INTEGER_FIELDS and isinstance(v, float) and v.is_integer()
            else v for k, v in overrides.items()}


@bp.post("/api/v1/jobs/<job_id>/rerun")
def rerun(job_id: str) -> tuple[Response, int]:
    svc = services()
    overrides = None
    if request.get_data():
        overrides = request.get_json(silent=True, force=True)
        if overrides is None:
            raise BadRequestError('send JSON like {"args": ["--lr=0.1"]}, or an empty body')
        overrides = _json_integers(overrides)
    job = create_rerun(svc, visible_job(job_id), overrides, owner=current_identity().name)
    body = jobs_json(svc, [job])[0]
    resp = jsonify(body)
    resp.headers["Location"] = body["links"]["self"]
    return resp, 201
