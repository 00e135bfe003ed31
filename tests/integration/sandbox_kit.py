"""What the sandbox tests share: the host check, a boxed system, packages built by hand
(a wheel with any files, an sdist whose in-tree build backend runs test code), and a
way to find processes that escaped a job."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import LabqSystem, wait_until

#: What every sandbox test system sets: small limits, so attacks hit them fast.
BOXED_ENV = {"LABQ_JOB_MAX_PROCS": "64", "LABQ_JOB_TMP_MB": "32", "LABQ_STOP_GRACE_S": "1",
             "LABQ_ALLOW_NETWORK": "1"}


def require_sandbox_host() -> None:
    """Skip (fail under CI) unless this host can give the whole sandbox."""
    if os.geteuid() != 0 or not shutil.which("bwrap") or not shutil.which("slirp4netns"):
        why = ("the sandbox tests need root, bubblewrap and slirp4netns "
               "(apt-get install bubblewrap slirp4netns)")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def layers_of(system: LabqSystem, workers: int = 2) -> list[dict]:
    folder = system.data_dir / "workers"
    wait_until(lambda: len(list(folder.glob("*.json"))) >= workers, timeout=30,
               message="the workers' sandbox reports")
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def run(system: LabqSystem, code: str, toml: str = "", timeout: float = 90,
        **files: str) -> tuple[dict, str]:
    """Submit ``code`` as a job (with ``labq.toml`` and other files), wait for its end."""
    bundle = {"code.py": code, **files}
    if toml:
        bundle["labq.toml"] = toml
    job = system.submit(bundle)
    done = system.wait_done(job["id"], timeout=timeout)
    return done, system.log(job["id"])


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel holding ``files`` (path in site-packages → text)."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    content = {path: text.encode() for path, text in files.items()}
    content[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" \
        .encode()
    content[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: labq-tests\n" \
                               b"Root-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, data in content.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in content.items():
            zf.writestr(path, data)
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    os.chmod(wheel, 0o644)
    return wheel


#: An in-tree PEP 517 backend: runs ``BUILD_CODE`` (the test's) when loaded, then builds
#: a wheel of one module, ``<name>.py``, holding ``REPORT`` (what BUILD_CODE returned).
BACKEND = '''
import base64, hashlib, os, zipfile
NAME, VERSION = {name!r}, {version!r}

def _build_code():
{build_code}

REPORT = _build_code()

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    dist = f"{{NAME}}-{{VERSION}}.dist-info"
    files = {{f"{{NAME}}.py": f"REPORT = {{REPORT!r}}\\n".encode(),
             f"{{dist}}/METADATA": f"Metadata-Version: 2.1\\nName: {{NAME}}\\n"
                                  f"Version: {{VERSION}}\\n".encode(),
             f"{{dist}}/WHEEL": b"Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\n"
                               b"Tag: py3-none-any\\n"}}
    def digest(data):
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = [f"{{p}},sha256={{digest(d)}},{{len(d)}}" for p, d in files.items()]
    name = f"{{NAME}}-{{VERSION}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{{dist}}/RECORD", "\\n".join(record + [f"{{dist}}/RECORD,,"]) + "\\n")
    return name
'''


def make_sdist(folder: Path, name: str, version: str, build_code: str) -> Path:
    """An sdist whose build runs ``build_code`` (the body of a function returning a
    report) in the build box: what a malicious ``setup.py`` could do."""
    folder.mkdir(parents=True, exist_ok=True)
    body = "\n".join("    " + line for line in build_code.strip().splitlines())
    files = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                          f'backend-path = ["."]\n[project]\nname = "{name}"\n'
                          f'version = "{version}"\n',
        "backend.py": BACKEND.format(name=name, version=version, build_code=body),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    }
    sdist = folder / f"{name}-{version}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name}-{version}/{path}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    os.chmod(sdist, 0o644)
    return sdist


def processes_with(mark: str) -> list[int]:
    """Live processes whose command line holds ``mark``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
                state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if mark.encode() in cmdline and state != "Z":
                found.append(int(name))
    return found
