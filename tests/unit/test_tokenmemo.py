"""Token owners remembered per backend process (backend/tokenmemo.py): a revoked token or a
disabled user is refused at once by every process that shares the data dir, and nothing
is remembered longer than MEMO_S."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from labq.backend import accounts, tokenmemo
from labq.backend.tokenmemo import TokenMemo, note_change
from labq.shared import db


@pytest.fixture()
def alice(engine) -> tuple[int, int, str]:
    user = accounts.create_user(engine, "alice")
    token_id, token = accounts.create_token(engine, user["id"], "laptop")
    return user["id"], token_id, token


def _revoke_behind_its_back(engine, token_id: int) -> None:
    """A change the memo is not told about (by hand, in the database)."""
    with engine.begin() as conn:
        conn.execute(update(db.api_tokens).where(db.api_tokens.c.id == token_id)
                     .values(revoked_at=1.0))


def test_a_known_token_is_answered_from_memory(engine, alice, tmp_path):
    user_id, token_id, token = alice
    memo = TokenMemo(engine, tmp_path)
    assert memo.identity(token).name == "alice"
    # Given the database no longer says so (and nobody told the processes)
    _revoke_behind_its_back(engine, token_id)
    # Then the process still knows alice for a moment: no database round trip
    assert memo.identity(token).name == "alice"
    assert memo.identity("not-a-token") is None


def test_a_revoked_token_is_refused_at_once_by_every_process(engine, alice, tmp_path):
    user_id, token_id, token = alice
    # Given two backend processes that both remember alice's token
    first, second = TokenMemo(engine, tmp_path), TokenMemo(engine, tmp_path)
    assert first.identity(token) is not None and second.identity(token) is not None
    # When it is revoked as the API and the CLI do it (the change, then the marker)
    assert accounts.revoke_token(engine, user_id, token_id)
    note_change(tmp_path)
    # Then neither process accepts it any more
    assert first.identity(token) is None and second.identity(token) is None


def test_a_disabled_user_is_refused_at_once(engine, alice, tmp_path):
    _user_id, _token_id, token = alice
    memo = TokenMemo(engine, tmp_path)
    assert memo.identity(token) is not None
    accounts.set_disabled(engine, "alice", True)
    note_change(tmp_path)
    assert memo.identity(token) is None
    # and let in again the same way
    accounts.set_disabled(engine, "alice", False)
    note_change(tmp_path)
    assert memo.identity(token).name == "alice"


def test_changes_within_one_clock_tick_are_all_seen(engine, alice, tmp_path):
    user_id, token_id, token = alice
    memo = TokenMemo(engine, tmp_path)
    note_change(tmp_path)
    assert memo.identity(token) is not None  # remembered under the first change
    assert accounts.revoke_token(engine, user_id, token_id)
    note_change(tmp_path)  # at once after: the same modification time, maybe
    assert memo.identity(token) is None


def test_nothing_is_remembered_past_memo_s(engine, alice, tmp_path, monkeypatch):
    _user_id, token_id, token = alice
    memo = TokenMemo(engine, tmp_path)
    assert memo.identity(token) is not None
    _revoke_behind_its_back(engine, token_id)
    clock = [1000.0]
    monkeypatch.setattr(tokenmemo.time, "monotonic", lambda: clock[0])
    memo._items.clear()
    assert memo.identity(token) is None  # looked up again: the database says revoked
    second_id, second = accounts.create_token(engine, alice[0], "second")
    assert memo.identity(second) is not None
    _revoke_behind_its_back(engine, second_id)
    clock[0] += tokenmemo.MEMO_S - 0.1
    assert memo.identity(second) is not None  # still within the time
    clock[0] += 0.2
    assert memo.identity(second) is None
