"""Server-sent events: framing, and the two streams (lifecycle events and a job's log).

A stream waits on its inbox in the :class:`Hub` and sends what arrives; it never polls
the database (the feed and the log watcher do that once for every stream). It ends when
its client goes away (the inbox is closed by the connection watcher, backend/streams.py)
or the backend stops, and sends a comment every ~15 s so proxies keep it open.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any

from labq.backend.feed import BATCH, latest_event_id, read_events
from labq.backend.hub import frame
from labq.backend.services import Services
from labq.shared.lifecycle import is_terminal

KEEPALIVE_S = 15.0
READ_CHUNK = 64 * 1024
HELLO = "retry: 3000\n: connected\n\n"


def _backlog(svc: Services, after: int, upto: int, owner: str | None) -> Iterator[dict[str, Any]]:
    """Rows in (after, upto] from the database: a resuming client's missed events."""
    while after < upto:
        rows = read_events(svc.engine, after, upto=upto, owner=owner)
        yield from rows
        if len(rows) < BATCH:
            return
        after = rows[-1]["id"]


def event_stream(svc: Services, after: int | None, owner: str | None = None,
                 link: Any = None) -> Iterator[str]:
    """Lifecycle events after id ``after`` (None: from now on), then live ones and status
    ticks; only of ``owner``'s jobs unless ``owner`` is None (admins)."""
    with svc.hub.subscribe(owner=owner) as (sub, position):
        if link is not None:
            link.on_gone(sub.close)
        if after is None:
            # The feed may be a poll behind the database: "now" is the newest row.
            after = max(position, latest_event_id(svc.engine))
        yield HELLO
        for row in _backlog(svc, after, position, owner):
            yield frame(row["data"], event="lifecycle", event_id=row["id"])
        # Everything up to here was sent; the inbox has what came after ``position``.
        floor = max(after, position)
        while not sub.closed and not svc.stop.is_set():
            if sub.lagged:
                # It fell behind: what it dropped is in the database.
                upto = svc.hub.catch_up(sub)
                for row in _backlog(svc, floor, upto, owner):
                    yield frame(row["data"], event="lifecycle", event_id=row["id"])
                floor = max(floor, upto)
            items = sub.wait(KEEPALIVE_S)
            if not items:
                if not sub.closed:
                    yield ": keep-alive\n\n"
                continue
            chunks = []
            for kind, payload in items:
                if kind == "status":
                    chunks.append(payload)  # the frame, ready
                elif kind == "lifecycle" and payload["id"] > floor:
                    chunks.append(payload["frame"])
            if chunks:
                yield "".join(chunks)


def _read(svc: Services, job_id: str, offset: int) -> bytes:
    handle = svc.storage.open_job_file(job_id, svc.storage.log_path(job_id).name)
    if handle is None:
        return b""
    with handle:
        handle.seek(offset)
        return handle.read(READ_CHUNK)


def _ended(items: list[tuple[str, Any]]) -> bool:
    return any(kind == "ended" or (kind == "lifecycle" and is_terminal(payload["state"]))
               for kind, payload in items)


def _read_all(svc: Services, job_id: str, offset: int) -> Iterator[bytes]:
    """The log from ``offset`` to its end now, a chunk at a time."""
    while data := _read(svc, job_id, offset):
        offset += len(data)
        yield data


def _shared_bytes(items: list[tuple[str, Any]], position: int) -> bytes:
    """What the log watcher read for every follower, when it continues exactly where
    this stream is; b"" (read the file instead) when anything does not fit."""
    data = b""
    for kind, payload in items:
        if kind != "log":
            continue
        if payload is None or payload[0] != position + len(data):
            return b""
        data += payload[1]
    return data


def log_stream(svc: Services, job_id: str, offset: int, link: Any = None) -> Iterator[str]:
    """Follow a job's log from byte ``offset``; ``event: end`` once it ended and all is sent.

    ``id:`` is the byte offset reached, so a reconnecting EventSource resumes there.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    position = offset
    with svc.hub.subscribe(job_id=job_id) as (sub, _):
        if link is not None:
            link.on_gone(sub.close)
        # Subscribed first, then the state: an end after this read is in the inbox.
        ended = is_terminal(svc.registry.get(job_id)["state"])
        yield HELLO
        shared: bytes = b""  # bytes the log watcher read for every follower
        while not sub.closed and not svc.stop.is_set():
            # The watcher's read when it starts here; else (and at the end: whatever the
            # worker wrote before its final event is on disk by now) the file itself.
            chunks = [shared] if shared and not ended else _read_all(svc, job_id, position)
            for data in chunks:
                position += len(data)
                if text := decoder.decode(data):
                    yield frame(text, event_id=position)
            if ended:
                if tail := decoder.decode(b"", final=True):
                    yield frame(tail, event_id=position)
                yield frame(json.dumps({"size": position}), event="end", event_id=position)
                return
            items = sub.wait(KEEPALIVE_S)
            if not items and not sub.closed:
                yield ": keep-alive\n\n"
            ended = _ended(items)
            shared = _shared_bytes(items, position)
