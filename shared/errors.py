"""The one exception tree of labq.

Every error labq raises on purpose derives from :class:`LabqError`. Each carries a
stable machine ``code`` and the HTTP ``status`` it maps to, so the backend translates
them to ``{"error": {"code", "message"}}`` in one place and the process unit turns them
into a job's ``error`` field in one place. Driver exceptions (pika, SQLAlchemy) are
translated at the boundary where they occur.
"""

from __future__ import annotations

from typing import Any


class LabqError(Exception):
    """Raised for any failure labq understands; the root of the tree."""

    code = "labq_error"
    status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}


class ConfigError(LabqError):
    """Raised when a ``LABQ_*`` setting cannot be parsed."""

    code = "config_error"


class BadRequestError(LabqError):
    """Raised when a request is malformed (missing field, bad JSON, bad query value)."""

    code = "bad_request"
    status = 400


class BundleError(LabqError):
    """Raised when an uploaded bundle is not a safe, usable zip."""

    code = "bad_bundle"
    status = 400


class BundleTooLargeError(BundleError):
    """Raised when an upload or its unpacked content exceeds the server's limits."""

    code = "bundle_too_large"
    status = 413


class ManifestError(BundleError):
    """Raised when ``labq.toml`` is malformed or asks for more than the server allows."""

    code = "invalid_manifest"
    status = 422


class MissingEntrypointError(BundleError):
    """Raised when a bundle has no script to run."""

    code = "missing_entrypoint"
    status = 422


class NotFoundError(LabqError):
    """Raised when a job or file does not exist."""

    code = "not_found"
    status = 404


class ConflictError(LabqError):
    """Raised when a lifecycle change is impossible from the job's current state."""

    code = "invalid_transition"
    status = 409


class BrokerUnavailableError(LabqError):
    """Raised when RabbitMQ cannot be reached or did not confirm a publish."""

    code = "broker_unavailable"
    status = 503


class DecodeError(LabqError):
    """Raised when a message from the broker is not a valid labq message."""

    code = "decode_error"
    status = 400


class EnvironmentBuildError(LabqError):
    """Raised when a job's Python environment cannot be built (uv failed)."""

    code = "environment_failed"


class UnauthorizedError(LabqError):
    """No valid credentials: a missing, unknown, revoked or disabled user's token."""

    code = "unauthorized"
    status = 401


class ForbiddenError(LabqError):
    """Signed in, but the request is not allowed (missing CSRF token, admins only)."""

    code = "forbidden"
    status = 403


class TooManyRequestsError(LabqError):
    """A limit was reached (wrong passwords, a user's job quota); ``retry_after_s`` says
    when trying again makes sense."""

    code = "too_many_requests"
    status = 429

    def __init__(self, message: str, retry_after_s: int | None = None, **details: object):
        super().__init__(message, **details)
        self.retry_after_s = retry_after_s


class AccountError(LabqError):
    """A user-management request that cannot be done (unknown user, name taken, ...)."""

    code = "account_error"
    status = 400
