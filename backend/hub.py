"""In-process fan-out of live events to the open server-sent event streams.

Each stream subscribes a bounded queue; a slow client loses status ticks (dropped when
its queue is full) instead of growing the backend's memory.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

QUEUE_SIZE = 256


class Hub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[queue.Queue[tuple[str, Any]]] = set()

    def publish(self, kind: str, payload: Any = None) -> None:
        with self._lock:
            targets = list(self._subscribers)
        for q in targets:
            # A slow reader misses a tick; lifecycle events come from the database anyway.
            with contextlib.suppress(queue.Full):
                q.put_nowait((kind, payload))

    @contextmanager
    def subscribe(self) -> Iterator[queue.Queue[tuple[str, Any]]]:
        q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=QUEUE_SIZE)
        with self._lock:
            self._subscribers.add(q)
        try:
            yield q
        finally:
            with self._lock:
                self._subscribers.discard(q)

    def __len__(self) -> int:
        with self._lock:
            return len(self._subscribers)
