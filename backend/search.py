"""Finding jobs: substring search on names, filters by outcome and date, sorting.

``GET /api/v1/jobs?q=osc&outcome=error&since=2024-05-01&sort=-duration``. The plain
listing (newest first, keyset cursor) stays in the registry; any of these parameters
routes the listing here. Sorting by duration uses the run time (pauses excluded) of
jobs whose script ran; others sort last. The cursor is an opaque offset.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select

from labq.shared import db
from labq.shared.errors import BadRequestError
from labq.shared.lifecycle import Outcome, State

PARAMS = ("q", "outcome", "since", "until", "sort", "group")
SORTS = {
    "created": (db.jobs.c.created_at.asc(), db.jobs.c.id.asc()),
    "-created": (db.jobs.c.created_at.desc(), db.jobs.c.id.desc()),
    "duration": (db.jobs.c.run_s.is_(None), db.jobs.c.run_s.asc(), db.jobs.c.id.asc()),
    "-duration": (db.jobs.c.run_s.is_(None), db.jobs.c.run_s.desc(), db.jobs.c.id.desc()),
}
MAX_Q = 200


def parse_time(name: str, raw: str) -> float:
    """An ISO date or date-time (UTC unless it says otherwise) as a Unix time."""
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequestError(f"{name} must be a date like 2024-05-01 or 2024-05-01T12:00:00Z,"
                              f" got {raw!r}", field=name) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        offset = int(data["o"])
        if offset < 0:
            raise ValueError(offset)
        return offset
    except (ValueError, TypeError, KeyError) as exc:
        raise BadRequestError("cursor is not one this server gave out", field="cursor") from exc


def search(engine: Engine, args: dict[str, str], limit: int, owner: str | None = None
           ) -> tuple[list[dict[str, Any]], str | None]:
    """``owner``: only that user's jobs (the caller's scope, backend/scope.py)."""
    query = select(db.jobs)
    if owner:
        query = query.where(db.jobs.c.owner == owner)
    q = (args.get("q") or "").strip()
    if len(q) > MAX_Q:
        raise BadRequestError(f"q is longer than {MAX_Q} characters", field="q")
    if q:
        query = query.where(db.jobs.c.name.ilike(_like(q), escape="\\"))
    if outcome := args.get("outcome"):
        if outcome not in {o.value for o in Outcome}:
            raise BadRequestError(f"unknown outcome {outcome!r}; use one of "
                                  f"{', '.join(o.value for o in Outcome)}", field="outcome")
        query = query.where(db.jobs.c.outcome == outcome)
    if state := args.get("state"):
        if state not in {s.value for s in State}:
            raise BadRequestError(f"unknown state {state!r}", field="state")
        query = query.where(db.jobs.c.state == state)
    if name := args.get("name"):
        query = query.where(db.jobs.c.name == name)
    if group := args.get("group"):
        query = query.where(db.jobs.c.group_id == group)
    if since := args.get("since"):
        query = query.where(db.jobs.c.created_at >= parse_time("since", since))
    if until := args.get("until"):
        query = query.where(db.jobs.c.created_at < parse_time("until", until))
    sort = args.get("sort") or "-created"
    if sort not in SORTS:
        raise BadRequestError(f"sort must be one of {', '.join(SORTS)}", field="sort")
    offset = _offset(args.get("cursor"))
    query = query.order_by(*SORTS[sort]).offset(offset).limit(limit + 1)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
    more = len(rows) > limit
    cursor = None
    if more:
        raw = json.dumps({"o": offset + limit}).encode()
        cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return rows[:limit], cursor
