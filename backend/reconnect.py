"""Run a broker session forever, reconnecting with exponential backoff (tenacity).

Background consumers (event applier, status broadcaster) each own one connection in
one thread; when it breaks they start over after a growing pause, until told to stop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tenacity import Retrying, retry_if_not_exception_type, wait_exponential

log = logging.getLogger(__name__)

#: A session that lasted this long was healthy; its failure restarts the backoff.
HEALTHY_SESSION_S = 30.0


class Stopping(Exception):
    """Raised inside a session to end it for good (shutdown)."""


def run_forever(name: str, stop: threading.Event, session: Callable[[], None]) -> None:
    """Call ``session`` again and again (with backoff after failures) until ``stop``."""

    def _log_retry(state: object) -> None:
        outcome = getattr(state, "outcome", None)
        exc = outcome.exception() if outcome is not None else None
        wait = getattr(getattr(state, "next_action", None), "sleep", 0)
        log.warning("%s: connection lost (%r); reconnecting in %.1fs", name, exc, wait)

    def _sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise Stopping()

    def _once() -> None:
        if stop.is_set():
            raise Stopping()
        began = time.monotonic()
        try:
            session()
        except Exception:
            if time.monotonic() - began < HEALTHY_SESSION_S:
                raise
            log.warning("%s: connection lost; reconnecting", name, exc_info=True)
            return  # it had worked for a while: start over with a short backoff
        if stop.is_set():
            raise Stopping()

    retrying = Retrying(
        wait=wait_exponential(multiplier=0.5, max=30),
        retry=retry_if_not_exception_type(Stopping),
        sleep=_sleep,
        before_sleep=_log_retry,
        reraise=True,
    )
    try:
        while not stop.is_set():
            # A session that ran fine for a while resets the backoff: a new Retrying call.
            retrying(_once)
    except Stopping:
        pass
    log.info("%s: stopped", name)
