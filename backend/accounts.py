"""Accounts and API tokens: the rows behind ``labq user`` and every authenticated request.

Passwords are argon2id hashes (argon2-cffi's defaults): slow on purpose, checked only at
sign-in. API tokens are 256 random bits, so a plain sha256 of the token is enough to
store (nothing to brute-force) and lets every request find its token through a unique
index in one query. ``last_used_at`` is written at most once a minute per token, so
authenticating a request is normally a read and nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, bindparam, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from labq.shared import db
from labq.shared.errors import AccountError

log = logging.getLogger(__name__)

TOKEN_PREFIX = "labq_"
ADMIN_NAME = "admin"
ADMIN_TOKEN_FILE = "admin-token"
#: last_used_at is refreshed at most this often per token (one write a minute, not per call).
LAST_USED_EVERY_S = 60.0
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_PASSWORD = 8

_hasher = PasswordHasher()
#: Verified against when the user does not exist, so a wrong name costs as much time as
#: a wrong password (user names are not revealed by timing).
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


@dataclass(frozen=True)
class Identity:
    """Who a request comes from."""

    user_id: int
    name: str
    is_admin: bool
    #: The API token used, or None when signed in with a session cookie.
    token_id: int | None = None

    @property
    def via(self) -> str:
        return "session" if self.token_id is None else "token"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise AccountError(f"{name!r} is not a valid user name: use 1-64 letters, digits, "
                           "'.', '_' or '-', starting with a letter or digit", field="name")
    return name


def check_password(password: str) -> str:
    if len(password or "") < MIN_PASSWORD:
        raise AccountError(f"the password must have at least {MIN_PASSWORD} characters",
                           field="password")
    return password


# -- users ---------------------------------------------------------------------------


def create_user(engine: Engine, name: str, *, admin: bool = False,
                password: str | None = None) -> dict[str, Any]:
    check_name(name)
    pw_hash = _hasher.hash(check_password(password)) if password is not None else None
    try:
        with engine.begin() as conn:
            conn.execute(insert(db.users).values(
                name=name, password_hash=pw_hash, is_admin=admin, disabled=False,
                created_at=time.time(), dispatch_seq=0))
    except IntegrityError:
        raise AccountError(f"there is already a user {name!r}", field="name") from None
    return get_user(engine, name)


def get_user(engine: Engine, name: str) -> dict[str, Any]:
    with db.read(engine) as conn:
        row = conn.execute(select(db.users).where(db.users.c.name == name)).mappings().first()
    if row is None:
        raise AccountError(f"there is no user {name!r} (see `labq user list`)", field="name")
    return dict(row)


def list_users(engine: Engine) -> list[dict[str, Any]]:
    active = (db.api_tokens.c.revoked_at.is_(None))
    tokens = (select(db.api_tokens.c.user_id, func.count().label("n"))
              .where(active).group_by(db.api_tokens.c.user_id).subquery())
    query = (select(db.users, func.coalesce(tokens.c.n, 0).label("tokens"))
             .outerjoin(tokens, tokens.c.user_id == db.users.c.id).order_by(db.users.c.name))
    with db.read(engine) as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def set_password(engine: Engine, name: str, password: str) -> None:
    pw_hash = _hasher.hash(check_password(password))
    with engine.begin() as conn:
        done = conn.execute(update(db.users).where(db.users.c.name == name)
                            .values(password_hash=pw_hash)).rowcount
    if not done:
        raise AccountError(f"there is no user {name!r} (see `labq user list`)", field="name")


def set_disabled(engine: Engine, name: str, disabled: bool) -> None:
    """A disabled user's tokens and sessions stop working at their next request."""
    with engine.begin() as conn:
        done = conn.execute(update(db.users).where(db.users.c.name == name)
                            .values(disabled=disabled)).rowcount
    if not done:
        raise AccountError(f"there is no user {name!r} (see `labq user list`)", field="name")


