"""``/api/v1/jobs/<id>/log``: the combined log from a byte offset, or followed live (SSE)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from flask import Blueprint, Response, request

from labq.backend.scope import visible_job
from labq.backend.services import services
from labq.backend.sse import log_stream
from labq.backend.streams import sse_response
from labq.shared.errors import BadRequestError

bp = Blueprint("logs", __name__, url_prefix="/api/v1/jobs")

CHUNK = 256 * 1024


def _offset() -> int:
    raw = request.args.get("offset") or request.headers.get("Last-Event-ID") or "0"
    try:
        offset = int(raw)
    except ValueError:
        raise BadRequestError(f"offset must be a whole number, got {raw!r}",
                              field="offset") from None
    if offset < 0:
        raise BadRequestError("offset must be 0 or more", field="offset")
    return offset


def wants_stream() -> bool:
    return (request.accept_mimetypes.best == "text/event-stream"
            or "text/event-stream" in request.headers.get("Accept", "")
            or request.args.get("follow") in ("1", "true", "yes"))


@bp.get("/<job_id>/log")
def show(job_id: str) -> Response:
    svc = services()
    visible_job(job_id)  # 404 for an unknown job, and for another user's
    offset = _offset()
    path = svc.storage.log_path(job_id)
    opened = svc.storage.open_job_file(job_id, path.name)  # 404 if it is not a real file
    if wants_stream():
        if opened is not None:
            opened.close()
        return sse_response(svc.streams, log_stream(svc, job_id, offset))
    size = os.fstat(opened.fileno()).st_size if opened is not None else 0

    def body() -> Iterator[bytes]:
        if opened is None:
            return
        with opened as handle:
            if offset >= size:
                return
            handle.seek(offset)
            left = size - offset
            while left > 0 and (chunk := handle.read(min(CHUNK, left))):
                left -= len(chunk)
                yield chunk

    resp = Response(body(), mimetype="text/plain")
    resp.headers["X-Log-Size"] = str(size)
    resp.headers["Cache-Control"] = "no-cache"
    return resp
