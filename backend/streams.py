"""Open streams (SSE) are capped, so they can never take every thread of the backend.

Each open event or log stream holds a gunicorn thread for as long as its client listens.
With ``LABQ_BACKEND_THREADS`` threads and no cap, that many browser tabs stopped the
server for everyone. :class:`StreamSlots` lets at most ``LABQ_MAX_STREAMS`` streams be
open at once (default: all threads but 16, kept for the API and the pages); one more
gets a 503 with ``Retry-After``, which the pages answer by polling a moment, and the CLI
by saying so. A stream frees its slot the moment it ends, whoever ends it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from flask import Response, stream_with_context

from labq.backend.errors import error_response

#: Threads kept for everything that is not a stream.
RESERVED_THREADS = 16
RETRY_AFTER_S = 5


class StreamSlots:
    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._open = 0
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, max_streams: int, threads: int) -> StreamSlots:
        return cls(max_streams or threads - RESERVED_THREADS)

    def take(self) -> bool:
        with self._lock:
            if self._open >= self.limit:
                return False
            self._open += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._open -= 1

    def __len__(self) -> int:
        return self._open


def sse_response(slots: StreamSlots, chunks: Iterator[str]) -> Response:
    """A text/event-stream response holding one slot until it ends, or a 503 when every
    slot is taken."""
    if not slots.take():
        resp = error_response(
            503, "too_many_streams",
            f"the server already has {slots.limit} live streams open; it retries by "
            f"itself, or close other labq tabs (retry after {RETRY_AFTER_S} s)",
            retry_after_s=RETRY_AFTER_S)
        resp.headers["Retry-After"] = str(RETRY_AFTER_S)
        return resp

    def held() -> Iterator[str]:
        try:
            yield from chunks
        finally:
            slots.give_back()

    resp = Response(stream_with_context(held()), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp
