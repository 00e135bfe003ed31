"""The REST API of a real backend (gunicorn, RabbitMQ, no workers): bad input, listing,
idempotency, NRP routes, readiness, OpenAPI, events and logs."""

from __future__ import annotations

import io
import json
import os
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
import requests
from helpers import LabqSystem, make_zip, wait_until

from labq.client.sse import iter_sse
from labq.shared.messages import LifecycleEvent, event_seq
from labq.shared.topology import PERSISTENT, Topology

pytestmark = pytest.mark.integration

LIMITS = {"LABQ_MAX_BUNDLE_FILES": "5", "LABQ_MAX_UPLOAD_BYTES": str(300 * 1024),
          "LABQ_MAX_UNPACKED_BYTES": str(2 * 1024 * 1024), "LABQ_MAX_COMPRESSION_RATIO": "50",
          "LABQ_MAX_TIMEOUT_S": "600", "LABQ_MAX_MEMORY_MB": "1024"}


@pytest.fixture(scope="module")
def api(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabqSystem]:
    """A backend with small limits and no workers: queued jobs stay on the queue."""
    sys_ = LabqSystem(tmp_path_factory.mktemp("labq-api"), workers=0, env=LIMITS)
    try:
        sys_.start()
        yield sys_
    finally:
        sys_.stop()


def queue_depth(system: LabqSystem) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(system.settings.rabbitmq_url))
    try:
        ok = conn.channel().queue_declare(Topology(system.prefix).jobs_queue, passive=True)
        return ok.method.message_count
    finally:
        conn.close()


def all_jobs(system: LabqSystem) -> list[str]:
    return [j["id"] for j in system.http.get(system.api("/api/v1/jobs?limit=500"),
                                          timeout=10).json()["jobs"]]


def post(system: LabqSystem, body: bytes, **form: str) -> requests.Response:
    return system.http.post(system.api("/api/v1/jobs"), files={"bundle": ("b.zip", body)},
                         data=form, timeout=30)


def raw_zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def symlink_zip() -> bytes:
    link = zipfile.ZipInfo("proj/evil")
    link.external_attr = (0o120777 << 16)
    return raw_zip([("proj/code.py", b"print(1)"), (link, b"/etc/passwd")])


