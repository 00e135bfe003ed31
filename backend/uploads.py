"""Streaming uploads: the multipart ``bundle`` goes straight to ``<data>/tmp`` while hashed.

Werkzeug asks the request class for a file stream per uploaded file; ours writes to a
temporary file on the data volume (so storing it by content hash is a rename),
computes its sha256 on the way and stops keeping bytes past ``max_upload_bytes``.
Nothing is held in memory. The temporary files are removed when the request ends,
unless they were moved into place.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any

from flask import Request, current_app


class StagedUpload:
    """A write-only file that hashes and counts what it is given."""

    def __init__(self, folder: Path, limit: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix="upload-", suffix=".zip")
        self.path = Path(name)
        self.file: IO[bytes] = os.fdopen(fd, "w+b")
        self.limit = limit
        self.size = 0
        self.too_large = False
        self._digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            # Keep reading (and discarding) the body so the client gets our 413 answer
            # instead of a reset connection; werkzeug bounds the total by
            # MAX_CONTENT_LENGTH.
            self.too_large = True
            return len(data)
        self._digest.update(data)
        return self.file.write(data)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


class LabqRequest(Request):
    """Flask's request with uploads staged on the data volume."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None
                         ) -> Any:
        labq = current_app.extensions["labq"]
        staged = StagedUpload(labq.storage.tmp, labq.settings.max_upload_bytes)
        self.environ.setdefault("labq.uploads", []).append(staged)
        return staged


def cleanup_uploads(environ: dict[str, Any]) -> None:
    for staged in environ.pop("labq.uploads", []):
        staged.discard()
