"""The OpenAPI additions for the researcher's features: durations, queue place, usage,
receipts, reruns, groups, search parameters and webhooks. :func:`extend` adds them to
the document :func:`labq.backend.openapi.build_spec` makes."""

from __future__ import annotations

from typing import Any

from labq.backend.openapi import JOB_ID, _errors, _json, _ref

NUM = {"type": "number", "nullable": True}
JOB_FIELDS = {
    "durations": {"type": "object", "description": "Seconds per stage, pauses excluded "
                  "from run_s", "properties": {k: NUM for k in (
                      "queued_s", "env_s", "run_s", "paused_s", "total_s")}},
    "peak_rss_mb": {**NUM, "description": "Peak resident memory of the job's processes"},
    "cpu_s": {**NUM, "description": "CPU seconds (user + system) the job used"},
    "queue_position": {"type": "integer", "nullable": True,
                       "description": "1-based place among waiting jobs; null unless waiting"},
    "estimated_start_at": {"type": "string", "format": "date-time", "nullable": True},
    "waiting_reason": {"type": "string", "nullable": True,
                       "example": "3 jobs ahead, 2 workers busy"},
    "group_id": {"type": "string", "nullable": True},
    "rerun_of": {"type": "string", "nullable": True},
    "notify_url": {"type": "string", "nullable": True},
    "has_results": {"type": "boolean", "description": "the job left result files"},
}
SEARCH_PARAMS = [
    {"name": "q", "in": "query", "schema": {"type": "string"},
     "description": "substring of the name, any case"},
    {"name": "outcome", "in": "query", "schema": {"type": "string", "enum": [
        "succeeded", "error", "timeout", "cancelled", "failed"]}},
    {"name": "since", "in": "query", "schema": {"type": "string"},
     "description": "created on or after (ISO date or date-time, UTC)"},
    {"name": "until", "in": "query", "schema": {"type": "string"},
     "description": "created before"},
    {"name": "sort", "in": "query", "schema": {"type": "string", "enum": [
        "created", "-created", "duration", "-duration"]}},
    {"name": "group", "in": "query", "schema": {"type": "string"}},
]
RECEIPT = {"type": "object", "properties": {
    "job_id": {"type": "string"}, "bundle_sha256": {"type": "string"},
    "entrypoint": {"type": "string"}, "args": {"type": "array", "items": {"type": "string"}},
    "env": {"type": "object", "additionalProperties": {"type": "string"}},
    "limits": {"type": "object"},
    "environment": {"type": "object", "properties": {
        "python": {"type": "string"}, "env_key": {"type": "string"},
        "packages": {"type": "array", "items": {"type": "string"},
                     "description": "uv pip freeze of the built environment"}}},
    "worker": {"type": "string"}, "worker_host": {"type": "string"},
    "labq_version": {"type": "string"}, "timestamps": {"type": "object"},
    "exit_code": {"type": "integer", "nullable": True},
    "results": {"type": "array", "items": {"type": "object", "properties": {
        "path": {"type": "string"}, "size": {"type": "integer"},
        "sha256": {"type": "string"}}}}}}
RERUN = {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {
        "args": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "object", "additionalProperties": {"type": "string"}},
        "timeout_s": {"type": "integer"}, "memory_mb": {"type": "integer"},
        "cpus": {"type": "integer"}, "max_output_mb": {"type": "integer"}}}}}}
GROUP = {"type": "object", "properties": {
    "id": {"type": "string"}, "name": {"type": "string"}, "size": {"type": "integer"},
    "done": {"type": "boolean"}, "states": {"type": "object"}, "outcomes": {"type": "object"},
    "jobs": {"type": "array", "items": _ref("Job")}, "links": {"type": "object"}}}
USAGE = {"type": "object", "properties": {
    "peak_rss_mb": {"type": "number"}, "cpu_s": {"type": "number"},
    "columns": {"type": "array", "items": {"type": "string"}},
    "samples": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}


def extend(spec: dict[str, Any]) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    schemas["Job"]["properties"].update(JOB_FIELDS)
    schemas["Job"]["properties"]["group"] = {**GROUP, "nullable": True,
                                             "description": "only in a sweep's upload answer"}
    schemas.update({"Receipt": RECEIPT, "Group": GROUP, "Usage": USAGE})
    schemas["Error"]["properties"]["error"]["properties"]["code"]["example"] = "ambiguous_id"
    paths = spec["paths"]
    paths["/api/v1/jobs"]["get"]["parameters"] = [
        *paths["/api/v1/jobs"]["get"]["parameters"], *SEARCH_PARAMS]
    upload = paths["/api/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    upload["schema"]["properties"]["notify_url"] = {
        "type": "string", "description": "JSON POST here when the job ends"}
    one = [{**JOB_ID, "description": "the id, or a unique prefix of 6+ characters "
                                     "(409 ambiguous_id when several jobs share it)"}]
    group_id = {"name": "group_id", "in": "path", "required": True,
                "schema": {"type": "string"}}
    paths.update({
        "/api/v1/jobs/{id}/receipt": {"get": {
            "tags": ["jobs"], "summary": "Reproducibility receipt", "parameters": one,
            "responses": {"200": _json(_ref("Receipt"), "The receipt"), **_errors(404, 409)}}},
        "/api/v1/jobs/{id}/usage": {"get": {
            "tags": ["jobs"], "summary": "Memory and CPU samples of the run", "parameters": one,
            "responses": {"200": _json(_ref("Usage"), "Samples"), **_errors(404, 409)}}},
        "/api/v1/jobs/{id}/rerun": {"post": {
            "tags": ["jobs"], "summary": "A new job from the same bundle and packages",
            "parameters": one, "requestBody": RERUN,
            "responses": {"201": _json(_ref("Job"), "The new job"),
                          **_errors(400, 404, 409, 422)}}},
        "/api/v1/groups/{group_id}": {"get": {
            "tags": ["groups"], "summary": "A sweep: every member's state",
            "parameters": [group_id],
            "responses": {"200": _json(_ref("Group"), "The group"), **_errors(404)}}},
        "/api/v1/groups/{group_id}/results": {"get": {
            "tags": ["groups"], "summary": "One zip of every member's results",
            "parameters": [group_id],
            "responses": {"200": {"description": "zip", "content": {"application/zip": {
                "schema": {"type": "string", "format": "binary"}}}}, **_errors(404)}}},
    })
    return spec
