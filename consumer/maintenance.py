"""Named periodic tasks of the worker's connection thread.

The connection thread wakes every ``TICK_S``; each task runs when its own period has
passed. Naming them keeps the loop readable and lets a failing task be logged by name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Task:
    name: str
    every_s: float
    run: Callable[[], None]
    next_at: float = 0.0


class Schedule:
    def __init__(self, *tasks: Task) -> None:
        self.tasks = list(tasks)

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for task in self.tasks:
            if now >= task.next_at:
                task.next_at = now + task.every_s
                task.run()

    def names(self) -> list[str]:
        return [t.name for t in self.tasks]
