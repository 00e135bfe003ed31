"""What every response of the backend gets regardless of who asks: the host allow-list
(DNS rebinding), anti-framing headers, the session cookie's flags, the secret key that
signs it, and trusting a reverse proxy's X-Forwarded-* headers when told to.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path

from flask import Flask, Response, request
from flask.sessions import SecureCookieSessionInterface
from werkzeug.middleware.proxy_fix import ProxyFix

from labq.backend.errors import error_response
from labq.shared.settings import Settings

log = logging.getLogger(__name__)

SECRET_KEY_FILE = "secret-key"
SESSION_COOKIE = "labq_session"
SESSION_DAYS = 7


def allowed_hosts(settings: Settings) -> list[str]:
    """LABQ_ALLOWED_HOSTS, or the bound address plus the loopback names (and this
    machine's names when bound to every interface)."""
    if settings.allowed_hosts.strip():
        return [h.strip() for h in settings.allowed_hosts.split(",") if h.strip()]
    hosts = ["localhost", "127.0.0.1", "::1"]
    if settings.host in ("0.0.0.0", "::", ""):
        name = socket.gethostname()
        hosts += [name, socket.getfqdn(name)]
    else:
        hosts.append(settings.host)
    return list(dict.fromkeys(h for h in hosts if h))


def split_host(header: str) -> str:
    """The host name of a Host header (``name:port``, ``[v6]:port``), lower-case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def host_allowed(header: str, trusted: list[str]) -> bool:
    """Exact names, ``.example.org`` for a domain and its subdomains, or ``*``.

    (werkzeug's ``host_is_trusted`` would do the same but drops IPv6 literals such as
    ``::1`` from the list, so the comparison is spelled out here.)
    """
    host = split_host(header)
    if not host:
        return False
    for ref in trusted:
        ref = ref.strip().lower().strip("[]")
        if ref == "*" or ref == host:
            return True
        if ref.startswith(".") and (host == ref[1:] or host.endswith(ref)):
            return True
    return False


def secret_key(settings: Settings) -> str:
    """LABQ_SECRET_KEY, else the key in ``<data_dir>/secret-key``, made once (0600).

    Made with O_EXCL-like care: every backend process on the data dir must sign with the
    same key, so a process that loses the race reads the winner's file.
    """
    if settings.secret_key:
        return settings.secret_key
    path = Path(settings.data_dir) / SECRET_KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # the winner may not have written it yet
            key = path.read_text().strip()
            if key:
                return key
            os.sched_yield()
        raise RuntimeError(f"{path} is empty; delete it and start labq again") from None
    key = secrets.token_urlsafe(48)
    try:
        os.write(fd, key.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("session signing key generated in %s", path)
    return key


class LabqSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie session, marked Secure whenever the request came over https
    (directly, or through a trusted proxy that says so)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(request) and request.is_secure


def _security_headers(resp: Response) -> Response:
    csp = resp.headers.get("Content-Security-Policy")
    resp.headers["Content-Security-Policy"] = (
        f"{csp}; frame-ancestors 'none'" if csp else "frame-ancestors 'none'")
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "same-origin")
    return resp


def install(app: Flask, settings: Settings) -> None:
    trusted = allowed_hosts(settings)
    if settings.trust_proxy:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    app.secret_key = secret_key(settings)
    app.session_interface = LabqSessionInterface()
    app.config.update(
        SESSION_COOKIE_NAME=SESSION_COOKIE,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=SESSION_DAYS * 24 * 3600,
        # The cookie is set at sign-in only (a session lasts SESSION_DAYS from then):
        # refreshed on every answer, a fetch still in flight when its page signed out
        # was answered with the cookie again, signing the user back in.
        SESSION_REFRESH_EACH_REQUEST=False,
    )

    @app.before_request
    def _check_host() -> Response | None:
        header = request.headers.get("Host", "")
        if not host_allowed(header, trusted):
            return error_response(
                400, "host_not_allowed",
                f"this labq server does not answer to the host name "
                f"{split_host(header)[:100]!r}; an admin can add it to LABQ_ALLOWED_HOSTS")
        return None

    app.after_request(_security_headers)
