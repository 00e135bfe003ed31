"""The thread-safe mailbox between the connection thread and the job thread.

The connection thread posts requests (``pause``, ``resume``, ``stop`` from control
messages; ``shutdown`` when the worker must put the job back); the job thread takes
them while it supervises the run and publishes a status snapshot for status events.
The thread waiting for the job's process interrupts a waiting ``take`` when it ends, so
the job thread learns of the exit at once instead of at its next tick.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from labq.shared.lifecycle import Action


@dataclass(frozen=True)
class Status:
    state: str
    elapsed_s: float
    memory_mb: float | None
    cpu_s: float | None = None


class Control:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._actions: deque[Action] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._shutdown = False
        self._interrupted = False
        self._status: Status | None = None

    def request(self, action: Action | str) -> None:
        action = Action(action)  # ValueError for anything else
        with self._lock:
            self._actions.append(action)
            if action == Action.STOP:
                self._stop = True
            elif action == Action.SHUTDOWN:
                self._shutdown = True
            self._wake.set()

    def interrupt(self) -> None:
        """End a waiting :meth:`take` early without a request (any thread may call):
        the job's process ended, and the job thread should see that at once."""
        with self._lock:
            self._interrupted = True
            self._wake.set()

    def take(self, timeout: float = 0.0) -> Action | None:
        """The oldest pending request, waiting up to ``timeout`` seconds for one (None
        when none came, or :meth:`interrupt` was called)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._actions:
                    return self._actions.popleft()
                if self._interrupted:
                    self._interrupted = False
                    return None
                self._wake.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._wake.wait(remaining):
                with self._lock:
                    return self._actions.popleft() if self._actions else None

    @property
    def stop_requested(self) -> bool:
        with self._lock:
            return self._stop

    @property
    def shutdown_requested(self) -> bool:
        with self._lock:
            return self._shutdown

    def set_status(self, status: Status | None) -> None:
        with self._lock:
            self._status = status

    @property
    def status(self) -> Status | None:
        with self._lock:
            return self._status
