"""The one place where errors become JSON: ``{"error": {"code", "message", ...}}``.

labq's own errors carry their code and HTTP status (:mod:`shared.errors`); werkzeug's
HTTP errors (404, 405, 413, ...) and database outages are translated here too, so no
view formats an error by hand.
"""

from __future__ import annotations

import logging
import re

from flask import Flask, Response, jsonify
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from labq.shared.errors import LabqError

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, **details: object) -> Response:
    resp = jsonify({"error": {"code": code, "message": message, **details}})
    resp.status_code = status
    return resp


def _code_of(exc: HTTPException) -> str:
    return re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(LabqError)
    def _labq(exc: LabqError) -> Response:
        if exc.status >= 500:
            log.warning("%s: %s", exc.code, exc.message)
        resp = error_response(exc.status, exc.code, exc.message, **exc.details)
        if exc.status == 503:
            resp.headers["Retry-After"] = "5"
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after:
            resp.headers["Retry-After"] = str(retry_after)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="labq"'
        return resp

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        if isinstance(exc, RequestEntityTooLarge):
            limit = app.extensions["labq"].settings.max_upload_bytes
            return error_response(
                413, "bundle_too_large",
                f"the upload is larger than this server accepts "
                f"({limit / (1024 * 1024):.1f} MiB at most)")
        resp = error_response(exc.code or 500, _code_of(exc), exc.description or exc.name)
        if exc.code == 405 and exc.response is None:
            allowed = getattr(exc, "valid_methods", None)
            if allowed:
                resp.headers["Allow"] = ", ".join(allowed)
        return resp

    @app.errorhandler(OperationalError)
    def _database(exc: OperationalError) -> Response:
        log.error("database error: %s", exc)
        return error_response(503, "database_unavailable",
                              "the database is unavailable; try again in a moment")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error",
                              "the server hit an unexpected error; see its log")
