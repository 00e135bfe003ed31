"""Server-sent events: framing, and the two streams (lifecycle events and a job's log).

Generators here hold one gunicorn thread each for as long as the client listens; they
end when the backend shuts down, and send a comment every ~15 s so a vanished client
is noticed (the write fails) and proxies keep the connection open.
"""

from __future__ import annotations

import codecs
import json
import queue
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import func, select

from labq.backend.services import Services
from labq.shared import db
from labq.shared.lifecycle import is_terminal

KEEPALIVE_S = 15.0
BATCH = 500
READ_CHUNK = 64 * 1024
POLL_S = 0.25


def frame(data: str, event: str | None = None, event_id: int | str | None = None) -> str:
    """One SSE message; multi-line data becomes several ``data:`` lines."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event:
        lines.append(f"event: {event}")
    text = data.replace("\r\n", "\n").replace("\r", "\n")
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return "\n".join(lines) + "\n\n"


def latest_event_id(svc: Services) -> int:
    with svc.engine.connect() as conn:
        return int(conn.execute(select(func.max(db.events.c.id))).scalar() or 0)


def _new_events(svc: Services, after: int, owner: str | None) -> list[Any]:
    query = (select(db.events.c.id, db.events.c.data)
             .where(db.events.c.id > after).order_by(db.events.c.id).limit(BATCH))
    if owner is not None:
        query = query.join(db.jobs, db.jobs.c.id == db.events.c.job_id) \
            .where(db.jobs.c.owner == owner)
    with svc.engine.connect() as conn:
        return conn.execute(query).all()


class _OwnerFilter:
    """Which live status ticks a stream may pass on: its owner's jobs only (a job's
    owner never changes, so each job is looked up once per stream)."""

    def __init__(self, svc: Services, owner: str | None) -> None:
        self.svc, self.owner = svc, owner
        self.known: dict[str, bool] = {}

    def allows(self, payload: Any) -> bool:
        if self.owner is None:
            return True
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        if not isinstance(job_id, str):
            return False
        if job_id not in self.known:
            if len(self.known) > 10_000:
                self.known.clear()
            with self.svc.engine.connect() as conn:
                found = conn.execute(select(db.jobs.c.owner)
                                     .where(db.jobs.c.id == job_id)).scalar()
            self.known[job_id] = found == self.owner
        return self.known[job_id]


def event_stream(svc: Services, after: int, owner: str | None = None) -> Iterator[str]:
    """Lifecycle rows of ``events`` after id ``after`` (with ids), then live status ticks;
    only of ``owner``'s jobs unless ``owner`` is None (admins)."""
    last = after
    ticks = _OwnerFilter(svc, owner)
    with svc.hub.subscribe() as inbox:
        yield "retry: 3000\n: connected\n\n"
        sent = time.monotonic()
        while not svc.stop.is_set():
            rows = _new_events(svc, last, owner)
            for row in rows:
                last = row.id
                yield frame(row.data, event="lifecycle", event_id=row.id)
            if rows:
                sent = time.monotonic()
                if len(rows) == BATCH:
                    continue
            try:
                kind, payload = inbox.get(timeout=1.0)
            except queue.Empty:
                kind, payload = "", None
            while kind:
                if kind == "status" and ticks.allows(payload):
                    yield frame(json.dumps(payload), event="status")
                    sent = time.monotonic()
                try:
                    kind, payload = inbox.get_nowait()
                except queue.Empty:
                    kind = ""
            if time.monotonic() - sent > KEEPALIVE_S:
                yield ": keep-alive\n\n"
                sent = time.monotonic()


def _read(svc: Services, job_id: str, offset: int) -> bytes:
    handle = svc.storage.open_job_file(job_id, svc.storage.log_path(job_id).name)
    if handle is None:
        return b""
    with handle:
        handle.seek(offset)
        return handle.read(READ_CHUNK)


def log_stream(svc: Services, job_id: str, offset: int) -> Iterator[str]:
    """Follow a job's log from byte ``offset``; ``event: end`` once it ended and all is sent.

    ``id:`` is the byte offset reached, so a reconnecting EventSource resumes there.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    position = offset
    yield "retry: 3000\n: following\n\n"
    sent = time.monotonic()
    while not svc.stop.is_set():
        data = _read(svc, job_id, position)
        if data:
            position += len(data)
            text = decoder.decode(data)
            if text:
                yield frame(text, event_id=position)
                sent = time.monotonic()
            continue
        # Check the state before the last read: whatever the worker wrote before its
        # final event was applied is on disk by then.
        if is_terminal(svc.registry.get(job_id)["state"]):
            data = _read(svc, job_id, position)
            if data:
                continue
            tail = decoder.decode(b"", final=True)
            if tail:
                yield frame(tail, event_id=position)
            yield frame(json.dumps({"size": position}), event="end", event_id=position)
            return
        if time.monotonic() - sent > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            sent = time.monotonic()
        svc.stop.wait(POLL_S)