def verify_password(engine: Engine, name: str, password: str) -> Identity | None:
    """The user when ``password`` is theirs (and they are enabled); None otherwise."""
    with db.read(engine) as conn:
        row = conn.execute(select(db.users).where(db.users.c.name == name)).mappings().first()
    stored = row["password_hash"] if row is not None else None
    try:
        _hasher.verify(stored or _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None or stored is None or row["disabled"]:
        return None
    return Identity(row["id"], row["name"], bool(row["is_admin"]))


def session_fingerprint(password_hash: str | None) -> str:
    """Changes with the password, so a new password signs every old session out."""
    return hashlib.sha256((password_hash or "").encode()).hexdigest()[:16]


def user_for_session(engine: Engine, user_id: int, fingerprint: str) -> Identity | None:
    with db.read(engine) as conn:
        row = conn.execute(select(db.users).where(db.users.c.id == user_id)).mappings().first()
    if row is None or row["disabled"] or row["password_hash"] is None:
        return None
    if not secrets.compare_digest(session_fingerprint(row["password_hash"]), fingerprint):
        return None
    return Identity(row["id"], row["name"], bool(row["is_admin"]))


# -- tokens --------------------------------------------------------------------------


def create_token(engine: Engine, user_id: int, name: str) -> tuple[int, str]:
    """A new API token for the user: (its id, the token — shown once, stored hashed)."""
    name = (name or "").strip() or "token"
    if len(name) > 100:
        raise AccountError("a token name has at most 100 characters", field="name")
    token = new_token()
    with engine.begin() as conn:
        result = conn.execute(insert(db.api_tokens).values(
            user_id=user_id, name=name, token_hash=hash_token(token), created_at=time.time()))
    return int(result.inserted_primary_key[0]), token


def list_tokens(engine: Engine, user_id: int) -> list[dict[str, Any]]:
    t = db.api_tokens
    with db.read(engine) as conn:
        rows = conn.execute(
            select(t.c.id, t.c.name, t.c.created_at, t.c.last_used_at)
            .where(t.c.user_id == user_id, t.c.revoked_at.is_(None)).order_by(t.c.id)
        ).mappings()
        return [dict(r) for r in rows]


def revoke_token(engine: Engine, user_id: int, token_id: int) -> bool:
    """Revoke one of the user's tokens; False when they have no such (live) token."""
    t = db.api_tokens
    with engine.begin() as conn:
        return conn.execute(
            update(t).where(t.c.id == token_id, t.c.user_id == user_id,
                            t.c.revoked_at.is_(None)).values(revoked_at=time.time())
        ).rowcount == 1


#: Every authenticated request asks this: built once, run with the hash as parameter.
_TOKEN_QUERY = (
    select(db.api_tokens.c.id, db.api_tokens.c.last_used_at, db.users.c.id.label("user_id"),
           db.users.c.name, db.users.c.is_admin, db.users.c.disabled)
    .join(db.users, db.users.c.id == db.api_tokens.c.user_id)
    .where(db.api_tokens.c.token_hash == bindparam("token_hash"),
           db.api_tokens.c.revoked_at.is_(None)))


def user_for_token(engine: Engine, token: str) -> Identity | None:
    """The enabled user owning this live token, found through the unique hash index."""
    t = db.api_tokens
    with db.read(engine) as conn:
        row = conn.execute(_TOKEN_QUERY, {"token_hash": hash_token(token)}).first()
    if row is None or row.disabled:
        return None
    now = time.time()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY_S:
        # Conditional, so several backends seeing the same token write once between them.
        with engine.begin() as conn:
            conn.execute(update(t).where(t.c.id == row.id, (t.c.last_used_at.is_(None))
                                         | (t.c.last_used_at <= now - LAST_USED_EVERY_S))
                         .values(last_used_at=now))
    return Identity(row.user_id, row.name, bool(row.is_admin), token_id=row.id)


# -- first start -------------------------------------------------------------------------


def ensure_admin(engine: Engine, data_dir: Path) -> bool:
    """On a database without users, create ``admin`` with a generated password, and write
    an admin API token to ``<data_dir>/admin-token`` (0600). True when this process did.

    Several backend processes may start at once: the unique user name lets exactly one
    of them create the account; the others see the IntegrityError and leave it.
    """
    with db.read(engine) as conn:
        if conn.execute(select(func.count()).select_from(db.users)).scalar():
            return False
    password = secrets.token_urlsafe(12)
    try:
        user = create_user(engine, ADMIN_NAME, admin=True, password=password)
    except AccountError:
        return False  # another process created it first
    _token_id, token = create_token(engine, user["id"], "admin-token (first start)")
    path = Path(data_dir) / ADMIN_TOKEN_FILE
    write_private(path, token + "\n")
    log.warning(
        "\n  labq created the account 'admin' (there were no users).\n"
        "  Web sign-in: admin / %s   (shown only this once; change it with "
        "`labq user passwd admin`)\n"
        "  An admin API token is in %s (mode 0600); the labq CLI on this machine uses it.",
        password, path.resolve())
    return True


def write_private(path: Path, text: str) -> None:
    """Write a secret readable by this user only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
