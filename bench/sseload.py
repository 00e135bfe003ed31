"""Many open server-sent event streams from one process (asyncio, plain sockets): what a
thousand browser tabs ask of the backend, at little cost to the benchmark's own CPU.

Each :class:`Stream` sends one ``GET`` with a Bearer token, reads the status and headers,
then decodes the chunked body into SSE messages and counts them: lifecycle events and
status ticks (with the job ids they named, to check the owner filter), log data, and
the log's ``end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field


@dataclass
class Stream:
    path: str
    token: str
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    lifecycle: int = 0
    status_ticks: int = 0
    log_bytes: int = 0
    ended: bool = False
    job_ids: set[str] = field(default_factory=set)
    error: str = ""
    _writer: asyncio.StreamWriter | None = None
    _task: asyncio.Task | None = None

    async def open(self, host: str, port: int, timeout: float = 30.0) -> None:
        """Connect and read the response head; a 200 keeps being read in the background."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                    timeout)
            self._writer = writer
            writer.write((f"GET {self.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                          f"Authorization: Bearer {self.token}\r\n"
                          "Accept: text/event-stream\r\n\r\n").encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                self.headers[name.strip().lower()] = value.strip()
        if self.status == 200:
            self._task = asyncio.ensure_future(self._read(reader))
        else:
            self.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        buffer = ""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError,
                                 asyncio.CancelledError):
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    return
                chunk = await reader.readexactly(size + 2)
                buffer += chunk[:-2].decode("utf-8", "replace")
                *messages, buffer = buffer.split("\n\n")
                for message in messages:
                    self._count(message)

    def _count(self, message: str) -> None:
        event, data = "message", []
        for line in message.split("\n"):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if not data:
            return  # a comment (keep-alive) or the retry hint
        if event == "message":
            self.log_bytes += sum(len(d) + 1 for d in data)
            return
        if event == "end":
            self.ended = True
            return
        try:
            payload = json.loads("\n".join(data))
        except ValueError:
            return
        if isinstance(payload, dict) and isinstance(payload.get("job_id"), str):
            self.job_ids.add(payload["job_id"])
        if event == "lifecycle":
            self.lifecycle += 1
        elif event == "status":
            self.status_ticks += 1

    def close(self) -> None:
        """Drop the connection at once, as a closed browser tab does."""
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.transport.abort()
            self._writer = None


async def open_all(streams: list[Stream], host: str, port: int, at_once: int = 100) -> None:
    """Open every stream, ``at_once`` connections in flight at a time."""
    gate = asyncio.Semaphore(at_once)

    async def one(stream: Stream) -> None:
        async with gate:
            await stream.open(host, port)

    await asyncio.gather(*(one(s) for s in streams))
