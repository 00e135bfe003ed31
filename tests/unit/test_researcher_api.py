"""Short ids, search, sweeps, groups, reruns, receipts and webhook URLs, through Flask's
test client with no broker (jobs stay ``created``)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from helpers import make_zip, signed_in_client
from sqlalchemy import update
from test_backend_api import NO_BROKER, upload  # noqa: F401 - NO_BROKER documents the setup

from labq.backend.app import create_app
from labq.shared import db
from labq.shared.settings import Settings


@pytest.fixture()
def app(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", prefix="unitres", rabbitmq_url=NO_BROKER,
                        max_upload_bytes=64 * 1024, max_timeout_s=100, max_group_size=6)
    app = create_app(settings)
    yield app
    app.extensions["labq"].shutdown()


@pytest.fixture()
def client(app):
    return signed_in_client(app)


def submit(client, files=None, **form):
    resp = upload(client, make_zip(files or {"code.py": "print(1)\n"}), **form)
    assert resp.status_code == 201, resp.json
    return resp.json


def set_row(app, job_id, **values):
    with app.extensions["labq"].engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.id == job_id).values(**values))


def test_short_ids_work_and_ambiguous_ones_are_409(client, app):
    job = submit(client)
    assert client.get(f"/api/v1/jobs/{job['id'][:8]}").json["id"] == job["id"]
    assert client.get(f"/api/v1/jobs/{job['id'][:6]}/state").json["id"] == job["id"]
    assert client.get(f"/api/v1/jobs/{job['id'][:5]}").status_code == 404
    other = submit(client)
    # Give the second job an id sharing the first one's first 7 characters.
    twin = job["id"][:7] + other["id"][7:]
    set_row(app, other["id"], id=twin)
    resp = client.get(f"/api/v1/jobs/{job['id'][:7]}")
    assert resp.status_code == 409 and resp.json["error"]["code"] == "ambiguous_id"
    assert "type more" in resp.json["error"]["message"]
    assert client.get(f"/api/v1/jobs/{job['id'][:12]}").json["id"] == job["id"]


def test_search_by_name_outcome_date_and_sort_by_duration(client, app):
    a = submit(client, name="oscillator-a")
    b = submit(client, name="Oscillator-b")
    c = submit(client, name="pendulum")
    set_row(app, a["id"], outcome="error", run_s=5.0)
    set_row(app, b["id"], outcome="succeeded", run_s=50.0)
    set_row(app, c["id"], outcome="error", run_s=20.0)
    names = lambda resp: [j["name"] for j in resp.json["jobs"]]  # noqa: E731
    assert sorted(names(client.get("/api/v1/jobs?q=osc"))) == ["Oscillator-b", "oscillator-a"]
    assert names(client.get("/api/v1/jobs?q=osc&outcome=error")) == ["oscillator-a"]
    assert names(client.get("/api/v1/jobs?sort=-duration")) == [
        "Oscillator-b", "pendulum", "oscillator-a"]
    assert names(client.get("/api/v1/jobs?sort=created")) == [
        "oscillator-a", "Oscillator-b", "pendulum"]
    tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
    assert names(client.get(f"/api/v1/jobs?since={tomorrow}")) == []
    assert len(names(client.get(f"/api/v1/jobs?until={tomorrow}"))) == 3
    first = client.get("/api/v1/jobs?sort=duration&limit=2")
    assert first.json["next_cursor"]
    rest = client.get(f"/api/v1/jobs?sort=duration&limit=2&cursor={first.json['next_cursor']}")
    assert names(first) + names(rest) == ["oscillator-a", "pendulum", "Oscillator-b"]
    assert client.get("/api/v1/jobs?q=%25").json["jobs"] == []  # % is a character
    for bad in ("outcome=nope", "since=yesterday", "sort=size"):
        resp = client.get(f"/api/v1/jobs?{bad}")
        assert resp.status_code == 400, bad
        assert resp.json["error"]["field"] == bad.split("=")[0]


def test_a_sweep_makes_a_group_with_values_in_env_and_args(client):
    toml = ('args = ["--lr={lr}", "--seed={seed}", "{other}"]\n'
            '[sweep]\nseed = [1, 2, 3]\nlr = [0.1, 0.01]\n')
    job = submit(client, {"code.py": "", "labq.toml": toml})
    group = job["group"]
    assert group["size"] == 6 and len(group["job_ids"]) == 6
    shown = client.get(f"/api/v1/groups/{group['id']}").json
    assert shown["size"] == 6 and not shown["done"] and shown["states"] == {"created": 6}
    specs = [j["spec"] for j in shown["jobs"]]
    assert specs[0]["args"] == ["--lr=0.1", "--seed=1", "{other}"]
    assert specs[0]["env"] == {"seed": "1", "lr": "0.1"}
    assert {tuple(s["args"][:2]) for s in specs} == {
        (f"--lr={lr}", f"--seed={seed}") for seed in (1, 2, 3) for lr in (0.1, 0.01)}
    assert all(j["group_id"] == group["id"] for j in shown["jobs"])
    assert shown["jobs"][0]["name"] == "proj[seed=1,lr=0.1]"
    listed = client.get(f"/api/v1/jobs?group={group['id']}").json["jobs"]
    assert len(listed) == 6
    assert client.get(f"/api/v1/groups/{group['id']}/results").status_code == 404
    assert client.get("/api/v1/groups/" + "0" * 32).status_code == 404


@pytest.mark.parametrize("toml, text", [
    ("[sweep]\na = [1, 2, 3]\nb = [1, 2, 3]\n", "at most 6"),
    ("[sweep]\na = []\n", "non-empty list"),
    ("[sweep]\nPATH = [1]\n", "reserved"),
    ("sweep = 3\n", "table"),
])
def test_bad_sweeps_are_422_and_nothing_is_created(client, toml, text):
    resp = upload(client, make_zip({"code.py": "", "labq.toml": toml}))
    assert resp.status_code == 422 and text in resp.json["error"]["message"], resp.json
    assert client.get("/api/v1/jobs").json["jobs"] == []


def test_rerun_reuses_the_bundle_with_overrides(client, app):
    job = submit(client, {"code.py": "", "labq.toml": 'args = ["--lr=1"]\ntimeout_s = 50\n'})
    resp = client.post(f"/api/v1/jobs/{job['id'][:8]}/rerun", json={"args": ["--lr=2"]})
    assert resp.status_code == 201, resp.json
    again = resp.json
    assert again["id"] != job["id"] and again["rerun_of"] == job["id"]
    assert again["bundle"] == job["bundle"] and again["spec"]["args"] == ["--lr=2"]
    assert again["spec"]["timeout_s"] == 50
    plain = client.post(f"/api/v1/jobs/{job['id']}/rerun")
    assert plain.status_code == 201 and plain.json["spec"]["args"] == ["--lr=1"]
    for body, status in (({"timeout_s": 1000}, 422), ({"entrypoint": "x.py"}, 400),
                         ({"args": "no"}, 422)):
        assert client.post(f"/api/v1/jobs/{job['id']}/rerun", json=body).status_code == status
    bad = client.post(f"/api/v1/jobs/{job['id']}/rerun", data="{nope",
                      content_type="application/json")
    assert bad.status_code == 400


def test_receipt_names_bundle_packages_and_result_hashes(client, app):
    job = submit(client, {"code.py": "", "labq.toml": 'args = ["-v"]\n[env]\nA = "1"\n'})
    storage = app.extensions["labq"].storage
    folder = storage.job_dir(job["id"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "environment.json").write_text(json.dumps({
        "python": "3.11.2", "packages": ["numpy==2.0.0"], "env_key": "k",
        "worker_host": "h1", "labq_version": "0.1.0"}))
    results = storage.results_dir(job["id"])
    results.mkdir(parents=True)
    (results / "a.txt").write_text("hello")
    set_row(app, job["id"], state="stopped", outcome="succeeded", exit_code=0,
            stopped_at=time.time())
    receipt = client.get(f"/api/v1/jobs/{job['id']}/receipt").json
    assert receipt["bundle_sha256"] == job["bundle"]["sha256"]
    assert (receipt["entrypoint"], receipt["args"], receipt["env"]) == ("code.py", ["-v"],
                                                                         {"A": "1"})
    assert receipt["environment"]["packages"] == ["numpy==2.0.0"]
    assert receipt["environment"]["python"] == "3.11.2"
    assert (receipt["worker_host"], receipt["labq_version"], receipt["exit_code"]) == (
        "h1", "0.1.0", 0)
    assert receipt["results"] == [{"path": "a.txt", "size": 5,
                                   "sha256": hashlib.sha256(b"hello").hexdigest()}]
    assert receipt["limits"]["timeout_s"] and receipt["complete"] is True


@pytest.mark.parametrize("url, ok", [
    ("https://hooks.example.org/labq", True),
    ("http://127.0.0.1:9/x", False),
    ("http://10.1.2.3/x", False),
    ("http://[::1]/x", False),
    ("ftp://example.org/x", False),
    ("https://user:pw@example.org/x", False),
])
def test_notify_url_is_checked(client, url, ok):
    resp = upload(client, make_zip({"code.py": ""}), notify_url=url)
    assert (resp.status_code == 201) is ok, resp.json
    if ok:
        assert resp.json["notify_url"] == url
    else:
        assert resp.json["error"]["field"] == "notify_url"


def test_a_short_id_never_reveals_another_users_job(client, app):
    # Given alice's job and bob's job whose ids share their first 7 characters
    from labq.backend import accounts

    engine = app.extensions["labq"].engine
    user = accounts.create_user(engine, "alice")
    _, token = accounts.create_token(engine, user["id"], "test")
    alice = app.test_client()
    alice.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    mine = submit(alice)
    bobs = submit(client)  # the admin's job stands in for "another user"
    # (the 8th character differs, so the twin's 8-character prefix is its own)
    twin = mine["id"][:7] + ("0" if mine["id"][7] != "0" else "1") + bobs["id"][8:]
    set_row(app, bobs["id"], id=twin)
    # When alice uses the shared prefix, it names her job (not "ambiguous": that would
    # reveal the other job); the other job's own prefix is a plain 404 for her
    assert alice.get(f"/api/v1/jobs/{mine['id'][:7]}").json["id"] == mine["id"]
    assert alice.get(f"/api/v1/jobs/{twin[:8]}").status_code == 404
    # while the admin, who sees both, is told the prefix is ambiguous
    assert client.get(f"/api/v1/jobs/{mine['id'][:7]}").status_code == 409
