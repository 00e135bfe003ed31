"""The OpenAPI 3 description of labq's HTTP API (served at ``/api/v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

from labq.shared.lifecycle import State

JSON = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad request", 401: "Not signed in", 403: "Forbidden", 404: "Not found",
            409: "Impossible state change", 413: "Too large", 422: "Invalid bundle or manifest",
            429: "Too many requests", 503: "Broker or database down"}
    # Every authenticated route can answer 401 (no or bad token).
    return {str(c): {"$ref": f"#/components/responses/E{c}"}
            for c in (401, *codes) if c in text}


JOB_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
UPLOAD = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["bundle"],
        "properties": {
            "bundle": {"type": "string", "format": "binary", "description": "the .zip"},
            "name": {"type": "string"}, "entrypoint": {"type": "string"},
            "timeout_s": {"type": "integer"}, "memory_mb": {"type": "integer"},
            "cpus": {"type": "integer"},
        }}}},
}
IDEMPOTENCY = {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}
LIST_PARAMS = [
    {"name": "state", "in": "query", "schema": {"type": "string",
                                                "enum": [s.value for s in State]}},
    {"name": "name", "in": "query", "schema": {"type": "string"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                "maximum": 500}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    {"name": "owner", "in": "query", "schema": {"type": "string"},
     "description": "admins: only this user's jobs (others always see only their own)"},
]
STATE_PUT = {"required": True, "content": {JSON: {"schema": {
    "type": "object", "required": ["state"],
    "properties": {"state": {"type": "string", "enum": ["paused", "started", "stopped"]}}}}}}
SSE = {"description": "server-sent events", "content": {"text/event-stream": {
    "schema": {"type": "string"}}}}


def _submit(tag: str) -> dict[str, Any]:
    return {"tags": [tag], "summary": "Upload a bundle and queue a job",
            "parameters": [IDEMPOTENCY], "requestBody": UPLOAD,
            "responses": {"201": _json(_ref("Job"), "The new job"),
                          "200": _json(_ref("Job"), "The job this Idempotency-Key made"),
                          **_errors(400, 413, 422, 429)}}


SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "an API token (`labq login`, `labq token create`, the account "
                              "page, or `labq user add`)"},
    "session": {"type": "apiKey", "in": "cookie", "name": "labq_session",
                "description": "the web pages' session; state-changing requests must also "
                               "send X-CSRF-Token (from GET /api/v1/me)"},
    "basic": {"type": "http", "scheme": "basic",
              "description": "user name and password, only to create a token"},
}
PUBLIC: list[dict[str, Any]] = []  # an operation anyone may call
TOKEN_NAME = {"required": False, "content": {JSON: {"schema": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 100}}}}}}


def _account_paths() -> dict[str, Any]:
    me = {"type": "object", "properties": {
        "name": {"type": "string"}, "admin": {"type": "boolean"},
        "via": {"type": "string", "enum": ["token", "session"]},
        "token_id": {"type": "integer", "nullable": True},
        "csrf_token": {"type": "string", "nullable": True}}}
    token = {"type": "object", "properties": {
        "id": {"type": "integer"}, "name": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time"},
        "last_used_at": {"type": "string", "format": "date-time", "nullable": True}}}
    login = {"required": True, "content": {JSON: {"schema": {
        "type": "object", "required": ["name", "password"],
        "properties": {"name": {"type": "string"}, "password": {"type": "string"}}}}}}
    return {
        "/api/v1/me": {"get": {"tags": ["accounts"], "summary": "Who is asking",
                               "responses": {"200": _json(me, "The caller"), **_errors()}}},
        "/api/v1/tokens": {
            "get": {"tags": ["accounts"], "summary": "The caller's live API tokens",
                    "responses": {"200": _json({"type": "object", "properties": {
                        "tokens": {"type": "array", "items": token}}}, "Tokens"),
                        **_errors()}},
            "post": {"tags": ["accounts"], "summary": "Make an API token (shown once)",
                     "security": [{"bearer": []}, {"session": []}, {"basic": []}],
                     "requestBody": TOKEN_NAME,
                     "responses": {"201": _json({"type": "object", "properties": {
                         "id": {"type": "integer"}, "name": {"type": "string"},
                         "token": {"type": "string"}, "user": {"type": "string"}}},
                         "The new token"), **_errors(429)}}},
        "/api/v1/tokens/{token_id}": {"delete": {
            "tags": ["accounts"], "summary": "Revoke one of the caller's tokens",
            "parameters": [{"name": "token_id", "in": "path", "required": True,
                            "schema": {"type": "integer"}}],
            "responses": {"204": {"description": "Revoked"}, **_errors(404)}}},
        "/login": {"post": {
            "tags": ["accounts"], "summary": "Sign a browser in (sets the session cookie)",
            "security": PUBLIC, "requestBody": login,
            "responses": {"200": _json(me, "Signed in"), **_errors(400, 403, 429)}}},
        "/logout": {"post": {"tags": ["accounts"], "summary": "Sign the browser out",
                             "security": [{"session": []}],
                             "responses": {"204": {"description": "Signed out"},
                                           **_errors(403)}}},
    }


def build_spec() -> dict[str, Any]:
    timestamps = {f"{s.value}_at": {"type": "string", "format": "date-time", "nullable": True}
                  for s in State}
    job = {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "name": {"type": "string"},
            "owner": {"type": "string", "nullable": True,
                      "description": "the user who submitted it"},
            "state": {"type": "string", "enum": [s.value for s in State]},
            "hold_reason": {"type": "string", "nullable": True,
                            "description": "why fair share keeps this created job off the "
                                           "queue for now"},
            "requested_state": {"type": "string", "nullable": True},
            "outcome": {"type": "string", "nullable": True,
                        "enum": ["succeeded", "error", "timeout", "cancelled", "failed", None]},
            "exit_code": {"type": "integer", "nullable": True},
            "attempts": {"type": "integer"}, "error": {"type": "string", "nullable": True},
            "worker": {"type": "string", "nullable": True},
            "worker_host": {"type": "string", "nullable": True},
            **timestamps,
            "updated_at": {"type": "string", "format": "date-time"},
            "spec": {"type": "object"},
            "bundle": {"type": "object", "properties": {"sha256": {"type": "string"},
                                                        "bytes": {"type": "integer"}}},
            "links": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    state = {"type": "object", "properties": {
        "id": {"type": "string"}, "state": {"type": "string"},
        "requested_state": {"type": "string", "nullable": True},
        "outcome": {"type": "string", "nullable": True},
        "allowed": {"type": "array", "items": {"type": "string"}}}}
    error = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        "additionalProperties": True}}}
    job_list = {"type": "object", "properties": {
        "jobs": {"type": "array", "items": _ref("Job")},
        "next_cursor": {"type": "string", "nullable": True}}}
    one = [JOB_ID]
    paths: dict[str, Any] = {
        "/api/v1/jobs": {
            "post": _submit("jobs"),
            "get": {"tags": ["jobs"], "summary": "List jobs, newest first",
                    "parameters": LIST_PARAMS,
                    "responses": {"200": _json(job_list, "One page"), **_errors(400)}},
        },
        "/api/v1/jobs/{id}": {"get": {
            "tags": ["jobs"], "summary": "One job", "parameters": one,
            "responses": {"200": _json(_ref("Job"), "The job"), **_errors(404)}}},
        "/api/v1/jobs/{id}/state": {
            "get": {"tags": ["jobs"], "summary": "The job's state", "parameters": one,
                    "responses": {"200": _json(_ref("State"), "State"), **_errors(404)}},
            "put": {"tags": ["jobs"], "summary": "Pause, resume or stop", "parameters": one,
                    "requestBody": STATE_PUT,
                    "responses": {"200": _json(_ref("Job"), "Applied or no-op"),
                                  **_errors(400, 404, 409, 503)}},
        },
        "/api/v1/jobs/{id}/log": {"get": {
            "tags": ["jobs"], "summary": "The log from a byte offset; SSE follows it live",
            "parameters": [*one, {"name": "offset", "in": "query",
                                  "schema": {"type": "integer", "minimum": 0}}],
            "responses": {"200": {"description": "log text (X-Log-Size header) or SSE",
                                  "content": {"text/plain": {"schema": {"type": "string"}},
                                              "text/event-stream": {
                                                  "schema": {"type": "string"}}}},
                          **_errors(400, 404, 503)}}},
        "/api/v1/jobs/{id}/results": {"get": {
            "tags": ["results"], "summary": "Zip of the job's output/", "parameters": one,
            "responses": {"200": {"description": "zip", "content": {"application/zip": {
                "schema": {"type": "string", "format": "binary"}}}}, **_errors(404)}}},
        "/api/v1/jobs/{id}/results/files": {"get": {
            "tags": ["results"], "summary": "The result files", "parameters": one,
            "responses": {"200": _json({"type": "object", "properties": {
                "files": {"type": "array", "items": {"type": "object", "properties": {
                    "path": {"type": "string"}, "size": {"type": "integer"}}}}}},
                "File list"), **_errors(404)}}},
        "/api/v1/jobs/{id}/results/files/{path}": {"get": {
            "tags": ["results"], "summary": "One result file",
            "parameters": [*one, {"name": "path", "in": "path", "required": True,
                                  "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the file"}, **_errors(404)}}},
        "/api/v1/events": {"get": {
            "tags": ["events"], "summary": "Lifecycle (with ids) and status events",
            "parameters": [{"name": "Last-Event-ID", "in": "header",
                            "schema": {"type": "integer"}}],
            "responses": {"200": SSE, **_errors(400, 503)}}},
        "/api/v1/stats": {"get": {"tags": ["system"], "summary": "Queue depth and job counts",
                                  "responses": {"200": _json({"type": "object"}, "Stats")}}},
        "/api/v1/openapi.json": {"get": {"tags": ["system"], "summary": "This document",
                                         "security": PUBLIC,
                                         "responses": {"200": _json({"type": "object"},
                                                                    "OpenAPI")}}},
        "/healthz": {"get": {"tags": ["system"], "summary": "Process alive",
                             "security": PUBLIC,
                             "responses": {"200": _json({"type": "object"}, "alive")}}},
        "/readyz": {"get": {"tags": ["system"], "summary": "Database and broker reachable",
                            "security": PUBLIC,
                            "responses": {"200": _json({"type": "object"}, "ready"),
                                          "503": {"$ref": "#/components/responses/E503"}}}},
        "/metrics": {"get": {"tags": ["system"],
                             "summary": "Prometheus metrics (an admin's token: it counts "
                                        "every user's jobs)",
                             "security": [{"bearer": []}],
                             "responses": {"200": {"description": "text", "content": {
                                 "text/plain": {"schema": {"type": "string"}}}},
                                 **_errors(403)}}},
        "/simulation": {
            "post": _submit("nrp"),
            "get": {"tags": ["nrp"], "summary": "List jobs (NRP)", "parameters": LIST_PARAMS,
                    "responses": {"200": _json({"type": "array", "items": _ref("Job")},
                                               "Jobs")}},
        },
        "/simulation/{id}": {"get": {
            "tags": ["nrp"], "summary": "One job (NRP)", "parameters": one,
            "responses": {"200": _json(_ref("Job"), "The job"), **_errors(404)}}},
        "/simulation/{id}/state": {
            "get": {"tags": ["nrp"], "summary": "State (NRP)", "parameters": one,
                    "responses": {"200": _json(_ref("State"), "State"), **_errors(404)}},
            "put": {"tags": ["nrp"], "summary": "Change state (NRP)", "parameters": one,
                    "requestBody": STATE_PUT,
                    "responses": {"200": _json(_ref("State"), "State"),
                                  **_errors(400, 404, 409, 503)}},
        },
    }
    paths.update(_account_paths())
    responses = {f"E{c}": _json(_ref("Error"), d) for c, d in {
        400: "Bad request", 401: "No valid credentials (WWW-Authenticate: Bearer)",
        403: "Not allowed: admins only, or a cookie-authenticated change without "
             "X-CSRF-Token", 404: "Not found (also: another user's job)",
        429: "Too many requests: wrong passwords, or the per-user job quota (Retry-After)",
        409: "Impossible state change (names the "
        "current state and the allowed targets)", 413: "Too large",
        422: "Invalid bundle or manifest (names the field)",
        503: "Broker or database unavailable"}.items()}
    return {
        "openapi": "3.0.3",
        "info": {"title": "labq", "version": "1",
                 "description": "A job server for research labs: upload a zipped Python "
                                "experiment, control it, get its logs and output back."},
        "paths": paths,
        "components": {"schemas": {"Job": job, "State": state, "Error": error},
                       "responses": responses, "securitySchemes": SECURITY_SCHEMES},
        "security": [{"bearer": []}, {"session": []}],
    }
