"""Signing in and out (pages), who am I, and the caller's API tokens."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request, session

from labq.backend import accounts
from labq.backend.auth import (
    csrf_token,
    current_identity,
    password_login,
    same_origin,
    start_session,
)
from labq.backend.params import TOKEN_ID_MAX
from labq.backend.registry import iso
from labq.backend.services import services
from labq.backend.tokenmemo import note_change
from labq.backend.views.pages import page
from labq.shared.errors import BadRequestError, ForbiddenError, NotFoundError

bp = Blueprint("account", __name__)


def _json_body() -> dict[str, Any]:
    data = request.get_json(silent=True) if request.is_json else None
    return data if isinstance(data, dict) else {}


@bp.get("/login")
def login_page() -> Response:
    return page("login.html")


@bp.post("/login")
def login() -> Response:
    # JSON only: a cross-site form cannot send it, so nobody can sign a visitor in
    # to an account of theirs (login CSRF); a foreign Origin is refused outright.
    origin = request.headers.get("Origin")
    if origin and not same_origin(origin):
        raise ForbiddenError("cross-origin sign-in is not allowed")
    if not request.is_json:
        raise BadRequestError('send JSON like {"name": "...", "password": "..."}')
    data = _json_body()
    name, password = data.get("name"), data.get("password")
    if not isinstance(name, str) or not isinstance(password, str) or not name:
        raise BadRequestError('send JSON like {"name": "...", "password": "..."}')
    identity = password_login(name, password)
    token = start_session(identity)
    return jsonify({"name": identity.name, "admin": identity.is_admin, "csrf_token": token})


@bp.post("/logout")
def logout() -> tuple[str, int]:
    session.clear()
    return "", 204


@bp.get("/api/v1/me")
def me() -> Response:
    identity = current_identity()
    return jsonify({"name": identity.name, "admin": identity.is_admin, "via": identity.via,
                    "token_id": identity.token_id, "csrf_token": csrf_token()})


def _token_json(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "created_at": iso(row["created_at"]),
            "last_used_at": iso(row["last_used_at"])}


@bp.get("/api/v1/tokens")
def list_tokens() -> Response:
    rows = accounts.list_tokens(services().engine, current_identity().user_id)
    return jsonify({"tokens": [_token_json(r) for r in rows]})


@bp.post("/api/v1/tokens")
def create_token() -> tuple[Response, int]:
    identity = current_identity()
    body: Any = request.get_json(silent=True) if request.is_json else {}
    if not isinstance(body, dict):
        raise BadRequestError('send JSON like {"name": "laptop"} (or no body)')
    # A name that is there but not text (null too) is refused, not replaced by the default.
    name = body["name"] if "name" in body else request.form.get("name", "token")
    if not isinstance(name, str):
        raise BadRequestError("the token name must be a string", field="name")
    token_id, token = accounts.create_token(services().engine, identity.user_id, name)
    return jsonify({"id": token_id, "name": name.strip() or "token", "token": token,
                    "user": identity.name}), 201


@bp.delete("/api/v1/tokens/<int:token_id>")
def revoke_token(token_id: int) -> tuple[str, int]:
    # Past the column's range no token exists (and PostgreSQL could not compare it).
    if token_id > TOKEN_ID_MAX or not accounts.revoke_token(
            services().engine, current_identity().user_id, token_id):
        raise NotFoundError(f"you have no token {token_id} (see GET /api/v1/tokens)")
    note_change(services().settings.data_dir)  # every process forgets it now
    return "", 204
