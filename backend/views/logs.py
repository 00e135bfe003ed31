"""``/api/v1/jobs/<id>/log``: the combined log from a byte offset, or followed live (SSE)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from flask import Blueprint, Response, request

from labq.backend.params import whole_number
from labq.backend.scope import visible_job
from labq.backend.services import services
from labq.backend.sse import log_stream
from labq.backend.streams import sse_response

bp = Blueprint("logs", __name__, url_prefix="/api/v1/jobs")

CHUNK = 256 * 1024


def _offset() -> int:
    """``offset``, else Last-Event-ID (a reconnecting EventSource), else 0; a malformed
    one of either is a 400 even when the other is given."""
    resumed = whole_number(request.headers.get("Last-Event-ID"), "Last-Event-ID", default=0)
    return whole_number(request.args.get("offset"), "offset", default=resumed)


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
        return sse_response(svc.streams, lambda link: log_stream(svc, job_id, offset, link),
                            kind="logs")
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
