"""Fair share: per-user limits on jobs, held in the database, correct across backends.

* ``LABQ_MAX_QUEUED_PER_USER`` (0: none): a user with that many unfinished jobs (held
  ones included) gets a 429 for the next upload.
* ``LABQ_MAX_RUNNING_PER_USER`` (0: none): at most that many of a user's jobs are on the
  queue or running ("active": unfinished and not held). A new job past the limit stays
  ``created`` with a ``hold_reason`` and is not published, so it never reaches a worker
  and other users' jobs go ahead of it. The outbox relay (every backend runs one)
  releases held jobs, oldest first, as the user's active jobs end, and publishes them.

Every decision for a user's jobs — admit, hold, refuse, release — is made inside one
transaction that first bumps ``users.dispatch_seq`` for that user. The update takes the
user's row lock (PostgreSQL) or the database's write lock (SQLite), so two backends
deciding for the same user at once take turns, and the second counts what the first
committed: nothing is over-published.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, func, select, update

from labq.shared import db, jobstore
from labq.shared.errors import TooManyRequestsError
from labq.shared.lifecycle import State
from labq.shared.settings import Settings

log = logging.getLogger(__name__)

TERMINAL = (State.STOPPED, State.FAILED)
QUOTA_RETRY_AFTER_S = 30


def enabled(settings: Settings) -> bool:
    return settings.max_running_per_user > 0 or settings.max_queued_per_user > 0


def _lock_owner(conn: Connection, owner: str) -> None:
    conn.execute(update(db.users).where(db.users.c.name == owner)
                 .values(dispatch_seq=db.users.c.dispatch_seq + 1))


def _counts(conn: Connection, owner: str) -> tuple[int, int]:
    """(unfinished jobs, active jobs) of ``owner``."""
    j = db.jobs
    unfinished = (j.c.owner == owner) & j.c.state.not_in(TERMINAL)
    total, active = conn.execute(
        select(func.count(), func.count().filter(j.c.hold_reason.is_(None)))
        .where(unfinished)).one()
    return int(total), int(active)


def hold_reason(active: int, settings: Settings) -> str:
    limit = settings.max_running_per_user
    jobs = f"{active} of your jobs {'is' if active == 1 else 'are'}"
    return (f"your running-job limit: {jobs} queued or running, the most this server runs "
            f"per user at once (LABQ_MAX_RUNNING_PER_USER={limit}); it starts when one of "
            "yours ends")


def admit(conn: Connection, owner: str, settings: Settings) -> str | None:
    """Decide for a job about to be inserted in ``conn``'s transaction: raise 429 past the
    quota, return a hold reason past the running limit, None to publish it now."""
    if not enabled(settings):
        return None
    _lock_owner(conn, owner)
    total, active = _counts(conn, owner)
    quota = settings.max_queued_per_user
    if quota and total >= quota:
        raise TooManyRequestsError(
            f"you already have {total} unfinished jobs, the most this server accepts per "
            f"user (LABQ_MAX_QUEUED_PER_USER={quota}); wait for some to finish or stop some "
            "(`labq ls`, `labq stop ID`)", retry_after_s=QUOTA_RETRY_AFTER_S,
            unfinished=total, limit=quota)
    limit = settings.max_running_per_user
    if limit and active >= limit:
        return hold_reason(active, settings)
    return None


def check_room(engine: Engine, owner: str, count: int, settings: Settings) -> None:
    """429 when ``count`` more jobs would not fit the owner's quota (a sweep's pre-check)."""
    quota = settings.max_queued_per_user
    if not quota:
        return
    with db.read(engine) as conn:
        total, _active = _counts(conn, owner)
    if total + count > quota:
        raise TooManyRequestsError(
            f"this upload makes {count} jobs and you have {total} unfinished; this server "
            f"accepts {quota} per user (LABQ_MAX_QUEUED_PER_USER={quota}); make the sweep "
            "smaller or wait for some jobs to finish", retry_after_s=QUOTA_RETRY_AFTER_S,
            unfinished=total, limit=quota)


def release_owner(engine: Engine, owner: str, settings: Settings) -> list[str]:
    """Un-hold the owner's oldest held jobs that fit under the running limit now."""
    limit = settings.max_running_per_user
    j = db.jobs
    with engine.begin() as conn:
        _lock_owner(conn, owner)
        _total, active = _counts(conn, owner)
        room = None if limit <= 0 else limit - active
        if room is not None and room <= 0:
            return []
        query = (select(j.c.id).where(j.c.owner == owner, j.c.state == State.CREATED,
                                      j.c.hold_reason.is_not(None))
                 .order_by(j.c.created_at, j.c.id))
        ids = [r.id for r in conn.execute(query if room is None else query.limit(room))]
        if ids:
            jobstore.release_held(conn, ids)
    for job_id in ids:
        log.info("fair share: job %s of %s released", job_id, owner)
    return ids


def release_held(engine: Engine, settings: Settings) -> list[str]:
    """Release what fits for every user with held jobs (the outbox relay calls this)."""
    j = db.jobs
    with db.read(engine) as conn:
        owners = [r.owner for r in conn.execute(
            select(j.c.owner).where(j.c.state == State.CREATED, j.c.hold_reason.is_not(None))
            .distinct())]
    released: list[str] = []
    for owner in owners:
        if owner is not None:
            released += release_owner(engine, owner, settings)
    return released