BAD_INPUTS = {
    "not a zip": (lambda: b"this is not a zip at all", 400, "bad_bundle", None),
    "dotdot": (lambda: raw_zip([("proj/code.py", b""), ("proj/../../escape.py", b"x")]),
               400, "bad_bundle", "climbs out"),
    "absolute": (lambda: raw_zip([("code.py", b""), ("/tmp/labq-abs-escape.py", b"x")]),
                 400, "bad_bundle", "absolute path"),
    "symlink": (symlink_zip, 400, "bad_bundle", "symbolic link"),
    "too many files": (lambda: make_zip({f"f{i}.txt": "x" for i in range(6)} | {"code.py": ""}),
                       413, "bundle_too_large", "more than 5 files"),
    # Three highly compressible files under 1 MiB each: no single one looks like a bomb.
    "too large unpacked": (lambda: make_zip({"code.py": ""} | {f"{c}.bin": b"\0" * 900_000
                                                                for c in "abc"}),
                           413, "bundle_too_large", "unpacks to more"),
    "zip bomb": (lambda: make_zip({"code.py": "", "bomb.bin": b"\0" * (1500 * 1024)}),
                 413, "bundle_too_large", "zip bomb"),
    "no entrypoint": (lambda: make_zip({"main.py": "print(1)"}), 422, "missing_entrypoint",
                      "code.py"),
    "upload too large": (lambda: os.urandom(400 * 1024), 413, "bundle_too_large", "larger"),
    "bad manifest": (lambda: make_zip({"code.py": "", "labq.toml": "timeout_s = 'soon'\n"}),
                     422, "invalid_manifest", "timeout_s"),
    "unknown manifest key": (lambda: make_zip({"code.py": "", "labq.toml": "gpus = 4\n"}),
                             422, "invalid_manifest", "gpus"),
    "manifest over max": (lambda: make_zip({"code.py": "", "labq.toml": "memory_mb = 4096\n"}),
                          422, "invalid_manifest", "memory_mb"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_changes_nothing(api, case):
    make, status, code, words = BAD_INPUTS[case]
    before = all_jobs(api)
    files_before = sorted(p for p in api.data_dir.rglob("*") if "labq.db" not in p.name)
    resp = post(api, make())
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code
    if words:
        assert words in error["message"] or words == error.get("field"), error
    assert all_jobs(api) == before
    assert queue_depth(api) == 0
    files_after = sorted(p for p in api.data_dir.rglob("*") if "labq.db" not in p.name)
    assert files_after == files_before, "a refused upload left files behind"
    assert not Path("/tmp/labq-abs-escape.py").exists()
    assert not (api.data_dir.parent / "escape.py").exists()


def test_manifest_error_names_the_field(api):
    resp = post(api, make_zip({"code.py": "", "labq.toml": "cpus = 0\n"}))
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "cpus"


def test_unknown_job_is_404_json(api):
    for path in ("/api/v1/jobs/" + "0" * 32, "/api/v1/jobs/nope/log",
                 "/api/v1/jobs/" + "1" * 32 + "/results", "/simulation/" + "2" * 32):
        resp = api.http.get(api.api(path), timeout=10)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", path


def test_submit_queues_one_message_then_pagination_and_filters(api):
    depth = queue_depth(api)
    ids = [api.submit({"code.py": ""}, root=f"page{i % 2}")["id"] for i in range(5)]
    assert queue_depth(api) == depth + 5
    assert all(api.job(i)["state"] == "queued" for i in ids)
    assert api.job(ids[0])["queued_at"] is not None
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.http.get(api.api("/api/v1/jobs"), params=params, timeout=10).json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen[:5] == list(reversed(ids))
    named = api.http.get(api.api("/api/v1/jobs"), params={"name": "page1"}, timeout=10).json()
    assert {j["id"] for j in named["jobs"]} == set(ids[1::2])
    queued = api.http.get(api.api("/api/v1/jobs"), params={"state": "queued"}, timeout=10)
    assert set(ids) <= {j["id"] for j in queued.json()["jobs"]}
    stats = api.http.get(api.api("/api/v1/stats"), timeout=10).json()
    assert stats["queue"]["messages"] == depth + 5 and stats["queue"]["consumers"] == 0
    assert stats["jobs"]["queued"] >= 5


def test_idempotency_key(api):
    body = make_zip({"code.py": ""})
    headers = {"Idempotency-Key": f"key-{time.time()}"}
    first = api.http.post(api.api("/api/v1/jobs"), files={"bundle": ("b.zip", body)},
                          headers=headers, timeout=30)
    depth = queue_depth(api)
    again = api.http.post(api.api("/api/v1/jobs"), files={"bundle": ("b.zip", body)},
                          headers=headers, timeout=30)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert queue_depth(api) == depth


def test_nrp_routes(api):
    resp = api.http.post(api.api("/simulation"),
                         files={"bundle": ("b.zip", make_zip({"code.py": ""}))}, timeout=30)
    assert resp.status_code == 201
    sim = resp.json()["id"]
    assert sim in [j["id"] for j in api.http.get(api.api("/simulation"), timeout=10).json()]
    assert api.http.get(api.api(f"/simulation/{sim}"), timeout=10).json()["state"] == "queued"
    state = api.http.get(api.api(f"/simulation/{sim}/state"), timeout=10).json()
    assert state["state"] == "queued" and state["allowed"] == ["stopped"]
    bad = api.http.put(api.api(f"/simulation/{sim}/state"), json={"state": "paused"}, timeout=10)
    assert bad.status_code == 409 and bad.json()["error"]["allowed"] == ["stopped"]
    stop = api.http.put(api.api(f"/simulation/{sim}/state"), json={"state": "stopped"},
                        timeout=10)
    assert stop.status_code == 200 and stop.json()["state"] == "stopped"
    assert api.job(sim)["outcome"] == "cancelled"
    assert (api.data_dir / "jobs" / sim / "cancelled").exists()


def test_readyz_openapi_metrics(api):
    ready = api.http.get(api.api("/readyz"), timeout=10)
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok",
                                                                   "broker": "ok"}
    spec = api.http.get(api.api("/api/v1/openapi.json"), timeout=10).json()
    assert spec["openapi"] == "3.1.0" and "/api/v1/events" in spec["paths"]
    metrics = api.http.get(api.api("/metrics"), timeout=10).text
    assert "labq_queue_messages" in metrics and "labq_broker_up 1" in metrics
    assert api.http.get(api.api("/"), timeout=10).headers["Content-Type"].startswith("text/html")


def publish_event(system: LabqSystem, event: LifecycleEvent) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(system.settings.rabbitmq_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(Topology(system.prefix).events_exchange, event.routing_key,
                         event.encode(), pika.BasicProperties(delivery_mode=PERSISTENT))
    finally:
        conn.close()


def read_sse(resp: requests.Response, into: list, stop_when) -> None:
    for event, data, _last_id in iter_sse(resp):
        into.append((event, data))
        if stop_when(event, data):
            return


def test_events_applied_streamed_in_order_and_log_followed(api):
    """Events a worker would publish reach the job, the event stream and the log stream."""
    job_id = api.submit({"code.py": ""})["id"]
    received: list = []
    stream = api.http.get(api.api("/api/v1/events"), stream=True, timeout=30)
    reader = threading.Thread(target=read_sse, args=(
        stream, received, lambda e, d: e == "lifecycle" and '"stopped"' in d))
    reader.start()
    log_path = api.data_dir / "jobs" / job_id / "log.txt"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("first line\n")
    log_lines: list = []
    log_resp = api.http.get(api.api(f"/api/v1/jobs/{job_id}/log"), stream=True, timeout=30,
                            headers={"Accept": "text/event-stream"})
    log_reader = threading.Thread(target=read_sse, args=(log_resp, log_lines,
                                                         lambda e, d: e == "end"))
    log_reader.start()
    states = ["initialized", "started", "paused", "started", "completed"]
    for n, state in enumerate(states, start=1):
        publish_event(api, LifecycleEvent(job_id=job_id, seq=event_seq(1, n), state=state,
                                          attempt=1, worker="w-test"))
    publish_event(api, LifecycleEvent(job_id=job_id, seq=event_seq(1, 2), state="started",
                                      attempt=1))  # stale: dropped
    wait_until(lambda: api.job(job_id)["state"] == "completed", timeout=15)
    with open(log_path, "a") as handle:
        handle.write("second line\n")
    # The log stream has sent the new line before "stopped" ends it.
    wait_until(lambda: any("second line" in d for e, d in list(log_lines) if e == "message"),
               timeout=15, message="the log stream to send the second line")
    publish_event(api, LifecycleEvent(job_id=job_id, seq=event_seq(1, 6), state="stopped",
                                      attempt=1, outcome="succeeded", exit_code=0))
    reader.join(20)
    log_reader.join(20)
    stream.close()
    log_resp.close()
    done = api.wait_done(job_id, timeout=10)
    assert (done["outcome"], done["exit_code"], done["attempts"], done["worker"]) == \
        ("succeeded", 0, 1, "w-test")
    mine = [json.loads(d) for e, d in received if e == "lifecycle"]
    mine = [e["state"] for e in mine if e["job_id"] == job_id]
    assert mine == [*states, "stopped"]
    text = "".join(d + "\n" if d else "" for e, d in log_lines if e == "message")
    assert "first line" in text and "second line" in text
    assert log_lines[-1][0] == "end"
    # Resume after a given event id replays what came after it.
    first_id = api.http.get(api.api("/api/v1/events"), stream=True, timeout=10,
                            headers={"Last-Event-ID": "0"})
    replay: list = []
    read_sse(first_id, replay, lambda e, d: e == "lifecycle" and job_id in d
             and '"stopped"' in d)
    first_id.close()
    assert any(job_id in d for _, d in replay)


def test_api_keeps_answering_while_many_streams_are_open(api):
    """40 open event/log streams (of 64 threads) do not starve ordinary requests."""
    job_id = api.submit({"code.py": ""})["id"]
    streams = []
    try:
        for i in range(40):
            path = "/api/v1/events" if i % 2 else f"/api/v1/jobs/{job_id}/log"
            resp = api.http.get(api.api(path), stream=True, timeout=10,
                                headers={"Accept": "text/event-stream"})
            assert resp.status_code == 200
            streams.append(resp)
        began = time.monotonic()
        for _ in range(10):
            assert api.http.get(api.api("/api/v1/jobs?limit=5"), timeout=5).status_code == 200
        assert time.monotonic() - began < 5
        metrics = api.http.get(api.api("/metrics"), timeout=5).text
        # Streams of earlier tests may linger until their next keep-alive write fails.
        open_streams = int(metrics.split("labq_event_streams ")[-1].split()[0])
        assert open_streams >= 20
    finally:
        for resp in streams:
            resp.close()


def test_a_job_cannot_turn_its_log_or_results_into_a_window_on_the_host(api, tmp_path):
    # Given a job whose folder a malicious script rearranged: its log is a symlink to a
    # secret of the backend host, and its results folder is a symlink to elsewhere
    secret = tmp_path / "secret.txt"
    secret.write_text("S3CRET")
    job = api.submit({"code.py": ""})
    folder = api.data_dir / "jobs" / job["id"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").symlink_to(secret)
    (folder / "results.zip").symlink_to(secret)
    (folder / "results").symlink_to(tmp_path)
    # Then no route serves what the links point at
    for path in ("log", "log?follow=1", "results", "results/files",
                 "results/files/secret.txt"):
        resp = api.http.get(api.api(f"/api/v1/jobs/{job['id']}/{path}"), timeout=10,
                            headers={"Accept": "text/event-stream"} if "follow" in path else {})
        assert "S3CRET" not in resp.text, path
        assert resp.status_code == 404, (path, resp.status_code, resp.text[:200])


def test_result_files_are_shown_inline_but_sandboxed(api):
    # Given a stopped job whose output/ holds an HTML page (results written as a worker
    # would: the results folder under the job's folder)
    job = api.submit({"code.py": ""})
    results = api.data_dir / "jobs" / job["id"] / "results"
    results.mkdir(parents=True)
    (results / "report.html").write_text("<script>fetch('/api/v1/jobs')</script>")
    resp = api.http.get(api.api(f"/api/v1/jobs/{job['id']}/results/files/report.html"),
                        timeout=10)
    # Then it is served, but its scripts cannot act as labq's origin
    assert resp.status_code == 200
    csp = [d.strip() for d in resp.headers["Content-Security-Policy"].split(";")]
    assert csp == ["sandbox", "frame-ancestors 'none'"]
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
