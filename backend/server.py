"""``labq backend``: the Flask app under gunicorn's gevent worker, started programmatically.

One process per core (``LABQ_BACKEND_PROCESSES``); in each, every request and every open
event or log stream is a greenlet, so open streams cost a socket and an inbox each, not
a thread: a thousand browser tabs leave the API as fast as with none, and the processes
share the requests between the cores (Python runs one thread at a time per process).
The open streams of all of them are counted together (backend/streams.py), and one of
them applies the workers' events (backend/leader.py).

The gevent worker monkey-patches the standard library before the app is imported into
it, so the background threads (event applier, outbox relay, reconciler, status
broadcaster with their pika BlockingConnections; the event feed and log watcher) are
greenlets too, SQLAlchemy's pool waits cooperatively, and psycopg 3
(from 3.1.14) waits on PostgreSQL cooperatively by itself. SQLite's calls are short and
run in place.

Each process keeps room for ``LABQ_MAX_STREAMS`` streams plus 1,000 other connections,
gives a client ``LABQ_HEADER_TIMEOUT_S`` to send its headers and holds request bodies to
the deadlines of backend/slowclients.py. SIGTERM or SIGINT ends open streams and
background threads, then gunicorn exits cleanly.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import signal
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.workers.ggevent import GeventWorker

from labq.backend.streamboard import StreamBoard, process_count
from labq.shared import db
from labq.shared.hardening import protect_process
from labq.shared.logs import setup_logging
from labq.shared.settings import Settings

log = logging.getLogger(__name__)

#: Seconds gunicorn lets in-flight requests finish after SIGTERM.
GRACEFUL_TIMEOUT_S = 10
#: File descriptors the process needs besides its connections (database, logs, broker).
SPARE_FILES = 256
#: Connections kept for everything that is not a stream, on top of LABQ_MAX_STREAMS.
API_CONNECTIONS = 1000
#: Reads one backend process runs at once (the rest wait their turn, in order): a few
#: keep both cores busy; more only interleave them and stretch every answer.
REQUEST_SLOTS = 8
#: Bytes a connection may have on its way out at once (the kernel allows twice this).
SEND_BUFFER = 256 * 1024
#: Keep-alive clients stay with the process that accepted them, and they all wait their
#: turn in its line: with 200 clients split 130 to 70 (as the kernel happened to hand
#: them out), the first process's clients waited nearly twice as long as the other's.
#: So a process serving more clients than the least busy one plus BALANCE_SLACK
#: (StreamBoard.over_share) leaves a new connection to the others for BALANCE_DEFER_S,
#: at most BALANCE_DEFERRALS times in a row.
BALANCE_SLACK = 2
BALANCE_DEFER_S = 0.005
BALANCE_DEFERRALS = 8
#: Connections a process takes from the backlog at one wake-up.
ACCEPT_AT_ONCE = 64


class LabqGeventWorker(GeventWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Keep-alive connections waiting for their next request (closed on SIGTERM).
        self._idle: set[Any] = set()
        #: This process's listening servers (gevent StreamServers), once started.
        self._servers: list[Any] = []

    def run(self) -> None:
        import gevent
        import gunicorn.workers.ggevent as ggevent

        # gunicorn makes its StreamServers inside run() and keeps them to itself; this
        # process's own subclass (a module global of this forked worker only) counts
        # each connection as it is accepted and accepts only while this process is not
        # over its share of the clients (see _steer_accepting).
        servers, board = self._servers, self._board

        class NotedStreamServer(ggevent.StreamServer):  # type: ignore[misc,name-defined]
            def start(self) -> None:
                # gunicorn has several processes accept one connection per wake-up, to
                # share them; the share is kept here now, and a burst of new clients
                # is taken from the backlog in a few wake-ups, not one per round of
                # requests.
                self.max_accept = ACCEPT_AT_ONCE
                super().start()
                servers.append(self)

            deferred = 0

            def do_read(self) -> Any:
                # Over its share, this process leaves the waiting connection to another
                # for a moment, a few times at most (so no client waits long, even if
                # the others are slow to accept).
                if board is not None and self.deferred < BALANCE_DEFERRALS \
                        and board.over_share(BALANCE_SLACK):
                    self.deferred += 1
                    self.stop_accepting()
                    self._timer = self.loop.timer(BALANCE_DEFER_S)
                    self._timer.start(self._start_accepting_if_started)
                    return None
                self.deferred = 0
                return super().do_read()

            def do_handle(self, *args: Any) -> None:
                if board is not None:
                    board.add_connection(1)  # counted now: the next do_read sees it
                try:
                    super().do_handle(*args)
                except BaseException:
                    if board is not None:
                        board.add_connection(-1)
                    raise

        ggevent.StreamServer = NotedStreamServer
        gevent.spawn(self._close_idle_when_stopping)
        super().run()

    @property
    def _board(self) -> StreamBoard | None:
        return getattr(self.app, "board", None)

    def _close_idle_when_stopping(self) -> None:
        """Once stopping, close connections that wait for a next request: gunicorn
        waits for every handler, and an idle keep-alive one would hold the exit for
        the whole graceful timeout (10 s) although it has nothing to finish."""
        import gevent

        while self.alive:
            gevent.sleep(0.2)
        while True:  # a request still running goes idle later: close it then
            for client in list(self._idle):
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)
            gevent.sleep(0.1)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        # A response that does not fit the socket's send buffer waits for a second turn,
        # behind every other ready request: a job list page (40 KB) then took a whole
        # round of 200 busy clients longer. One send buffer holds any page.
        with contextlib.suppress(OSError):
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._idle.add(client)
        try:
            super().handle(listener, client, addr)
        finally:
            self._idle.discard(client)
            board = self._board
            if board is not None:
                board.add_connection(-1)  # counted when accepted (NotedStreamServer)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> None:
        self._idle.discard(sock)
        try:
            super().handle_request(listener_name, req, sock, addr)
        finally:
            self._idle.add(sock)

    def patch(self) -> None:
        # The CLI imported requests (and so ssl) before gunicorn forked this worker; no
        # SSL object exists yet, so patching now is safe, and the warning only noise.
        from gevent.monkey import MonkeyPatchWarning

        warnings.filterwarnings("ignore", category=MonkeyPatchWarning)
        super().patch()
        # urllib3 (imported with requests) still names the unpatched SSLContext, whose
        # options setter then recurses forever: every HTTPS client made in this worker
        # (webhooks, boto3 for LABQ_STORAGE=s3) would die. Point it at gevent's class.
        import ssl

        import urllib3.util.ssl_

        urllib3.util.ssl_.SSLContext = ssl.SSLContext  # type: ignore[misc]


def _post_worker_init(worker: Any) -> None:
    """Make SIGTERM/SIGINT also end open streams, which would otherwise hold the exit.

    Only a flag is set here (a signal may arrive while the hub's lock is held); the
    event feed sees it within a poll and closes every stream.
    """
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


def connections(settings: Settings) -> int:
    return settings.max_streams + API_CONNECTIONS




@contextlib.contextmanager
def one_at_a_time(data_dir: Path) -> Iterator[None]:
    """Processes starting together build their apps in turn, so the first start's work
    (admin account, signing key) is done once and seen complete by the others."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(data_dir) / ".backend-start.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def raise_open_files(needed: int) -> int:
    """Lift the soft limit on open files to what the connections need (a usual default
    is 1,024); returns the limit in force. The forked worker inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if soft < needed:
        log.warning("only %d open files allowed (ulimit -n); %d connections need %d: "
                    "raise the hard limit or lower LABQ_MAX_STREAMS", soft,
                    needed - SPARE_FILES, needed)
    return soft


class BackendServer(BaseApplication):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Made before gunicorn forks, so every process shares it.
        self.board = StreamBoard(process_count(settings))
        super().__init__()

    def _post_fork(self, _server: Any, _worker: Any) -> None:
        self.board.claim()

    def load_config(self) -> None:
        s = self.settings
        options = {
            "bind": f"{s.host}:{s.port}",
            "workers": process_count(s),
            "worker_class": LabqGeventWorker,
            "worker_connections": connections(s),
            "timeout": 60,
            "graceful_timeout": GRACEFUL_TIMEOUT_S,
            # The gevent worker bounds reading a request's headers by this (and idle
            # keep-alive connections): the header timeout.
            "keepalive": max(1, round(s.header_timeout_s)),
            "backlog": 2048,
            "loglevel": s.log_level.lower(),
            "errorlog": "-",
            "accesslog": "-" if s.log_level.upper() == "DEBUG" else None,
            "proc_name": "labq-backend",
            "post_fork": self._post_fork,
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
        # Runs in the worker, after gevent patched it: the app, its threads and its
        # connections belong to the worker and are cooperative.
        from labq.backend.app import create_app
        from labq.backend.slowclients import BodyDeadline
        from labq.backend.turns import TakeTurns

        s = self.settings
        with one_at_a_time(s.data_dir):
            app = create_app(s, start_background=True)
        svc = app.extensions["labq"]
        svc.streams.board = self.board
        try:  # the first burst of requests finds its connections open
            db.warm(svc.engine, REQUEST_SLOTS)
        except Exception:  # noqa: BLE001 - the database may come later: not fatal here
            log.warning("could not open database connections ahead", exc_info=True)
        app.wsgi_app = TakeTurns(BodyDeadline(  # type: ignore[method-assign]
            app.wsgi_app, s.body_timeout_s, s.body_min_bytes_per_s),
            slots=REQUEST_SLOTS)
        return app


def run(settings: Settings) -> int:
    setup_logging("backend", settings.log_level)
    protect_process()  # inherited by gunicorn's forked worker
    raise_open_files(connections(settings) + SPARE_FILES)
    log.info("labq backend on http://%s:%s (data in %s, prefix %s)", settings.host,
             settings.port, settings.data_dir, settings.prefix)
    try:
        BackendServer(settings).run()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
