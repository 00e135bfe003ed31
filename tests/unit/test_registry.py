"""The job registry against a real SQLite database: creation, event ordering, control."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import isolated_database_url, unique_prefix
from sqlalchemy import select, text

from labq.backend.registry import Registry, job_to_json
from labq.producer.control import WorkerUnreachableError
from labq.producer.publisher import UnroutableError
from labq.shared import db
from labq.shared.db import make_engine
from labq.shared.errors import BadRequestError, ConflictError, NotFoundError
from labq.shared.manifest import JobSpec
from labq.shared.messages import LifecycleEvent, event_seq
from labq.shared.settings import Settings
from labq.shared.storage import Storage
from labq.shared.topology import Topology


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[Registry]:
    """SQLite, or PostgreSQL (a schema of its own) when LABQ_DATABASE_URL selects it."""
    url = os.environ.get("LABQ_DATABASE_URL", "")
    schema = unique_prefix()
    if url.startswith("postgresql"):
        url = isolated_database_url(url, schema)
    settings = Settings(data_dir=tmp_path, prefix="unit", database_url=url)
    engine = make_engine(settings)
    yield Registry(engine, Storage(tmp_path).ensure())
    if url.startswith("postgresql"):
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def new_job(registry: Registry, **kw) -> dict:
    job, created = registry.create(name=kw.pop("name", "proj"), spec=JobSpec("code.py"),
                                   bundle_sha256="a" * 64, bundle_bytes=10, **kw)
    assert created
    return job


def ev(job_id: str, n: int, state: str, attempt: int = 1, **kw) -> LifecycleEvent:
    return LifecycleEvent(job_id=job_id, seq=event_seq(attempt, n), state=state,
                          attempt=attempt, worker="w1", **kw)


def events_of(registry: Registry, job_id: str) -> list[tuple[int, str]]:
    with registry.engine.connect() as conn:
        rows = conn.execute(select(db.events.c.seq, db.events.c.state)
                            .where(db.events.c.job_id == job_id).order_by(db.events.c.id))
        return [tuple(r) for r in rows]


def test_create_and_json(registry):
    job = new_job(registry)
    data = job_to_json(job)
    assert data["state"] == "created" and data["attempts"] == 0
    assert data["created_at"].endswith("Z") and data["queued_at"] is None
    assert data["spec"]["entrypoint"] == "code.py"
    assert data["links"]["log"] == f"/api/v1/jobs/{job['id']}/log"
    assert events_of(registry, job["id"]) == [(0, "created")]


def test_idempotency_key_returns_the_same_job(registry):
    first = new_job(registry, idempotency_key="k1", owner="alice")
    again, created = registry.create(name="x", spec=JobSpec("code.py"), bundle_sha256="b" * 64,
                                     bundle_bytes=1, idempotency_key="k1", owner="alice")
    assert not created and again["id"] == first["id"]


def test_idempotency_keys_are_per_user(registry):
    # Given alice's job made with key k1
    first = new_job(registry, idempotency_key="k1", owner="alice")
    # When bob uses the same key, he gets a job of his own, not alice's
    bobs = new_job(registry, idempotency_key="k1", owner="bob")
    assert bobs["id"] != first["id"] and bobs["owner"] == "bob"
    assert registry.find_by_key("k1", "alice")["id"] == first["id"]


def test_unknown_job(registry):
    with pytest.raises(NotFoundError):
        registry.get("0" * 32)
    with pytest.raises(NotFoundError):
        registry.get("../etc")


def test_events_in_order_then_stale_duplicate_and_terminal_dropped(registry):
    job_id = new_job(registry)["id"]
    assert registry.apply_event(ev(job_id, 1, "initialized"))
    assert registry.apply_event(ev(job_id, 2, "started"))
    assert not registry.apply_event(ev(job_id, 2, "started"))  # duplicate
    assert not registry.apply_event(ev(job_id, 1, "initialized"))  # stale
    assert registry.apply_event(ev(job_id, 4, "stopped", outcome="succeeded", exit_code=0))
    assert not registry.apply_event(ev(job_id, 3, "completed"))  # late: terminal
    assert not registry.apply_event(ev(job_id, 9, "failed", attempt=2))  # after terminal
    job = registry.get(job_id)
    assert (job["state"], job["outcome"], job["exit_code"], job["attempts"], job["worker"]) == \
        ("stopped", "succeeded", 0, 1, "w1")
    assert job["stopped_at"] and job["started_at"] and job["initialized_at"]
    assert [s for _, s in events_of(registry, job_id)] == \
        ["created", "initialized", "started", "stopped"]


def test_the_worker_host_of_the_latest_event_is_kept_on_the_job(registry):
    # Given a job whose first attempt ran on host h3 and whose second ran on h2
    job = new_job(registry)
    registry.apply_event(ev(job["id"], 1, "started", worker_host="h3"))
    registry.apply_event(ev(job["id"], 1, "queued", attempt=2))  # an event without a host
    registry.apply_event(ev(job["id"], 2, "stopped", attempt=2, outcome="succeeded",
                            exit_code=0, worker_host="h2"))
    # Then the record names where it ended, and each stored event where it happened
    assert job_to_json(registry.get(job["id"]))["worker_host"] == "h2"
    with registry.engine.connect() as conn:
        hosts = [json.loads(d)["worker_host"] for (d,) in conn.execute(
            select(db.events.c.data).where(db.events.c.job_id == job["id"])
            .order_by(db.events.c.id))]
    assert hosts == [None, "h3", None, "h2"]


def test_skipped_steps_are_accepted_when_reachable(registry):
    job_id = new_job(registry)["id"]
    assert registry.apply_event(ev(job_id, 3, "started"))
    assert registry.get(job_id)["state"] == "started"


def test_retry_attempt_goes_back_to_queued_and_counts(registry):
    job_id = new_job(registry)["id"]
    registry.apply_event(ev(job_id, 2, "started"))
    assert registry.apply_event(ev(job_id, 1, "initialized", attempt=2))
    job = registry.get(job_id)
    assert (job["state"], job["attempts"]) == ("initialized", 2)


def test_unreachable_event_dropped(registry):
    job_id = new_job(registry)["id"]
    registry.apply_event(ev(job_id, 2, "started"))
    assert not registry.apply_event(ev(job_id, 3, "created"))
    assert registry.get(job_id)["state"] == "started"


def test_unknown_job_event_dropped(registry):
    assert not registry.apply_event(ev("f" * 32, 1, "initialized"))


def _race(registry: Registry, events: list[LifecycleEvent], threads: int = 8) -> None:
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(chunk: list[LifecycleEvent]) -> None:
        try:
            barrier.wait()
            for event in chunk:
                registry.apply_event(event)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(events[i::threads],))
            for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors


def test_concurrent_apply_never_loses_an_update(registry):
    """8 threads race to apply one job's events; the highest seq always wins."""
    for _round in range(3):
        job_id = new_job(registry)["id"]
        events = [ev(job_id, n, "started" if n % 2 else "paused") for n in range(1, 41)]
        _race(registry, [ev(job_id, 0, "initialized"), *events])
        job = registry.get(job_id)
        # Every event either applied or was stale when it came: the last one always wins.
        assert job["seq"] == event_seq(1, 40) and job["state"] == "paused"
        seqs = [s for s, _ in events_of(registry, job_id)]
        assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))


