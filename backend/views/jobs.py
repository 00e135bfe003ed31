"""``/api/v1/jobs``: submit, list, read, and control jobs."""

from __future__ import annotations

import logging
from pathlib import PurePath
from typing import Any

from flask import Blueprint, Response, jsonify, request

from backend.registry import job_to_json
from backend.services import services
from backend.uploads import StagedUpload
from producer.jobs import publish_job
from shared.bundle import clean_name, inspect_bundle
from shared.errors import (
    BadRequestError,
    BrokerUnavailableError,
    BundleTooLargeError,
    ManifestError,
)
from shared.lifecycle import user_allowed_targets

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
    if key and (existing := svc.registry.find_by_key(key)) is not None:
        return _job_response(existing, 200)
    overrides = form_overrides()
    fallback = clean_name(PurePath(upload.filename or "job").stem)
    info, spec = inspect_bundle(staged.path, svc.settings, fallback_name=fallback,
                                overrides=overrides)
    svc.storage.store_bundle(staged.path, staged.sha256)
    job, created = svc.registry.create(name=info.name, spec=spec, bundle_sha256=staged.sha256,
                                       bundle_bytes=staged.size, idempotency_key=key)
    if not created:
        return _job_response(job, 200)
    try:
        publish_job(svc.engine, svc.publisher, job["id"])
    except BrokerUnavailableError as exc:
        # Accepted all the same: the outbox relay publishes it when the broker is back.
        log.warning("job %s stays created for now: %s", job["id"], exc.message)
    log.info("job %s (%s) accepted, %d bytes", job["id"], job["name"], staged.size)
    return _job_response(svc.registry.get(job["id"]), 201)


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
    rows, cursor = services().registry.list(
        state=request.args.get("state") or None, name=request.args.get("name") or None,
        limit=int_arg("limit", minimum=1), cursor=request.args.get("cursor") or None)
    return [job_to_json(r) for r in rows], cursor


def state_body(job: dict[str, Any]) -> dict[str, Any]:
    return {"id": job["id"], "state": job["state"], "requested_state": job["requested_state"],
            "outcome": job["outcome"], "allowed": user_allowed_targets(job["state"])}


def put_state(job_id: str) -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict) or not isinstance(data.get("state"), str):
        raise BadRequestError('send JSON like {"state": "paused"} (or "started", "stopped")',
                              field="state")
    svc = services()
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
    return jsonify(job_to_json(services().registry.get(job_id)))


@bp.get("/<job_id>/state")
def get_state(job_id: str) -> Response:
    return jsonify(state_body(services().registry.get(job_id)))


@bp.put("/<job_id>/state")
def set_state(job_id: str) -> Response:
    return jsonify(job_to_json(put_state(job_id)))
