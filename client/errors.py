"""The one exception the client raises: a message meant for a person."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Any failure talking to labq; ``str(exc)`` is one line meant for a person."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details or {}
