"""A multipart/form-data upload streamed from disk (no whole bundle in memory), with
progress reports for the CLI's progress line."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

ProgressFn = Callable[[int, int], None]
_CHUNK = 256 * 1024


class MultipartBody:
    """A multipart/form-data body streamed from disk, reporting upload progress."""

    def __init__(self, fields: dict[str, str], file_field: str, file_path: Path,
                 filename: str, progress: ProgressFn | None = None) -> None:
        self.boundary = f"labq-{uuid.uuid4().hex}"
        head = b""
        for key, value in fields.items():
            head += (f"--{self.boundary}\r\nContent-Disposition: form-data; "
                     f'name="{key}"\r\n\r\n{value}\r\n').encode()
        head += (f"--{self.boundary}\r\nContent-Disposition: form-data; "
                 f'name="{file_field}"; filename="{filename}"\r\n'
                 "Content-Type: application/zip\r\n\r\n").encode()
        self._head = head
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._file_size = file_path.stat().st_size
        self._file: IO[bytes] = open(file_path, "rb")  # noqa: SIM115 - closed in close()
        self._progress = progress
        self.sent = 0
        self.length = len(head) + self._file_size + len(self._tail)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        while chunk := self._file.read(_CHUNK):
            self.sent += len(chunk)
            if self._progress:
                self._progress(self.sent, self._file_size)
            yield chunk
        yield self._tail

    def close(self) -> None:
        self._file.close()
