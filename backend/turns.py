"""Reads take turns, first come first served, and identical reads waiting together are
answered once (WSGI middleware of every backend process; see docs/internals.md,
"Serving").

**Turns.** While other reads are in their views, a request first lets every other ready
request run (one yield): without it gevent keeps serving whichever connections answer
fastest, and with 200 busy keep-alive clients a few were served hundreds of times while
most waited seconds. In an idle process it does not yield: that would queue a health
check behind whatever a thousand open streams are sending (healthz p99 30 -> 12 ms).
Then a request without a body (a read: the job list, a job, a page) waits for one of
``slots`` places, handed to waiters strictly in arrival order: without that, new arrivals barge past
requests already waiting for a database connection, and the unlucky ones waited seconds
(p50 76 ms, max 2.2 s with 200 clients listing jobs). A place is held only while the
view runs, never while a response streams out, and never by an upload (its body may
take minutes to arrive).

**One answer for identical reads.** Every open tab of a researcher polls the same job
list with the same cookie; every copy of a script asks with the same token. When a read
gets its place, the reads *still waiting* that are the same request (method GET, the
same path and query, the same headers: so the same caller, see :func:`share_key`) are
answered with its response instead of each computing its own. Only reads that arrived
before it began are answered so, never one that came later: each gets an answer at
least as new as itself, exactly as if it had been served at that moment (a client that
changed a job and then reads sees its change). Only the JSON reads of jobs are shared
(:data:`SHARED_PATHS`), never a response that sets a cookie, never one larger than
:data:`MAX_SHARED_BYTES`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

#: Where a request finds its process's TakeTurns (see :func:`turn`).
ENVIRON_KEY = "labq.turns"
#: The reads whose answers may be shared: the job list, one job, its state.
SHARED_PATHS = re.compile(r"/api/v1/jobs(/[A-Za-z0-9]+(/state)?)?")
#: A larger answer is not kept to be shared (a page of 500 jobs is about 1 MB).
MAX_SHARED_BYTES = 2 * 1024 * 1024
#: Request headers that say nothing about the answer (the connection's own).
_IGNORED = frozenset({"HTTP_CONNECTION", "HTTP_KEEP_ALIVE"})

Key = tuple[Any, ...]


def share_key(environ: dict[str, Any]) -> Key | None:
    """What makes two requests the same read, or None when this one is never shared:
    the path and query and every request header (credentials, cookies, host, accept,
    forwarded-for, ...) but the connection's own."""
    if environ.get("REQUEST_METHOD") != "GET" or not SHARED_PATHS.fullmatch(
            environ.get("PATH_INFO", "")):
        return None
    headers = tuple(sorted((k, v) for k, v in environ.items()
                           if k.startswith("HTTP_") and k not in _IGNORED))
    return (environ.get("PATH_INFO"), environ.get("QUERY_STRING", ""),
            environ.get("wsgi.url_scheme"), headers)


class _Turn:
    """A read waiting for its place (or for the answer of an identical read)."""

    __slots__ = ("event", "key", "follows", "answer")

    def __init__(self, event: Any, key: Key | None) -> None:
        self.event = event
        self.key = key
        #: Taken out of the line by an identical read, which answers for it.
        self.follows = False
        #: (status, headers, body) when an identical read answered for it; None: run.
        self.answer: tuple[str, list[tuple[str, str]], list[bytes]] | None = None


