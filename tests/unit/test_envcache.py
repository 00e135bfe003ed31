"""The environment cache: uv builds, reuse, concurrent builds, isolation, failures."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from labq.process_unit.envcache import EnvCache, normalize_requirements, referenced_files
from labq.shared.errors import EnvironmentBuildError
from labq.shared.settings import Settings


def make_wheel(folder: Path, name: str = "labqdemo", version: str = "1.0",
               code: str = "VALUE = 42\n") -> Path:
    """A minimal pure-Python wheel, written by hand: no build backend, no network."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": code.encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: labq-tests\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    wheels = tmp_path / "wheels"
    make_wheel(wheels)
    return Settings(data_dir=tmp_path / "data", uv_offline=True, uv_find_links=str(wheels))


def reqs(tmp: Path, text: str) -> Path:
    path = tmp / f"req-{hashlib.sha1(text.encode()).hexdigest()[:6]}.txt"
    path.write_text(text)
    return path


def run_in(env: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(env / "bin" / "python"), "-c", code], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin"}, check=False)


def test_normalized_requirements_ignore_comments_and_order():
    assert normalize_requirements("b\n# c\n\na  # why\n") == normalize_requirements("a\nb\n")


def test_build_once_then_reuse(tmp_path, settings):
    cache = EnvCache(settings)
    req = reqs(tmp_path, "labqdemo==1.0\n")
    with open(tmp_path / "log1", "w+b") as log, cache.acquire(req, log) as env:
        assert run_in(env, "import labqdemo; print(labqdemo.VALUE)").stdout.strip() == "42"
    with open(tmp_path / "log2", "w+b") as log, cache.acquire(req, log) as env2:
        assert env2 == env
    assert "building environment" in (tmp_path / "log1").read_text()
    assert "reusing environment" in (tmp_path / "log2").read_text()
    assert "building" not in (tmp_path / "log2").read_text()


def test_two_concurrent_builds_of_one_key_build_once(tmp_path, settings):
    req = reqs(tmp_path, "labqdemo\n")
    envs: list[Path] = []
    errors: list[BaseException] = []

    def build(i: int) -> None:
        try:  # separate EnvCache objects: like two workers sharing the volume
            with open(tmp_path / f"log{i}", "w+b") as log, \
                    EnvCache(settings).acquire(req, log) as env:
                envs.append(env)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(envs)) == 1
    logs = [(tmp_path / f"log{i}").read_text() for i in range(2)]
    assert sum("building environment" in text for text in logs) == 1
    assert [p.name for p in (settings.resolved_work_dir / "envs").iterdir()
            if not p.name.startswith(".")] == [envs[0].name]


def test_no_requirements_gets_an_isolated_empty_env(tmp_path, settings):
    with open(tmp_path / "log", "w+b") as log, EnvCache(settings).acquire(None, log) as env:
        result = run_in(env, "import flask")
        assert result.returncode != 0 and "No module named 'flask'" in result.stderr
        assert run_in(env, "import sys; print(sys.prefix)").stdout.strip() == str(env)


def test_failed_install_raises_with_uvs_message(tmp_path, settings):
    req = reqs(tmp_path, "labq-no-such-package-xyz==9.9\n")
    with open(tmp_path / "log", "w+b") as log, pytest.raises(EnvironmentBuildError) as info, \
            EnvCache(settings).acquire(req, log):
        pass
    assert "labq-no-such-package-xyz" in info.value.message
    assert "installing requirements.txt failed" in info.value.message
    assert "labq-no-such-package-xyz" in (tmp_path / "log").read_text()  # uv's output logged
    envs = settings.resolved_work_dir / "envs"
    assert not [p for p in envs.iterdir() if not p.name.startswith(".")]


def test_least_recently_used_envs_are_evicted(tmp_path, settings):
    cache = EnvCache(settings.replace(env_cache_max_bytes=1))
    with open(tmp_path / "log", "w+b") as log:
        with cache.acquire(None, log) as first:
            pass
        with cache.acquire(reqs(tmp_path, "labqdemo\n"), log) as second:
            assert not first.exists() and second.exists()


def test_included_requirement_files_are_part_of_the_cache_key(tmp_path, settings):
    # Given two projects whose requirements.txt are the same line, "-r base.txt",
    # but whose base.txt differ
    cache = EnvCache(settings)
    keys = []
    for name, base in (("a", "numpy==1.0\n"), ("b", "numpy==2.0\n"), ("c", "numpy==1.0\n")):
        project = tmp_path / name
        project.mkdir()
        (project / "base.txt").write_text(base)
        (project / "requirements.txt").write_text("-r base.txt\n")
        text = (project / "requirements.txt").read_text()
        keys.append(cache.key(text, referenced_files(project / "requirements.txt")))
    # Then they get different environments, and the same content gets the same one
    assert keys[0] != keys[1]
    assert keys[0] == keys[2]


def test_local_wheels_and_nested_includes_are_found(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "pkg-1.0-py3-none-any.whl").write_bytes(b"wheel")
    (tmp_path / "more.txt").write_text("-c pins.txt\n./wheels/pkg-1.0-py3-none-any.whl\n")
    (tmp_path / "pins.txt").write_text("six==1.16\n")
    (tmp_path / "requirements.txt").write_text("-r more.txt\nrequests\n")
    found = {p.name for p in referenced_files(tmp_path / "requirements.txt")}
    assert found == {"more.txt", "pins.txt", "pkg-1.0-py3-none-any.whl"}
