"""Bundle validation and extraction: every bad input is refused with a clear error."""

from __future__ import annotations

import io
import stat
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import make_zip  # noqa: E402

from labq.shared.bundle import BundleLimits, extract_bundle, inspect_bundle, zip_folder  # noqa: E402
from labq.shared.errors import (  # noqa: E402
    BundleError,
    BundleTooLargeError,
    ManifestError,
    MissingEntrypointError,
)
from labq.shared.settings import Settings  # noqa: E402

SETTINGS = Settings(max_bundle_files=20, max_unpacked_bytes=5 * 1024 * 1024,
                    max_timeout_s=3600, max_memory_mb=1024, max_cpus=4)


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "b.zip"
    path.write_bytes(data)
    return path


def _raw_zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, content in entries:
            zf.writestr(info, content)
    return buf.getvalue()


def test_a_project_folder_gives_its_name_entrypoint_and_requirements(tmp_path):
    path = _write(tmp_path, make_zip({"code.py": "print(1)", "requirements.txt": "numpy\n",
                                      "output/.keep": ""}, root="my-exp"))
    info, spec = inspect_bundle(path, SETTINGS)
    assert (info.name, info.root, info.entrypoint) == ("my-exp", "my-exp", "code.py")
    assert info.has_requirements and info.file_count == 3
    assert spec.timeout_s == 3600  # the default (24 h) is clamped to the server maximum


def test_files_at_the_zip_root_and_main_script_are_accepted(tmp_path):
    path = _write(tmp_path, make_zip({"main_script.py": "print(1)"}, root=None))
    info, _ = inspect_bundle(path, SETTINGS, fallback_name="upload")
    assert (info.root, info.entrypoint, info.name) == ("", "main_script.py", "upload")


def test_the_manifest_sets_entrypoint_and_limits_within_the_maxima(tmp_path):
    manifest = 'entrypoint = "src/train.py"\ntimeout_s = 60\nmemory_mb = 256\ncpus = 2\n' \
               'args = ["--x", 1]\n[env]\nSEED = 42\n'
    path = _write(tmp_path, make_zip({"src/train.py": "", "labq.toml": manifest}))
    info, spec = inspect_bundle(path, SETTINGS)
    assert info.entrypoint == "src/train.py"
    assert (spec.timeout_s, spec.memory_mb, spec.cpus) == (60, 256, 2)
    assert spec.args == ["--x", "1"] and spec.env == {"SEED": "42"}


@pytest.mark.parametrize("manifest,field", [
    ("timeout_s = 99999", "timeout_s"),
    ("memory_mb = -1", "memory_mb"),
    ("cpus = 'two'", "cpus"),
    ("colour = 'blue'", "colour"),
    ("timeout_s = ", "labq.toml"),
    ("[env]\nLABQ_RABBITMQ_URL = 'x'", "env"),
    ("[env]\nPATH = '/evil'", "env"),
])
def test_a_bad_manifest_is_a_422_naming_the_field(tmp_path, manifest, field):
    path = _write(tmp_path, make_zip({"code.py": "", "labq.toml": manifest}))
    with pytest.raises(ManifestError) as err:
        inspect_bundle(path, SETTINGS)
    assert err.value.status == 422
    assert err.value.details["field"] == field


def test_not_a_zip(tmp_path):
    with pytest.raises(BundleError, match="not a zip"):
        inspect_bundle(_write(tmp_path, b"hello, I am a text file"), SETTINGS)


@pytest.mark.parametrize("name", ["../evil.py", "proj/../../evil.py", "/etc/evil.py",
                                  "C:/evil.py"])
def test_paths_that_leave_the_project_are_refused(tmp_path, name):
    data = _raw_zip([("proj/code.py", b""), (name, b"x")])
    with pytest.raises(BundleError) as err:
        inspect_bundle(_write(tmp_path, data), SETTINGS)
    assert err.value.status == 400


