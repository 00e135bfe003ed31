"""labq's one reader of server-sent events (text/event-stream), used by the CLI, the
SDK and the tests."""

from __future__ import annotations

from collections.abc import Iterator

import requests

_CHUNK = 256 * 1024


def _raw_chunks(resp: requests.Response) -> Iterator[bytes]:
    """Bytes as soon as they arrive (``read1``), not when a fixed-size buffer fills."""
    raw = resp.raw
    if hasattr(raw, "read1"):
        while chunk := raw.read1(_CHUNK):
            yield chunk
    else:  # older urllib3
        yield from resp.iter_content(1)


def iter_sse(resp: requests.Response) -> Iterator[tuple[str, str, str | None]]:
    """Parse a text/event-stream response into (event, data, last event id) triples
    (WHATWG rules: the last id seen stays in force until another one comes)."""
    event, data_lines, last_id = "message", [], None
    buffer = b""
    for chunk in _raw_chunks(resp):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.removesuffix(b"\r").decode("utf-8", errors="replace")
            if line == "":
                if data_lines or event != "message":
                    yield event, "\n".join(data_lines), last_id
                event, data_lines = "message", []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value or "message"
            elif name == "data":
                data_lines.append(value)
            elif name == "id" and "\0" not in value:
                last_id = value
    if data_lines:
        yield event, "\n".join(data_lines), last_id
