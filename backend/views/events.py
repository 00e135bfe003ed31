"""``/api/v1/events``: server-sent lifecycle changes (resumable) and live status ticks."""

from __future__ import annotations

from flask import Blueprint, Response, request

from labq.backend.params import whole_number
from labq.backend.scope import owner_filter
from labq.backend.services import services
from labq.backend.sse import event_stream
from labq.backend.streams import sse_response

bp = Blueprint("events", __name__, url_prefix="/api/v1/events")


@bp.get("")
def stream() -> Response:
    svc = services()
    # The header (a reconnecting EventSource) wins; a malformed one of either is a 400.
    query = whole_number(request.args.get("last_event_id"), "last_event_id", default=-1)
    number = whole_number(request.headers.get("Last-Event-ID"), "Last-Event-ID",
                          default=query)
    after = number if number >= 0 else None  # None: what happens from now on
    owner = owner_filter()
    return sse_response(svc.streams, lambda link: event_stream(svc, after, owner, link))
