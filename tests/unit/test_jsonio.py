"""The backend's JSON goes through orjson (backend/jsonio.py) and says the same as
Flask's own: every value that was serialisable still is, the same way."""

from __future__ import annotations

import datetime
import decimal
from pathlib import Path

import pytest
from flask import jsonify, request
from helpers import signed_in_client

from labq.backend.app import create_app
from labq.shared.settings import Settings


@pytest.fixture()
def app(tmp_path: Path):
    app = create_app(Settings(data_dir=tmp_path / "data", prefix="unitjson",
                              rabbitmq_url="amqp://guest:guest@127.0.0.1:1/%2F"))

    @app.post("/echo")
    def echo():  # noqa: ANN202
        return jsonify(request.get_json())

    yield app
    app.extensions["labq"].shutdown()


def test_values_read_back_as_flask_wrote_them(app):
    value = {"b": 1, "a": [1.5, None, True], "name": "Jürgen’s run ✓", 3: "int key",
             "big": 2**70, "when": datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC),
             "day": datetime.date(2024, 5, 1), "price": decimal.Decimal("1.10")}
    with app.app_context():
        body = jsonify(value).get_data()
        plain = app.json.loads(body)
    assert list(plain) == ["b", "a", "name", "3", "big", "when", "day", "price"]  # in order
    assert plain["name"] == "Jürgen’s run ✓" and plain["3"] == "int key"
    assert plain["big"] == 2**70  # past 64 bits: the standard library writes it
    assert plain["when"] == "Wed, 01 May 2024 12:00:00 GMT"  # Flask's HTTP date, as before
    assert plain["day"] == "Wed, 01 May 2024 00:00:00 GMT" and plain["price"] == "1.10"
    assert body.endswith(b"\n")


def test_bodies_in_and_out(app):
    client = signed_in_client(app)
    resp = client.post("/echo", json={"x": [1, "ü"]})
    assert resp.status_code == 200 and resp.json == {"x": [1, "ü"]}
    assert resp.mimetype == "application/json"
    broken = client.post("/echo", data=b'{"x": NaN', content_type="application/json")
    assert broken.status_code == 400
