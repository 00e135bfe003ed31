"""Deadlines on reading requests, so a client trickling bytes holds only its own
connection, and only for a while.

* Headers: the gevent worker gives a connection ``keepalive`` seconds to send a
  request's line and headers (and to start the next one); backend/server.py sets that to
  ``LABQ_HEADER_TIMEOUT_S``. A client still sending its headers then is dropped.
* Bodies: :class:`BodyDeadline` (WSGI middleware) wraps ``wsgi.input``. No read may
  stall longer than ``LABQ_BODY_TIMEOUT_S``, and once that long has passed the body must
  have come at ``LABQ_BODY_MIN_BYTES_PER_S`` on average. Past either, the request ends
  with a 408 that says so and the connection is closed. A 1 GB upload at full speed is
  nowhere near either; one sent at 1 byte/s is cut off after the grace.

Only under gevent (whose timeouts interrupt a blocked read); the Flask test client and
other servers read bodies as before.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from werkzeug.exceptions import RequestTimeout
from werkzeug.wsgi import ClosingIterator

#: The size assumed for a read of "everything" when the body's length is unknown.
UNKNOWN_READ = 64 * 1024


class SlowBody(RequestTimeout):
    def __init__(self, stall_s: float, min_rate: int) -> None:
        super().__init__(
            f"the request body came too slowly (a pause over {stall_s:g} s, or under "
            f"{min_rate // 1024} KiB/s on average); send it again from a faster "
            f"connection, or ask the admin to raise LABQ_BODY_MIN_BYTES_PER_S")


def gevent_active() -> bool:
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


class GuardedInput:
    """``wsgi.input`` whose reads must keep up with the deadlines."""

    def __init__(self, stream: Any, length: int | None, stall_s: float, min_rate: int
                 ) -> None:
        self._stream = stream
        self._left = length
        self.stall_s = stall_s
        self.min_rate = max(1, min_rate)
        self._began: float | None = None
        self._got = 0
        self.tripped = False

    def _budget(self, size: int | None) -> float:
        """Seconds the next read of ``size`` bytes may take."""
        now = time.monotonic()
        if self._began is None:
            self._began = now
        if size is None or size < 0:
            size = self._left if self._left is not None else UNKNOWN_READ
        by_rate = self._began + self.stall_s + (self._got + size) / self.min_rate
        return max(0.001, min(now + self.stall_s, by_rate) - now)

    def _guarded(self, read: Callable[..., bytes], size: int | None) -> bytes:
        import gevent

        try:
            with gevent.Timeout(self._budget(size), SlowBody(self.stall_s, self.min_rate)):
                data = read() if size is None else read(size)
        except SlowBody:
            self.tripped = True
            raise
        self._got += len(data)
        if self._left is not None:
            self._left = max(0, self._left - len(data))
        return data

    def read(self, size: int | None = None) -> bytes:
        return self._guarded(self._stream.read, size)

    def readline(self, size: int | None = None) -> bytes:
        return self._guarded(self._stream.readline, size)

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


class BodyDeadline:
    """WSGI middleware putting :class:`GuardedInput` around every request body."""

    def __init__(self, app: Callable[..., Iterable[bytes]], stall_s: float, min_rate: int
                 ) -> None:
        self.app = app
        self.stall_s = stall_s
        self.min_rate = min_rate
        self.active = gevent_active()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        if not self.active or "wsgi.input" not in environ:
            return self.app(environ, start_response)
        try:
            length: int | None = int(environ.get("CONTENT_LENGTH") or 0) or None
        except ValueError:
            length = None
        guard = GuardedInput(environ["wsgi.input"], length, self.stall_s, self.min_rate)
        environ["wsgi.input"] = guard
        result = self.app(environ, start_response)
        if not guard.tripped:
            return result
        # The rest of the body may never come: answer, then close the connection.
        return ClosingIterator(result, [lambda: _hang_up(environ)])


def _hang_up(environ: dict[str, Any]) -> None:
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
