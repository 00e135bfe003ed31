"""Webhooks are really sent: a local receiver gets the JSON POST, a failing one is retried
with backoff until it answers, one that never does is given up on — and nothing of it
ever touches the job (tests/integration/test_webhooks_job.py runs a real job)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from helpers import Receiver, wait_until

from labq.backend.notify import Notifier


@pytest.fixture()
def notifier():
    stop = threading.Event()
    made = Notifier(SimpleNamespace(webhook_allow_private=True), stop,
                    backoff=(0.05, 0.1, 0.2))
    yield made
    stop.set()
    made.shutdown()


JOB = {"id": "a" * 32, "name": "hello", "state": "stopped", "outcome": "succeeded",
       "exit_code": 0}


def test_the_post_reaches_the_receiver_with_the_job(notifier):
    receiver = Receiver([])
    try:
        notifier.job_ended({**JOB, "notify_url": receiver.url})
        wait_until(lambda: receiver.bodies, timeout=10, message="the webhook")
        body = receiver.bodies[0]
        assert body["event"] == "job.ended"
        assert body["job"]["id"] == JOB["id"] and body["job"]["outcome"] == "succeeded"
    finally:
        receiver.close()


def test_a_failing_receiver_gets_it_again_until_it_answers(notifier):
    receiver = Receiver([500, 503])  # fails twice, then 200
    try:
        notifier.job_ended({**JOB, "notify_url": receiver.url})
        wait_until(lambda: len(receiver.bodies) == 3, timeout=10, message="three tries")
        assert all(b["job"]["id"] == JOB["id"] for b in receiver.bodies)
    finally:
        receiver.close()


def test_a_receiver_that_never_answers_is_given_up_on(notifier):
    receiver = Receiver([500] * 10)
    try:
        notifier.job_ended({**JOB, "notify_url": receiver.url})
        wait_until(lambda: len(receiver.bodies) == 4, timeout=10, message="four tries")
        wait_until(lambda: notifier._pending._value == 1000, timeout=5,  # type: ignore[attr-defined]
                   message="the webhook to be finished with")
        assert len(receiver.bodies) == 4  # 1 + 3 retries, then it stops
    finally:
        receiver.close()


def test_a_private_target_is_refused_when_it_is_sent_unless_allowed():
    stop = threading.Event()
    strict = Notifier(SimpleNamespace(webhook_allow_private=False), stop, backoff=(0.05,))
    receiver = Receiver([])
    try:
        strict.job_ended({**JOB, "notify_url": receiver.url})
        wait_until(lambda: strict._pending._value == 1000, timeout=5,  # type: ignore[attr-defined]
                   message="the webhook to be dropped")
        assert receiver.bodies == []
    finally:
        stop.set()
        strict.shutdown()
        receiver.close()
