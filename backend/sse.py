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

from backend.services import Services
from shared import db
from shared.lifecycle import is_terminal

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


def _new_events(svc: Services, after: int) -> list[Any]:
    with svc.engine.connect() as conn:
        return conn.execute(
            select(db.events.c.id, db.events.c.data)
            .where(db.events.c.id > after).order_by(db.events.c.id).limit(BATCH)
        ).all()


def event_stream(svc: Services, after: int) -> Iterator[str]:
    """Lifecycle rows of ``events`` after id ``after`` (with ids), then live status ticks."""
    last = after
    with svc.hub.subscribe() as inbox:
        yield "retry: 3000\n: connected\n\n"
        sent = time.monotonic()
        while not svc.stop.is_set():
            rows = _new_events(svc, last)
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
                if kind == "status":
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
