"""The OpenAPI document against a live labq: schemathesis (property-based, driven by the
document) with every check, as two researchers (object-level authorization: one must
never get the other's jobs) and as an admin. Any failure fails the test.

The backend runs with no workers, so the jobs the run uploads only wait on the queue
(and a per-user quota bounds how many); the generator knows the rules the document can
only state in words (tests/integration/schemathesis_hooks.py). Generation is
deterministic, so a run repeats exactly; the example count keeps both runs within
about 90 s on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import LabqSystem, Receiver

pytestmark = pytest.mark.integration

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MAX_EXAMPLES = 12
RUN_TIMEOUT_S = 150
#: Few jobs per user (429 beyond), small limits; nothing ever runs. Webhooks may go to
#: the loopback receiver the hooks point every notify_url at.
ENV = {"LABQ_MAX_QUEUED_PER_USER": "40", "LABQ_MAX_UPLOAD_BYTES": str(1024 * 1024),
       "LABQ_MAX_TIMEOUT_S": "3600", "LABQ_MAX_MEMORY_MB": "2048", "LABQ_MAX_CPUS": "4",
       "LABQ_MAX_GROUP_SIZE": "4", "LABQ_WEBHOOK_ALLOW_PRIVATE": "1"}
#: Streams never end by themselves: read one or two events, or for 1-2 s at most.
CONFIG = """
[[operations]]
include-name = "GET /api/v1/events"
request-timeout = 1
request-retries = 2
max-stream-events = 1
generation.max-examples = 3

[[operations]]
include-name = "GET /api/v1/jobs/{id}/log"
request-timeout = 2
request-retries = 2
max-stream-events = 2
"""


@pytest.fixture(scope="module")
def labq(broker: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabqSystem]:
    system = LabqSystem(tmp_path_factory.mktemp("labq-contract"), workers=0, env=ENV)
    try:
        system.start()
        yield system
    finally:
        system.stop()


@pytest.fixture(scope="module")
def webhook() -> Iterator[str]:
    receiver = Receiver([])
    try:
        # A name, as the document's notify_url pattern asks (an IP literal is checked apart).
        yield receiver.url.replace("127.0.0.1", "localhost")
    finally:
        receiver.close()


@pytest.fixture(scope="module")
def cursors(labq: LabqSystem) -> dict[str, str]:
    """Real cursors of both kinds (creation and duration order), for valid listings."""
    for n in range(3):
        labq.submit({"code.py": ""}, name=f"seed-{n}")

    def next_cursor(query: str) -> str:
        page = labq.http.get(labq.api(f"/api/v1/jobs?limit=1{query}"), timeout=10)
        assert page.status_code == 200, page.text
        return page.json()["next_cursor"]

    return {"created": next_cursor(""), "duration": next_cursor("&sort=-duration")}


def _token_id(system: LabqSystem, token: str) -> int:
    return system.session_for(token).get(system.api("/api/v1/me"), timeout=10).json()[
        "token_id"]


def _run(system: LabqSystem, tmp: Path, auth: list[str], keep: list[int],
         cursors: dict[str, str], webhook: str, config_extra: str = ""
         ) -> subprocess.CompletedProcess[str]:
    if not SCHEMATHESIS.exists():
        message = f"{SCHEMATHESIS} is missing: pip install -e '.[dev]' (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    config = tmp / "schemathesis.toml"
    config.write_text(CONFIG + config_extra)
    cmd = [str(SCHEMATHESIS), "--config-file", str(config), "run",
           system.api("/api/v1/openapi.json"), "--checks", "all",
           "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
           "--no-color", "--workers", "1", "--suppress-health-check", "too_slow",
           "--request-timeout", "20", *auth]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS),
           "LABQ_ST_CURSORS": json.dumps(cursors),
           "LABQ_ST_KEEP_TOKENS": ",".join(map(str, keep)), "LABQ_ST_WEBHOOK": webhook}
    return subprocess.run(cmd, cwd=tmp, env=env, text=True, capture_output=True,
                          timeout=RUN_TIMEOUT_S)


def _verdict(done: subprocess.CompletedProcess[str], system: LabqSystem) -> None:
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"schemathesis failed:\n{report[-20000:]}\n" \
                                 f"{system.read_logs()[-4000:]}"
    # It really ran: every operation of the document, and a good number of cases.
    spec = system.http.get(system.api("/api/v1/openapi.json"), timeout=10).json()
    operations = sum(m in ("get", "put", "post", "delete", "patch")
                     for item in spec["paths"].values() for m in item)
    tested = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", report)
    # All but the document itself (schemathesis loads it rather than tests it).
    assert tested and len(set(tested.groups())) == 1 and int(tested[3]) == operations - 1, \
        report[-4000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counts and int(counts[1]) >= 500 and counts[1] == counts[2], report[-4000:]


def test_schemathesis_as_two_researchers(labq: LabqSystem, cursors: dict[str, str],
                                         webhook: str, tmp_path: Path) -> None:
    alice, bob = labq.add_user("alice"), labq.add_user("bob")
    wfc = tmp_path / "auth.json"
    wfc.write_text(json.dumps({"auth": [
        {"name": name, "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {t}"}]}
        for name, t in (("alice", alice), ("bob", bob))]}))
    # Peers: schemathesis replays each one's reads of their objects as the other.
    peers = f'\n[auth.wfc]\npath = "{wfc}"\npeers = ["alice", "bob"]\n'
    done = _run(labq, tmp_path, [], [_token_id(labq, alice), _token_id(labq, bob)],
                cursors, webhook, peers)
    _verdict(done, labq)


def test_schemathesis_as_an_admin(labq: LabqSystem, cursors: dict[str, str],
                                  webhook: str, tmp_path: Path) -> None:
    done = _run(labq, tmp_path, ["-H", f"Authorization: Bearer {labq.token}"],
                [_token_id(labq, labq.token)], cursors, webhook)
    _verdict(done, labq)
