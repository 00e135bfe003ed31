"""The in-process fan-out of live news to the open server-sent event streams.

One feed (backend/feed.py) reads new lifecycle events from the database, the status
broadcaster hands over live status ticks, and the log watcher (backend/logwatch.py) says
when a followed log grew or its job ended; the hub passes each item only to the streams
that may see it: an event stream of a user gets that user's jobs, an admin's everyone's
(or one ``?owner=``'s), a log stream its one job. No stream queries anything to learn
what happened.

Each item carries its SSE frame, rendered once for every stream that gets it, and a
log's new bytes are read once for every stream following it (backend/logwatch.py).
Publishing never blocks and costs one append per matching stream. Each stream's inbox
is bounded: a stream that falls behind (a client that stopped reading) loses status
ticks, which are transient, and is marked ``lagged`` for lifecycle events, which it then
reads back from the database itself, once, from where it was.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: Items a stream may have waiting before it counts as lagging.
INBOX_SIZE = 512

Item = tuple[str, Any]


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


class Subscriber:
    """One open stream's inbox: ``(kind, payload)`` items, and whether it must end."""

    def __init__(self, owner: str | None, job_id: str | None) -> None:
        self.owner = owner
        self.job_id = job_id
        self.lagged = False
        self.closed = False
        self._items: deque[Item] = deque()
        self._ready = threading.Event()

    def put(self, item: Item) -> None:
        if len(self._items) >= INBOX_SIZE:
            if item[0] == "lifecycle":
                self.lagged = True
            return
        self._items.append(item)
        self._ready.set()

    def wait(self, timeout: float) -> list[Item]:
        """Everything waiting, or (after up to ``timeout`` s) nothing; [] once closed."""
        if not self._items and not self.closed:
            self._ready.wait(timeout)
        self._ready.clear()
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items

    def close(self) -> None:
        """The client went away or the server stops: wake the stream so it ends."""
        self.closed = True
        self._ready.set()

    def clear(self) -> None:
        self._items.clear()
        self.lagged = False


class Hub:
    """Who listens to what, and delivery to them. ``owner_of`` names a job's owner (for
    status ticks, which do not carry it)."""

    def __init__(self, owner_of: Callable[[str], str | None] | None = None) -> None:
        self._lock = threading.Lock()
        self._everyone: set[Subscriber] = set()
        self._by_owner: dict[str, set[Subscriber]] = {}
        self._by_job: dict[str, set[Subscriber]] = {}
        self._owner_of = owner_of or (lambda _job_id: None)
        #: Id of the newest lifecycle event handed out (the feed moves it forward).
        self.position = 0
        #: Set when a local writer applied an event, so the feed reads without waiting.
        self.news = threading.Event()
        self._closed = False

    # -- streams ------------------------------------------------------------------------
    @contextmanager
    def subscribe(self, *, owner: str | None = None, job_id: str | None = None
                  ) -> Iterator[tuple[Subscriber, int]]:
        """Listen to one job (a log stream), to ``owner``'s jobs, or (neither: an admin)
        to everyone's; yields the inbox and the event position from which it receives
        every lifecycle event."""
        sub = Subscriber(owner, job_id)
        with self._lock:
            if self._closed:
                sub.close()
            self._index(sub, create=True).add(sub)
            position = self.position
        try:
            yield sub, position
        finally:
            with self._lock:
                index = self._index(sub, create=False)
                index.discard(sub)
                if not index and index is not self._everyone:
                    # No empty sets left behind for every job ever followed.
                    if sub.job_id is not None:
                        self._by_job.pop(sub.job_id, None)
                    else:
                        self._by_owner.pop(sub.owner or "", None)

    def _index(self, sub: Subscriber, create: bool) -> set[Subscriber]:
        if sub.job_id is not None:
            table, key = self._by_job, sub.job_id
        elif sub.owner is not None:
            table, key = self._by_owner, sub.owner
        else:
            return self._everyone
        return table.setdefault(key, set()) if create else table.get(key, set())

    def catch_up(self, sub: Subscriber) -> int:
        """A lagged stream drops its inbox and reads the database up to the position
        returned; from there its inbox is complete again."""
        with self._lock:
            sub.clear()
            return self.position

    # -- news -----------------------------------------------------------------------------
    def publish_lifecycle(self, rows: list[dict[str, Any]]) -> None:
        """New ``events`` rows (``id``, ``job_id``, ``owner``, ``state``, ``data``), oldest
        first, to the streams that may see them."""
        with self._lock:
            for row in rows:
                self.position = max(self.position, row["id"])
                row["frame"] = frame(row["data"], event="lifecycle", event_id=row["id"])
                item = ("lifecycle", row)
                for sub in self._targets(row["owner"], row["job_id"]):
                    sub.put(item)

    def publish_status(self, payload: dict[str, Any]) -> None:
        """A live status tick (event streams only: a log stream has no use for it)."""
        job_id = payload.get("job_id")
        if not isinstance(job_id, str):
            return
        owner = self._owner_of(job_id)
        item = ("status", frame(json.dumps(payload), event="status"))
        with self._lock:
            for sub in self._targets(owner, None):
                sub.put(item)

    def publish_job(self, job_id: str, kind: str, payload: Any = None) -> None:
        """News for the streams of one job: ``log`` (it grew; ``payload`` the new bytes
        and where they start, when read) or ``ended``."""
        with self._lock:
            for sub in self._by_job.get(job_id, ()):
                sub.put((kind, payload))

    def _targets(self, owner: str | None, job_id: str | None) -> Iterator[Subscriber]:
        yield from self._everyone
        if owner is not None:
            yield from self._by_owner.get(owner, ())
        if job_id is not None:
            yield from self._by_job.get(job_id, ())

    def wake(self) -> None:
        """A local writer applied an event: the feed reads at once instead of at its next
        poll."""
        self.news.set()

    def followed_jobs(self) -> list[str]:
        with self._lock:
            return list(self._by_job)

    def close_all(self) -> None:
        """The server stops: every stream ends, and new ones end at once."""
        with self._lock:
            self._closed = True
            subs = [*self._everyone, *(s for group in self._by_owner.values() for s in group),
                    *(s for group in self._by_job.values() for s in group)]
        for sub in subs:
            sub.close()

    def __len__(self) -> int:
        """Open event streams (log streams not counted)."""
        with self._lock:
            return len(self._everyone) + sum(len(s) for s in self._by_owner.values())
