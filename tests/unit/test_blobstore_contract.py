"""One contract for both blob stores: the volume (tmp dirs) and S3 (a real moto server on
127.0.0.1, started here). Then what each store adds: the volume never follows a link, S3
refuses names it cannot hold and says what to fix when the bucket is missing or away.
Last, Storage's bundle and result rules over both stores."""

from __future__ import annotations

import hashlib
import io
import os
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3server import CREDENTIALS, MotoS3

from labq.process_unit.results import store_results
from labq.shared.blobstore import (
    BlobIntegrityError,
    BlobKeyError,
    BlobStore,
    StorageUnavailableError,
    VolumeBlobStore,
    content_sha256,
    open_blobstore,
)
from labq.shared.errors import ConfigError, LabqError, NotFoundError
from labq.shared.settings import Settings
from labq.shared.storage import BundleTamperedError, Storage, new_job_id


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path_factory.mktemp("moto"))
    try:
        yield server.start()
    finally:
        server.stop()


def s3_settings(moto: MotoS3, tmp: Path, **changes: str) -> Settings:
    # A prefix of its own per test: nothing one test writes is seen by another.
    values = {**moto.env(prefix=f"t-{uuid.uuid4().hex[:8]}/"), **changes}
    return Settings.from_env({**values, "LABQ_DATA_DIR": str(tmp / "data")})


