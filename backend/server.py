"""``labq backend``: the Flask app under gunicorn, started programmatically.

One process with ``settings.backend_threads`` threads (gthread): every open event or
log stream holds a thread, and the event applier, outbox relay and status broadcaster
run as threads of that same process, started after gunicorn forked it. SIGTERM or
SIGINT ends open streams and background threads, then gunicorn exits cleanly.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from gunicorn.app.base import BaseApplication

from labq.backend.app import create_app
from labq.shared.hardening import protect_process
from labq.shared.logs import setup_logging
from labq.shared.settings import Settings

log = logging.getLogger(__name__)

#: Seconds gunicorn lets in-flight requests finish after SIGTERM.
GRACEFUL_TIMEOUT_S = 10


def _post_worker_init(worker: Any) -> None:
    """Make SIGTERM/SIGINT also end open streams, which would otherwise hold the exit."""
    svc = worker.wsgi.extensions["labq"]
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous = signal.getsignal(signum)

        def _handler(sig: int, frame: Any, _previous: Any = previous) -> None:
            svc.stop.set()
            if callable(_previous):
                _previous(sig, frame)

        signal.signal(signum, _handler)


def _worker_exit(_server: Any, worker: Any) -> None:
    app = getattr(worker, "wsgi", None)
    if app is not None and "labq" in getattr(app, "extensions", {}):
        app.extensions["labq"].shutdown()
        log.info("backend stopped")


class BackendServer(BaseApplication):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options = {
            "bind": f"{s.host}:{s.port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": s.backend_threads,
            "timeout": 60,
            "graceful_timeout": GRACEFUL_TIMEOUT_S,
            "keepalive": 5,
            "loglevel": s.log_level.lower(),
            "errorlog": "-",
            "accesslog": "-" if s.log_level.upper() == "DEBUG" else None,
            "proc_name": "labq-backend",
            "post_worker_init": _post_worker_init,
            "worker_exit": _worker_exit,
        }
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn >= 25 opens one control socket per user by default; two backends
            # on one host (tests, several labs) would fight over it, and labq needs none.
            options["control_socket_disable"] = True
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        # Runs in the worker process: the threads and connections belong to it.
        return create_app(self.settings, start_background=True)


def run(settings: Settings) -> int:
    setup_logging("backend", settings.log_level)
    protect_process()  # inherited by gunicorn's forked worker
    log.info("labq backend on http://%s:%s (data in %s, prefix %s)", settings.host,
             settings.port, settings.data_dir, settings.prefix)
    try:
        BackendServer(settings).run()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
