"""Sign-in rate limiting: wrong passwords per (user name, client address) per minute.

The failures live in the database (``login_failures``), not in process memory, so the
limit holds across gunicorn workers and several backends. Once the limit is reached,
even the right password is refused until the oldest failure of the window expires
(otherwise the limit would only slow a guesser down, not stop it).
"""

from __future__ import annotations

import math
import time

from sqlalchemy import Engine, delete, func, insert, select

from labq.shared import db
from labq.shared.errors import TooManyRequestsError

WINDOW_S = 60.0


def _key(name: str, address: str) -> str:
    return f"{name[:100]}|{address[:150]}"


def check(engine: Engine, name: str, address: str, limit: int) -> None:
    """Raise 429 (with Retry-After) when this user and address failed ``limit`` times."""
    if limit <= 0:
        return
    since = time.time() - WINDOW_S
    f = db.login_failures
    with db.read(engine) as conn:
        count, oldest = conn.execute(
            select(func.count(), func.min(f.c.at))
            .where(f.c.key == _key(name, address), f.c.at > since)).one()
    if count >= limit:
        wait = max(1, math.ceil(oldest + WINDOW_S - time.time()))
        raise TooManyRequestsError(
            f"too many wrong passwords for {name!r} from this address; try again in "
            f"{wait} s", retry_after_s=wait)


def record_failure(engine: Engine, name: str, address: str) -> None:
    now = time.time()
    f = db.login_failures
    with engine.begin() as conn:
        conn.execute(insert(f).values(key=_key(name, address), at=now))
        # Keep the table small: what is out of every window is of no use.
        conn.execute(delete(f).where(f.c.at < now - 10 * WINDOW_S))


def clear(engine: Engine, name: str, address: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(db.login_failures)
                     .where(db.login_failures.c.key == _key(name, address)))
