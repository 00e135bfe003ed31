"""The operations of labq's core API in the OpenAPI document: jobs (and their NRP
aliases under ``/simulation``), logs, results, events, health and accounts.

Limits that depend on the server's settings (upload size, timeout, memory, CPUs) are
taken from the running server's :class:`Settings`, so the document states this server's
numbers. Answers every route shares (401, 403, 503, the Host check) are added by
:func:`labq.backend.openapi.complete`.
"""

from __future__ import annotations

from typing import Any

from labq.backend.openapi_parts import (
    CURSOR_MAX,
    IDEMPOTENCY,
    JOB_ID,
    LIST_PARAMS,
    STRING,
    TEXT,
    blank_ok,
    errors,
    form_object,
    header,
    json_answer,
    json_object,
    nullable,
    positive,
    ref,
)
from labq.backend.params import MAX_DIGITS, MAX_WHOLE, TOKEN_ID_MAX
from labq.shared.settings import MIB, Settings

ZIP = "application/zip"
SSE = "text/event-stream"
LOCATION = {"Location": header("the new job's URL", required=True)}
REPLAYED = {"Idempotent-Replayed": header("`true`: the job an earlier upload with this "
                                          "Idempotency-Key made", required=True,
                                          schema={"type": "string", "enum": ["true"]})}
ONE = [JOB_ID]


def upload_body(settings: Settings) -> dict[str, Any]:
    """``multipart/form-data`` with the bundle zip and the fields that override labq.toml."""
    props = {
        "bundle": {"type": "string", "format": "binary", "description": (
            f"The project as a .zip (at most {settings.max_upload_bytes // MIB} MiB, "
            f"{settings.max_bundle_files} files, "
            f"{settings.max_unpacked_bytes // MIB} MiB unpacked). Its script is code.py "
            "or main_script.py at the top (or in one top folder), or the `entrypoint`; "
            "an optional labq.toml sets the job. Refused: not a zip, damaged, "
            "password-protected, absolute or `..` paths, symbolic links, a name both "
            "file and folder (400 `bad_bundle`); over the limits (413); no script, or "
            "a bad labq.toml (422). Archiver junk (__MACOSX/, .DS_Store, Thumbs.db) is "
            "left out.")},
        "name": {**TEXT, "description": "shown in lists (cleaned to "
                 "[A-Za-z0-9._-], at most 100); default: the top folder or file name"},
        "entrypoint": {**TEXT, "description": "the script to run, a path "
                       "inside the bundle's top folder; one that is not in the bundle "
                       "is a 422 `missing_entrypoint`; blank: labq.toml's, or code.py"},
        "timeout_s": positive(settings.max_timeout_s, "wall-clock limit in seconds"),
        "memory_mb": positive(settings.max_memory_mb, "memory limit in MiB"),
        "cpus": positive(settings.max_cpus, "CPU limit"),
    }
    return {"required": True, "content": {"multipart/form-data": {
        "schema": form_object(props, ["bundle"]),
        "encoding": {"bundle": {"contentType": ZIP}}}}}


def operation_ref(path: str, method: str) -> str:
    return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + f"/{method}"


def job_links(base: str, ops: list[tuple[str, str]]) -> dict[str, Any]:
    """OpenAPI links from a new job to what can be asked about it (stateful testers and
    generated clients follow them)."""
    return {f"{method}{suffix.replace('/', '_') or '_job'}": {
        "operationRef": operation_ref(f"{base}/{{id}}{suffix}", method),
        "parameters": {"id": "$response.body#/id"}} for suffix, method in ops}


NRP_OPS = [("", "get"), ("/state", "get"), ("/state", "put")]
JOB_OPS = [*NRP_OPS, ("/log", "get"), ("/receipt", "get"), ("/rerun", "post")]


def _submit(tag: str, settings: Settings) -> dict[str, Any]:
    links = job_links("/simulation", NRP_OPS) if tag == "nrp" else \
        job_links("/api/v1/jobs", JOB_OPS)
    links["group"] = {"operationRef": operation_ref("/api/v1/groups/{group_id}", "get"),
                      "parameters": {"group_id": "$response.body#/group/id"}}
    created = json_answer(ref("Job"), "The new job (for a sweep: its first member, with "
                          "`group`)", LOCATION)
    return {"tags": [tag], "summary": "Upload a bundle and queue a job",
            "parameters": [IDEMPOTENCY], "requestBody": upload_body(settings),
            "responses": {"201": {**created, "links": links},
                          "200": json_answer(ref("Job"), "The job this Idempotency-Key "
                                             "made", {**LOCATION, **REPLAYED}),
                          **errors(400, 413, 422, 429, 503)}}