@pytest.fixture(params=["volume", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> BlobStore:
    if request.param == "volume":
        return open_blobstore(Settings(data_dir=tmp_path / "volume"))
    moto = request.getfixturevalue("moto")
    for name, value in CREDENTIALS.items():  # boto3 reads the standard AWS variables
        monkeypatch.setenv(name, value)
    blobs = open_blobstore(s3_settings(moto, tmp_path))
    blobs.check()
    return blobs


def _file(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / f"src-{uuid.uuid4().hex[:6]}"
    path.write_bytes(body)
    return path


class OneWay:
    """A stream that can only be read forward (no seek, no tell, no fileno)."""

    def __init__(self, body: bytes) -> None:
        self._inner = io.BytesIO(body)

    def read(self, size: int = -1) -> bytes:
        return self._inner.read(min(size, 1000) if size and size > 0 else size)


# -- the contract -------------------------------------------------------------------------
def test_a_file_put_is_read_back_as_a_stream_of_chunks(store: BlobStore, tmp_path: Path):
    body = os.urandom(300_000)
    info = store.put("jobs/a/results.zip", _file(tmp_path, body))
    assert (info.key, info.size, info.sha256) == ("jobs/a/results.zip", len(body),
                                                 hashlib.sha256(body).hexdigest())
    blob = store.open("jobs/a/results.zip")
    assert blob is not None and blob.size == len(body)
    with blob:
        chunks = list(blob.chunks(64 * 1024))
    assert all(len(c) <= 64 * 1024 for c in chunks) and len(chunks) >= 5
    assert b"".join(chunks) == body
    assert store.exists("jobs/a/results.zip")
    assert store.info("jobs/a/results.zip").size == len(body)
    assert content_sha256(store, "jobs/a/results.zip") == hashlib.sha256(body).hexdigest()


def test_a_stream_put_is_read_to_its_end(store: BlobStore):
    body = b"line\n" * 5000
    info = store.put("k/stream.txt", OneWay(body))
    assert info.size == len(body) and info.sha256 == hashlib.sha256(body).hexdigest()
    with store.open("k/stream.txt") as blob:
        assert blob.read() == body
    recorded = store.info("k/stream.txt").sha256
    assert recorded in (None, info.sha256)  # a store records the true hash or none


def test_a_wrong_sha256_stores_nothing_and_keeps_what_was_there(store: BlobStore,
                                                                tmp_path: Path):
    good = b"the researcher's code"
    store.put("bundles/ab/x.zip", _file(tmp_path, good), sha256=hashlib.sha256(good).hexdigest())
    wrong = hashlib.sha256(b"something else").hexdigest()
    bad = b"the attacker's code"
    for source in (lambda: _file(tmp_path, bad), lambda: io.BytesIO(bad)):
        for key in ("bundles/ab/x.zip", "bundles/ab/new.zip"):
            with pytest.raises(BlobIntegrityError, match="send it again"):
                store.put(key, source(), sha256=wrong)
    with store.open("bundles/ab/x.zip") as blob:
        assert blob.read() == good
    assert not store.exists("bundles/ab/new.zip")
    assert [b.key for b in store.list("bundles/")] == ["bundles/ab/x.zip"]


def test_a_moved_file_is_gone_and_stored(store: BlobStore, tmp_path: Path):
    source = _file(tmp_path, b"zip bytes")
    store.put("bundles/cd/y.zip", source, sha256=hashlib.sha256(b"zip bytes").hexdigest(),
              move=True)
    assert not source.exists()
    with store.open("bundles/cd/y.zip") as blob:
        assert blob.read() == b"zip bytes"


def test_a_put_replaces_the_whole_blob(store: BlobStore, tmp_path: Path):
    store.put("a/b", _file(tmp_path, b"long old content " * 100))
    store.put("a/b", io.BytesIO(b"new"))
    with store.open("a/b") as blob:
        assert blob.read() == b"new"
    assert store.info("a/b").size == 3


def test_missing_blobs_are_none_and_deleting_them_is_fine(store: BlobStore):
    assert store.open("nope/x") is None and store.info("nope/x") is None
    assert not store.exists("nope/x") and not store.has_any("nope/")
    assert list(store.list("nope/")) == []
    store.delete("nope/x")


def test_list_is_sorted_under_a_folder_like_prefix(store: BlobStore, tmp_path: Path):
    names = ["r/z.txt", "r/a b/é.csv", "r/a/deep/x.bin", "r/a-c", "rx/other", "r2/n"]
    for n, name in enumerate(names):
        store.put(name, io.BytesIO(b"x" * n))
    listed = list(store.list("r/"))
    assert [b.key for b in listed] == sorted(["r/z.txt", "r/a b/é.csv", "r/a/deep/x.bin",
                                              "r/a-c"])
    assert {b.key: b.size for b in listed}["r/a/deep/x.bin"] == 2
    assert [b.key for b in store.list("r/a/")] == ["r/a/deep/x.bin"]
    assert sorted(b.key for b in store.list("")) == sorted(names)
    assert store.has_any("r/a/deep/") and not store.has_any("r/zz/")
    with pytest.raises(ValueError, match="ends with '/'"):
        list(store.list("r"))


def test_delete_removes_one_blob(store: BlobStore):
    store.put("d/one", io.BytesIO(b"1"))
    store.put("d/two", io.BytesIO(b"2"))
    store.delete("d/one")
    assert [b.key for b in store.list("d/")] == ["d/two"]
    assert store.open("d/one") is None


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a//b", "a\\b", "a/./b", "a/..",
                                 "", "a/\x00b"])
def test_keys_that_are_not_clean_never_name_a_blob(store: BlobStore, bad: str):
    with pytest.raises(NotFoundError):
        store.open(bad)
    with pytest.raises(NotFoundError):
        store.put(bad, io.BytesIO(b"x"))


def test_a_blob_larger_than_a_multipart_part(store: BlobStore, tmp_path: Path):
    if getattr(store, "transfer", None) is not None:
        from boto3.s3.transfer import TransferConfig

        # S3's smallest part is 5 MiB: make this upload a multipart one.
        store.transfer = TransferConfig(multipart_threshold=5 * 1024 * 1024,
                                        multipart_chunksize=5 * 1024 * 1024)
    body = os.urandom(11 * 1024 * 1024 + 17)
    store.put("big/blob", _file(tmp_path, body))
    with store.open("big/blob") as blob:
        assert blob.size == len(body)
        digest = hashlib.sha256()
        for chunk in blob.chunks():
            assert len(chunk) <= 1024 * 1024
            digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(body).hexdigest()


# -- the volume: never follows a link a job planted --------------------------------------------
def test_the_volume_serves_only_regular_files_never_through_links(tmp_path: Path):
    root = tmp_path / "volume"
    store = VolumeBlobStore(root)
    store.put("jobs/j/results/real.txt", io.BytesIO(b"mine"))
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    (secret.parent / "elsewhere").mkdir()
    (secret.parent / "elsewhere" / "x").write_text("x")
    results = root / "jobs/j/results"
    (results / "link.txt").symlink_to(secret)
    (results / "dirlink").symlink_to(secret.parent / "elsewhere")
    os.mkfifo(results / "fifo")
    assert [b.key for b in store.list("jobs/j/results/")] == ["jobs/j/results/real.txt"]
    for key in ("jobs/j/results/link.txt", "jobs/j/results/dirlink/x", "jobs/j/results/fifo"):
        assert store.open(key) is None and not store.exists(key)
    # A job folder that is itself a link yields nothing either.
    (root / "jobs/k").symlink_to(root / "jobs/j")
    assert list(store.list("jobs/k/results/")) == []
    assert store.open("jobs/k/results/real.txt") is None
    assert not store.has_any("jobs/k/results/")


def test_a_volume_blob_can_be_sent_by_descriptor_an_s3_body_cannot(store: BlobStore):
    store.put("s/f", io.BytesIO(b"0123456789"))
    with store.open("s/f") as blob:
        if store.kind == "volume":  # what a server's sendfile needs: fileno, seek, tell
            assert blob.fileno() >= 0 and blob.seekable()
            assert blob.seek(4) == 4 and blob.read(2) == b"45" and blob.tell() == 6
        else:
            assert not blob.seekable()
            with pytest.raises(io.UnsupportedOperation):
                blob.fileno()
            with pytest.raises(io.UnsupportedOperation):
                blob.seek(4)
            assert blob.read() == b"0123456789"


def test_the_volume_keeps_the_data_dir_layout(tmp_path: Path):
    store = open_blobstore(Settings(data_dir=tmp_path))
    store.put("bundles/ab/abc.zip", io.BytesIO(b"z"))
    assert (tmp_path / "bundles/ab/abc.zip").read_bytes() == b"z"
    assert not [p for p in (tmp_path / "bundles/ab").iterdir() if p.name.startswith(".")]


# -- S3: what it cannot hold, and what to fix ---------------------------------------------------
def test_s3_refuses_names_with_control_characters(moto: MotoS3, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    store = open_blobstore(s3_settings(moto, tmp_path))
    with pytest.raises(BlobKeyError, match="control characters"):
        store.put("jobs/j/results/a\nb.txt", io.BytesIO(b"x"))


def test_s3_settings_say_what_is_missing(moto: MotoS3, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="LABQ_S3_BUCKET"):
        open_blobstore(s3_settings(moto, tmp_path, LABQ_S3_BUCKET=""))
    with pytest.raises(ConfigError, match="LABQ_STORAGE='nfs'"):
        open_blobstore(s3_settings(moto, tmp_path, LABQ_STORAGE="nfs"))
    missing = open_blobstore(s3_settings(moto, tmp_path, LABQ_S3_BUCKET="no-such-bucket-x"))
    with pytest.raises(StorageUnavailableError, match="create the bucket"):
        missing.check()
    with pytest.raises(ConfigError, match="create the bucket"):  # a service will not start
        Storage(tmp_path / "data", missing).ensure()
    away = open_blobstore(s3_settings(
        moto, tmp_path, LABQ_S3_ENDPOINT_URL=f"http://127.0.0.1:{_closed_port()}"))
    away.client.meta.config.retries["max_attempts"] = 1
    with pytest.raises(StorageUnavailableError, match="LABQ_S3_ENDPOINT_URL"):
        away.check()


def _closed_port() -> int:
    from helpers import free_port

    return free_port()  # bound and released: nothing listens there


# -- Storage's rules over both stores ------------------------------------------------------------
@pytest.fixture
def storage(store: BlobStore, tmp_path: Path) -> Storage:
    return Storage(tmp_path / "data", store if store.kind == "s3" else None).ensure()


def _stage(storage: Storage, body: bytes) -> tuple[Path, str]:
    staged = storage.tmp / f"upload-{uuid.uuid4().hex[:6]}.zip"
    staged.write_bytes(body)
    return staged, hashlib.sha256(body).hexdigest()


def _tamper(storage: Storage, sha: str, body: bytes) -> None:
    key = storage.bundle_key(sha)
    if storage.on_volume:
        storage.bundle_path(sha).write_bytes(body)  # as an attacker on the volume would
    else:
        storage.blobs.client.put_object(Bucket=storage.blobs.bucket,
                                        Key=storage.blobs.prefix + key, Body=body,
                                        Metadata={"sha256": sha})  # metadata lies too


def test_storing_a_bundle_again_replaces_a_poisoned_copy(storage: Storage):
    staged, sha = _stage(storage, b"the researcher's code")
    storage.store_bundle(staged, sha)
    assert not staged.exists()
    _tamper(storage, sha, b"the attacker's code")
    staged, _ = _stage(storage, b"the researcher's code")
    storage.store_bundle(staged, sha)
    assert content_sha256(storage.blobs, storage.bundle_key(sha)) == sha
    with storage.fetched_bundle(sha, storage.root / "scratch") as local:
        assert local.read_bytes() == b"the researcher's code"
    assert not list((storage.root / "scratch").glob("*"))  # the download is gone


def test_a_worker_refuses_a_bundle_changed_in_storage(storage: Storage):
    staged, sha = _stage(storage, b"original")
    storage.store_bundle(staged, sha)
    _tamper(storage, sha, b"tampered")
    with pytest.raises(BundleTamperedError, match="upload the job again"), \
            storage.fetched_bundle(sha, storage.root / "scratch"):
        pass
    assert not list((storage.root / "scratch").glob("*"))  # no copy is left behind


def test_a_missing_bundle_says_so(storage: Storage):
    sha = hashlib.sha256(b"never stored").hexdigest()
    assert not storage.has_bundle(sha)
    with pytest.raises(LabqError, match="missing"), \
            storage.fetched_bundle(sha, storage.root / "scratch"):
        pass


def _output(tmp_path: Path, files: dict[str, str]) -> Path:
    output = tmp_path / f"output-{uuid.uuid4().hex[:6]}"
    output.mkdir()
    for name, text in files.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_text(text)
    return output


def test_results_are_listed_served_and_replaced(storage: Storage, tmp_path: Path):
    job = new_job_id()
    assert not storage.has_results(job) and storage.open_results_zip(job) is None
    output = _output(tmp_path, {"sub/r.txt": "result", "a.csv": "x,y\n"})
    (output / "link").symlink_to("/etc/passwd")  # a job's link is never a result
    scratch = tmp_path / "scratch"
    assert store_results(storage, job, output, 1 << 20, scratch=scratch) == 10
    assert [(p, b.size) for p, b in storage.result_files(job)] == [("a.csv", 4),
                                                                   ("sub/r.txt", 6)]
    assert storage.has_results(job, settled=True) and storage.has_results_zip(job)
    with storage.open_result(job, "sub/r.txt") as blob:
        assert blob.read() == b"result"
    with storage.open_results_zip(job) as blob:
        names = zipfile.ZipFile(io.BytesIO(blob.read())).namelist()
    assert sorted(names) == ["a.csv", "sub/r.txt"]
    # A second attempt's results replace the first's entirely.
    store_results(storage, job, _output(tmp_path, {"sub/new.txt": "n"}), 1 << 20,
                  scratch=scratch)
    assert [p for p, _ in storage.result_files(job)] == ["sub/new.txt"]
    assert not list(scratch.glob("*"))  # nothing is left on the way
    for bad in ("../../bundles/x", "sub/../a.csv", "/etc/passwd"):
        with pytest.raises(NotFoundError):
            storage.open_result(job, bad)


def test_an_empty_output_is_no_results_but_a_zip(storage: Storage, tmp_path: Path):
    job = new_job_id()
    store_results(storage, job, _output(tmp_path, {}), 1 << 20, scratch=tmp_path / "s")
    assert storage.has_results_zip(job) and storage.result_files(job) == []
    assert not storage.has_results(job, settled=True)