class TakeTurns:
    """The middleware; ``slots`` reads run at once in this process."""

    def __init__(self, app: Any, slots: int) -> None:
        import gevent
        import gevent.event

        self.app = app
        self._yield = gevent.sleep
        self._event = gevent.event.Event
        self.slots = slots
        self.free = slots
        self.waiting: deque[_Turn] = deque()
        #: Waiting turns by share key, oldest first (a subset of ``waiting``).
        self.by_key: dict[Key, deque[_Turn]] = {}
        #: Reads answered with another's response (for tests and the log).
        self.shared = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if self.free < self.slots:
            # Others are in their views: every ready request takes its step first.
            self._yield(0)
        if environ.get("CONTENT_LENGTH") not in (None, "", "0") or \
                environ.get("HTTP_TRANSFER_ENCODING"):
            # Its body may take minutes to come: it takes a place only once it has it
            # all, when the view asks (turn(), below).
            environ[ENVIRON_KEY] = self
            return self.app(environ, start_response)
        key = share_key(environ)
        turn = self._take(key)
        if turn is not None and turn.answer is not None:
            status, headers, body = turn.answer
            start_response(status, headers)
            return body
        followers = self._followers(key)
        try:
            if not followers:
                return self.app(environ, start_response)
            return self._answer_all(environ, start_response, followers)
        finally:
            self._release()

    @contextlib.contextmanager
    def place(self) -> Iterator[None]:
        """Hold one of the places, in line with the reads, for a ``with`` block."""
        self._take(None)
        try:
            yield
        finally:
            self._release()

    def _take(self, key: Key | None) -> _Turn | None:
        """A place, at once when one is free and nobody waits, else in line (then the
        turn, which may carry an identical read's answer instead)."""
        if self.free > 0 and not self.waiting:
            self.free -= 1
            return None
        return self._wait(key)

    def _wait(self, key: Key | None) -> _Turn:
        turn = _Turn(self._event(), key)
        self.waiting.append(turn)
        if key is not None:
            self.by_key.setdefault(key, deque()).append(turn)
        try:
            turn.event.wait()  # the place (or an answer) is handed over by another read
        except BaseException:
            if turn.follows:  # another read answers for it: it holds no place
                raise
            if turn in self.waiting:  # never handed over: no place to give back
                self._forget(turn)
                raise
            self._release()  # it had been handed the place: pass it on
            raise
        return turn

    def _forget(self, turn: _Turn) -> None:
        self.waiting.remove(turn)
        if turn.key is not None:
            self._unkey(turn)

    def _unkey(self, turn: _Turn) -> None:
        assert turn.key is not None
        same = self.by_key[turn.key]
        if same[0] is turn:
            same.popleft()
        else:
            same.remove(turn)
        if not same:
            del self.by_key[turn.key]

    def _followers(self, key: Key | None) -> list[_Turn]:
        """The identical reads waiting now (they all came before this one began): taken
        out of the line, to be answered by this one."""
        if key is None:
            return []
        same = self.by_key.pop(key, None)
        if not same:
            return []
        for turn in same:
            self.waiting.remove(turn)
            turn.follows = True
        return list(same)

    def _answer_all(self, environ: dict[str, Any], start_response: Any,
                    followers: list[_Turn]) -> Iterable[bytes]:
        captured: list[Any] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None
                    ) -> Any:
            captured[:] = [status, headers]
            return start_response(status, headers, exc_info)

        answered = False
        try:
            result = self.app(environ, capture)
            try:
                body = [bytes(chunk) for chunk in result]
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            status, headers = captured
            if sum(len(c) for c in body) <= MAX_SHARED_BYTES and not any(
                    name.lower() == "set-cookie" for name, _ in headers):
                for turn in followers:
                    turn.answer = (status, list(headers), body)
                    turn.event.set()
                self.shared += len(followers)
                answered = True
            return body
        finally:
            if not answered:
                # Not shareable after all (or the view failed): each runs on its own,
                # first in line, as it would have without us.
                for turn in reversed(followers):
                    turn.follows = False
                    self.waiting.appendleft(turn)
                    if turn.key is not None:
                        self.by_key.setdefault(turn.key, deque()).appendleft(turn)

    def _release(self) -> None:
        if self.waiting:
            turn = self.waiting.popleft()
            if turn.key is not None:
                self._unkey(turn)
            turn.event.set()
        else:
            self.free += 1


def turn(environ: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
    """A place for a request with a body, once it has its body (uploads, in their view):
    twenty uploads working at once each got a twentieth of the process and finished
    together, late (p99 four times p50); in line, each one finishes in its turn. Outside
    the server (tests, scripts) there is no line: the block just runs."""
    turns = environ.get(ENVIRON_KEY)
    return turns.place() if isinstance(turns, TakeTurns) else contextlib.nullcontext()
