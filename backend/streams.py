"""Open streams (SSE): capped, and ended the moment their client goes away.

Under the gevent worker (backend/server.py) an open stream costs a greenlet, a socket and
an inbox, not a thread, so a thousand open browser tabs leave the API as fast as ever.
:class:`StreamSlots` still caps them (``LABQ_MAX_STREAMS``): one more gets a 503 with
``Retry-After``, which the pages answer by polling a moment, and the CLI by saying so.
The cap counts the streams of all the backend's processes (:class:`StreamBoard`), and
each process keeps room for that many plus 1,000 other connections, so streams can
never take the connections the API needs.

:class:`ClientLink` watches a stream's socket: an SSE client sends nothing after its
request, so the socket becoming readable means it closed (or broke the protocol), and
the stream ends at once instead of at its next write. A client that stops reading is
dropped after :data:`SEND_TIMEOUT_S` of a full send buffer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, request

from labq.backend.errors import error_response
from labq.backend.streamboard import StreamBoard

RETRY_AFTER_S = 5
SEND_TIMEOUT_S = 60.0


class StreamSlots:
    """The cap: ``limit`` open streams in this process, or on the ``board`` in all the
    processes of the backend (two taking the last slot at the same instant may both get
    it: the cap protects capacity, it is not a quota)."""

    def __init__(self, limit: int, board: StreamBoard | None = None) -> None:
        self.limit = max(1, limit)
        self.board = board
        self._open = {kind: 0 for kind in StreamBoard.KINDS}
        self._lock = threading.Lock()

    def take(self, kind: str = "events") -> bool:
        with self._lock:
            if len(self) >= self.limit:
                return False
            self._open[kind] += 1
            if self.board is not None:
                self.board.add(kind, 1)
            return True

    def give_back(self, kind: str = "events") -> None:
        with self._lock:
            self._open[kind] -= 1
            if self.board is not None:
                self.board.add(kind, -1)

    def count(self, kind: str | None = None) -> int:
        """Open streams (of one kind), in every process when there is a board."""
        if self.board is not None and self.board.slot >= 0:
            return self.board.total(kind)
        return sum(n for k, n in self._open.items() if kind in (None, k))

    def __len__(self) -> int:
        return self.count()


def _gevent_socket(environ: dict[str, Any]) -> Any:
    """The client's socket when gevent serves this request, else None."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return None
    try:
        from gevent import monkey
    except ImportError:
        return None
    return sock if monkey.is_module_patched("socket") else None


class ClientLink:
    """Calls back once when the client of a stream has gone (gevent only; elsewhere the
    next write fails instead)."""

    def __init__(self, environ: dict[str, Any]) -> None:
        self._callbacks: list[Callable[[], None]] = []
        self.gone = False
        self._watcher: Any = None
        self._sock = _gevent_socket(environ)
        if self._sock is not None:
            from gevent import get_hub

            self._sock.settimeout(SEND_TIMEOUT_S)
            self._watcher = get_hub().loop.io(self._sock.fileno(), 1)  # 1: readable
            self._watcher.start(self._fire)

    def on_gone(self, callback: Callable[[], None]) -> None:
        if self.gone:
            callback()
        else:
            self._callbacks.append(callback)

    def _fire(self) -> None:
        # Runs in gevent's hub: only flags and wake-ups, nothing that blocks.
        self.gone = True
        self._stop_watching()
        for callback in self._callbacks:
            callback()

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    def close(self) -> None:
        self._stop_watching()
        if self._sock is not None and not self.gone:
            with contextlib.suppress(OSError):
                self._sock.settimeout(None)  # the connection may serve more requests


class _Body:
    """The response body of one stream: its chunks, giving the slot back exactly once,
    whether the stream ran to its end, failed, or was closed before it started."""

    def __init__(self, slots: StreamSlots, kind: str,
                 stream: Callable[[ClientLink], Iterator[str]], environ: dict[str, Any]
                 ) -> None:
        self._slots = slots
        self._kind = kind
        self._link = ClientLink(environ)
        self._chunks = stream(self._link)
        self._done = False

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> str:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._chunks.close()  # the stream's own cleanup: it leaves the hub
        finally:
            self._link.close()
            self._slots.give_back(self._kind)


def sse_response(slots: StreamSlots, stream: Callable[[ClientLink], Iterator[str]],
                 kind: str = "events") -> Response:
    """A text/event-stream response of ``stream(link)``, holding one slot until it ends,
    or a 503 when every slot is taken. ``stream`` runs outside the request context: it
    gets what it needs from the view. ``kind``: ``events`` or ``logs`` (for the gauges)."""
    if not slots.take(kind):
        resp = error_response(
            503, "too_many_streams",
            f"the server already has {slots.limit} live streams open; it retries by "
            f"itself, or close other labq tabs (retry after {RETRY_AFTER_S} s)",
            retry_after_s=RETRY_AFTER_S)
        resp.headers["Retry-After"] = str(RETRY_AFTER_S)
        return resp
    resp = Response(_Body(slots, kind, stream, request.environ),
                    mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp
