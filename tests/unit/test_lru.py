"""The bounded memo the backend's per-process memories share (shared/lru.py)."""

from __future__ import annotations

from labq.shared.lru import MISSING, Lru


def test_the_least_recently_used_goes_first_when_full():
    memo: Lru[str, int] = Lru(2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # a is now the most recent
    memo.put("c", 3)
    assert memo.get("b") is None and memo.get("a") == 1 and memo.get("c") == 3
    assert len(memo) == 2


def test_a_kept_none_is_told_apart_from_a_missing_key():
    memo: Lru[str, str | None] = Lru(4)
    memo.put("job-without-owner", None)
    assert memo.get("job-without-owner", MISSING) is None
    assert memo.get("unknown", MISSING) is MISSING


def test_pop_and_clear_forget():
    memo: Lru[str, int] = Lru(4)
    memo.put("a", 1)
    memo.put("b", 2)
    memo.pop("a")
    memo.pop("never-there")
    assert memo.get("a") is None and memo.get("b") == 2
    memo.clear()
    assert len(memo) == 0
