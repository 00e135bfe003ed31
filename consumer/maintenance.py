"""Named periodic tasks of the worker's connection thread, and the tasks themselves.

The connection thread wakes every ``TICK_S``; each task runs when its own period has
passed. Naming them keeps the loop readable and lets a failing task be logged by name.
The tasks: keep the sandbox report fresh, publish the running job's status, notice a
stop marker written while the channel was down, and sweep orphans of dead workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from labq.consumer.delivery import Delivery
from labq.consumer.link import BrokerLink
from labq.process_unit import proctree
from labq.process_unit.sandbox import TOKEN_VAR
from labq.shared.lifecycle import Action, State
from labq.shared.messages import StatusEvent
from labq.shared.storage import Storage

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


def touch_report(path: Path) -> None:
    with contextlib.suppress(OSError):  # the backend shows reports touched recently
        os.utime(path)


def publish_status(link: BrokerLink, d: Delivery | None, worker: str) -> None:
    """A live status tick for the job ``d`` while it is started or paused."""
    status = d.control.status if d is not None else None
    if d is None or status is None or not link.online() \
            or status.state not in (State.STARTED, State.PAUSED):
        return
    link.publish_status(StatusEvent(
        job_id=d.job.job_id, state=status.state, elapsed_s=status.elapsed_s,
        attempt=d.attempt, worker=worker, memory_mb=status.memory_mb, cpu_s=status.cpu_s))


def check_stop_marker(storage: Storage, d: Delivery | None) -> None:
    """The stop may have been asked while our channel was down (its control message
    unroutable): the marker on the data dir still reaches us."""
    if d is not None and not d.done.is_set() and not d.control.stop_requested \
            and storage.is_cancelled(d.job.job_id):
        log.info("job %s has a stop marker; stopping it", d.job.job_id)
        d.control.request(Action.STOP)


def sweep_orphans(busy: bool) -> None:
    """Also while busy: an orphan of a SIGKILLed worker on this host should not keep
    running until some worker happens to be idle."""
    if not busy:  # a running job's Popen must reap its own child
        proctree.reap_zombies()
    proctree.sweep_orphans(TOKEN_VAR)
