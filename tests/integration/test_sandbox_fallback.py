"""A host where user namespaces are blocked: the worker falls back to its own uid per job,
an empty network namespace, the cgroup and the rlimits, and says so at start, in /readyz
and in the stats.

The block is real, without touching this machine's settings: the worker's PATH finds a
``bwrap`` that first enters a user namespace of its own, sets ``user.max_user_namespaces``
to 0 there (that sysctl is per user namespace, and binds every namespace below it), and
then runs the real bubblewrap — which fails exactly as on a host with the sysctl at 0.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import LabqSystem
from sandbox_kit import BOXED_ENV, layers_of, require_sandbox_host, run

from labq.process_unit import isolation
from labq.shared.errors import ConfigError
from labq.shared.settings import Settings

pytestmark = pytest.mark.integration

BLOCKED_BWRAP = """#!/usr/bin/python3 -I
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
    sys.exit("unshare: " + os.strerror(ctypes.get_errno()))
for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                   ("gid_map", f"{gid} {gid} 1")):
    with open(f"/proc/self/{name}", "w") as handle:
        handle.write(text)
with open("/proc/sys/user/max_user_namespaces", "w") as handle:
    handle.write("0")
os.execv(BWRAP, ["bwrap", *sys.argv[1:]])
"""


@pytest.fixture(scope="module")
def blocked_path() -> Iterator[str]:
    require_sandbox_host()
    folder = Path(tempfile.mkdtemp(prefix="labq-nouserns-", dir="/var/tmp"))
    script = folder / "bwrap"
    script.write_text(BLOCKED_BWRAP.replace("BWRAP", repr(shutil.which("bwrap"))))
    os.chmod(folder, 0o755)
    os.chmod(script, 0o755)
    try:
        yield f"{folder}:{os.environ['PATH']}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def fallback(broker: str, blocked_path: str, tmp_path_factory: pytest.TempPathFactory):
    system = LabqSystem(tmp_path_factory.mktemp("fallback"), workers=1,
                        env={**BOXED_ENV, "PATH": blocked_path})
    try:
        system.start()
        yield system
    finally:
        system.stop()


def test_without_user_namespaces_the_worker_says_so_and_keeps_uid_cgroup_and_rlimits(
        fallback: LabqSystem):
    # Then the worker says what it lost, and why, in its log, /readyz and the stats
    layers = layers_of(fallback, 1)[0]
    assert layers["uid_pool"] and layers["cgroup"] and layers["rlimits"], layers
    assert layers["network_isolation"], layers  # the launcher's own namespace
    assert not layers["bwrap"] and not layers["complete"]
    why = "; ".join(layers["missing"])
    assert "bwrap failed" in why and "user namespaces may be blocked" in why, why
    ready = fallback.http.get(fallback.api("/readyz"), timeout=10).json()
    assert [w["bwrap"] for w in ready["sandbox"].values()] == [False], ready
    worker_log = (fallback.tmp / "worker-w1.log").read_text()
    assert "WARNING" in worker_log and "missing: " in worker_log and "bwrap failed" in worker_log
    # and a job still runs as its own uid, never root, held by the rlimits
    code = ("import os, resource\nprint('UID', os.getuid())\n"
            "print('NPROC', resource.getrlimit(resource.RLIMIT_NPROC)[0])\n"
            "print('CORE', resource.getrlimit(resource.RLIMIT_CORE)[0])\n"
            "print('HOME', os.access(os.environ['HOME'], os.W_OK))\n")
    done, log = run(fallback, code)
    assert done["outcome"] == "succeeded", log
    uid = int(log.split("UID ", 1)[1].split()[0])
    assert 60000 <= uid <= 60999, log
    assert "NPROC 64" in log and "CORE 0" in log and "HOME True" in log, log
    # nor can it read labq's data, which it now sees on the host (the data dir is 0700)
    done, log = run(fallback, f"open({str(fallback.data_dir / 'labq.db')!r}, 'rb')\n")
    assert done["outcome"] == "error" and "PermissionError" in log, log


NET_PROBE = """
import errno, socket
def tcp(port):
    s = socket.socket(); s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port)); return "REACHED"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc))
print("BROKER", tcp(5672), "BACKEND", tcp(PORT))
with open("/proc/self/net/dev") as handle:
    print("DEVICES", sorted(line.split(":")[0].strip() for line in handle if ":" in line))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.connect(("10.0.2.3", 53)); print("ROUTE", u.getsockname()[0])
except OSError as exc:
    print("NO ROUTE", errno.errorcode.get(exc.errno))
"""


def test_without_user_namespaces_a_job_still_cannot_reach_the_hosts_loopback(
        fallback: LabqSystem):
    # Given the broker and the backend answer on the host's loopback
    for port in (5672, fallback.port):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # then a job, without bubblewrap, reaches neither: its namespace has only its own lo
    done, log = run(fallback, NET_PROBE.replace("PORT", str(fallback.port)))
    assert done["outcome"] == "succeeded", log
    assert "BROKER ECONNREFUSED BACKEND ECONNREFUSED" in log, log
    assert "DEVICES ['lo']" in log and "NO ROUTE ENETUNREACH" in log, log
    # and a job asking for the network is refused: no route out without the host's own
    done, log = run(fallback, "print('JOB RAN')\n", "network = true\n")
    assert done["outcome"] == "failed" and "JOB RAN" not in log, log
    assert "cannot give it a network of its own" in done["error"], done


def test_required_refuses_a_host_without_user_namespaces(blocked_path: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", blocked_path)
    with pytest.raises(ConfigError) as info:
        isolation.probe(Settings(data_dir=tmp_path, sandbox="required"))
    assert "user namespaces may be blocked" in info.value.message
