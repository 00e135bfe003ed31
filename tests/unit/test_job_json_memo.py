"""The job JSON a backend process remembers (backend/jobfields.py, JobJsonMemo) is always
what the row says now: any change to the row is seen at once, and the parts that run
with the clock (durations, the place in the queue) are never remembered."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import make_zip, signed_in_client
from sqlalchemy import update

from labq.backend.app import create_app
from labq.backend.jobfields import JobJsonMemo, jobs_json
from labq.shared import db
from labq.shared.settings import Settings

NO_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"


@pytest.fixture()
def app(tmp_path: Path):
    app = create_app(Settings(data_dir=tmp_path / "data", prefix="unitmemo",
                              rabbitmq_url=NO_BROKER))
    yield app
    app.extensions["labq"].shutdown()


@pytest.fixture()
def client(app):
    return signed_in_client(app)


def _submit(client) -> str:
    import io

    resp = client.post("/api/v1/jobs", content_type="multipart/form-data",
                       data={"bundle": (io.BytesIO(make_zip({"code.py": "print(1)\n"})),
                                        "b.zip")})
    assert resp.status_code == 201, resp.json
    return resp.json["id"]


def _change(app, job_id: str, **values) -> None:
    with app.extensions["labq"].engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.id == job_id).values(**values))


def _end(app, job_id: str) -> None:
    now = time.time()
    _change(app, job_id, state="stopped", outcome="succeeded", exit_code=0, seq=5,
            started_at=now - 2, completed_at=now - 1, stopped_at=now - 1, run_s=1.0)


def _listed(client, job_id: str) -> dict:
    jobs = client.get("/api/v1/jobs").json["jobs"]
    return next(j for j in jobs if j["id"] == job_id)


def test_an_ended_job_changed_in_the_database_is_served_as_it_is_now(app, client):
    job_id = _submit(client)
    _end(app, job_id)
    first = _listed(client, job_id)
    assert first["state"] == "stopped" and first["name"] == "proj"
    assert client.get(f"/api/v1/jobs/{job_id}").json == first  # one job: the same JSON
    # When someone changes the row without telling anyone (no updated_at, no event)
    _change(app, job_id, name="renamed", exit_code=3)
    # Then every read shows the row as it is now
    again = _listed(client, job_id)
    assert again["name"] == "renamed" and again["exit_code"] == 3
    assert client.get(f"/api/v1/jobs/{job_id}").json["name"] == "renamed"


def test_a_waiting_jobs_durations_run_with_the_clock(app, client):
    job_id = _submit(client)  # no broker: it waits, created
    first = _listed(client, job_id)["durations"]["total_s"]
    time.sleep(0.05)
    later = _listed(client, job_id)["durations"]["total_s"]
    assert later > first


def test_remembered_json_equals_json_made_afresh(app, client):
    ids = [_submit(client) for _ in range(3)]
    _end(app, ids[0])
    svc = app.extensions["labq"]
    rows = [svc.registry.get(i) for i in ids]
    with app.app_context():
        remembered = jobs_json(svc, rows)
        again = jobs_json(svc, rows)  # from the memo now
        svc.job_json = JobJsonMemo()
        fresh = jobs_json(svc, rows)
    for made in (again, fresh):
        for a, b in zip(remembered, made, strict=True):
            assert {k: v for k, v in a.items() if k != "durations"} == \
                {k: v for k, v in b.items() if k != "durations"}
    assert remembered[0]["durations"] == fresh[0]["durations"]  # ended: fixed


def test_callers_get_their_own_copy(app, client):
    job_id = _submit(client)
    _end(app, job_id)
    svc = app.extensions["labq"]
    row = svc.registry.get(job_id)
    with app.app_context():
        jobs_json(svc, [row])[0]["name"] = "scribbled"
        assert jobs_json(svc, [row])[0]["name"] == "proj"


def test_the_memo_forgets_the_least_recently_used():
    memo = JobJsonMemo(size=2)
    memo.put(("a",), {"n": 1})
    memo.put(("b",), {"n": 2})
    assert memo.get(("a",)) == {"n": 1}  # a is now the most recent
    memo.put(("c",), {"n": 3})
    assert memo.get(("b",)) is None and memo.get(("a",)) is not None
