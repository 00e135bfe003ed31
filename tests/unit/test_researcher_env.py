"""The job log carries no terminal advice from uv; the environment's lock is recorded."""

from __future__ import annotations

from test_envcache import reqs, settings  # noqa: F401 - the fixture

from labq.process_unit.envcache import EnvCache
from labq.process_unit.envlock import read_environment, record_environment
from labq.shared.storage import Storage


def test_log_has_no_activate_line_and_lock_lists_exact_versions(tmp_path, settings):  # noqa: F811
    req = reqs(tmp_path, "labqdemo\n")  # no version: the lock must name the one installed
    with open(tmp_path / "log", "w+b") as log, EnvCache(settings).acquire(req, log) as env:
        storage = Storage(settings.data_dir).ensure()
        storage.job_dir("a" * 32).mkdir(parents=True, exist_ok=True)
        record_environment(storage, "a" * 32, env)
    text = (tmp_path / "log").read_text()
    assert "building environment" in text
    assert "Activate with" not in text, text
    recorded = read_environment(storage, "a" * 32)
    assert recorded is not None
    assert recorded["packages"] == ["labqdemo==1.0"]
    assert recorded["python"] and recorded["python"][0] == "3"