def test_symlinks_are_refused(tmp_path):
    link = zipfile.ZipInfo("proj/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    data = _raw_zip([("proj/code.py", b""), (link, b"/etc/passwd")])
    with pytest.raises(BundleError, match="symbolic link"):
        inspect_bundle(_write(tmp_path, data), SETTINGS)


def test_too_many_files(tmp_path):
    files = {f"f{i}.txt": "" for i in range(25)} | {"code.py": ""}
    with pytest.raises(BundleTooLargeError, match="more than 20 files"):
        inspect_bundle(_write(tmp_path, make_zip(files)), SETTINGS)


def test_too_large_once_unpacked(tmp_path):
    data = make_zip({"code.py": "", "a.bin": b"\0" * (3 * 1024 * 1024),
                     "b.bin": b"\1" * (3 * 1024 * 1024)})
    with pytest.raises(BundleTooLargeError) as err:
        inspect_bundle(_write(tmp_path, data), SETTINGS.replace(max_compression_ratio=10_000))
    assert err.value.status == 413


def test_a_zip_bomb_is_refused_by_its_ratio(tmp_path):
    data = make_zip({"code.py": "", "zeros.bin": b"\0" * (4 * 1024 * 1024)})
    with pytest.raises(BundleTooLargeError, match="zip bomb"):
        inspect_bundle(_write(tmp_path, data), SETTINGS)


@pytest.mark.parametrize("files", [{"script.py": ""}, {"output/.keep": ""}])
def test_no_entrypoint_is_a_422_that_says_what_to_do(tmp_path, files):
    with pytest.raises(MissingEntrypointError, match="code.py") as err:
        inspect_bundle(_write(tmp_path, make_zip(files)), SETTINGS)
    assert err.value.status == 422


def test_a_manifest_entrypoint_that_is_missing_is_refused(tmp_path):
    data = make_zip({"code.py": "", "labq.toml": 'entrypoint = "train.py"'})
    with pytest.raises(MissingEntrypointError, match="train.py"):
        inspect_bundle(_write(tmp_path, data), SETTINGS)


def test_macos_junk_does_not_hide_the_project_folder(tmp_path):
    data = _raw_zip([("proj/code.py", b""), ("__MACOSX/proj/._code.py", b"junk"),
                     ("proj/.DS_Store", b"junk")])
    info, _ = inspect_bundle(_write(tmp_path, data), SETTINGS)
    assert info.root == "proj" and info.file_count == 1


def test_extraction_strips_the_project_folder_and_keeps_the_tree(tmp_path):
    path = _write(tmp_path, make_zip({"code.py": "print(1)", "pkg/mod.py": "X = 1",
                                      "output/.keep": ""}))
    dest = extract_bundle(path, tmp_path / "ws", BundleLimits.from_settings(SETTINGS))
    assert (dest / "code.py").read_text() == "print(1)"
    assert (dest / "pkg" / "mod.py").exists() and (dest / "output").is_dir()


def test_extraction_refuses_what_inspection_refuses(tmp_path):
    data = _raw_zip([("proj/code.py", b""), ("proj/../../escape.txt", b"x")])
    with pytest.raises(BundleError):
        extract_bundle(_write(tmp_path, data), tmp_path / "ws",
                       BundleLimits.from_settings(SETTINGS))
    assert not (tmp_path / "escape.txt").exists()


def test_zip_folder_skips_symlinks_and_enforces_the_size(tmp_path):
    out = tmp_path / "output"
    out.mkdir()
    (out / "a.txt").write_text("hello")
    (out / "link").symlink_to("/etc/passwd")
    assert zip_folder(out, tmp_path / "r.zip") == 5
    with zipfile.ZipFile(tmp_path / "r.zip") as zf:
        assert zf.namelist() == ["a.txt"]
    with pytest.raises(BundleTooLargeError):
        zip_folder(out, tmp_path / "r2.zip", max_bytes=3)


def test_a_password_protected_zip_is_a_400_that_says_so(tmp_path):
    data = bytearray(_raw_zip([("proj/code.py", b""), ("proj/data.txt", b"x" * 100)]))
    # Set the "encrypted" bit in every local and central header, as `zip -P` does
    # (zipfile cannot write encrypted members itself).
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(signature)
        while at != -1:
            data[at + flag_offset] |= 0x1
            at = data.find(signature, at + 4)
    data = bytes(data)
    with pytest.raises(BundleError, match="password") as err:
        inspect_bundle(_write(tmp_path, data), SETTINGS)
    assert err.value.status == 400


def test_corrupt_compressed_data_is_a_400(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("proj/code.py", "print('hello')\n" * 200)
    data = bytearray(buf.getvalue())
    start = data.index(b"proj/code.py") + len("proj/code.py")
    data[start + 5:start + 25] = b"\xff" * 20  # scramble the deflate stream
    with pytest.raises(BundleError) as err:
        inspect_bundle(_write(tmp_path, bytes(data)), SETTINGS)
    assert err.value.status == 400


@pytest.mark.parametrize("order", [("proj/data", "proj/data/a.csv"),
                                   ("proj/data/a.csv", "proj/data")])
def test_a_path_that_is_both_a_file_and_a_folder_is_refused_at_upload(tmp_path, order):
    data = _raw_zip([("proj/code.py", b""), *((name, b"x") for name in order)])
    with pytest.raises(BundleError, match="both a file and a folder"):
        inspect_bundle(_write(tmp_path, data), SETTINGS)


def test_an_output_folder_replaced_by_a_symlink_gives_no_results(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("S3CRET")
    (tmp_path / "output").symlink_to(elsewhere)
    assert zip_folder(tmp_path / "output", tmp_path / "r.zip") == 0
    with zipfile.ZipFile(tmp_path / "r.zip") as zf:
        assert zf.namelist() == []
