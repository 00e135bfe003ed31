"""labq with LABQ_STORAGE=s3 against a real S3-compatible server (moto's, on 127.0.0.1):
bundles and results live only in the bucket, the backend streams a result far larger
than its memory growth, sweeps and reruns work from the bucket, and a bundle changed in
the bucket is refused by the worker."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import LabqSystem, make_zip
from s3server import MotoS3

pytestmark = pytest.mark.integration

PREFIX = "labq/"
BIG_MIB = 64
#: Most the backend's peak memory may grow while it serves the big file twice.
MAX_GROWTH_MIB = 24

BIG_JOB = f"""
import hashlib, os
digest = hashlib.sha256()
with open("output/big.bin", "wb") as out:
    for _ in range({BIG_MIB}):
        chunk = os.urandom(1 << 20)
        digest.update(chunk)
        out.write(chunk)
open("output/big.sha256", "w").write(digest.hexdigest())
open("output/table.csv", "w").write("a,b\\n1,2\\n")
os.makedirs("output/sub", exist_ok=True)
open("output/sub/note.txt", "w").write("hello from the bucket")
print("wrote", {BIG_MIB}, "MiB")
"""


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3system(broker: str, moto: MotoS3,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabqSystem]:
    system = LabqSystem(tmp_path_factory.mktemp("labq-s3"), workers=1, env=moto.env(PREFIX))
    try:
        system.start()
        yield system
    finally:
        system.stop()


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def process_tree(pid: int) -> set[int]:
    """``pid`` and its descendants (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def memory_kib(pids: set[int], field: str) -> dict[int, int]:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of each process, in KiB."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as handle:
                for line in handle:
                    if line.startswith(f"{field}:"):
                        found[pid] = int(line.split()[1])
        except OSError:
            continue
    return found


def streamed_sha256(system: LabqSystem, path: str) -> tuple[str, int, dict[str, str]]:
    digest, size = hashlib.sha256(), 0
    with system.http.get(system.api(path), stream=True, timeout=120) as resp:
        assert resp.status_code == 200, resp.text[:500]
        for chunk in resp.iter_content(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
        return digest.hexdigest(), size, dict(resp.headers)


@pytest.fixture(scope="module")
def big_job(s3system: LabqSystem, moto: MotoS3) -> dict:
    """A job that wrote a big result (BIG_MIB), run once for the tests below; its
    bundle was checked to be in the bucket, not on the volume, right after the upload."""
    system = s3system
    job = system.submit({"code.py": BIG_JOB})
    sha = job["bundle"]["sha256"]
    assert moto.keys(f"{PREFIX}bundles/") == [f"{PREFIX}bundles/{sha[:2]}/{sha}.zip"]
    assert files_under(system.data_dir / "bundles") == []
    done = system.wait_done(job["id"], timeout=240)
    assert done["outcome"] == "succeeded", system.log(job["id"])
    assert done["has_results"] is True
    return done


def test_results_are_served_from_the_bucket_and_not_kept_on_the_volume(
        s3system: LabqSystem, moto: MotoS3, big_job: dict, tmp_path: Path):
    system, job_id = s3system, big_job["id"]
    base = f"/api/v1/jobs/{job_id}/results"
    listing = system.http.get(system.api(f"{base}/files"), timeout=10).json()["files"]
    assert listing == [{"path": "big.bin", "size": BIG_MIB << 20},
                       {"path": "big.sha256", "size": 64},
                       {"path": "sub/note.txt", "size": 21},
                       {"path": "table.csv", "size": 8}]
    expected = system.http.get(system.api(f"{base}/files/big.sha256"), timeout=10).text
    preview = system.http.get(system.api(f"{base}/files/table.csv"), timeout=10)
    assert preview.text == "a,b\n1,2\n"
    assert preview.headers["Content-Security-Policy"].startswith("sandbox")

    sha_one, size_one, headers = streamed_sha256(system, f"{base}/files/big.bin")
    assert (sha_one, size_one) == (expected, BIG_MIB << 20)
    assert headers["Content-Length"] == str(BIG_MIB << 20)
    archive = tmp_path / "results.zip"
    with system.http.get(system.api(base), stream=True, timeout=120) as resp:
        assert resp.status_code == 200
        with open(archive, "wb") as out:
            for chunk in resp.iter_content(256 * 1024):
                out.write(chunk)
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["big.bin", "big.sha256", "sub/note.txt", "table.csv"]
        with zf.open("big.bin") as member:
            assert hashlib.file_digest(member, "sha256").hexdigest() == expected

    # The receipt's hashes are the ones the worker recorded in the bucket.
    receipt = system.http.get(system.api(f"/api/v1/jobs/{job_id}/receipt"), timeout=10)
    hashes = {r["path"]: r["sha256"] for r in receipt.json()["results"]}
    assert hashes["big.bin"] == expected
    assert hashes["sub/note.txt"] == hashlib.sha256(b"hello from the bucket").hexdigest()

    # Nothing of the bundle or the results is on the volume; the log and records are.
    job_dir = system.data_dir / "jobs" / job_id
    assert not (job_dir / "results").exists() and not (job_dir / "results.zip").exists()
    assert (job_dir / "log.txt").exists() and (job_dir / "outcome.json").exists()
    assert files_under(system.data_dir / "bundles") == []
    assert files_under(system.data_dir / "tmp") == []
    keys = moto.keys(f"{PREFIX}jobs/{job_id}/")
    assert f"{PREFIX}jobs/{job_id}/results.zip" in keys
    assert f"{PREFIX}jobs/{job_id}/results/sub/note.txt" in keys


def reset_peaks(pids: set[int]) -> None:
    """Make each process's peak resident size (VmHWM) start again from now."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as handle:
                handle.write("5")
        except PermissionError:
            # labq's processes are non-dumpable, so their /proc files belong to root.
            pytest.skip("resetting a process's peak memory (/proc/PID/clear_refs) needs root")


def test_the_backend_streams_a_big_result_in_bounded_memory(s3system: LabqSystem,
                                                            big_job: dict):
    system, base = s3system, f"/api/v1/jobs/{big_job['id']}/results"
    streamed_sha256(system, f"{base}/files/big.sha256")  # warm: botocore loads its models
    backend = process_tree(system.backend.pid)
    reset_peaks(backend)
    resident = memory_kib(backend, "VmRSS")
    for path in (f"{base}/files/big.bin", base):  # the file, then the zip holding it
        assert streamed_sha256(system, path)[1] >= BIG_MIB << 20
    peaks = memory_kib(backend, "VmHWM")
    growth_mib = max(peaks[pid] - resident[pid] for pid in resident if pid in peaks) / 1024
    print(f"backend peak RSS rose {growth_mib:.1f} MiB above its resident size while "
          f"serving {BIG_MIB} MiB twice (limit {MAX_GROWTH_MIB} MiB)")
    assert growth_mib < MAX_GROWTH_MIB, "the backend held a result in memory"


def test_a_sweep_zips_its_members_results_from_the_bucket(s3system: LabqSystem):
    system = s3system
    toml = 'args = ["{n}"]\n[sweep]\nn = [1, 2]\n'
    code = "import sys\nopen('output/n.txt', 'w').write(sys.argv[1])\n"
    first = system.submit({"code.py": code, "labq.toml": toml})
    for job_id in first["group"]["job_ids"]:
        assert system.wait_done(job_id, timeout=120)["outcome"] == "succeeded"
    resp = system.http.get(system.api(f"/api/v1/groups/{first['group']['id']}/results"),
                           timeout=30)
    assert resp.status_code == 200
    with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
        found = sorted(zf.read(n).decode() for n in zf.namelist() if n.endswith("/n.txt"))
    assert found == ["1", "2"]


def test_a_rerun_fetches_the_bundle_from_the_bucket_and_refuses_a_changed_one(
        s3system: LabqSystem, moto: MotoS3):
    system = s3system
    # One zip, sent twice below: the same bytes have the same sha256.
    body = make_zip({"code.py": "open('output/who.txt', 'w').write('original')\n"})
    job = system.submit(body)
    assert system.wait_done(job["id"], timeout=120)["outcome"] == "succeeded"
    again = system.http.post(system.api(f"/api/v1/jobs/{job['id']}/rerun"), timeout=10)
    assert again.status_code == 201, again.text
    assert system.wait_done(again.json()["id"], timeout=120)["outcome"] == "succeeded"

    # Someone with write access to the bucket swaps the bundle (metadata and all).
    sha = job["bundle"]["sha256"]
    moto.client().put_object(
        Bucket=moto.bucket, Key=f"{PREFIX}bundles/{sha[:2]}/{sha}.zip", Metadata={"sha256": sha},
        Body=make_zip({"code.py": "open('output/who.txt', 'w').write('attacker')\n"}))
    poisoned = system.http.post(system.api(f"/api/v1/jobs/{job['id']}/rerun"), timeout=10)
    done = system.wait_done(poisoned.json()["id"], timeout=120)
    assert done["state"] == "failed" and "no longer matches its sha256" in done["error"]
    assert "attacker" not in system.log(poisoned.json()["id"])

    # Uploading the same zip again puts the researcher's bundle back.
    resubmitted = system.submit(body)
    assert resubmitted["bundle"]["sha256"] == sha
    assert system.wait_done(resubmitted["id"], timeout=120)["outcome"] == "succeeded"
    who = system.http.get(system.api(f"/api/v1/jobs/{resubmitted['id']}/results/files/who.txt"),
                          timeout=10)
    assert who.text == "original"
