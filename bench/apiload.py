"""Many concurrent API clients from one process (asyncio, one keep-alive connection each):
each sends its next request the moment the last one was answered, for a while, and
records every request's latency, status and size.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

CURSOR = re.compile(rb'"next_cursor":\s*"([^"]+)"')


@dataclass
class Sample:
    kind: str
    seconds: float
    status: int
    size: int
    at: float = 0.0  # time.monotonic() when it was sent


@dataclass
class Client:
    """One client; ``pick(client)`` names its next request as ``(kind, path)``."""

    token: str
    user: str
    pick: Callable[[Client], tuple[str, str]]
    samples: list[Sample] = field(default_factory=list)
    cursor: str | None = None
    errors: list[str] = field(default_factory=list)

    async def run(self, host: str, port: int, until: float) -> None:
        reader = writer = None
        try:
            while time.monotonic() < until:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                kind, path = self.pick(self)
                began, at = time.perf_counter(), time.monotonic()
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                             f"Authorization: Bearer {self.token}\r\n\r\n".encode())
                status, body, close = await _response(reader)
                self.samples.append(Sample(kind, time.perf_counter() - began, status,
                                           len(body), at))
                if kind == "results":  # where the next page starts
                    found = CURSOR.search(body[-400:])
                    self.cursor = found.group(1).decode() if found else None
                if close:
                    writer.close()
                    reader = writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if writer is not None:
                writer.close()


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {}
    for line in head[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body, headers.get("connection", "").lower() == "close"


async def run_clients(clients: list[Client], host: str, port: int, seconds: float) -> float:
    """Run every client for ``seconds``; returns the wall time taken."""
    began = time.monotonic()
    until = began + seconds
    await asyncio.gather(*(c.run(host, port, until) for c in clients))
    return time.monotonic() - began
