"""The OpenAPI additions for the researcher's features: durations, queue place, usage,
receipts, reruns, groups, search parameters and webhooks. :func:`extend` adds them to
the document :func:`labq.backend.openapi.build_spec` makes."""

from __future__ import annotations

from typing import Any

from labq.backend.openapi_parts import (
    GROUP_ID,
    JOB_ID,
    MAYBE_STRING,
    MAYBE_TIME,
    OUTCOMES,
    STRING,
    TEXT,
    blank_ok,
    errors,
    json_answer,
    nullable,
    positive,
    ref,
)
from labq.backend.openapi_paths import LOCATION, ZIP_ANSWER
from labq.shared.settings import MIB, Settings

NUM = nullable({"type": "number"})
JOB_FIELDS = {
    "durations": {"type": "object", "description": "Seconds per stage, pauses excluded "
                  "from run_s", "properties": {k: NUM for k in (
                      "queued_s", "env_s", "run_s", "paused_s", "total_s")}},
    "peak_rss_mb": {**NUM, "description": "Peak resident memory of the job's processes"},
    "cpu_s": {**NUM, "description": "CPU seconds (user + system) the job used"},
    "queue_position": {**nullable({"type": "integer", "minimum": 1}),
                       "description": "1-based place among waiting jobs; null unless waiting"},
    "estimated_start_at": MAYBE_TIME,
    "waiting_reason": {**MAYBE_STRING, "examples": ["3 jobs ahead, 2 workers busy"]},
    "group_id": MAYBE_STRING,
    "rerun_of": MAYBE_STRING,
    "notify_url": MAYBE_STRING,
    "has_results": {"type": "boolean", "description": "the job left result files"},
}
DATE = {"anyOf": [{"type": "string", "format": "date"},
                  {"type": "string", "format": "date-time"},
                  {"type": "string", "maxLength": 0}]}
SEARCH_PARAMS = [
    {"name": "q", "in": "query", "schema": {**TEXT, "maxLength": 200},
     "description": "substring of the name, any case"},
    {"name": "outcome", "in": "query",
     "schema": blank_ok({"type": "string", "enum": OUTCOMES})},
    {"name": "since", "in": "query", "schema": DATE,
     "description": "created on or after (ISO date or date-time; UTC unless it says)"},
    {"name": "until", "in": "query", "schema": DATE, "description": "created before"},
    {"name": "sort", "in": "query", "schema": blank_ok({"type": "string", "enum": [
        "created", "-created", "duration", "-duration"]})},
    {"name": "group", "in": "query", "schema": TEXT,
     "description": "only this group's jobs"},
]
RECEIPT = {"type": "object", "required": ["receipt_version", "job_id", "results",
                                          "complete"], "properties": {
    "receipt_version": {"type": "integer"},
    "job_id": STRING, "name": STRING, "bundle_sha256": STRING,
    "entrypoint": STRING, "args": {"type": "array", "items": STRING},
    "env": {"type": "object", "additionalProperties": STRING},
    "limits": {"type": "object"},
    "environment": {"type": "object", "properties": {
        "python": MAYBE_STRING, "env_key": MAYBE_STRING,
        "packages": {**nullable({"type": "array", "items": STRING}),
                     "description": "uv pip freeze of the built environment"}}},
    "worker": MAYBE_STRING, "worker_host": MAYBE_STRING,
    "labq_version": MAYBE_STRING, "rerun_of": MAYBE_STRING, "group_id": MAYBE_STRING,
    "timestamps": {"type": "object", "additionalProperties": MAYBE_TIME},
    "durations": {"type": "object"},
    "state": STRING, "outcome": MAYBE_STRING,
    "exit_code": nullable({"type": "integer"}),
    "peak_rss_mb": NUM, "cpu_s": NUM,
    "results": {"type": "array", "items": {"type": "object", "properties": {
        "path": STRING, "size": {"type": "integer"},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}},
    "complete": {"type": "boolean", "description": "the job ended and its environment "
                 "was recorded"}}}
GROUP = {"type": "object", "required": ["id", "name", "size", "done"], "properties": {
    "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"}, "name": STRING,
    "size": {"type": "integer", "minimum": 1},
    "done": {"type": "boolean"},
    "states": {"type": "object", "additionalProperties": {"type": "integer"}},
    "outcomes": {"type": "object", "additionalProperties": {"type": "integer"}},
    "job_ids": {"type": "array", "items": STRING, "description": "in an upload's answer"},
    "jobs": {"type": "array", "items": ref("Job")},
    "links": {"type": "object", "additionalProperties": STRING}}}
