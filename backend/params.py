"""Reading whole-number request parameters the way the OpenAPI document states them.

Event ids and byte offsets arrive as text (a query parameter, or the ``Last-Event-ID``
header EventSource sends): plain decimal digits, at most 18 of them, so every value fits
the database's 64-bit integers. ``int()`` alone would also take ``+5``, ``1_000``, other
scripts' digits and numbers too large for SQLite (a 500). Blank means "not given".
"""

from __future__ import annotations

import re

from labq.shared.errors import BadRequestError

MAX_DIGITS = 18
#: The largest value :func:`whole_number` accepts (the document's ``maximum``).
MAX_WHOLE = 10**MAX_DIGITS - 1
PATTERN = rf"^[0-9]{{1,{MAX_DIGITS}}}$"
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
