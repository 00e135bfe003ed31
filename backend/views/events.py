"""``/api/v1/events``: server-sent lifecycle changes (resumable) and live status ticks."""

from __future__ import annotations

from flask import Blueprint, Response, request

from labq.backend.scope import owner_filter
from labq.backend.services import services
from labq.backend.sse import event_stream, latest_event_id
from labq.backend.streams import sse_response
from labq.shared.errors import BadRequestError

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
    return sse_response(svc.streams, event_stream(svc, after, owner_filter()))
