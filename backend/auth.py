"""Who is asking: every request is authenticated here, once, before any view runs.

* ``Authorization: Bearer <token>`` — the CLI, the SDK, scripts. No CSRF token needed:
  a browser never adds this header to a cross-site request by itself.
* The signed session cookie — the web pages. Every state-changing request made with it
  (anything but GET/HEAD/OPTIONS) must carry ``X-CSRF-Token`` equal to the one in the
  session, which only labq's own pages can read (``GET /api/v1/me``); otherwise 403.
* ``Authorization: Basic`` — only to ``POST /api/v1/tokens`` (``labq login``), rate
  limited like the sign-in page.

Public: health, readiness, the OpenAPI document, the sign-in page and the static files.
``/metrics`` needs an admin's token: it counts every user's jobs. Unauthenticated page
views are redirected to the sign-in page; anything else gets a 401 with
``WWW-Authenticate``. Views read the caller with :func:`current_identity`.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from urllib.parse import quote, urlsplit

from flask import Flask, Response, g, redirect, request, session

from labq.backend import accounts, ratelimit
from labq.backend.accounts import Identity
from labq.backend.errors import error_response
from labq.backend.services import services
from labq.shared.errors import ForbiddenError, UnauthorizedError

PUBLIC_ENDPOINTS = {"health.healthz", "health.readyz", "openapi", "account.login_page",
                    "account.login", "pages.static_file"}
ADMIN_ENDPOINTS = {"health.metrics"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
CSRF_HEADER = "X-CSRF-Token"
BASIC_ENDPOINTS = {"account.create_token"}


def current_identity() -> Identity:
    identity = g.get("identity")
    if identity is None:  # a view reached without the hook: never serve it anonymously
        raise UnauthorizedError("sign in first")
    return identity


def client_address() -> str:
    return request.remote_addr or "unknown"


def password_login(name: str, password: str) -> Identity:
    """Check a user's password under the rate limit; raise 401/429, or return them."""
    svc = services()
    limit = svc.settings.login_failures_per_minute
    ratelimit.check(svc.engine, name, client_address(), limit)
    identity = accounts.verify_password(svc.engine, name, password)
    if identity is None:
        ratelimit.record_failure(svc.engine, name, client_address())
        raise UnauthorizedError("wrong user name or password")
    ratelimit.clear(svc.engine, name, client_address())
    return identity


def start_session(identity: Identity) -> str:
    """Sign the browser in; returns the session's CSRF token."""
    row = accounts.get_user(services().engine, identity.name)
    session.clear()
    session.permanent = True
    session["uid"] = identity.user_id
    session["fp"] = accounts.session_fingerprint(row["password_hash"])
    session["csrf"] = secrets.token_urlsafe(24)
    return session["csrf"]


def csrf_token() -> str | None:
    return session.get("csrf") if g.get("identity") and g.identity.via == "session" else None


def _from_bearer(header: str) -> Identity:
    token = header[7:].strip()
    identity = services().tokens.identity(token) if token else None
    if identity is None:
        raise UnauthorizedError("the API token is not valid (revoked, mistyped, or its user "
                                "is disabled); make a new one with `labq login`")
    return identity


def _from_basic(header: str) -> Identity:
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode()
        name, _, password = raw.partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise UnauthorizedError("malformed Basic credentials") from None
    return password_login(name, password)


def _from_session() -> Identity | None:
    uid, fingerprint = session.get("uid"), session.get("fp")
    if not isinstance(uid, int) or not isinstance(fingerprint, str):
        return None
    return accounts.user_for_session(services().engine, uid, fingerprint)


def same_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}" == request.host_url.rstrip("/")


def check_csrf() -> None:
    """A cookie-authenticated change must come from labq's own pages."""
    origin = request.headers.get("Origin")
    if origin and origin != "null" and not same_origin(origin):
        raise ForbiddenError("cross-origin requests cannot change anything here")
    sent = request.headers.get(CSRF_HEADER, "")
    expected = session.get("csrf", "")
    if not sent or not expected or not secrets.compare_digest(sent, expected):
        raise ForbiddenError(f"missing or wrong {CSRF_HEADER} header; reload the page "
                             "(scripts should use an API token instead of the cookie)")


def authenticate() -> Identity | None:
    """The caller of this request, or None; raises for bad credentials and CSRF."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return _from_bearer(header)
    if header[:6].lower() == "basic " and request.endpoint in BASIC_ENDPOINTS:
        return _from_basic(header)
    identity = _from_session()
    if identity is not None and request.method not in SAFE_METHODS:
        check_csrf()
    return identity


def _is_page() -> bool:
    return request.blueprint == "pages" and request.method in SAFE_METHODS


def _unauthorized(message: str) -> Response:
    if _is_page():
        return redirect(f"/login?next={quote(request.full_path.rstrip('?'), safe='/')}")
    resp = error_response(401, "unauthorized", message)
    resp.headers["WWW-Authenticate"] = 'Bearer realm="labq"'
    return resp


def install(app: Flask) -> None:
    @app.before_request
    def _authenticate() -> Response | None:
        if request.endpoint is None or request.endpoint in PUBLIC_ENDPOINTS:
            return None  # public, or no such route (a plain 404)
        try:
            identity = authenticate()
        except UnauthorizedError as exc:
            return _unauthorized(exc.message)
        if identity is None:
            return _unauthorized("sign in first: send `Authorization: Bearer <token>` "
                                 "(see `labq login`) or use the sign-in page")
        if request.endpoint in ADMIN_ENDPOINTS and not identity.is_admin:
            raise ForbiddenError("only admins can read this")
        g.identity = identity
        return None
