"""labq as it is installed, not as it is developed: ``pip install .`` (not editable) into
a fresh venv gives a working ``labq up`` that runs a job; the client-only distribution
installs without Flask, pika or gunicorn; every package folder is in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import REPO
from test_cli_up import Up

pytestmark = pytest.mark.integration


def _uv() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


def _source(tmp: Path) -> Path:
    """A copy of the checkout: building a wheel writes build/ and *.egg-info into it."""
    source = tmp / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "data", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    return source


def _venv(path: Path, *packages: str) -> Path:
    subprocess.run([_uv(), "venv", "--quiet", "--python", sys.executable, str(path)],
                   check=True, timeout=120)
    python = path / "bin" / "python"
    done = subprocess.run([_uv(), "pip", "install", "--quiet", "--python", str(python),
                           *packages], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return path / "bin"


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            if "build" in init.parts or any(p.endswith(".egg-info") for p in init.parts):
                continue
            relative = init.parent.relative_to(REPO / folder)
            found.add(".".join([name, *relative.parts]))
    assert found == listed, f"in the tree but not listed: {found - listed}; " \
                            f"listed but not in the tree: {listed - found}"


def test_a_plain_install_runs_labq_up_and_a_job(broker, tmp_path):
    bin_dir = _venv(tmp_path / "venv", str(_source(tmp_path)))
    # Nothing generic lands in site-packages: only the labq namespace.
    site = next((tmp_path / "venv" / "lib").glob("python*/site-packages"))
    assert not any((site / name).exists() for name in ("shared", "backend", "client"))
    home = tmp_path / "home"
    home.mkdir()
    up = Up(home, workers=1, labq=[str(bin_dir / "labq")])
    try:
        up.wait_for(f"labq is running at {up.url} (1 worker)", timeout=90)
        done = subprocess.run([str(bin_dir / "labq"), "submit", str(REPO / "examples" / "hello"),
                               "--wait"], cwd=home, env=up.env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, (done.stdout, done.stderr, up.output)
        assert "succeeded" in done.stdout + done.stderr
    finally:
        up.close()


def test_the_client_alone_installs_without_the_server(tmp_path):
    bin_dir = _venv(tmp_path / "venv", str(_source(tmp_path) / "client"))
    listed = subprocess.run([str(bin_dir / "python"), "-m", "pip", "list"],
                            capture_output=True, text=True).stdout.lower()
    frozen = subprocess.run([_uv(), "pip", "freeze", "--python", str(bin_dir / "python")],
                            capture_output=True, text=True, timeout=60).stdout.lower()
    for server_part in ("flask", "pika", "gunicorn", "sqlalchemy"):
        assert server_part not in frozen + listed, frozen
    assert "labq-client" in frozen
    help_text = subprocess.run([str(bin_dir / "labq"), "--help"], capture_output=True,
                               text=True, timeout=60)
    assert help_text.returncode == 0 and "labq submit" in help_text.stdout
    refused = subprocess.run([str(bin_dir / "labq"), "worker"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and "full package" in refused.stderr
