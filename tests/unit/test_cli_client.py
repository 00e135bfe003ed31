"""The client's own logic: zipping a project folder, unpacking results safely, the
broker decision, SSE parsing, error messages. (The CLI against a real labq is in
tests/integration/test_cli.py.)"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from labq.client import api
from labq.client.broker import BrokerError, ensure_broker, is_local_url, mask_url
from labq.client.bundles import bundle_file, safe_extract, zip_project
from labq.client.cli import main
from labq.client.errors import ClientError
from labq.client.sse import iter_sse
from labq.shared.bundle import inspect_bundle
from labq.shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]


# -- zipping ---------------------------------------------------------------------


def _project(tmp_path: Path) -> Path:
    proj = tmp_path / "my-exp"
    (proj / "pkg" / "__pycache__").mkdir(parents=True)
    (proj / ".venv" / "lib").mkdir(parents=True)
    (proj / ".git").mkdir()
    (proj / "output").mkdir()
    (proj / "code.py").write_text("print('hi')\n")
    (proj / "requirements.txt").write_text("\n")
    (proj / "pkg" / "util.py").write_text("X = 1\n")
    (proj / "pkg" / "__pycache__" / "util.cpython-311.pyc").write_bytes(b"\0")
    (proj / "pkg" / "stale.pyc").write_bytes(b"\0")
    (proj / ".venv" / "lib" / "big.so").write_bytes(b"\0" * 10)
    (proj / ".git" / "HEAD").write_text("ref\n")
    (proj / ".DS_Store").write_bytes(b"\0")
    (proj / "link.py").symlink_to(proj / "code.py")
    return proj


def test_zip_project_keeps_the_project_and_skips_the_rest(tmp_path):
    proj = _project(tmp_path)
    dest = tmp_path / "b.zip"
    assert zip_project(proj, dest) == 3
    names = set(zipfile.ZipFile(dest).namelist())
    assert names == {"my-exp/code.py", "my-exp/requirements.txt", "my-exp/pkg/util.py",
                     "my-exp/output/"}
    # The server accepts it and names the job after the folder.
    info, spec = inspect_bundle(dest, Settings(data_dir=tmp_path))
    assert (info.name, spec.entrypoint, info.has_requirements) == ("my-exp", "code.py", True)


def test_every_example_is_a_valid_bundle(tmp_path):
    examples = [p for p in (REPO / "examples").iterdir() if p.is_dir()]
    assert {"hello", "numpy-stats", "long-counter", "full-manifest", "fails"} <= {
        p.name for p in examples}
    for ex in examples:
        dest = tmp_path / f"{ex.name}.zip"
        zip_project(ex, dest)
        info, _spec = inspect_bundle(dest, Settings(data_dir=tmp_path))
        assert info.name == ex.name
    _info, spec = inspect_bundle(tmp_path / "full-manifest.zip", Settings(data_dir=tmp_path))
    assert spec.entrypoint == "train.py" and spec.env["SEED"] == "42"
    assert (spec.timeout_s, spec.memory_mb, spec.cpus) == (600, 512, 1)


def test_bundle_file_accepts_zip_and_folder_and_refuses_the_rest(tmp_path):
    proj = _project(tmp_path)
    with bundle_file(proj) as zpath:
        assert zipfile.is_zipfile(zpath)
        temp = zpath
    assert not temp.exists()  # the temporary zip is removed
    z = tmp_path / "given.zip"
    z.write_bytes(_zip_bytes({"p/code.py": "x"}))
    with bundle_file(z) as zpath:
        assert zpath == z
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ClientError, match="not a zip"), bundle_file(tmp_path / "notes.txt"):
        pass
    with pytest.raises(ClientError, match="does not exist"), bundle_file(tmp_path / "nope"):
        pass
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClientError, match="no files"), bundle_file(tmp_path / "empty"):
        pass


def _zip_bytes(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()


def test_safe_extract_unpacks_and_refuses_escapes(tmp_path):
    good = tmp_path / "good.zip"
    good.write_bytes(_zip_bytes({"a.txt": "A", "sub/b.txt": "B"}))
    files = safe_extract(good, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == [
        "a.txt", "sub/b.txt"]
    assert (tmp_path / "out" / "sub" / "b.txt").read_text() == "B"
    bad = tmp_path / "bad.zip"
    bad.write_bytes(_zip_bytes({"../evil.txt": "x"}))
    with pytest.raises(ClientError, match="unsafe"):
        safe_extract(bad, tmp_path / "out2")
    assert not (tmp_path / "evil.txt").exists()


# -- broker ------------------------------------------------------------------------


def test_mask_url_hides_the_password():
    assert mask_url("amqp://guest:secret@10.0.0.5:5672/%2F") == "amqp://guest:***@10.0.0.5:5672/%2F"
    assert mask_url("amqp://host/%2F") == "amqp://host/%2F"


@pytest.mark.parametrize("url,local", [
    ("amqp://guest:guest@127.0.0.1:5672/%2F", True),
    ("amqp://guest:guest@localhost/%2F", True),
    ("amqp://u:p@[::1]:5672/%2F", True),
    ("amqp://u:p@rabbitmq:5672/%2F", False),
    ("amqps://u:p@broker.lab.example.org/%2F", False),
])
def test_only_a_local_broker_may_be_started(url, local):
    assert is_local_url(url) is local


class _FakeBroker:
    def __init__(self, up_after: int | None) -> None:
        self.checks = 0
        self.started = 0
        self.up_after = up_after

    def reachable(self, _url: str) -> bool:
        self.checks += 1
        return self.up_after is not None and self.started > 0 and self.checks > self.up_after

    def start(self) -> None:
        self.started += 1


def test_ensure_broker_does_nothing_when_it_answers():
    assert ensure_broker("amqp://x@127.0.0.1/%2F", reachable=lambda _u: True,
                         starter=pytest.fail) is False


def test_ensure_broker_starts_an_installed_local_broker_and_waits():
    fake = _FakeBroker(up_after=3)
    assert ensure_broker("amqp://guest:guest@127.0.0.1:5672/%2F", reachable=fake.reachable,
                         starter=fake.start, installed=lambda: True, sleep=lambda _s: None)
    assert fake.started == 1 and fake.checks == 4


def test_ensure_broker_explains_how_to_get_one():
    fake = _FakeBroker(up_after=None)
    with pytest.raises(BrokerError) as exc:
        ensure_broker("amqp://guest:pw@127.0.0.1:5672/%2F", reachable=fake.reachable,
                      starter=fake.start, installed=lambda: False)
    text = str(exc.value)
    assert "sudo apt-get install -y rabbitmq-server" in text
    assert "docker run -d -p 5672:5672 rabbitmq:3" in text
    assert "LABQ_RABBITMQ_URL" in text and "pw" not in text
    assert fake.started == 0


def test_ensure_broker_never_starts_one_for_a_remote_url():
    fake = _FakeBroker(up_after=0)
    with pytest.raises(BrokerError, match="not reachable at amqp://u:\\*\\*\\*@rabbitmq"):
        ensure_broker("amqp://u:p@rabbitmq:5672/%2F", reachable=fake.reachable,
                      starter=fake.start, installed=lambda: True)
    assert fake.started == 0


def test_ensure_broker_gives_up_after_the_timeout():
    fake = _FakeBroker(up_after=None)
    with pytest.raises(BrokerError, match="did not answer"):
        ensure_broker("amqp://g:g@localhost/%2F", reachable=fake.reachable,
                      starter=fake.start, installed=lambda: True, timeout_s=0.05,
                      sleep=lambda _s: None)


# -- HTTP details ----------------------------------------------------------------------


class _Raw:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)

    def read1(self, _n: int) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_iter_sse_joins_data_lines_and_sees_the_end():
    resp = requests.Response()
    resp.raw = _Raw([b": keepalive\n\nda", b"ta: line 1\ndata: line 2\ndata: \n\n",
                     b"id: 7\r\ndata: x\r\n\r\n", b"event: end\ndata: {}\n\n"])
    assert list(iter_sse(resp)) == [("message", "line 1\nline 2\n", None),
                                    ("message", "x", "7"), ("end", "{}", "7")]


def _response(status: int, body: bytes, content_type: str = "application/json"
              ) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.reason = "Reason"
    resp._content = body
    resp.headers["Content-Type"] = content_type
    return resp


def test_server_errors_carry_the_servers_message():
    err = api._error_from(_response(
        409, b'{"error": {"code": "invalid_transition", "message": "job is stopped", '
             b'"state": "stopped", "allowed": []}}'))
    assert (str(err), err.status, err.code, err.details["state"]) == (
        "job is stopped", 409, "invalid_transition", "stopped")
    err = api._error_from(_response(502, b"<html>Bad gateway</html>", "text/html"))
    assert str(err).startswith("HTTP 502")


def test_cli_says_what_to_do_when_the_server_is_down(tmp_path):
    runner = CliRunner()
    url = "http://127.0.0.1:9"  # discard port: nothing listens
    for args in (["ls"], ["status", "0" * 32], ["submit", str(REPO / "examples" / "hello")]):
        result = runner.invoke(main, ["--url", url, *args])
        assert result.exit_code != 0, args
        assert f"cannot reach labq at {url}" in result.output
        assert "make run" in result.output
        assert "Traceback" not in result.output


def test_cli_reads_labq_url_from_the_environment():
    result = CliRunner().invoke(main, ["ls"], env={"LABQ_URL": "http://127.0.0.1:9"})
    assert result.exit_code == 1
    assert "http://127.0.0.1:9" in result.output


def test_cli_has_every_command():
    assert {"up", "backend", "worker", "broker-check", "submit", "ls", "status", "logs",
            "results", "pause", "resume", "stop"} <= set(main.commands)


def test_broker_check_explains_a_missing_broker():
    result = CliRunner().invoke(main, ["broker-check"], env={
        "LABQ_RABBITMQ_URL": "amqp://u:secret@labq-no-such-host.invalid:5672/%2F"})
    assert result.exit_code == 1
    assert "RabbitMQ is not reachable at amqp://u:***@labq-no-such-host.invalid" in result.output
    assert "sudo apt-get install -y rabbitmq-server" in result.output
    assert "secret" not in result.output


def test_a_saved_token_is_only_sent_to_the_server_it_came_from(tmp_path, monkeypatch):
    # Given a token saved by `labq login` for one server, and an admin-token file here
    from labq.client import credentials

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("LABQ_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("LABQ_TOKEN", raising=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "admin-token").write_text("labq_admin\n")
    path = credentials.save_token("labq_lab", "http://labserver:8080/")
    assert path.stat().st_mode & 0o777 == 0o600
    # Then that server gets it, another server gets nothing, and only a server on this
    # machine gets the local admin token
    assert credentials.find_token("http://labserver:8080")[0] == "labq_lab"
    assert credentials.find_token("http://elsewhere:8080")[0] is None
    assert credentials.find_token("http://127.0.0.1:8080")[0] == "labq_admin"
    assert credentials.forget_token("http://LABSERVER:8080")
    assert credentials.find_token("http://labserver:8080")[0] is None