STATE_PUT = {"required": True, "content": {"application/json": {"schema": json_object(
    {"state": {"type": "string", "enum": ["paused", "started", "stopped"],
               "description": "started resumes a paused job"}}, ["state"])}}}
WHOLE = blank_ok({"type": "integer", "minimum": 0, "maximum": MAX_WHOLE})
#: Headers are text: a whole number, or blank (not given).
WHOLE_TEXT = {"type": "string", "pattern": f"^[0-9]{{0,{MAX_DIGITS}}}$"}
OFFSET = {"name": "offset", "in": "query", "description": "byte offset to start from "
          "(default 0, or the Last-Event-ID header)", "schema": WHOLE}
FOLLOW = {"name": "follow", "in": "query", "description": "`1`, `true` or `yes`: follow "
          "live as server-sent events (as does `Accept: text/event-stream`); any other "
          "value: the text now", "schema": TEXT}


def sse_event(names: list[str | None], data: str) -> dict[str, Any]:
    """One server-sent event (what a client gets per event, as schemathesis reads it)."""
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"enum": names}, "id": {"type": "string", "pattern": "^[0-9]+$"},
        "data": {"type": "string", "description": data}}}


EVENTS = sse_event(["lifecycle", "status"], "JSON: a lifecycle event (with `id`) or a "
                   "live status sample of a running job")
LOG_EVENTS = sse_event([None, "end"], "log text; `id` is the offset reached; `end` "
                       "carries JSON {\"size\": bytes} once the job ended")
ZIP_ANSWER = {"description": "zip", "content": {ZIP: {"schema": {"type": "string",
                                                                  "format": "binary"}}}}


def job_paths(settings: Settings) -> dict[str, Any]:
    job_list = {"type": "object", "required": ["jobs", "next_cursor"], "properties": {
        "jobs": {"type": "array", "items": ref("Job")},
        "next_cursor": nullable({"type": "string", "maxLength": CURSOR_MAX})}}
    return {
        "/api/v1/jobs": {
            "post": _submit("jobs", settings),
            "get": {"tags": ["jobs"], "summary": "List jobs, newest first",
                    "parameters": LIST_PARAMS,
                    "responses": {"200": json_answer(job_list, "One page"), **errors(400)}},
        },
        "/api/v1/jobs/{id}": {"get": {
            "tags": ["jobs"], "summary": "One job", "parameters": ONE,
            "responses": {"200": json_answer(ref("Job"), "The job"), **errors(404, 409)}}},
        "/api/v1/jobs/{id}/state": {
            "get": {"tags": ["jobs"], "summary": "The job's state", "parameters": ONE,
                    "responses": {"200": json_answer(ref("State"), "State"),
                                  **errors(404, 409)}},
            "put": {"tags": ["jobs"], "summary": "Pause, resume or stop", "parameters": ONE,
                    "requestBody": STATE_PUT,
                    "responses": {"200": json_answer(ref("Job"), "Applied, or nothing to "
                                                     "do"),
                                  **errors(400, 404, 409, 413)}},
        },
        "/api/v1/jobs/{id}/log": {"get": {
            "tags": ["jobs"], "summary": "The log from a byte offset; SSE follows it live",
            "parameters": [*ONE, OFFSET, FOLLOW,
                           {"name": "Last-Event-ID", "in": "header", "schema": WHOLE_TEXT,
                            "description": "the offset to resume from (when `offset` is not "
                                           "given)"}],
            "responses": {"200": {
                "description": "the log text (X-Log-Size: its size now), or SSE: `data` "
                               "chunks with the offset as `id`, then `event: end`",
                "headers": {"X-Log-Size": header("bytes in the log now (text answers)",
                                                 schema={"type": "string",
                                                         "pattern": "^[0-9]+$"})},
                "content": {"text/plain": {"schema": STRING}, SSE: {"schema": LOG_EVENTS}}},
                **errors(400, 404, 409)}}},
        "/api/v1/jobs/{id}/results": {"get": {
            "tags": ["results"], "summary": "Zip of the job's output/", "parameters": ONE,
            "responses": {"200": ZIP_ANSWER, **errors(404, 409)}}},
        "/api/v1/jobs/{id}/results/files": {"get": {
            "tags": ["results"], "summary": "The result files", "parameters": ONE,
            "responses": {"200": json_answer({"type": "object", "properties": {
                "job_id": STRING,
                "files": {"type": "array", "items": {"type": "object", "properties": {
                    "path": STRING, "size": {"type": "integer", "minimum": 0}}}}}},
                "File list"), **errors(404, 409)}}},
        "/api/v1/jobs/{id}/results/files/{path}": {"get": {
            "tags": ["results"], "summary": "One result file (shown inline, sandboxed)",
            "parameters": [*ONE, {"name": "path", "in": "path", "required": True,
                                  "description": "relative to output/; symbolic links are "
                                                 "never followed",
                                  "schema": {"type": "string", "minLength": 1}}],
            "responses": {"200": {"description": "the file", "content": {"*/*": {
                "schema": {"type": "string", "format": "binary"}}}}, **errors(404, 409)}}},
    }


def nrp_paths(settings: Settings) -> dict[str, Any]:
    """The NRP-compatible aliases: the same jobs; lists are plain arrays."""
    return {
        "/simulation": {
            "post": _submit("nrp", settings),
            "get": {"tags": ["nrp"], "summary": "List jobs (NRP: a plain array)",
                    "parameters": LIST_PARAMS,
                    "responses": {"200": json_answer({"type": "array",
                                                      "items": ref("Job")}, "Jobs"),
                                  **errors(400)}},
        },
        "/simulation/{id}": {"get": {
            "tags": ["nrp"], "summary": "One job (NRP)", "parameters": ONE,
            "responses": {"200": json_answer(ref("Job"), "The job"), **errors(404, 409)}}},
        "/simulation/{id}/state": {
            "get": {"tags": ["nrp"], "summary": "State (NRP)", "parameters": ONE,
                    "responses": {"200": json_answer(ref("State"), "State"),
                                  **errors(404, 409)}},
            "put": {"tags": ["nrp"], "summary": "Change state (NRP)", "parameters": ONE,
                    "requestBody": STATE_PUT,
                    "responses": {"200": json_answer(ref("State"), "State"),
                                  **errors(400, 404, 409, 413)}},
        },
    }


def system_paths() -> dict[str, Any]:
    anything = {"type": "object"}
    ready = {"type": "object", "required": ["status", "checks"], "properties": {
        "status": {"type": "string", "enum": ["ready"]},
        "checks": {"type": "object", "additionalProperties": {"enum": ["ok", "down"]}},
        "sandbox": anything}}
    stats = {"type": "object", "required": ["queue", "jobs"], "properties": {
        "queue": anything,
        "jobs": {"type": "object", "additionalProperties": {"type": "integer"}},
        "sandbox": anything}}
    public: list[dict[str, Any]] = []
    return {
        "/api/v1/events": {"get": {
            "tags": ["events"], "summary": "Lifecycle events (with ids, resumable) and live "
                                           "status events",
            "parameters": [
                {"name": "Last-Event-ID", "in": "header", "schema": WHOLE_TEXT,
                 "description": "resume after this event id (what EventSource sends by "
                                "itself); without it or `last_event_id`, only what "
                                "happens from now on; anything but a whole number is a "
                                "400"},
                {"name": "last_event_id", "in": "query", "schema": WHOLE,
                 "description": "the same, for a first connection"}],
            "responses": {"200": {"description": "server-sent events", "content": {
                SSE: {"schema": EVENTS}}}, **errors(400)}}},
        "/api/v1/stats": {"get": {"tags": ["system"], "summary": "Queue depth and job counts",
                                  "responses": {"200": json_answer(stats, "Stats")}}},
        "/api/v1/openapi.json": {"get": {"tags": ["system"], "summary": "This document",
                                         "security": public,
                                         "responses": {"200": json_answer(anything,
                                                                          "OpenAPI 3.1")}}},
        "/healthz": {"get": {"tags": ["system"], "summary": "Process alive",
                             "security": public,
                             "responses": {"200": json_answer(
                                 {"type": "object", "properties": {
                                     "status": {"enum": ["ok"]}}}, "alive")}}},
        "/readyz": {"get": {"tags": ["system"], "summary": "Database and broker reachable",
                            "security": public,
                            "responses": {"200": json_answer(ready, "ready"),
                                          **errors(503)}}},
        "/metrics": {"get": {"tags": ["system"],
                             "summary": "Prometheus metrics (an admin's token: it counts "
                                        "every user's jobs)",
                             "security": [{"bearer": []}, {"session": []}],
                             "responses": {"200": {"description": "text", "content": {
                                 "text/plain": {"schema": STRING}}}}}},
    }


