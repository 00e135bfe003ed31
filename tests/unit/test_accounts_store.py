"""Accounts, tokens, the first-start admin, sign-in rate limiting and the web-security
pieces, against a real SQLite database and Flask's test client (no broker)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from labq.backend import accounts, ratelimit
from labq.backend.app import create_app
from labq.backend.websecurity import allowed_hosts, host_allowed, secret_key, split_host
from labq.shared import db
from labq.shared.errors import AccountError, TooManyRequestsError
from labq.shared.settings import Settings

NO_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"


def test_first_start_makes_one_admin_even_when_processes_race(engine, tmp_path: Path):
    # When four backends start at once on an empty database
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(
        accounts.ensure_admin(engine, tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # Then exactly one made the admin and its token file, readable by this user only
    assert sorted(results) == [False, False, False, True]
    path = tmp_path / "admin-token"
    assert path.stat().st_mode & 0o777 == 0o600
    identity = accounts.user_for_token(engine, path.read_text().strip())
    assert identity is not None and identity.name == "admin" and identity.is_admin
    # And a later start leaves everything alone
    assert accounts.ensure_admin(engine, tmp_path) is False
    assert [u["name"] for u in accounts.list_users(engine)] == ["admin"]


def test_tokens_are_stored_hashed_and_revocable(engine):
    user = accounts.create_user(engine, "alice")
    token_id, token = accounts.create_token(engine, user["id"], "laptop")
    with engine.connect() as conn:
        stored = conn.execute(select(db.api_tokens.c.token_hash)).scalar()
    assert token not in stored and stored == accounts.hash_token(token)
    assert accounts.user_for_token(engine, token).name == "alice"
    assert accounts.user_for_token(engine, token + "x") is None
    assert accounts.revoke_token(engine, user["id"] + 99, token_id) is False  # not theirs
    assert accounts.revoke_token(engine, user["id"], token_id) is True
    assert accounts.user_for_token(engine, token) is None


def test_last_used_is_written_at_most_once_a_minute(engine, monkeypatch):
    user = accounts.create_user(engine, "alice")
    token_id, token = accounts.create_token(engine, user["id"], "t")
    clock = [1000.0]
    monkeypatch.setattr(accounts.time, "time", lambda: clock[0])

    def last_used() -> float | None:
        return accounts.list_tokens(engine, user["id"])[0]["last_used_at"]

    accounts.user_for_token(engine, token)
    assert last_used() == 1000.0
    clock[0] = 1059.0
    accounts.user_for_token(engine, token)
    assert last_used() == 1000.0  # not again within the minute
    clock[0] = 1060.0
    accounts.user_for_token(engine, token)
    assert last_used() == 1060.0


def test_disabled_users_and_passwords(engine):
    accounts.create_user(engine, "bob", password="bob-password")
    assert accounts.verify_password(engine, "bob", "bob-password").name == "bob"
    assert accounts.verify_password(engine, "bob", "wrong-password") is None
    assert accounts.verify_password(engine, "nobody", "bob-password") is None
    with pytest.raises(AccountError, match="at least 8"):
        accounts.set_password(engine, "bob", "short")
    with pytest.raises(AccountError, match="already"):
        accounts.create_user(engine, "bob")
    with pytest.raises(AccountError, match="not a valid user name"):
        accounts.create_user(engine, "../bob")
    accounts.set_disabled(engine, "bob", True)
    assert accounts.verify_password(engine, "bob", "bob-password") is None


def test_a_new_password_ends_old_sessions(engine):
    user = accounts.create_user(engine, "bob", password="bob-password")
    fingerprint = accounts.session_fingerprint(accounts.get_user(engine, "bob")["password_hash"])
    assert accounts.user_for_session(engine, user["id"], fingerprint).name == "bob"
    accounts.set_password(engine, "bob", "another-password")
    assert accounts.user_for_session(engine, user["id"], fingerprint) is None


def test_wrong_passwords_are_limited_per_user_and_address(engine):
    for _ in range(5):
        ratelimit.check(engine, "bob", "10.0.0.1", 5)
        ratelimit.record_failure(engine, "bob", "10.0.0.1")
    with pytest.raises(TooManyRequestsError) as caught:
        ratelimit.check(engine, "bob", "10.0.0.1", 5)
    assert 1 <= caught.value.retry_after_s <= 60
    ratelimit.check(engine, "bob", "10.0.0.2", 5)  # another address
    ratelimit.check(engine, "alice", "10.0.0.1", 5)  # another user
    ratelimit.clear(engine, "bob", "10.0.0.1")
    ratelimit.check(engine, "bob", "10.0.0.1", 5)


@pytest.mark.parametrize(("header", "host"), [
    ("127.0.0.1:8080", "127.0.0.1"), ("LocalHost", "localhost"), ("[::1]:8080", "::1"),
    ("::1", "::1"), ("lab.example.org:443", "lab.example.org")])
def test_split_host(header: str, host: str):
    assert split_host(header) == host


def test_host_allow_list():
    assert set(allowed_hosts(Settings())) == {"localhost", "127.0.0.1", "::1"}
    assert "10.1.2.3" in allowed_hosts(Settings(host="10.1.2.3"))
    trusted = allowed_hosts(Settings(allowed_hosts="labq.lab.org, .example.org"))
    assert host_allowed("labq.lab.org:8080", trusted)
    assert host_allowed("a.example.org", trusted) and host_allowed("example.org", trusted)
    assert not host_allowed("evil.org", trusted) and not host_allowed("badexample.org", trusted)
    assert not host_allowed("localhost", trusted)  # an explicit list replaces the default
    assert host_allowed("anything", ["*"])


def test_the_secret_key_is_made_once_and_private(tmp_path: Path):
    first = secret_key(Settings(data_dir=tmp_path))
    assert (tmp_path / "secret-key").stat().st_mode & 0o777 == 0o600
    assert secret_key(Settings(data_dir=tmp_path)) == first and len(first) > 40
    assert secret_key(Settings(data_dir=tmp_path, secret_key="from-env")) == "from-env"


@pytest.mark.parametrize(("trust_proxy", "base", "headers", "secure"), [
    (False, "http://localhost", {}, False),
    (False, "https://localhost", {}, True),
    (True, "http://localhost", {"X-Forwarded-Proto": "https"}, True),
    (False, "http://localhost", {"X-Forwarded-Proto": "https"}, False),  # not trusted
])
def test_the_session_cookie_is_secure_over_https(tmp_path: Path, trust_proxy: bool, base: str,
                                                 headers: dict, secure: bool):
    app = create_app(Settings(data_dir=tmp_path, rabbitmq_url=NO_BROKER,
                              trust_proxy=trust_proxy))
    try:
        accounts.set_password(app.extensions["labq"].engine, "admin", "admin-password")
        resp = app.test_client().post("/login", base_url=base, headers=headers,
                                      json={"name": "admin", "password": "admin-password"})
        assert resp.status_code == 200, resp.json
        cookie = resp.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert ("Secure" in cookie) is secure
    finally:
        app.extensions["labq"].shutdown()
