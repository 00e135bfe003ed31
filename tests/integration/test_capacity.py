"""The real backend (gunicorn's gevent worker, two processes) against clients that hold
connections: streams end as soon as their client goes, the cap counts the streams of
every process, and clients that trickle their headers or body are cut off."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator

import pytest
from helpers import LabqSystem, wait_until

pytestmark = pytest.mark.integration

CAP = 6


@pytest.fixture(scope="module")
def lab(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabqSystem]:
    system = LabqSystem(tmp_path_factory.mktemp("labq-capacity"), workers=0, env={
        "LABQ_BACKEND_PROCESSES": "2", "LABQ_MAX_STREAMS": str(CAP),
        "LABQ_HEADER_TIMEOUT_S": "1", "LABQ_BODY_TIMEOUT_S": "2"})
    try:
        system.start()
        yield system
    finally:
        system.stop()


def connect(lab: LabqSystem) -> socket.socket:
    return socket.create_connection(("127.0.0.1", lab.port), timeout=30)


def read_response(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 answer with a Content-Length: head and body may come in
    separate segments, so reading once is not enough."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        assert chunk, answer
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, answer
        body += chunk
    return head + b"\r\n\r\n" + body


def open_stream(lab: LabqSystem, path: str) -> tuple[socket.socket, bytes]:
    """A raw SSE request; returns the socket and the head of the answer."""
    sock = connect(lab)
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{lab.port}\r\n"
                  f"Authorization: Bearer {lab.token}\r\nAccept: text/event-stream\r\n\r\n"
                  ).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def streams_open(lab: LabqSystem) -> int:
    text = lab.http.get(lab.api("/metrics"), timeout=10).text
    return int(text.split("labq_streams_open ")[-1].split()[0])


def test_the_cap_counts_every_process_and_a_gone_client_frees_its_slot_at_once(lab):
    job_id = lab.submit({"code.py": "print(1)\n"})["id"]
    # Given the cap's worth of event and log streams, spread over both processes
    held = [open_stream(lab, "/api/v1/events" if i % 2 else
                        f"/api/v1/jobs/{job_id}/log?follow=1") for i in range(CAP)]
    assert all(head.startswith(b"HTTP/1.1 200") for _, head in held)
    assert streams_open(lab) == CAP
    # When one more is asked for, it is refused with a time to come back
    extra, head = open_stream(lab, "/api/v1/events")
    extra.close()
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in head
    # And when the clients vanish, their streams end now, not at the next keep-alive
    # (every 15 s) or the next event
    for sock, _ in held:
        sock.close()
    wait_until(lambda: streams_open(lab) == 0, timeout=10, message="the streams to end")
    again, head = open_stream(lab, "/api/v1/events")
    again.close()
    assert head.startswith(b"HTTP/1.1 200")


def rest_until_closed(sock: socket.socket, answer: bytes) -> bytes:
    """The server closes after an error answer; its head and body may come in
    separate segments, so read on until the close."""
    sock.settimeout(10)
    while chunk := sock.recv(4096):
        answer += chunk
    return answer


def closed_by_server(sock: socket.socket, trickle: bytes, deadline_s: float) -> bytes:
    """Send ``trickle`` a byte at a time (every 0.2 s) until the server answers or closes;
    returns what it sent back (b"" for a plain close)."""
    sock.settimeout(0.2)
    end = time.monotonic() + deadline_s
    sent = 0
    while time.monotonic() < end:
        try:
            answer = sock.recv(4096)
            return rest_until_closed(sock, answer) if answer else b"<closed>"
        except TimeoutError:
            pass
        try:
            sock.sendall(trickle[sent % len(trickle):][:1])
        except OSError:
            return b"<closed>"
        sent += 1
    return b""


def test_a_client_trickling_its_headers_is_dropped(lab):
    sock = connect(lab)
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{lab.port}\r\nX-Slow: ".encode())
    with sock:
        assert closed_by_server(sock, b"a", deadline_s=20) == b"<closed>"
    # while everyone else is answered as usual
    assert lab.http.get(lab.api("/healthz"), timeout=10).status_code == 200


def test_an_upload_trickling_its_body_gets_408(lab):
    boundary = "capacityboundary"
    sock = connect(lab)
    sock.sendall((f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{lab.port}\r\n"
                  f"Authorization: Bearer {lab.token}\r\nContent-Length: 100000\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
                  f"--{boundary}\r\nContent-Disposition: form-data; name=\"bundle\"; "
                  f"filename=\"slow.zip\"\r\n\r\n").encode())
    with sock:
        answer = closed_by_server(sock, b"PK", deadline_s=30)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"too slowly" in answer


def test_sigterm_is_not_held_by_idle_keep_alive_connections(broker: str, tmp_path) -> None:
    # Given a backend with a client that keeps its connection open between requests,
    system = LabqSystem(tmp_path, workers=0)
    system.start()
    try:
        idle = connect(system)
        idle.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{system.port}\r\n\r\n"
                     .encode())
        assert read_response(idle).startswith(b"HTTP/1.1 200")
        # when it is told to stop, then it exits at once instead of waiting out the
        # graceful timeout (10 s) for a request that is never coming.
        began = time.monotonic()
        system.backend.send_signal(signal.SIGTERM)
        assert system.backend.wait(timeout=30) == 0
        assert time.monotonic() - began < 5, time.monotonic() - began
        assert idle.recv(4096) == b""  # closed by the server
    finally:
        system.stop()
