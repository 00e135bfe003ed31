"""A stored bundle is what was uploaded: a copy changed on the volume is replaced when
the same zip is stored again, and refused when a worker reads it (bundle poisoning)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from labq.shared.storage import BundleTamperedError, Storage


def _stage(storage: Storage, body: bytes) -> tuple[Path, str]:
    staged = storage.tmp / "upload.zip"
    staged.write_bytes(body)
    return staged, hashlib.sha256(body).hexdigest()


def test_storing_again_replaces_a_poisoned_copy(tmp_path: Path):
    # Given a bundle stored once, then overwritten on the volume by an attacker
    storage = Storage(tmp_path).ensure()
    staged, sha = _stage(storage, b"the researcher's code")
    final = storage.store_bundle(staged, sha)
    final.write_bytes(b"the attacker's code")
    # When the owner uploads the same zip again
    staged, _ = _stage(storage, b"the researcher's code")
    storage.store_bundle(staged, sha)
    # Then the stored copy is the owner's again
    assert final.read_bytes() == b"the researcher's code"
    assert storage.verify_bundle(sha) == final


def test_a_worker_refuses_a_bundle_that_no_longer_matches_its_hash(tmp_path: Path):
    storage = Storage(tmp_path).ensure()
    staged, sha = _stage(storage, b"original")
    storage.store_bundle(staged, sha).write_bytes(b"tampered")
    with pytest.raises(BundleTamperedError) as info:
        storage.verify_bundle(sha)
    assert "upload the job again" in info.value.message
