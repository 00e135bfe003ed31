"""Building blocks of labq's OpenAPI document: references, error answers, shared
parameters and the schemas every part uses (the error body, date-times, ids).

The document is OpenAPI 3.1 (JSON Schema 2020-12), so a nullable value is a type list
and names of a map can be constrained (``propertyNames``). Every parameter states what
the server refuses (patterns, ranges, lengths) and :data:`ERRORS` names each error
answer; :func:`labq.backend.openapi.complete` adds the answers every route shares.
"""

from __future__ import annotations

from typing import Any

from labq.shared.lifecycle import Outcome, State

JSON = "application/json"
HEX32 = "^[0-9a-f]{32}$"
STATES = [s.value for s in State]
OUTCOMES = [o.value for o in Outcome]


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` or JSON null (3.1 spelling: a type list, and null among the enum)."""
    out = dict(schema)
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    kind = out.get("type")
    if isinstance(kind, str):
        out["type"] = [kind, "null"]
    return out


def json_answer(schema: dict[str, Any], description: str,
                headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def header(description: str, required: bool = False,
           schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "required": required,
            "schema": schema or {"type": "string"}}


def errors(*codes: int) -> dict[str, Any]:
    """References to the shared error answers, e.g. ``errors(404, 409)``."""
    return {str(c): {"$ref": f"#/components/responses/E{c}"} for c in codes}


def positive(maximum: int, description: str = "") -> dict[str, Any]:
    """A whole number from 1 up to the server's ``maximum`` (0: this server sets none)."""
    schema: dict[str, Any] = {"type": "integer", "minimum": 1}
    if maximum:
        schema["maximum"] = maximum
    if description:
        schema["description"] = description
    return schema


def blank_ok(schema: dict[str, Any]) -> dict[str, Any]:
    """A query value that may also be blank: ``?limit=`` means "not given", as from a form."""
    if "enum" in schema:
        return {**schema, "enum": ["", *schema["enum"]]}
    return {"anyOf": [schema, {"type": "string", "maxLength": 0}]}


STRING = {"type": "string"}
#: Text a request sends: never the NUL character (400 otherwise; backend/params.py).
NO_NUL = "^[^\\x00]*$"
TEXT = {"type": "string", "pattern": NO_NUL}
#: Any JSON value without a NUL character in a string or a key: what a JSON body may
#: carry beside the fields an operation reads (they are ignored).
ANY_JSON = {"$ref": "#/components/schemas/JsonWithoutNul"}
JSON_WITHOUT_NUL = {"anyOf": [
    {"type": ["null", "boolean", "number"]}, TEXT,
    {"type": "array", "items": ANY_JSON},
    {"type": "object", "propertyNames": {"pattern": NO_NUL}, "additionalProperties": ANY_JSON},
]}


def json_object(properties: dict[str, Any], required: list[str] | None = None
                ) -> dict[str, Any]:
    """A JSON body object: the fields read, and any others (ignored) without NUL."""
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "propertyNames": {"pattern": NO_NUL},
                              "additionalProperties": ANY_JSON}
    if required:
        schema["required"] = required
    return schema


def form_object(properties: dict[str, Any], required: list[str] | None = None
                ) -> dict[str, Any]:
    """A form: the fields read, and any other text fields (ignored) without NUL."""
    return {**json_object(properties, required), "additionalProperties": TEXT}
DATE_TIME = {"type": "string", "format": "date-time"}
MAYBE_TIME = nullable(DATE_TIME)
MAYBE_STRING = nullable(STRING)

ERROR = {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "pattern": "^[a-z0-9_]+$",
                     "description": "stable, machine-readable", "examples": ["ambiguous_id"]},
            "message": {"type": "string", "description": "what went wrong and what to do"},
            "field": {"type": "string", "description": "the parameter or field refused"},
        },
        "additionalProperties": True}},
}

RETRY_AFTER = header("seconds to wait before trying again",
                     schema={"type": "string", "pattern": "^[0-9]+$"})
#: Each shared error answer: its description (the codes it carries) and headers.
ERRORS: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("Bad request (`bad_request`, `bad_bundle`, `account_error`; `error.field` names "
          "the parameter), or a Host header this server does not answer to "
          "(`host_not_allowed`, see LABQ_ALLOWED_HOSTS)", {}),
    401: ("No valid credentials (`unauthorized`): no token, or a revoked or mistyped one",
          {"WWW-Authenticate": header("`Bearer realm=\"labq\"`", required=True)}),
    403: ("Not allowed (`forbidden`): admins only, or a change made with the session cookie "
          "without the right X-CSRF-Token or from another origin", {}),
    404: ("Not found (`not_found`); another user's job is answered exactly like one that "
          "does not exist", {}),
    409: ("Conflict: an impossible state change (`invalid_transition`, naming the state and "
          "the allowed targets) or a short id shared by several jobs (`ambiguous_id`)", {}),
    413: ("Too large (`bundle_too_large`): the request body is over this server's "
          "upload limit, or the bundle unpacks to too much", {}),
    422: ("Valid form, unusable content (`invalid_manifest`, `missing_entrypoint`): "
          "`error.field` names the field and the server's limit where one applies", {}),
    429: ("Too many requests (`too_many_requests`): wrong passwords, or the per-user job "
          "quota (LABQ_MAX_QUEUED_PER_USER)", {"Retry-After": RETRY_AFTER}),
    503: ("Unavailable: the database or RabbitMQ (`database_unavailable`, "
          "`broker_unavailable`), or every live stream is taken (`too_many_streams`)",
          {"Retry-After": RETRY_AFTER}),
}
HOST_ONLY = ("Only a Host header this server does not answer to (`host_not_allowed`, "
             "see LABQ_ALLOWED_HOSTS)")


