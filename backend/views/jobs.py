"""``/api/v1/jobs``: submit, list, read, and control jobs."""

from __future__ import annotations

import logging
from pathlib import PurePath
from typing import Any

from flask import Blueprint, Response, jsonify, request

from labq.backend import search
from labq.backend.auth import current_identity
from labq.backend.groups import create_sweep, group_summary, notify_url_of, publish_quietly
from labq.backend.jobfields import jobs_json
from labq.backend.registry import DEFAULT_LIMIT, MAX_LIMIT, job_to_json
from labq.backend.scope import owner_filter, visible_job
from labq.backend.services import services
from labq.backend.turns import turn
from labq.backend.uploads import StagedUpload
from labq.shared import sweep
from labq.shared.bundle import clean_name, inspect_bundle
from labq.shared.errors import (
    BadRequestError,
    BundleTooLargeError,
    ManifestError,
)
from labq.shared.lifecycle import user_allowed_targets

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs")

#: Form fields that override the bundle's labq.toml.
TEXT_OVERRIDES = ("name", "entrypoint")
INT_OVERRIDES = ("timeout_s", "memory_mb", "cpus")
MAX_KEY_LENGTH = 200


def form_overrides() -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for key in TEXT_OVERRIDES:
        value = request.form.get(key, "").strip()
        if value:
            overrides[key] = value
    for key in INT_OVERRIDES:
        value = request.form.get(key, "").strip()
        if not value:
            continue
        try:
            overrides[key] = int(value)
        except ValueError:
            raise ManifestError(f"{key} must be a whole number, got {value!r}",
                                field=key) from None
    return overrides


def submit_job() -> tuple[Response, int]:
    """Shared by ``POST /api/v1/jobs`` and NRP's ``POST /simulation``."""
    svc = services()
    key = request.headers.get("Idempotency-Key", "").strip() or None
    if key and len(key) > MAX_KEY_LENGTH:
        raise BadRequestError(f"Idempotency-Key is longer than {MAX_KEY_LENGTH} characters")
    upload = request.files.get("bundle")
    if upload is None or not isinstance(upload.stream, StagedUpload):
        raise BadRequestError(
            "send the bundle as a multipart/form-data file field named 'bundle'",
            field="bundle")
    staged: StagedUpload = upload.stream
    staged.flush()
    if staged.too_large:
        limit = svc.settings.max_upload_bytes
        raise BundleTooLargeError(
            f"the upload is larger than this server accepts ({limit / (1024 * 1024):.1f} "
            "MiB at most); leave data sets out of the bundle")
    with turn(request.environ):  # the whole body is here: the work takes its turn
        return _accept(svc, staged, upload.filename, key)


def _accept(svc: Any, staged: StagedUpload, filename: str | None, key: str | None
            ) -> tuple[Response, int]:
    """Check, store and queue an upload that has fully arrived."""
    owner = current_identity().name
    overrides = form_overrides()
    fallback = clean_name(PurePath(filename or "job").stem)
    info, spec = inspect_bundle(staged.path, svc.settings, fallback_name=fallback,
                                overrides=overrides)
    combos = sweep.combinations(info.manifest.get("sweep"), svc.settings.max_group_size)
    notify_url = notify_url_of(info, request.form.get("notify_url"), svc.settings)
    # A replay is checked like the upload it repeats: a key never makes an invalid
    # request succeed (the first one could not have made a job).
    if key and (existing := svc.registry.find_by_key(key, owner)) is not None:
        return _job_response(existing, 200)
    svc.storage.store_bundle(staged.path, staged.sha256)
    if combos:
        return _group_response(svc, info, spec, combos, staged, notify_url, key)
    job, created = svc.registry.create(name=info.name, spec=spec, bundle_sha256=staged.sha256,
                                       bundle_bytes=staged.size, idempotency_key=key,
                                       owner=owner,
                                       extra={"notify_url": notify_url} if notify_url else None)
    if not created:
        return _job_response(job, 200)
    if job["hold_reason"]:
        log.info("job %s (%s) of %s accepted and held: %s", job["id"], job["name"], owner,
                 job["hold_reason"])
        return _job_response(job, 201)
    job = publish_quietly(svc, job)
    log.info("job %s (%s) accepted, %d bytes", job["id"], job["name"], staged.size)
    return _job_response(job, 201)