ME = {"type": "object", "required": ["name", "admin", "via"], "properties": {
    "name": STRING, "admin": {"type": "boolean"},
    "via": {"type": "string", "enum": ["token", "session"]},
    "token_id": nullable({"type": "integer"}),
    "csrf_token": nullable({"type": "string"})}}
TOKEN = {"type": "object", "required": ["id", "name", "created_at"], "properties": {
    "id": {"type": "integer"}, "name": STRING,
    "created_at": {"type": "string", "format": "date-time"},
    "last_used_at": nullable({"type": "string", "format": "date-time"})}}
TOKEN_NAME = {**TEXT, "description": "blank: `token`; at most 100 characters once "
              "surrounding spaces are removed (longer: 400 `account_error`)"}
SIGNED_IN = {"type": "object", "required": ["name", "admin", "csrf_token"],
             "properties": {"name": STRING, "admin": {"type": "boolean"},
                            "csrf_token": STRING}}
SESSION_COOKIE = {"Set-Cookie": header("the session: `labq_session=...; HttpOnly; "
                                       "SameSite=Lax` (and Secure over https)",
                                       required=True)}


def account_paths() -> dict[str, Any]:
    token_body = {"required": False, "content": {
        "application/json": {"schema": json_object({"name": TOKEN_NAME})},
        "application/x-www-form-urlencoded": {"schema": form_object({"name": TOKEN_NAME})}}}
    login = {"required": True, "content": {"application/json": {"schema": json_object(
        {"name": {**TEXT, "minLength": 1}, "password": TEXT}, ["name", "password"])}}}
    return {
        "/api/v1/me": {"get": {"tags": ["accounts"], "summary": "Who is asking",
                               "responses": {"200": json_answer(ME, "The caller")}}},
        "/api/v1/tokens": {
            "get": {"tags": ["accounts"], "summary": "The caller's live API tokens",
                    "responses": {"200": json_answer({"type": "object", "properties": {
                        "tokens": {"type": "array", "items": TOKEN}}}, "Tokens")}},
            "post": {"tags": ["accounts"], "summary": "Make an API token (shown once)",
                     "description": "Also with Basic credentials (user name and password), "
                                    "rate limited like the sign-in page: how `labq login` "
                                    "gets its first token.",
                     "security": [{"bearer": []}, {"session": [], "csrf": []},
                                  {"basic": []}],
                     "requestBody": token_body,
                     "responses": {"201": json_answer({
                         "type": "object", "required": ["id", "name", "token", "user"],
                         "properties": {"id": {"type": "integer"}, "name": STRING,
                                        "token": STRING, "user": STRING}},
                         "The new token"), **errors(400, 413, 429)}}},
        "/api/v1/tokens/{token_id}": {"delete": {
            "tags": ["accounts"], "summary": "Revoke one of the caller's tokens",
            "parameters": [{"name": "token_id", "in": "path", "required": True,
                            "schema": {"type": "integer", "minimum": 0,
                                       "maximum": TOKEN_ID_MAX}}],
            "responses": {"204": {"description": "Revoked"}, **errors(404)}}},
        "/login": {
            "get": {"tags": ["accounts"], "summary": "The sign-in page", "security": [],
                    "responses": {"200": {"description": "HTML", "content": {
                        "text/html": {"schema": STRING}}}}},
            "post": {"tags": ["accounts"],
                     "summary": "Sign a browser in (sets the session cookie)",
                     "description": "JSON only, and never from another origin (403), so a "
                                    "foreign site cannot sign a visitor in.",
                     "security": [], "requestBody": login,
                     "responses": {"200": json_answer(SIGNED_IN, "Signed in",
                                                      SESSION_COOKIE),
                                   "401": {"$ref": "#/components/responses/E401"},
                                   **errors(400, 403, 413, 429, 503)}}},
        "/logout": {"post": {"tags": ["accounts"], "summary": "Sign the browser out",
                             "responses": {"204": {"description": "Signed out"}}}},
    }
