"""The REST API through Flask's test client, with no broker (publishing fails fast)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from helpers import make_zip, signed_in_client

from labq.backend.app import create_app
from labq.shared.messages import LifecycleEvent, event_seq
from labq.shared.settings import Settings

NO_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"


@pytest.fixture()
def app(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data", prefix="unitapi", rabbitmq_url=NO_BROKER,
                        max_upload_bytes=64 * 1024, max_bundle_files=5, max_timeout_s=100)
    app = create_app(settings)
    yield app
    app.extensions["labq"].shutdown()


@pytest.fixture()
def client(app):
    return signed_in_client(app)


def upload(client, body: bytes, headers=None, path="/api/v1/jobs", **form):
    return client.post(path, data={"bundle": (io.BytesIO(body), "b.zip"), **form},
                       headers=headers or {}, content_type="multipart/form-data")


def tmp_files(app) -> list[Path]:
    return list(app.extensions["labq"].storage.tmp.iterdir())


def test_submit_without_broker_is_accepted_as_created(client, app):
    resp = upload(client, make_zip({"code.py": "print(1)\n"}))
    assert resp.status_code == 201, resp.json
    job = resp.json
    assert job["state"] == "created" and job["name"] == "proj"
    assert resp.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    assert job["bundle"]["bytes"] > 0 and len(job["bundle"]["sha256"]) == 64
    storage = app.extensions["labq"].storage
    assert storage.bundle_path(job["bundle"]["sha256"]).exists()
    assert tmp_files(app) == []
    assert client.get(f"/api/v1/jobs/{job['id']}").json["id"] == job["id"]


def test_form_overrides(client):
    resp = upload(client, make_zip({"code.py": "", "train.py": ""}), name="run-3",
                  timeout_s="50", entrypoint="train.py")
    assert resp.status_code == 201, resp.json
    assert resp.json["name"] == "run-3"
    assert resp.json["spec"]["timeout_s"] == 50 and resp.json["spec"]["entrypoint"] == "train.py"


@pytest.mark.parametrize(("form", "field"), [({"timeout_s": "soon"}, "timeout_s"),
                                              ({"timeout_s": "1000"}, "timeout_s"),
                                              ({"memory_mb": "-3"}, "memory_mb")])
def test_bad_overrides_are_422(client, app, form, field):
    resp = upload(client, make_zip({"code.py": ""}), **form)
    assert resp.status_code == 422
    assert resp.json["error"]["field"] == field
    assert client.get("/api/v1/jobs").json["jobs"] == []
    assert tmp_files(app) == []


def test_idempotency_key(client):
    body = make_zip({"code.py": ""})
    first = upload(client, body, headers={"Idempotency-Key": "abc"})
    again = upload(client, body, headers={"Idempotency-Key": "abc"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json["id"] == first.json["id"]
    assert len(client.get("/api/v1/jobs").json["jobs"]) == 1


def test_upload_errors(client, app):
    assert client.post("/api/v1/jobs").status_code == 400
    assert upload(client, b"not a zip").status_code == 400
    big = upload(client, b"x" * (100 * 1024))
    assert big.status_code == 413 and big.json["error"]["code"] == "bundle_too_large"
    many = upload(client, make_zip({f"f{i}.py": "" for i in range(9)} | {"code.py": ""}))
    assert many.status_code == 413
    assert upload(client, make_zip({"main.py": ""})).json["error"]["code"] == \
        "missing_entrypoint"
    assert client.get("/api/v1/jobs").json["jobs"] == []
    assert tmp_files(app) == []


def test_errors_are_json(client):
    for resp, status in ((client.get("/api/v1/jobs/" + "0" * 32), 404),
                         (client.get("/nowhere"), 404),
                         (client.delete("/api/v1/jobs"), 405),
                         (client.get("/api/v1/jobs?limit=x"), 400),
                         (client.get("/api/v1/jobs?state=nope"), 400)):
        assert resp.status_code == status
        assert set(resp.json["error"]) >= {"code", "message"}


def test_state_routes(client, app):
    job = upload(client, make_zip({"code.py": ""})).json
    url = f"/api/v1/jobs/{job['id']}/state"
    assert client.get(url).json == {"id": job["id"], "state": "created", "requested_state": None,
                                   "outcome": None, "allowed": ["stopped"]}
    assert client.put(url, json={"state": "started"}).status_code == 200  # no-op
    conflict = client.put(url, json={"state": "paused"})
    assert conflict.status_code == 409
    assert conflict.json["error"]["state"] == "created"
    assert client.put(url, data="nope").status_code == 400
    stopped = client.put(url, json={"state": "stopped"})
    assert (stopped.status_code, stopped.json["state"], stopped.json["outcome"]) == \
        (200, "stopped", "cancelled")
    # A running job cannot be reached without a broker: 503, request forgotten.
    other = upload(client, make_zip({"code.py": ""})).json
    app.extensions["labq"].registry.apply_event(LifecycleEvent(
        job_id=other["id"], seq=event_seq(1, 2), state="started", attempt=1))
    resp = client.put(f"/api/v1/jobs/{other['id']}/state", json={"state": "paused"})
    assert resp.status_code == 503 and resp.json["error"]["code"] == "broker_unavailable"
    assert client.get(f"/api/v1/jobs/{other['id']}").json["requested_state"] is None


def test_log_offsets_and_results(client, app):
    job = upload(client, make_zip({"code.py": ""})).json
    storage = app.extensions["labq"].storage
    empty = client.get(f"/api/v1/jobs/{job['id']}/log")
    assert (empty.status_code, empty.data, empty.headers["X-Log-Size"]) == (200, b"", "0")
    storage.log_path(job["id"]).parent.mkdir(parents=True, exist_ok=True)
    storage.log_path(job["id"]).write_bytes("héllo\nworld\n".encode())
    resp = client.get(f"/api/v1/jobs/{job['id']}/log?offset=7")
    assert resp.data == b"world\n" and resp.headers["X-Log-Size"] == "13"
    assert client.get(f"/api/v1/jobs/{job['id']}/log?offset=-1").status_code == 400
    missing = client.get(f"/api/v1/jobs/{job['id']}/results")
    assert missing.status_code == 404 and "no results yet" in missing.json["error"]["message"]
    assert client.get(f"/api/v1/jobs/{job['id']}/results/files").status_code == 404
    results = storage.results_dir(job["id"])
    (results / "sub").mkdir(parents=True)
    (results / "sub" / "a.txt").write_text("A")
    (results / "b.bin").write_bytes(b"BB")
    (results / "link").symlink_to("/etc/passwd")
    (results / "dirlink").symlink_to(results / "sub")
    with zipfile.ZipFile(storage.results_zip(job["id"]), "w") as zf:
        zf.writestr("b.bin", b"BB")
    listing = client.get(f"/api/v1/jobs/{job['id']}/results/files").json["files"]
    assert listing == [{"path": "b.bin", "size": 2}, {"path": "sub/a.txt", "size": 1}]
    base = f"/api/v1/jobs/{job['id']}/results/files"
    assert client.get(f"{base}/sub/a.txt").data == b"A"
    for bad in ("link", "dirlink/a.txt", "../log.txt", "sub/../../log.txt", "%2e%2e/log.txt",
                "nope"):
        assert client.get(f"{base}/{bad}").status_code == 404, bad
    assert client.get(f"/api/v1/jobs/{job['id']}/results").status_code == 200


def test_log_stream_ends_when_job_is_terminal(client, app):
    job = upload(client, make_zip({"code.py": ""})).json
    storage = app.extensions["labq"].storage
    storage.log_path(job["id"]).parent.mkdir(parents=True, exist_ok=True)
    storage.log_path(job["id"]).write_bytes(b"line one\nline two\n")
    client.put(f"/api/v1/jobs/{job['id']}/state", json={"state": "stopped"})
    resp = client.get(f"/api/v1/jobs/{job['id']}/log",
                      headers={"Accept": "text/event-stream"})
    text = resp.get_data(as_text=True)
    assert resp.mimetype == "text/event-stream"
    assert "data: line one\ndata: line two\ndata: \n\n" in text
    assert text.rstrip().splitlines()[-2] == "event: end"


def test_health_stats_metrics_openapi_pages(client):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json["error"]["checks"]["broker"] == "down"
    stats = client.get("/api/v1/stats").json
    assert stats["jobs"]["created"] == 0 and stats["queue"]["messages"] is None
    assert 'labq_jobs{state="queued"} 0' in client.get("/metrics").get_data(as_text=True)
    spec = client.get("/api/v1/openapi.json").json
    assert spec["openapi"].startswith("3.")
    assert {"/api/v1/jobs", "/api/v1/jobs/{id}/state", "/simulation/{id}/state"} <= \
        set(spec["paths"])
    json.dumps(spec)
    for page in ("/", "/upload", "/results", "/jobs/" + "0" * 32, "/static/app.css"):
        assert client.get(page).status_code == 200, page
    assert client.get("/static/__init__.py").status_code == 404


def test_nrp_routes(client):
    created = upload(client, make_zip({"code.py": ""}), path="/simulation")
    assert created.status_code == 201
    sim_id = created.json["id"]
    assert [j["id"] for j in client.get("/simulation").json] == [sim_id]
    assert client.get(f"/simulation/{sim_id}").json["state"] == "created"
    assert client.get(f"/simulation/{sim_id}/state").json["state"] == "created"
    resp = client.put(f"/simulation/{sim_id}/state", json={"state": "stopped"})
    assert resp.status_code == 200 and resp.json["state"] == "stopped"
    assert client.get("/simulation/" + "0" * 32).status_code == 404
