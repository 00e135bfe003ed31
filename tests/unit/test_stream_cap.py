"""Open streams are capped: one past LABQ_MAX_STREAMS gets 503 with Retry-After, the API
goes on answering, and a stream that ends frees its slot at once."""

from __future__ import annotations

import pytest
from helpers import signed_in_client
from test_backend_api import NO_BROKER

from labq.backend.app import create_app
from labq.shared.settings import Settings


@pytest.fixture()
def app(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", prefix="unitcap", rabbitmq_url=NO_BROKER,
                        max_streams=2)
    app = create_app(settings)
    yield app
    app.extensions["labq"].shutdown()


def test_one_stream_past_the_cap_is_a_503_and_a_closed_one_frees_its_slot(app):
    client = signed_in_client(app)
    # Given two open event streams (the cap)
    open_streams = [client.get("/api/v1/events", buffered=False) for _ in range(2)]
    assert all(r.status_code == 200 for r in open_streams)
    # When a third is asked for, it is refused at once, saying when to try again
    third = client.get("/api/v1/events", buffered=False)
    assert third.status_code == 503 and third.headers["Retry-After"] == "5"
    assert third.json["error"]["code"] == "too_many_streams"
    # while the API and health checks answer as usual
    assert client.get("/healthz").status_code == 200
    assert client.get("/api/v1/jobs").status_code == 200
    # Then a stream that ends gives its slot back (closed last-opened first: Flask's test
    # client keeps each stream's request context on one stack)
    open_streams[1].close()
    again = client.get("/api/v1/events", buffered=False)
    assert again.status_code == 200
    again.close()
    open_streams[0].close()
    assert len(app.extensions["labq"].streams) == 0
