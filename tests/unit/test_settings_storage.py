"""Settings come from LABQ_* variables; storage writes atomically and stays inside."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from labq.shared.errors import ConfigError, NotFoundError
from labq.shared.lifecycle import Outcome, State
from labq.shared.outcome import OutcomeRecord
from labq.shared.settings import Settings
from labq.shared.storage import Storage, new_job_id


def test_settings_read_labq_variables_with_units():
    env = {"LABQ_PORT": "9000", "LABQ_UV_OFFLINE": "yes", "LABQ_STOP_GRACE_S": "2.5",
           "LABQ_DATA_DIR": "/srv/labq", "OTHER": "x"}
    s = Settings.from_env(env)
    assert (s.port, s.uv_offline, s.stop_grace_s, s.data_dir) == (9000, True, 2.5,
                                                                 Path("/srv/labq"))
    assert s.resolved_database_url == "sqlite:////srv/labq/labq.db"
    assert Settings.from_env({}, port=1).port == 1


def test_a_bad_setting_says_which_variable():
    with pytest.raises(ConfigError, match="LABQ_PORT"):
        Settings.from_env({"LABQ_PORT": "eighty"})


def test_env_names_lists_every_setting():
    names = Settings.env_names()
    assert {"LABQ_RABBITMQ_URL", "LABQ_DATABASE_URL", "LABQ_DATA_DIR", "LABQ_WORKERS",
            "LABQ_MAX_ATTEMPTS", "LABQ_STOP_GRACE_S", "LABQ_LOG_LEVEL"} <= names


def test_job_paths_refuse_ids_that_are_not_ids(tmp_path):
    storage = Storage(tmp_path).ensure()
    for bad in ("../etc", "", "A" * 32, "x/y"):
        with pytest.raises(NotFoundError):
            storage.job_dir(bad)
    assert storage.job_dir(new_job_id()).parent == storage.jobs


def test_records_attempts_outcome_and_cancel_marker(tmp_path):
    storage = Storage(tmp_path).ensure()
    job = new_job_id()
    assert storage.read_outcome(job) is None and storage.attempts(job) == 0
    assert storage.record_attempt(job, "w1") == 1
    assert storage.record_attempt(job, "w2") == 2
    record = OutcomeRecord(state=State.STOPPED, outcome=Outcome.SUCCEEDED, exit_code=0,
                           attempt=2, worker="w2")
    storage.write_outcome(job, record)
    assert storage.read_outcome(job) == record
    storage.outcome_path(job).write_text('{"state": "nonsense"}')
    assert storage.read_outcome(job) is None  # junk is no outcome
    assert not storage.is_cancelled(job)
    storage.mark_cancelled(job)
    assert storage.is_cancelled(job)
    assert not list(storage.job_dir(job).glob(".*"))  # no temporary files left behind


def test_bundles_are_stored_once_by_hash(tmp_path):
    storage = Storage(tmp_path).ensure()
    sha = hashlib.sha256(b"zip").hexdigest()
    for n in range(2):
        staged = storage.tmp / f"upload-{n}.zip"
        staged.write_bytes(b"zip")
        final = storage.store_bundle(staged, sha)
        staged.unlink(missing_ok=True)  # left alone when the stored copy is kept
    assert final.read_bytes() == b"zip"
    assert list(storage.bundles.rglob("*.zip")) == [final]
    assert not list(storage.tmp.iterdir())
