"""Request parameters read the way the OpenAPI document states them.

Event ids and byte offsets arrive as text (a query parameter, or the ``Last-Event-ID``
header EventSource sends): plain decimal digits, at most 18 of them, so every value fits
the database's 64-bit integers. ``int()`` alone would also take ``+5``, ``1_000``, other
scripts' digits and numbers too large for SQLite (a 500). Blank means "not given".

No text a request carries (query, form fields, JSON strings) may hold the NUL character:
nothing in labq can use one (a job's arguments and environment cannot carry it) and
PostgreSQL refuses it in text, which was a 500. :func:`refuse_nul` answers 400 first.
"""

from __future__ import annotations

import re
from typing import Any

from flask import request

from labq.shared.errors import BadRequestError

NUL = "\x00"

MAX_DIGITS = 18
#: The largest value :func:`whole_number` accepts (the document's ``maximum``).
MAX_WHOLE = 10**MAX_DIGITS - 1
PATTERN = rf"^[0-9]{{1,{MAX_DIGITS}}}$"
#: Token ids are the database's INTEGER: 32 bits on PostgreSQL, which cannot even compare
#: a larger number with one (no token has such an id: 404).
TOKEN_ID_MAX = 2**31 - 1
_WHOLE = re.compile(PATTERN)


def whole_number(raw: str | None, name: str, default: int) -> int:
    """``raw`` as a whole number, ``default`` when blank; 400 naming ``name`` otherwise."""
    if raw is None or not raw.strip():
        return default
    text = raw.strip()
    if not _WHOLE.fullmatch(text):
        raise BadRequestError(f"{name} must be a whole number of at most {MAX_DIGITS} digits,"
                              f" got {text[:40]!r}", field=name)
    return int(text)


def _nul_in(value: Any) -> bool:
    if isinstance(value, str):
        return NUL in value
    if isinstance(value, dict):
        return any(_nul_in(k) or _nul_in(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_nul_in(v) for v in value)
    return False


def refuse_nul() -> None:
    """A before-request hook (after authentication, so no stranger's upload is parsed)."""
    for where, values in (("query", request.args), ("form", request.form)):
        for name, value in values.items(multi=True):
            # werkzeug gives None for a form part whose name it cannot read.
            name, value = name or "", value or ""
            if NUL in name or NUL in value:
                raise BadRequestError(f"the {where} parameter {name[:40]!r} holds a NUL "
                                      "character; no text sent to labq may", field=name)
    if request.is_json and _nul_in(request.get_json(silent=True)):
        raise BadRequestError("the JSON body holds a NUL character (\\u0000) in a string; "
                              "no text sent to labq may")
