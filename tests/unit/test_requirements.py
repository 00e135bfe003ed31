"""requirements.txt may name packages and files inside the bundle, nothing of the worker's:
each attack of issue 8 is refused at upload with a 422 naming the line."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from helpers import make_zip
from test_backend_api import app, client, upload  # noqa: F401, F811 - fixtures

from labq.shared.requirements import RequirementsError, check_requirements

FILES = {PurePosixPath(p) for p in ("code.py", "requirements.txt", "more.txt", "deps/a.txt")}


@pytest.mark.parametrize("line", [
    "-r /etc/shadow",
    "--requirement=/etc/shadow",
    "-r ../../etc/shadow",
    "-c /root/constraints.txt",
    "-e .",
    "--editable /opt/labq",
    "-e git+https://example.org/x.git#egg=x",
    "/root/labq",
    "./wheels/x.whl",
    "file:///etc/passwd",
    "pkg @ file:///tmp/pkg",
    "http://127.0.0.1:8080/evil.tar.gz",
    "https://localhost/pkg.whl",
    "--index-url http://127.0.0.1:3141/simple",
    "--find-links /var/cache/wheels",
    "pkg @ http://169.254.169.254/latest/meta-data",
])
def test_lines_reaching_the_worker_are_refused_naming_the_line(line):
    text = f"numpy\n{line}\n"
    with pytest.raises(RequirementsError) as info:
        check_requirements(text, FILES)
    assert "line 2" in info.value.message and info.value.status == 422


@pytest.mark.parametrize("line", [
    "numpy==2.0", "scipy>=1.10  # science", "-r more.txt", "-c deps/a.txt",
    "--index-url https://pypi.org/simple", "torch @ https://download.example.org/t.whl",
    "requests[socks]; python_version >= '3.8'", "# -e . in a comment",
])
def test_packages_indexes_and_files_inside_the_bundle_are_fine(line):
    check_requirements(f"{line}\n", FILES)


def test_an_upload_with_a_bad_requirements_line_is_a_422_and_nothing_is_stored(client, app):  # noqa: F811
    body = make_zip({"code.py": "print(1)\n", "requirements.txt": "numpy\n-r /etc/shadow\n"})
    resp = upload(client, body)
    assert resp.status_code == 422, resp.json
    error = resp.json["error"]
    assert error["code"] == "invalid_requirements" and "line 2" in error["message"]
    assert "/etc/shadow" in error["message"]
    assert client.get("/api/v1/jobs").json["jobs"] == []


def test_an_included_file_is_checked_too(client, app):  # noqa: F811
    body = make_zip({"code.py": "print(1)\n", "requirements.txt": "-r more.txt\n",
                     "more.txt": "-e .\n"})
    resp = upload(client, body)
    assert resp.status_code == 422 and "more.txt line 1" in resp.json["error"]["message"]


def test_network_is_refused_unless_the_server_allows_it(tmp_path):
    from labq.process_unit.sandbox import bwrap_argv
    from labq.shared.errors import ManifestError
    from labq.shared.manifest import resolve_spec
    from labq.shared.settings import Settings

    with pytest.raises(ManifestError) as info:
        resolve_spec({"network": True}, "code.py", Settings(data_dir=tmp_path))
    assert info.value.details["field"] == "network" and "LABQ_ALLOW_NETWORK" in info.value.message
    spec = resolve_spec({"network": True}, "code.py",
                        Settings(data_dir=tmp_path, allow_network=True))
    assert spec.network
    # and every job has a network namespace of its own
    common = {"workspace": tmp_path, "project": tmp_path / "p", "env_dir": tmp_path / "e",
              "tmp_mb": 8}
    assert "--unshare-net" in bwrap_argv("bwrap", **common)
    # (made by the job's launcher, routed out by slirp4netns: bwrap keeps it)
    assert "--unshare-net" not in bwrap_argv("bwrap", own_network=True, **common)
