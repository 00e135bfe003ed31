"""Schemathesis hooks for labq's contract test (loaded through SCHEMATHESIS_HOOKS).

They teach the generator the rules of labq's API that JSON Schema cannot state, and
that the OpenAPI document states in words, so that a request schemathesis calls valid
really is valid:

* the multipart ``bundle`` is a zip holding the script (``entrypoint`` names a file
  *in* it): valid uploads get a real bundle whose script is the named entrypoint;
* a ``cursor`` is opaque (only one the server gave out is valid): valid listings get a
  real one of the right kind (a place in creation order, or in duration order; the test
  passes both in LABQ_ST_CURSORS);
* the run must not revoke the tokens it runs with (LABQ_ST_KEEP_TOKENS, their ids);
* a webhook must never leave the machine: every valid upload's ``notify_url`` points at
  the test's receiver on loopback (LABQ_ST_WEBHOOK).

Schema-violating (negative) cases are left exactly as generated.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import PurePosixPath
from typing import Any

import schemathesis
from schemathesis.transport.serialization import Binary

UPLOADS = {"POST /api/v1/jobs", "POST /simulation"}
LISTINGS = {"GET /api/v1/jobs", "GET /simulation"}
#: Archiver junk the server leaves out of a bundle (shared/bundle.py).
JUNK = re.compile(r"(^|/)(__MACOSX(/|$)|\.DS_Store$|Thumbs\.db$)")
UNUSED_TOKEN_ID = 10**9


def _positive(case: Any) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_positive


def _script_path(entrypoint: Any) -> str | None:
    """Where a script named ``entrypoint`` sits in a zip, or None if no zip can hold it
    (the server then refuses it with 422 whatever the bundle)."""
    if not isinstance(entrypoint, str):
        return None
    name = entrypoint.strip()
    if not name or len(name) > 500 or "\\" in name or "\x00" in name:
        return None
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or str(path) in ("", ".") \
            or JUNK.search(f"proj/{path}"):
        return None
    return str(path)


def _bundle(script: str, sweep: bool) -> bytes:
    """A tiny bundle: one empty script (valid as Python, TOML and requirements alike,
    whatever its name), and sometimes a two-job sweep."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"proj/{script}", "")
        if sweep and script != "labq.toml":
            zf.writestr("proj/labq.toml", '[sweep]\nSEED = ["1", "2"]\n')
    return buf.getvalue()


def _fix_upload(case: Any) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    script = _script_path(body.get("entrypoint"))
    if script is None:
        if isinstance(body.get("entrypoint"), str) and body["entrypoint"].strip():
            body["entrypoint"] = ""  # unplaceable: let the bundle's code.py run
        script = "code.py"
    notify = body.get("notify_url")
    if isinstance(notify, str) and notify.strip():
        body["notify_url"] = os.environ["LABQ_ST_WEBHOOK"]
    # A sweep now and then (decided by the generated fields, so runs repeat exactly).
    digest = hashlib.sha256(json.dumps(sorted(
        (k, str(v)) for k, v in body.items() if k != "bundle")).encode()).digest()
    body["bundle"] = Binary(_bundle(script, sweep=digest[0] % 4 == 0))


def _fix_cursor(case: Any) -> None:
    query = case.query
    if not isinstance(query, dict) or not query.get("cursor"):
        return
    cursors = json.loads(os.environ.get("LABQ_ST_CURSORS", "{}"))
    by_duration = str(query.get("sort", "")).endswith("duration")
    query["cursor"] = cursors["duration" if by_duration else "created"]


def _keep_tokens(case: Any) -> None:
    keep = {int(t) for t in os.environ.get("LABQ_ST_KEEP_TOKENS", "").split(",") if t}
    params = case.path_parameters or {}
    try:
        token_id = int(params.get("token_id"))
    except (TypeError, ValueError):
        return
    if token_id in keep:
        params["token_id"] = UNUSED_TOKEN_ID


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    label = case.operation.label
    if label == "DELETE /api/v1/tokens/{token_id}":
        _keep_tokens(case)
    if not _positive(case):
        return case
    if label in UPLOADS:
        _fix_upload(case)
    elif label in LISTINGS:
        _fix_cursor(case)
    return case
