"""One feed for every stream: the hub gives each stream only what it may see, the event
feed reads new events once (and finds rows that committed out of order), the log watcher
reads a log's new bytes once for all its followers."""

from __future__ import annotations

import json
import threading

from sqlalchemy import insert

from labq.backend.feed import EventFeed, Owners
from labq.backend.hub import INBOX_SIZE, Hub
from labq.backend.logwatch import LogWatcher
from labq.shared import db
from labq.shared.storage import Storage


def row(event_id: int, job_id: str, owner: str | None, state: str = "queued") -> dict:
    return {"id": event_id, "job_id": job_id, "owner": owner, "state": state,
            "data": json.dumps({"job_id": job_id, "state": state})}


def test_each_stream_gets_only_what_its_owner_may_see():
    owners = {"ja": "alice", "jb": "bob"}
    hub = Hub(owner_of=owners.get)
    with hub.subscribe(owner="alice") as (alice, _), hub.subscribe(owner="bob") as (bob, _), \
            hub.subscribe() as (admin, _), hub.subscribe(job_id="ja") as (log_a, _):
        hub.publish_lifecycle([row(1, "ja", "alice"), row(2, "jb", "bob")])
        hub.publish_status({"job_id": "ja", "elapsed_s": 1.0})
        hub.publish_job("ja", "log", (0, b"hi\n"))

        def kinds(sub):
            return [(kind, p["job_id"] if kind == "lifecycle" else p)
                    for kind, p in sub.wait(0)]

        assert [k for k, _ in kinds(alice)] == ["lifecycle", "status"]
        assert [k for k, _ in kinds(bob)] == ["lifecycle"]
        assert [k for k, _ in kinds(admin)] == ["lifecycle", "lifecycle", "status"]
        # A log stream gets its job's lifecycle events and log news, never status ticks
        assert kinds(log_a) == [("lifecycle", "ja"), ("log", (0, b"hi\n"))]
        assert hub.position == 2 and len(hub) == 3 and hub.followed_jobs() == ["ja"]
    assert len(hub) == 0 and hub.followed_jobs() == []


def test_a_stream_that_falls_behind_is_told_to_read_back_instead_of_growing():
    hub = Hub()
    with hub.subscribe(owner="alice") as (sub, _):
        hub.publish_lifecycle([row(i, "ja", "alice") for i in range(1, INBOX_SIZE + 10)])
        assert sub.lagged
        assert hub.catch_up(sub) == INBOX_SIZE + 9  # read the database up to here
        assert not sub.lagged and sub.wait(0) == []


def test_closing_every_stream_wakes_them_all_and_refuses_new_ones():
    hub = Hub()
    woke = []
    with hub.subscribe(owner="alice") as (sub, _):
        waiter = threading.Thread(target=lambda: woke.append(sub.wait(30)))
        waiter.start()
        hub.close_all()
        waiter.join(10)
        assert woke == [[]] and sub.closed
    with hub.subscribe() as (late, _):
        assert late.closed


def add_event(engine, job_id: str, event_id: int | None = None) -> None:
    values = {"job_id": job_id, "seq": 1, "state": "queued", "at": 1.0,
              "data": json.dumps({"job_id": job_id})}
    if event_id is not None:
        values["id"] = event_id
    with engine.begin() as conn:
        conn.execute(insert(db.events), values)


def test_the_feed_reads_new_events_once_with_owners_and_finds_late_commits(engine):
    with engine.begin() as conn:
        conn.execute(insert(db.jobs), {c.name: None for c in db.jobs.columns} | {
            "id": "ja", "name": "a", "state": "queued", "owner": "alice", "attempts": 0,
            "seq": 1, "bundle_sha256": "0" * 64, "bundle_bytes": 1, "spec": "{}",
            "updated_at": 1.0})
    hub = Hub()
    feed = EventFeed(engine, hub, Owners(engine), threading.Event())
    add_event(engine, "ja")
    feed.start_at_latest()
    with hub.subscribe() as (sub, position):
        assert position == 1
        add_event(engine, "ja")
        add_event(engine, "ja", event_id=5)  # ids 3 and 4 not committed yet
        assert feed.poll() == 2
        got = [(p["id"], p["owner"]) for _, p in sub.wait(0)]
        assert got == [(2, "alice"), (5, "alice")] and set(feed.gaps) == {3, 4}
        add_event(engine, "ja", event_id=4)  # commits late
        feed.poll()
        assert [p["id"] for _, p in sub.wait(0)] == [4] and set(feed.gaps) == {3}
    assert feed.owners("ja") == "alice"


def test_the_log_watcher_reads_new_bytes_once_for_every_follower(engine, tmp_path):
    storage = Storage(tmp_path / "store").ensure()
    hub = Hub()
    watcher = LogWatcher(engine, storage, hub, threading.Event())
    log = storage.log_path("0" * 32)
    log.parent.mkdir(parents=True)
    log.write_bytes(b"one\n")
    with hub.subscribe(job_id="0" * 32) as (first, _), \
            hub.subscribe(job_id="0" * 32) as (second, _):
        watcher.tick()  # first sight: the size, and news (each reads for itself)
        assert first.wait(0) == [("log", None)] and second.wait(0) == [("log", None)]
        with open(log, "ab") as handle:
            handle.write(b"two\n")
        watcher.tick()
        assert first.wait(0) == second.wait(0) == [("log", (4, b"two\n"))]
        watcher.tick()  # nothing new: no news
        assert first.wait(0) == []
