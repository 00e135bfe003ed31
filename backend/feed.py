"""The one reader of new lifecycle events: a backend thread feeding every open stream.

It reads the ``events`` rows after the last one it saw (with each job's owner, in the
same query) whenever a local writer says there is news, and every ``POLL_S`` anyway for
the events other backend processes applied, and hands them to the :class:`Hub`. A
thousand open streams cost this one query, not a thousand.

On PostgreSQL, ids come from a sequence and two transactions may commit out of order:
an id skipped over may still appear. Skipped ids are looked for again for ``GAP_S``
(and then given up: a rolled-back insert leaves a gap for good).

:class:`Owners` remembers whose each job is, for status ticks (which carry only the job
id): one lookup per job, shared by every stream.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import Engine, func, select

from labq.backend.hub import Hub
from labq.shared import db
from labq.shared.lru import MISSING, Lru

log = logging.getLogger(__name__)

POLL_S = 0.25
#: Least time between two reads: a burst of news (a hundred events a second from busy
#: workers) is read in a few queries, not one each; the first news is read at once.
COALESCE_S = 0.02
BATCH = 500
GAP_S = 10.0
MAX_GAPS = 1000


def read_events(engine: Engine, after: int, upto: int | None = None,
                owner: str | None = None, ids: list[int] | None = None,
                limit: int = BATCH) -> list[dict[str, Any]]:
    """``events`` rows after id ``after`` (up to ``upto``; or exactly ``ids``), oldest
    first, each with its job's owner; only ``owner``'s jobs unless None."""
    e, j = db.events, db.jobs
    query = (select(e.c.id, e.c.job_id, e.c.state, e.c.data, j.c.owner)
             .select_from(e.outerjoin(j, j.c.id == e.c.job_id)))
    if ids is not None:
        query = query.where(e.c.id.in_(ids))
    else:
        query = query.where(e.c.id > after)
        if upto is not None:
            query = query.where(e.c.id <= upto)
    if owner is not None:
        query = query.where(j.c.owner == owner)
    query = query.order_by(e.c.id).limit(limit)
    with db.read(engine) as conn:
        return db.dicts(conn.execute(query))


def latest_event_id(engine: Engine) -> int:
    with db.read(engine) as conn:
        return int(conn.execute(select(func.max(db.events.c.id))).scalar() or 0)


class Owners:
    """Job id → owner, looked up once per job (an owner never changes)."""

    def __init__(self, engine: Engine, size: int = 20_000) -> None:
        self.engine = engine
        self._known: Lru[str, str | None] = Lru(size)

    def remember(self, job_id: str, owner: str | None) -> None:
        self._known.put(job_id, owner)

    def __call__(self, job_id: str) -> str | None:
        known = self._known.get(job_id, MISSING)
        if known is not MISSING:
            return known  # type: ignore[return-value]
        with db.read(self.engine) as conn:
            owner = conn.execute(select(db.jobs.c.owner).where(db.jobs.c.id == job_id)).scalar()
        self.remember(job_id, owner)
        return owner


class EventFeed(threading.Thread):
    def __init__(self, engine: Engine, hub: Hub, owners: Owners, stop: threading.Event,
                 poll_s: float = POLL_S) -> None:
        super().__init__(name="labq-feed", daemon=True)
        self.engine = engine
        self.hub = hub
        self.owners = owners
        self.stop_event = stop
        self.poll_s = poll_s
        #: Skipped ids still looked for, with when to give up on each.
        self.gaps: dict[int, float] = {}

    def start_at_latest(self) -> None:
        """Begin after the newest event (called before the first request is served, so a
        new stream's position is right from the start)."""
        self.hub.position = latest_event_id(self.engine)

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.hub.news.wait(self.poll_s)
                self.hub.news.clear()
                try:
                    self.poll()
                except Exception:  # noqa: BLE001 - the database may be away a while
                    log.warning("event feed: reading new events failed; retrying",
                                exc_info=True)
                    self.stop_event.wait(1.0)
                self.stop_event.wait(COALESCE_S)
        finally:
            self.hub.close_all()  # shutdown: every open stream ends now
            log.info("event feed: stopped")

    def poll(self) -> int:
        """Hand every new event to the hub; returns how many."""
        rows: list[dict[str, Any]] = []
        if self.gaps:
            rows += self._found_gaps()
        while True:
            batch = read_events(self.engine, self.hub.position)
            self._note_gaps(batch)
            rows += batch
            self._publish(rows)
            rows = []
            if len(batch) < BATCH:
                return len(batch)

    def _publish(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        for row in rows:
            self.owners.remember(row["job_id"], row["owner"])
        self.hub.publish_lifecycle(rows)

    def _note_gaps(self, batch: list[dict[str, Any]]) -> None:
        expected = self.hub.position + 1
        until = time.monotonic() + GAP_S
        for row in batch:
            for missing in range(expected, row["id"]):
                if len(self.gaps) < MAX_GAPS:
                    self.gaps[missing] = until
            expected = row["id"] + 1

    def _found_gaps(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        self.gaps = {i: t for i, t in self.gaps.items() if t > now}
        if not self.gaps:
            return []
        found = read_events(self.engine, 0, ids=list(self.gaps), limit=MAX_GAPS)
        for row in found:
            self.gaps.pop(row["id"], None)
        return found