class FakePublisher:
    def __init__(self, fail: Exception | None = None) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.fail = fail
        self.topology = Topology("unit")

    def publish(self, exchange, routing_key, body, **_kw):
        if self.fail:
            raise self.fail
        self.sent.append((routing_key, body))


def test_request_state_noop_and_409(registry):
    pub = FakePublisher()
    job_id = new_job(registry)["id"]
    assert registry.request_state(job_id, "started", pub)["state"] == "created"  # no-op
    with pytest.raises(ConflictError) as err:
        registry.request_state(job_id, "paused", pub)
    assert err.value.details["state"] == "created" and err.value.details["allowed"]
    with pytest.raises(ConflictError):
        registry.request_state(job_id, "completed", pub)
    assert pub.sent == []


def test_stop_of_a_created_job_cancels_it_at_once(registry):
    pub = FakePublisher()
    job_id = new_job(registry)["id"]
    job = registry.request_state(job_id, "stopped", pub)
    assert (job["state"], job["outcome"]) == ("stopped", "cancelled")
    assert registry.storage.is_cancelled(job_id)
    assert registry.request_state(job_id, "stopped", pub)["state"] == "stopped"  # no-op
    assert not registry.apply_event(ev(job_id, 1, "initialized"))
    assert pub.sent == []


def test_pause_of_a_running_job_sends_control_and_remembers_it(registry):
    pub = FakePublisher()
    job_id = new_job(registry)["id"]
    registry.apply_event(ev(job_id, 2, "started"))
    job = registry.request_state(job_id, "paused", pub)
    assert (job["state"], job["requested_state"]) == ("started", "paused")
    assert pub.sent[0][0] == f"{job_id}.control" and b'"pause"' in pub.sent[0][1]
    registry.request_state(job_id, "paused", pub)  # already on the way: no-op
    assert len(pub.sent) == 1
    registry.apply_event(ev(job_id, 3, "paused"))
    assert registry.get(job_id)["requested_state"] is None


def test_unroutable_control_is_503_and_forgets_the_request(registry):
    pub = FakePublisher(fail=UnroutableError("nobody"))
    job_id = new_job(registry)["id"]
    registry.apply_event(ev(job_id, 2, "started"))
    with pytest.raises(WorkerUnreachableError) as err:
        registry.request_state(job_id, "paused", pub)
    assert err.value.status == 503
    assert registry.get(job_id)["requested_state"] is None


def test_unroutable_stop_stands_because_the_marker_carries_it(registry):
    # Given a running job whose worker is not bound right now (reconnecting or dead)
    pub = FakePublisher(fail=UnroutableError("nobody"))
    job_id = new_job(registry)["id"]
    registry.apply_event(ev(job_id, 2, "started"))
    # When the user stops it, the request stands: the marker stops it wherever it runs next
    job = registry.request_state(job_id, "stopped", pub)
    assert (job["state"], job["requested_state"]) == ("started", "stopped")
    assert registry.storage.is_cancelled(job_id)


def test_list_pagination_and_filters(registry):
    ids = [new_job(registry, name=f"n{i % 2}")["id"] for i in range(7)]
    page, cursor = registry.list(limit=3)
    seen = [j["id"] for j in page]
    while cursor:
        page, cursor = registry.list(limit=3, cursor=cursor)
        seen += [j["id"] for j in page]
    assert seen == list(reversed(ids))
    named, _ = registry.list(name="n1")
    assert {j["id"] for j in named} == set(ids[1::2])
    registry.apply_event(ev(ids[0], 1, "initialized"))
    assert [j["id"] for j in registry.list(state="initialized")[0]] == [ids[0]]
    assert registry.counts()["created"] == 6
    for bad in ({"state": "bogus"}, {"limit": 0}, {"cursor": "!!"}):
        with pytest.raises(BadRequestError):
            registry.list(**bad)
