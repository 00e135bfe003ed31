"""Several backend processes act as one: the stream cap and gauges count every process's
streams (shared memory made before the fork), a dead process's count is dropped, and
exactly one process leads (applies events) until it stops, then another takes over."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
from helpers import wait_until

from labq.backend import leader as leader_mod
from labq.backend.leader import Leader
from labq.backend.streamboard import StreamBoard
from labq.backend.streams import StreamSlots

FORK = multiprocessing.get_context("fork")


def _open_streams(board: StreamBoard, n: int, opened: FORK.Event, done: FORK.Event) -> None:
    board.claim()
    slots = StreamSlots(10, board)
    for _ in range(n):
        assert slots.take("logs")
    opened.set()
    done.wait(30)


def test_the_cap_counts_the_streams_of_every_process_and_forgets_dead_ones():
    board = StreamBoard(2)
    done = FORK.Event()
    opened = [FORK.Event(), FORK.Event()]
    # Given two processes holding 4 and 3 streams
    procs = [FORK.Process(target=_open_streams, args=(board, n, ev, done))
             for n, ev in zip((4, 3), opened, strict=True)]
    for proc in procs:
        proc.start()
    try:
        assert all(ev.wait(30) for ev in opened)
        board.claim()
        mine = StreamSlots(10, board)
        # Then a third process sees all 7, and may open only 3 more
        assert len(mine) == 7 and mine.count("logs") == 7 and mine.count("events") == 0
        assert [mine.take("events") for _ in range(4)] == [True, True, True, False]
        assert mine.count("events") == 3
        mine.give_back("events")
        assert len(mine) == 9
    finally:
        done.set()
        for proc in procs:
            proc.join(30)
    # When they have died, each process started in their place takes a dead one's slot
    # over, its count cleared: only the 2 streams still open here are counted
    for _ in range(2):
        board.claim()
    assert board.total() == 2


@pytest.fixture()
def quick_retry(monkeypatch):
    monkeypatch.setattr(leader_mod, "RETRY_S", 0.05)


def test_one_process_leads_until_it_stops_then_another_takes_over(tmp_path, quick_retry):
    path = tmp_path / "leader.lock"
    started: list[str] = []

    def make(name: str):
        def threads() -> list[threading.Thread]:
            started.append(name)
            return []
        return threads

    stop_a, stop_b = threading.Event(), threading.Event()
    a, b = Leader(path, stop_a, make("a")), Leader(path, stop_b, make("b"))
    a.start()
    wait_until(a.leading.is_set, timeout=10, message="a to lead")
    b.start()
    # b waits (flock conflicts between two opens even in one process)
    assert not b.leading.wait(0.5) and started == ["a"]
    stop_a.set()
    a.join(10)
    wait_until(b.leading.is_set, timeout=10, message="b to take over")
    assert started == ["a", "b"]
    stop_b.set()
    b.join(10)


def test_a_process_over_its_share_of_clients_leaves_new_ones_to_the_others():
    board = StreamBoard(2)
    board.claim()
    sleeper = FORK.Process(target=threading.Event().wait, args=(30,))
    sleeper.start()
    try:
        # Given another live process (its slot) serving 10 clients and this one 12
        other = 1 if board.slot == 0 else 0
        board._pids[other] = sleeper.pid
        board._conns[other] = 10
        for _ in range(12):
            board.add_connection(1)
        # Then this one is within its share (slack 2), and over it with one more
        assert not board.over_share(2)
        board.add_connection(1)
        assert board.over_share(2)
        # Streams are connections that send no requests: they do not count as clients
        board.add("events", 5)
        assert not board.over_share(2)
    finally:
        sleeper.kill()
        sleeper.join(10)
    # A dead process's count is no reason to stand back
    assert not board.over_share(0)
