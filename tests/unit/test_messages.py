"""Messages round-trip through JSON; anything else is one DecodeError."""

from __future__ import annotations

import json

import pytest

from labq.shared.errors import DecodeError
from labq.shared.manifest import JobSpec
from labq.shared.messages import (
    ControlMessage,
    JobMessage,
    LifecycleEvent,
    StatusEvent,
    decode_event,
    event_seq,
)

JOB = JobMessage(job_id="a" * 32, name="proj", bundle_sha256="b" * 64,
                 spec=JobSpec("code.py", args=["--n", "3"], env={"SEED": "1"}, timeout_s=60,
                              memory_mb=128, cpus=1, max_output_bytes=1024),
                 submitted_at=12.5)


@pytest.mark.parametrize("message", [
    JOB,
    LifecycleEvent(job_id="a" * 32, seq=1001, state="started", attempt=1, worker="w1"),
    LifecycleEvent(job_id="a" * 32, seq=1005, state="stopped", attempt=1, outcome="error",
                   exit_code=3, error="boom"),
    StatusEvent(job_id="a" * 32, state="started", elapsed_s=3.2, attempt=1, memory_mb=12.0),
    ControlMessage(job_id="a" * 32, action="pause"),
])
def test_messages_survive_a_round_trip(message):
    body = message.encode()
    assert json.loads(body)["schema_version"] == 1
    assert type(message).decode(body) == message


def test_events_decode_by_kind():
    event = LifecycleEvent(job_id="c" * 32, seq=2001, state="initialized", attempt=2)
    status = StatusEvent(job_id="c" * 32, state="paused", elapsed_s=1.0)
    assert decode_event(event.encode()) == event
    assert decode_event(status.encode()) == status


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"kind": "job"}',
    b'{"kind": "job", "schema_version": 2, "job_id": "x", "name": "n", "bundle_sha256": "s",'
    b' "entrypoint": "e"}',
    b'{"kind": "lifecycle", "schema_version": 1, "job_id": "x", "seq": 1, "state": "started"}',
    b'{"kind": "job", "schema_version": 1, "job_id": "x", "name": 5, "bundle_sha256": "s",'
    b' "entrypoint": "e"}',
    b'{"kind": "job", "schema_version": 1, "job_id": "", "name": "n", "bundle_sha256": "s",'
    b' "entrypoint": "e"}',
    b'{"kind": "job", "schema_version": 1, "job_id": "x", "name": "n", "bundle_sha256": "s",'
    b' "entrypoint": "e", "args": "rm -rf"}',
    b'{"kind": "job", "schema_version": 1, "job_id": "x", "name": "n", "bundle_sha256": "s",'
    b' "spec": {"entrypoint": "e", "env": {"A": 1}}}',
    b'{"kind": "job", "schema_version": 1, "job_id": "x", "name": "n", "bundle_sha256": "s",'
    b' "spec": {"args": []}}',
    b'{"kind": "job", "schema_version": 1, "job_id": "x", "name": "n", "bundle_sha256": "s",'
    b' "spec": "code.py"}',
    b'{"kind": "job", "schema_version": 1, "job_id": "x", "name": "n", "bundle_sha256": "s",'
    b' "spec": {"entrypoint": "e", "memory_mb": "lots"}}',
    b"\xff\xfe",
])
def test_anything_that_is_not_a_job_message_is_a_decode_error(body):
    with pytest.raises(DecodeError):
        JobMessage.decode(body)


def test_control_actions_are_checked():
    with pytest.raises(DecodeError):
        ControlMessage.decode(ControlMessage(job_id="a" * 32, action="pause").encode()
                              .replace(b"pause", b"explode"))


def test_sequence_numbers_of_a_retry_sort_after_the_first_attempt():
    assert event_seq(2, 1) > event_seq(1, 999)


def test_a_job_message_queued_by_an_older_labq_still_decodes():
    """Before JobMessage held a JobSpec its fields were flat; such a message may sit on
    the queue across an upgrade and must still run as it was submitted."""
    flat = (b'{"kind": "job", "schema_version": 1, "job_id": "' + b"a" * 32 + b'", "name": "n",'
            b' "bundle_sha256": "' + b"b" * 64 + b'", "entrypoint": "run.py",'
            b' "args": ["-v"], "memory_mb": 64, "network": false}')
    job = JobMessage.decode(flat)
    assert job.spec == JobSpec("run.py", args=["-v"], memory_mb=64)
