"""Who owns an API token, remembered by each backend process for a few seconds.

Every request of a script or the CLI carries its token, and looking it up was a tenth of
a job list's CPU. The identity found is kept for up to :data:`MEMO_S`, and forgotten at
once, by every process on this host, when an account changes in a way that can take a
token's power away: a token revoked (``DELETE /api/v1/tokens/<id>``), a user disabled
(``labq user disable``). Those write :data:`MARKER` in the data dir (:func:`note_change`),
and each request compares the marker's modification time with the one its memo was
made under: one ``stat`` instead of a database round trip. A change made any other way
(by hand in the database, or by a backend on another host that does not share the data
dir) takes effect within :data:`MEMO_S`.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from sqlalchemy import Engine

from labq.backend import accounts
from labq.backend.accounts import Identity
from labq.shared.lru import Lru

#: Longest a remembered identity is used without asking the database again.
MEMO_S = 10.0
#: Tokens remembered per process.
MEMO_SIZE = 10_000
#: Touched whenever an account change must reach every process at once.
MARKER = ".accounts-changed"


def note_change(data_dir: Path) -> None:
    """Make every backend process on this host forget the identities it remembers.
    (A new file each time: its inode number tells it apart even from a change made
    within the same clock tick, which a modification time alone would not.)"""
    path = Path(data_dir) / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{MARKER}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{time.time_ns()} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


class TokenMemo:
    """Token → identity, per process (use :meth:`identity`)."""

    def __init__(self, engine: Engine, data_dir: Path) -> None:
        self.engine = engine
        self.marker = Path(data_dir) / MARKER
        self._items: Lru[str, tuple[Identity, float, tuple[int, int]]] = Lru(MEMO_SIZE)

    def _version(self) -> tuple[int, int]:
        try:
            found = os.stat(self.marker)
        except FileNotFoundError:
            return (0, 0)
        return (found.st_ino, found.st_mtime_ns)

    def identity(self, token: str) -> Identity | None:
        """The enabled user owning this live token (None: no such token), from memory
        when it was looked up less than MEMO_S ago and no account changed since."""
        key = accounts.hash_token(token)
        version = self._version()
        now = time.monotonic()
        found = self._items.get(key)
        if found is not None and found[2] == version and now - found[1] < MEMO_S:
            return found[0]
        identity = accounts.user_for_token(self.engine, token)
        if identity is None:
            self._items.pop(key)
        else:
            self._items.put(key, (identity, now, version))
        return identity
