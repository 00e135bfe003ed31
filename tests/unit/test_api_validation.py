"""What the API refuses, as its OpenAPI document states it (through Flask's test client,
no broker): strict whole numbers for event ids and offsets, token ids past the column's range,
token names that are not text, replays of invalid uploads, JSON's 5.0 as the integer 5,
a notify_url that does not even parse, and text holding a NUL character."""

from __future__ import annotations

import io

import pytest
from helpers import make_zip, signed_in_client

from labq.backend.app import create_app
from labq.backend.params import MAX_WHOLE, whole_number
from labq.shared.errors import BadRequestError
from labq.shared.settings import Settings

NO_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"


@pytest.fixture()
def app(tmp_path):
    app = create_app(Settings(data_dir=tmp_path / "data", prefix="unitval",
                              rabbitmq_url=NO_BROKER, max_timeout_s=100))
    yield app
    app.extensions["labq"].shutdown()


@pytest.fixture()
def client(app):
    return signed_in_client(app)


def upload(client, body: bytes, headers=None, **form):
    return client.post("/api/v1/jobs", data={"bundle": (io.BytesIO(body), "b.zip"), **form},
                       headers=headers or {}, content_type="multipart/form-data")


@pytest.mark.parametrize("raw", ["+5", "-1", "1_000", "٣", "1.0", "{}", "1" * 19, "0x10"])
def test_whole_numbers_are_plain_digits(raw):
    with pytest.raises(BadRequestError) as caught:
        whole_number(raw, "offset", default=0)
    assert caught.value.details["field"] == "offset"


def test_whole_number_blank_is_the_default():
    assert whole_number(None, "x", 7) == 7 and whole_number("  ", "x", 7) == 7
    assert whole_number(" 12 ", "x", 7) == 12 and whole_number(str(MAX_WHOLE), "x", 0) == \
        MAX_WHOLE


def test_event_ids_are_checked_both_in_the_header_and_the_query(client):
    bad_header = client.get("/api/v1/events", headers={"Last-Event-ID": "{}"})
    assert bad_header.status_code == 400
    assert bad_header.json["error"]["field"] == "Last-Event-ID"
    bad_query = client.get("/api/v1/events?last_event_id=abc", headers={"Last-Event-ID": "3"})
    assert bad_query.status_code == 400 and bad_query.json["error"]["field"] == "last_event_id"


def test_a_log_offset_and_a_bad_last_event_id(client):
    job = upload(client, make_zip({"code.py": ""})).json
    resp = client.get(f"/api/v1/jobs/{job['id']}/log?offset=0",
                      headers={"Last-Event-ID": "not-a-number"})
    assert resp.status_code == 400 and resp.json["error"]["field"] == "Last-Event-ID"
    huge = client.get(f"/api/v1/jobs/{job['id']}/log?offset=9223372036854775808")
    assert huge.status_code == 400 and huge.json["error"]["field"] == "offset"
    assert client.get(f"/api/v1/jobs/{job['id']}/log?offset=5").status_code == 200


@pytest.mark.parametrize("token_id", [2**31, 2**63])
def test_a_token_id_past_the_columns_range_is_no_token(client, token_id):
    resp = client.delete(f"/api/v1/tokens/{token_id}")
    assert resp.status_code == 404 and resp.json["error"]["code"] == "not_found"


@pytest.mark.parametrize("body", [{"name": None}, {"name": {}}, {"name": 0}, [None], "x"])
def test_a_token_name_must_be_text(client, body):
    resp = client.post("/api/v1/tokens", json=body)
    assert resp.status_code == 400, resp.json


def test_a_token_name_may_be_left_out(client):
    assert client.post("/api/v1/tokens", json={}).json["name"] == "token"
    assert client.post("/api/v1/tokens").json["name"] == "token"
    assert client.post("/api/v1/tokens", data={"name": "ci"}).json["name"] == "ci"


def test_a_replay_is_checked_like_the_upload_it_repeats(client):
    body = make_zip({"code.py": ""})
    key = {"Idempotency-Key": "k-1"}
    first = upload(client, body, headers=key)
    assert first.status_code == 201
    # Before, any request with a used key got the job back: now it must be valid itself.
    assert upload(client, b"not a zip", headers=key).status_code == 400
    assert upload(client, body, headers=key, timeout_s="1000").status_code == 422
    again = upload(client, body, headers=key)
    assert again.status_code == 200 and again.json["id"] == first.json["id"]


def test_a_rerun_limit_may_be_a_whole_float(client):
    job = upload(client, make_zip({"code.py": ""})).json
    resp = client.post(f"/api/v1/jobs/{job['id']}/rerun", json={"timeout_s": 50.0})
    assert resp.status_code == 201, resp.json
    assert resp.json["spec"]["timeout_s"] == 50
    half = client.post(f"/api/v1/jobs/{job['id']}/rerun", json={"timeout_s": 50.5})
    assert half.status_code == 422 and half.json["error"]["field"] == "timeout_s"


def test_an_unparsable_notify_url_is_a_422(client):
    resp = upload(client, make_zip({"code.py": ""}), notify_url="http://[oops/x")
    assert resp.status_code == 422 and resp.json["error"]["field"] == "notify_url"


def test_no_text_may_hold_a_nul_character(client):
    # PostgreSQL refuses NUL in text (it was a 500 there); nothing in labq can use one.
    listed = client.get("/api/v1/jobs?group=a%00b")
    assert listed.status_code == 400 and listed.json["error"]["field"] == "group"
    assert client.post("/api/v1/tokens", json={"name": "a\x00"}).status_code == 400
    assert client.post("/login", json={"name": "a\x00", "password": "x"}).status_code == 400
    form = upload(client, make_zip({"code.py": ""}), notify_url="https://example.org/\x00")
    assert form.status_code == 400 and form.json["error"]["field"] == "notify_url"
    assert client.get("/api/v1/jobs?group=ab").status_code == 200


def test_a_form_part_with_an_unreadable_name_is_no_server_error(client):
    # werkzeug reads the name of this part as None (the backslash escapes the quote).
    body = b'--b\r\nContent-Disposition: form-data; name="x\\"\r\n\r\nv\r\n--b--\r\n'
    resp = client.post("/api/v1/jobs", data=body,
                       content_type="multipart/form-data; boundary=b")
    assert resp.status_code == 400 and resp.json["error"]["field"] == "bundle"
