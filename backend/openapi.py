"""The OpenAPI 3.1 description of labq's HTTP API (served at ``/api/v1/openapi.json``).

:func:`build_spec` assembles the document from the operations (backend/openapi_paths.py,
backend/openapi_research.py) and the schemas here, then :func:`complete` adds to every
operation the answers all routes share: 401 where credentials are needed, 403 where a
session cookie needs X-CSRF-Token, 413 where a body is read, 503 where the database is,
and the 400 of the Host check. tests/unit/test_openapi_routes.py keeps the document
and the Flask routes equal; tests/integration/test_openapi_contract.py runs schemathesis
against a live server with every check.
"""

from __future__ import annotations

from typing import Any

from labq.backend import openapi_research
from labq.backend.openapi_parts import (
    ERROR,
    HEX32,
    JSON_WITHOUT_NUL,
    MAYBE_STRING,
    MAYBE_TIME,
    OUTCOMES,
    STATES,
    STRING,
    error_components,
    nullable,
)
from labq.backend.openapi_paths import account_paths, job_paths, nrp_paths, system_paths
from labq.shared.settings import Settings

SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "an API token (`labq login`, `labq token create`, the account "
                              "page, or `labq user add`)"},
    "session": {"type": "apiKey", "in": "cookie", "name": "labq_session",
                "description": "the web pages' session (POST /login)"},
    "csrf": {"type": "apiKey", "in": "header", "name": "X-CSRF-Token",
             "description": "with the session cookie, every change (anything but GET) must "
                            "carry the session's CSRF token (from GET /api/v1/me)"},
    "basic": {"type": "http", "scheme": "basic",
              "description": "user name and password, only to create a token"},
}
#: Safe requests with the cookie need no CSRF token; changes do.
READ_SECURITY = [{"bearer": []}, {"session": []}]
CHANGE_SECURITY = [{"bearer": []}, {"session": [], "csrf": []}]
SAFE = {"get", "head", "options"}
METHODS = ("get", "put", "post", "delete", "patch")
#: Operations that answer without touching the database or the broker.
NO_DATABASE = {("/healthz", "get"), ("/api/v1/openapi.json", "get"), ("/login", "get")}


def job_schema() -> dict[str, Any]:
    timestamps = {f"{s}_at": MAYBE_TIME for s in STATES}
    spec = {"type": "object", "required": ["entrypoint", "args", "env"], "properties": {
        "entrypoint": STRING, "args": {"type": "array", "items": STRING},
        "env": {"type": "object", "additionalProperties": STRING},
        **{k: {"type": "integer", "minimum": 0} for k in (
            "timeout_s", "memory_mb", "cpus", "max_output_bytes")},
        "network": {"type": "boolean"}}}
    links = {"type": "object", "required": ["self", "state", "log", "results"],
             "additionalProperties": STRING}
    return {
        "type": "object",
        "required": ["id", "name", "state", "requested_state", "outcome", "attempts",
                     "spec", "bundle", "links", *timestamps],
        "properties": {
            "id": {"type": "string", "pattern": HEX32}, "name": STRING,
            "owner": {**MAYBE_STRING, "description": "the user who submitted it"},
            "state": {"type": "string", "enum": STATES},
            "hold_reason": {**MAYBE_STRING, "description": "why fair share keeps this "
                            "created job off the queue for now"},
            "requested_state": nullable({"type": "string", "enum": STATES}),
            "outcome": nullable({"type": "string", "enum": OUTCOMES}),
            "exit_code": nullable({"type": "integer"}),
            "attempts": {"type": "integer", "minimum": 0}, "error": MAYBE_STRING,
            "worker": MAYBE_STRING, "worker_host": MAYBE_STRING,
            **timestamps,
            "updated_at": MAYBE_TIME,
            "spec": spec,
            "bundle": {"type": "object", "properties": {
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "bytes": {"type": "integer", "minimum": 0}}},
            "links": links,
        },
    }


def state_schema() -> dict[str, Any]:
    return {"type": "object", "required": ["id", "state", "allowed"], "properties": {
        "id": {"type": "string", "pattern": HEX32},
        "state": {"type": "string", "enum": STATES},
        "requested_state": nullable({"type": "string", "enum": STATES}),
        "outcome": nullable({"type": "string", "enum": OUTCOMES}),
        "allowed": {"type": "array", "items": {"type": "string", "enum": [
            "paused", "started", "stopped"]}}}}


def _add(responses: dict[str, Any], code: int, name: str | None = None) -> None:
    responses.setdefault(str(code), {"$ref": f"#/components/responses/{name or f'E{code}'}"})


def complete(spec: dict[str, Any]) -> dict[str, Any]:
    """Add the answers every route shares to each operation (see the module docstring)."""
    for path, item in spec["paths"].items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            if "security" not in op and method not in SAFE:
                op["security"] = CHANGE_SECURITY
            security = op.get("security", spec["security"])
            responses = op["responses"]
            if security:
                _add(responses, 401)
            if any("session" in s for s in security) and method not in SAFE:
                _add(responses, 403)
            if "requestBody" in op:
                _add(responses, 413)
            if (path, method) not in NO_DATABASE:
                _add(responses, 503)
            _add(responses, 400, "EHost")
            op["responses"] = dict(sorted(responses.items()))
    return spec


def build_spec(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or Settings()
    paths: dict[str, Any] = {**job_paths(settings), **nrp_paths(settings),
                             **system_paths(), **account_paths()}
    paths["/metrics"]["get"]["responses"]["403"] = {"$ref": "#/components/responses/E403"}
    spec = {
        "openapi": "3.1.0",
        "info": {"title": "labq", "version": "1",
                 "description": "A job server for research labs: upload a zipped Python "
                                "experiment, control it, get its logs and output back. "
                                "Every error is JSON `{\"error\": {\"code\", \"message\", "
                                "...}}`; limits stated here are this server's settings."},
        "paths": paths,
        "components": {"schemas": {"Job": job_schema(), "State": state_schema(),
                                   "Error": ERROR, "JsonWithoutNul": JSON_WITHOUT_NUL},
                       "responses": error_components(),
                       "securitySchemes": SECURITY_SCHEMES},
        "security": READ_SECURITY,
    }
    return complete(openapi_research.extend(spec, settings))

