"""Reads take turns in arrival order, and identical reads waiting together get one answer
(backend/turns.py) — but never an answer computed before they arrived, never one for
other credentials, never one that sets a cookie."""

from __future__ import annotations

from typing import Any

import gevent
import gevent.event
import pytest

from labq.backend.turns import TakeTurns, share_key

TOKEN_A = "Bearer aaaa"
TOKEN_B = "Bearer bbbb"


class App:
    """A WSGI app that numbers its answers and can be held inside a request."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gates: dict[str, gevent.event.Event] = {}
        self.headers: list[tuple[str, str]] = [("Content-Type", "application/json")]
        #: The number of the call that fails (0: none).
        self.fail_call = 0

    def hold(self, path: str) -> gevent.event.Event:
        self.gates[path] = gevent.event.Event()
        return self.gates[path]

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.calls.append(environ["PATH_INFO"])
        number = len(self.calls)
        gate = self.gates.get(environ["PATH_INFO"])
        if gate is not None:
            gate.wait(10)
        if number == self.fail_call:
            raise RuntimeError("the view failed")
        start_response("200 OK", list(self.headers))
        return [f'{{"answer": {number}}}'.encode()]


def environ(path: str = "/api/v1/jobs", auth: str = TOKEN_A, method: str = "GET",
            query: str = "limit=25") -> dict[str, Any]:
    return {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
            "wsgi.url_scheme": "http", "HTTP_HOST": "127.0.0.1:8080",
            "HTTP_AUTHORIZATION": auth, "HTTP_CONNECTION": "keep-alive"}


def request(turns: TakeTurns, env: dict[str, Any]) -> tuple[str, bytes]:
    status: list[str] = []

    def start_response(s: str, _headers: Any, _exc: Any = None) -> None:
        status.append(s)

    try:
        body = b"".join(turns(env, start_response))
    except RuntimeError:
        return "failed", b""
    return status[0], body


def spawn(turns: TakeTurns, env: dict[str, Any]) -> gevent.Greenlet:
    greenlet = gevent.spawn(request, turns, env)
    gevent.sleep(0.01)  # it arrives (and waits in line) before the next one
    return greenlet


@pytest.fixture()
def app() -> App:
    return App()


def test_identical_reads_waiting_together_are_answered_once(app):
    turns = TakeTurns(app, slots=1)
    # Given the only place taken by another read
    busy = app.hold("/api/v1/jobs/other")
    first = spawn(turns, environ("/api/v1/jobs/other", auth=TOKEN_B))
    # When three identical reads wait behind it
    same = [spawn(turns, environ()) for _ in range(3)]
    busy.set()
    gevent.joinall([first, *same], timeout=10)
    # Then the view ran once for them, and all three got its answer
    assert app.calls == ["/api/v1/jobs/other", "/api/v1/jobs"]
    assert {g.value for g in same} == {("200 OK", b'{"answer": 2}')}
    assert turns.shared == 2


def test_a_read_never_gets_an_answer_begun_before_it_arrived(app):
    turns = TakeTurns(app, slots=1)
    # Given a read already running (its answer may predate a change made meanwhile)
    running = app.hold("/api/v1/jobs")
    first = spawn(turns, environ())
    # When the same read arrives while it runs
    second = spawn(turns, environ())
    running.set()
    gevent.joinall([first, second], timeout=10)
    # Then the second is computed anew, after the first
    assert first.value == ("200 OK", b'{"answer": 1}')
    assert second.value == ("200 OK", b'{"answer": 2}')
    assert turns.shared == 0


@pytest.mark.parametrize("other", [
    environ(auth=TOKEN_B),                      # another caller
    environ(query="limit=10"),                  # another page
    environ(path="/api/v1/jobs/abc/log"),       # not a shared read (a log may stream)
    environ(method="HEAD"),                     # only GET
])
def test_reads_that_differ_are_never_shared(app, other):
    turns = TakeTurns(app, slots=1)
    busy = app.hold("/api/v1/jobs/other")
    first = spawn(turns, environ("/api/v1/jobs/other", auth=TOKEN_B))
    mine = spawn(turns, environ())
    theirs = spawn(turns, other)
    busy.set()
    gevent.joinall([first, mine, theirs], timeout=10)
    assert len(app.calls) == 3 and turns.shared == 0
    assert mine.value != theirs.value


def test_an_answer_that_sets_a_cookie_is_not_shared(app):
    turns = TakeTurns(app, slots=1)
    app.headers.append(("Set-Cookie", "labq_session=secret"))
    busy = app.hold("/api/v1/jobs/other")
    first = spawn(turns, environ("/api/v1/jobs/other", auth=TOKEN_B))
    same = [spawn(turns, environ()) for _ in range(3)]
    busy.set()
    gevent.joinall([first, *same], timeout=10)
    # Each computed its own, in arrival order
    assert [g.value[1] for g in same] == [b'{"answer": 2}', b'{"answer": 3}',
                                           b'{"answer": 4}']
    assert turns.shared == 0


def test_when_the_first_of_identical_reads_fails_the_others_still_run(app):
    turns = TakeTurns(app, slots=1)
    busy = app.hold("/api/v1/jobs/other")
    first = spawn(turns, environ("/api/v1/jobs/other", auth=TOKEN_B))
    same = [spawn(turns, environ()) for _ in range(3)]
    app.fail_call = 2  # the first of the identical reads
    busy.set()
    gevent.joinall([first, *same], timeout=10)
    # Then that one fails alone; the others wait on, and are answered together
    assert same[0].value == ("failed", b"")
    assert [g.value[1] for g in same[1:]] == [b'{"answer": 3}', b'{"answer": 3}']
    assert app.calls.count("/api/v1/jobs") == 2
    # and the place went round: nothing is left waiting, every place is free again
    assert not turns.waiting and not turns.by_key and turns.free == 1


def test_turns_are_kept_in_arrival_order_and_every_place_comes_back(app):
    turns = TakeTurns(app, slots=2)
    gates = [app.hold(f"/api/v1/jobs/j{i}") for i in range(5)]
    greenlets = [spawn(turns, environ(f"/api/v1/jobs/j{i}")) for i in range(5)]
    assert app.calls == ["/api/v1/jobs/j0", "/api/v1/jobs/j1"]  # two places
    for gate in gates:
        gate.set()
    gevent.joinall(greenlets, timeout=10)
    assert app.calls == [f"/api/v1/jobs/j{i}" for i in range(5)]
    assert turns.free == 2 and not turns.waiting and not turns.by_key


def test_the_share_key_holds_the_credentials_and_ignores_the_connection():
    a, b = environ(), environ()
    b["HTTP_CONNECTION"] = "close"
    assert share_key(a) == share_key(b)
    b["HTTP_COOKIE"] = "labq_session=x"
    assert share_key(a) != share_key(b)
    assert share_key(environ(method="POST")) is None
    assert share_key(environ(path="/api/v1/jobs/abc/results")) is None
    assert share_key(environ(path="/api/v1/jobs/abc/state")) is not None


def test_an_upload_waits_for_its_body_without_a_place_then_takes_its_turn(app):
    from labq.backend.turns import turn

    order: list[str] = []

    def upload_view(env: dict[str, Any], start_response: Any) -> list[bytes]:
        order.append("body read")  # reading the body holds no place
        with turn(env):
            order.append("upload works")
        start_response("201 CREATED", [])
        return [b"{}"]

    turns = TakeTurns(upload_view, slots=1)
    holder = TakeTurns.place(turns)
    holder.__enter__()  # a read holds the only place
    up = {**environ(method="POST"), "CONTENT_LENGTH": "10"}
    upload = gevent.spawn(request, turns, up)
    gevent.sleep(0.01)
    assert order == ["body read"]  # it got its body, and waits in line for the place
    holder.__exit__(None, None, None)
    upload.join(10)
    assert order == ["body read", "upload works"] and upload.value[0] == "201 CREATED"
    assert turns.free == 1


def test_outside_the_server_an_upload_just_runs():
    from labq.backend.turns import turn

    with turn({}):
        pass


def test_an_idle_process_answers_at_once_and_a_busy_one_lets_the_others_step_first(app):
    turns = TakeTurns(app, slots=2)
    yields: list[str] = []
    turns._yield = lambda _s: yields.append("yield")
    assert request(turns, environ("/healthz"))[0] == "200 OK"
    assert yields == []  # nobody else is in a view: no trip round the loop
    gate = app.hold("/api/v1/jobs/slow")
    held = gevent.spawn(request, turns, environ("/api/v1/jobs/slow"))
    gevent.sleep(0.01)
    assert request(turns, environ("/healthz"))[0] == "200 OK"
    assert yields == ["yield"]  # another read was in its view: this one yielded first
    gate.set()
    held.join(10)
    assert turns.free == 2