def error_components() -> dict[str, Any]:
    responses = {f"E{c}": json_answer(ref("Error"), text, headers)
                 for c, (text, headers) in ERRORS.items()}
    responses["EHost"] = json_answer(ref("Error"), HOST_ONLY)
    return responses


# -- parameters -------------------------------------------------------------------

JOB_ID = {"name": "id", "in": "path", "required": True,
          "description": "the job id, or a unique prefix of at least 6 hex digits (any "
                         "case); an ambiguous prefix is a 409 `ambiguous_id`",
          "schema": {"type": "string", "pattern": "^[0-9A-Fa-f]{6,32}$"}}
GROUP_ID = {"name": "group_id", "in": "path", "required": True,
            "description": "the group id (the full 32 hex digits, lower case)",
            "schema": {"type": "string", "pattern": HEX32}}
CURSOR_MAX = 200
CURSOR = {
    "name": "cursor", "in": "query",
    "description": "Opaque: pass back the `next_cursor` of the previous page of the same "
                   "listing. It marks a place in the listing's order, so it is valid with "
                   "other filters of the same sort; a cursor the server did not give out, "
                   "or one of a duration sort given to a creation-time sort (or the "
                   "reverse), is refused with 400 (`bad_request`, `field: cursor`).",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]*$", "maxLength": CURSOR_MAX}}
IDEMPOTENCY_MAX = 200
IDEMPOTENCY = {
    "name": "Idempotency-Key", "in": "header",
    "description": "repeat an upload safely: a valid upload with a key the caller used "
                   "before answers the job that key made (200, Idempotent-Replayed) "
                   "instead of making another; an invalid one is refused as always; "
                   "blank is no key",
    "schema": {"type": "string", "maxLength": IDEMPOTENCY_MAX}}
LIST_PARAMS = [
    {"name": "state", "in": "query", "schema": blank_ok({"type": "string", "enum": STATES})},
    {"name": "name", "in": "query", "description": "exactly this name", "schema": TEXT},
    {"name": "limit", "in": "query", "description": "page size (default 50)",
     "schema": blank_ok({"type": "integer", "minimum": 1, "maximum": 500})},
    CURSOR,
    {"name": "owner", "in": "query", "schema": TEXT,
     "description": "admins: only this user's jobs (others always see only their own, "
                    "and this parameter is ignored for them)"},
]
