"""``/api/v1/events``: server-sent lifecycle changes (resumable) and live status ticks."""

from __future__ import annotations

from flask import Blueprint, Response, request, stream_with_context

from backend.services import services
from backend.sse import event_stream, latest_event_id
from shared.errors import BadRequestError

bp = Blueprint("events", __name__, url_prefix="/api/v1/events")


@bp.get("")
def stream() -> Response:
    svc = services()
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    if raw:
        try:
            after = int(raw)
        except ValueError:
            raise BadRequestError(f"Last-Event-ID must be a number, got {raw!r}") from None
    else:
        after = latest_event_id(svc)  # a new listener gets what happens from now on
    resp = Response(stream_with_context(event_stream(svc, after)),
                    mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp
