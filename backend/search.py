"""Listing and finding jobs: filters, sorting, and keyset pages that cost the same on page
1,000 as on page 1.

``GET /api/v1/jobs?q=osc&outcome=error&since=2024-05-01&sort=-duration``: substring
search on names (any case), outcome, state, exact name, sweep group, creation dates; the
plain listing (newest first) is the same query without filters. Every page is read
through an index in the sort's order (``created_at, id``; for durations ``run_s, id``)
and the cursor is the last row's sort key, never an offset.

Sorting by duration uses the run time (pauses excluded) of jobs whose script ran, in
that order; jobs that never ran follow, in id order (descending for ``-duration``). The
cursor says which of the two parts the page ended in.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Select, and_, or_, select

from labq.shared import db
from labq.shared.errors import BadRequestError
from labq.shared.lifecycle import Outcome, State

PARAMS = ("q", "outcome", "since", "until", "sort", "group")
SORTS = ("created", "-created", "duration", "-duration")
MAX_Q = 200
J = db.jobs.c


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


def encode_cursor(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, size: int) -> list[Any]:
    """The sort key a cursor carries (``size`` values, the last one a job id)."""
    try:
        key = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(key, list) or len(key) != size or not isinstance(key[-1], str) \
                or any(isinstance(v, bool) for v in key):
            raise ValueError(cursor)
        return [None if v is None else float(v) if i < size - 1 else v
                for i, v in enumerate(key)]
    except (ValueError, TypeError) as exc:
        raise BadRequestError("cursor is not one this server gave out", field="cursor") from exc


def _one_of(param: str, value: str, kinds: type[Outcome] | type[State]) -> str:
    """``value`` if it names a member of ``kinds``, else a 400 listing them."""
    allowed = [k.value for k in kinds]
    if value not in allowed:
        raise BadRequestError(f"unknown {param} {value!r}; use one of {', '.join(allowed)}",
                              field=param)
    return value


def _filtered(args: dict[str, str], owner: str | None) -> Select:
    query = select(db.jobs)
    if owner:
        query = query.where(J.owner == owner)
    q = (args.get("q") or "").strip()
    if len(q) > MAX_Q:
        raise BadRequestError(f"q is longer than {MAX_Q} characters", field="q")
    if q:
        query = query.where(J.name.ilike(_like(q), escape="\\"))
    for param, column, kinds in (("outcome", J.outcome, Outcome), ("state", J.state, State)):
        if value := args.get(param):
            query = query.where(column == _one_of(param, value, kinds))
    for param, column in (("name", J.name), ("group", J.group_id)):
        if value := args.get(param):
            query = query.where(column == value)
    if since := args.get("since"):
        query = query.where(J.created_at >= parse_time("since", since))
    if until := args.get("until"):
        query = query.where(J.created_at < parse_time("until", until))
    return query


def _by_created(query: Select, descending: bool, cursor: str | None, limit: int
                ) -> Select:
    if cursor:
        created, last_id = decode_cursor(cursor, 2)
        if descending:
            query = query.where(or_(J.created_at < created,
                                    and_(J.created_at == created, J.id < last_id)))
        else:
            query = query.where(or_(J.created_at > created,
                                    and_(J.created_at == created, J.id > last_id)))
    order = (J.created_at.desc(), J.id.desc()) if descending else (J.created_at, J.id)
    return query.order_by(*order).limit(limit)


def _ran(query: Select, descending: bool, after: tuple[float, str] | None, limit: int
         ) -> Select:
    """Jobs that ran, by run time (the first part of a duration sort)."""
    query = query.where(J.run_s.is_not(None))
    if after is not None:
        run_s, last_id = after
        ahead = (J.run_s < run_s) if descending else (J.run_s > run_s)
        tie = (J.id < last_id) if descending else (J.id > last_id)
        query = query.where(or_(ahead, and_(J.run_s == run_s, tie)))
    order = (J.run_s.desc(), J.id.desc()) if descending else (J.run_s, J.id)
    return query.order_by(*order).limit(limit)


def _never_ran(query: Select, descending: bool, last_id: str | None, limit: int) -> Select:
    query = query.where(J.run_s.is_(None))
    if last_id is not None:
        query = query.where(J.id < last_id if descending else J.id > last_id)
    return query.order_by(J.id.desc() if descending else J.id).limit(limit)


def _page_by_duration(engine: Engine, query: Select, descending: bool, cursor: str | None,
                      limit: int) -> tuple[list[dict[str, Any]], str | None]:
    part, run_s, last_id = decode_cursor(cursor, 3) if cursor else (0.0, None, None)
    if part == 0 and last_id is not None and run_s is None:
        raise BadRequestError("cursor is not one this server gave out", field="cursor")
    rows: list[dict[str, Any]] = []
    with db.read(engine) as conn:
        if part == 0:
            after = (run_s, last_id) if last_id is not None else None
            rows = db.dicts(conn.execute(_ran(query, descending, after, limit + 1)))
            last_id = None
        if len(rows) <= limit:
            rows += db.dicts(conn.execute(
                _never_ran(query, descending, last_id, limit + 1 - len(rows))))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    key = [0, last["run_s"], last["id"]] if last["run_s"] is not None else \
        [1, None, last["id"]]
    return rows[:limit], encode_cursor(key)


def search(engine: Engine, args: dict[str, str], limit: int, owner: str | None = None
           ) -> tuple[list[dict[str, Any]], str | None]:
    """One page of jobs and the cursor of the next (None: no more); ``owner``: only that
    user's jobs (the caller's scope, backend/scope.py)."""
    query = _filtered(args, owner)
    sort = args.get("sort") or "-created"
    if sort not in SORTS:
        raise BadRequestError(f"sort must be one of {', '.join(SORTS)}", field="sort")
    cursor = args.get("cursor") or None
    if sort.endswith("duration"):
        return _page_by_duration(engine, query, sort.startswith("-"), cursor, limit)
    with db.read(engine) as conn:
        rows = db.dicts(conn.execute(
            _by_created(query, sort.startswith("-"), cursor, limit + 1)))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor([last["created_at"], last["id"]])