def _group_response(svc: Any, info: Any, spec: Any, combos: list[dict[str, str]],
                    staged: StagedUpload, notify_url: str | None,
                    key: str | None) -> tuple[Response, int]:
    """A sweep upload: the first member's JSON plus the group (ids, size, links)."""
    members, created = create_sweep(svc, info, spec, combos, bundle_sha256=staged.sha256,
                                    bundle_bytes=staged.size, notify_url=notify_url,
                                    idempotency_key=key, owner=current_identity().name)
    first = members[0]
    resp, status = _job_response(first, 201 if created else 200)
    body = resp.get_json()
    group_id = first["group_id"]
    body["group"] = {**group_summary(group_id, members),
                     "job_ids": [m["id"] for m in members]}
    resp.set_data(jsonify(body).get_data())
    return resp, status


def _job_response(job: dict[str, Any], status: int) -> tuple[Response, int]:
    body = job_to_json(job)
    resp = jsonify(body)
    resp.headers["Location"] = body["links"]["self"]
    if status == 200:
        resp.headers["Idempotent-Replayed"] = "true"
    return resp, status


def int_arg(name: str, default: int | None = None, minimum: int = 0) -> int | None:
    raw = request.args.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"{name} must be a whole number, got {raw!r}", field=name) from None
    if value < minimum:
        raise BadRequestError(f"{name} must be at least {minimum}", field=name)
    return value


def list_jobs() -> tuple[list[dict[str, Any]], str | None]:
    if any(request.args.get(p) for p in search.PARAMS):
        limit = int_arg("limit", default=DEFAULT_LIMIT, minimum=1) or DEFAULT_LIMIT
        if limit > MAX_LIMIT:
            raise BadRequestError(f"limit must be between 1 and {MAX_LIMIT}", field="limit")
        rows, cursor = search.search(services().engine, request.args.to_dict(), limit,
                                     owner=owner_filter())
        return jobs_json(services(), rows), cursor
    rows, cursor = services().registry.list(
        state=request.args.get("state") or None, name=request.args.get("name") or None,
        limit=int_arg("limit", minimum=1), cursor=request.args.get("cursor") or None,
        owner=owner_filter())
    return jobs_json(services(), rows), cursor


def state_body(job: dict[str, Any]) -> dict[str, Any]:
    return {"id": job["id"], "state": job["state"], "requested_state": job["requested_state"],
            "outcome": job["outcome"], "allowed": user_allowed_targets(job["state"])}


def put_state(job_id: str) -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict) or not isinstance(data.get("state"), str):
        raise BadRequestError('send JSON like {"state": "paused"} (or "started", "stopped")',
                              field="state")
    svc = services()
    visible_job(job_id)  # another user's job is a 404 here too
    return svc.registry.request_state(job_id, data["state"], svc.publisher)


@bp.post("")
def create() -> tuple[Response, int]:
    return submit_job()


@bp.get("")
def index() -> Response:
    jobs, cursor = list_jobs()
    return jsonify({"jobs": jobs, "next_cursor": cursor})


@bp.get("/<job_id>")
def show(job_id: str) -> Response:
    svc = services()
    return jsonify(jobs_json(svc, [visible_job(job_id)])[0])


@bp.get("/<job_id>/state")
def get_state(job_id: str) -> Response:
    return jsonify(state_body(visible_job(job_id)))


@bp.put("/<job_id>/state")
def set_state(job_id: str) -> Response:
    return jsonify(job_to_json(put_state(job_id)))