USAGE = {"type": "object", "properties": {
    "job_id": STRING, "peak_rss_mb": NUM, "cpu_s": NUM,
    "columns": {"type": "array", "items": STRING},
    "samples": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}
#: Blank (no webhook), or an http(s) URL naming a host (an IP literal must be public:
#: the server checks that, a pattern cannot), with no user name or password.
NOTIFY_URL = (r"^\s*$|^\s*[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9.-]*[A-Za-z][A-Za-z0-9.-]*"
              r"(:[0-9]{1,5})?([/?#][^\s\x00]*)?\s*$")
SCALAR = {"anyOf": [TEXT, {"type": "number"}, {"type": "boolean"}]}
ENV_NAME = {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "not": {
    "pattern": "^(LABQ_.*|PATH|HOME|VIRTUAL_ENV|PYTHONHOME|PYTHONPATH|LD_.*)$"}}


def rerun_body(settings: Settings) -> dict[str, Any]:
    return {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False,
        "description": "what to change (anything else: 400); values are checked like "
                       "labq.toml's (422 naming the field)",
        "properties": {
            "args": {"type": "array", "items": SCALAR,
                     "description": "numbers and booleans become strings"},
            "env": {"type": "object", "propertyNames": ENV_NAME,
                    "additionalProperties": SCALAR,
                    "description": "LABQ_*, PATH, HOME, VIRTUAL_ENV, PYTHONHOME, "
                                   "PYTHONPATH and LD_* are reserved"},
            "timeout_s": positive(settings.max_timeout_s),
            "memory_mb": positive(settings.max_memory_mb),
            "cpus": positive(settings.max_cpus),
            "max_output_mb": positive(settings.max_output_bytes // MIB)}}}}}


def extend(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    schemas["Job"]["properties"].update(JOB_FIELDS)
    schemas["Job"]["properties"]["group"] = {**GROUP, "description": "only in a sweep's "
                                             "upload answer"}
    schemas.update({"Receipt": RECEIPT, "Group": GROUP, "Usage": USAGE})
    paths = spec["paths"]
    for listing in ("/api/v1/jobs", "/simulation"):
        get = paths[listing]["get"]
        get["parameters"] = [*get["parameters"], *SEARCH_PARAMS]
    for upload in ("/api/v1/jobs", "/simulation"):
        form = paths[upload]["post"]["requestBody"]["content"]["multipart/form-data"]
        form["schema"]["properties"]["notify_url"] = {
            "type": "string", "maxLength": 2000, "pattern": NOTIFY_URL,
            "description": "an http(s) URL that gets a JSON POST when the job ends; no "
                           "user name or password in it, and not a loopback or private "
                           "address unless the admin allows it (422 otherwise)"}
    one = [JOB_ID]
    paths.update({
        "/api/v1/jobs/{id}/receipt": {"get": {
            "tags": ["jobs"], "summary": "Reproducibility receipt", "parameters": one,
            "responses": {"200": json_answer(ref("Receipt"), "The receipt"),
                          **errors(404, 409)}}},
        "/api/v1/jobs/{id}/usage": {"get": {
            "tags": ["jobs"], "summary": "Memory and CPU samples of the run", "parameters": one,
            "responses": {"200": json_answer(ref("Usage"), "Samples"), **errors(404, 409)}}},
        "/api/v1/jobs/{id}/rerun": {"post": {
            "tags": ["jobs"], "summary": "A new job from the same bundle and packages",
            "parameters": one, "requestBody": rerun_body(settings),
            "responses": {"201": json_answer(ref("Job"), "The new job", LOCATION),
                          **errors(400, 404, 409, 413, 422, 429)}}},
        "/api/v1/groups/{group_id}": {"get": {
            "tags": ["groups"], "summary": "A sweep: every member's state",
            "parameters": [GROUP_ID],
            "responses": {"200": json_answer(ref("Group"), "The group"), **errors(404)}}},
        "/api/v1/groups/{group_id}/results": {"get": {
            "tags": ["groups"], "summary": "One zip of every member's results",
            "parameters": [GROUP_ID],
            "responses": {"200": ZIP_ANSWER, **errors(404)}}},
    })
    return spec
