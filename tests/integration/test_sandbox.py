"""Every job in its own box: the attacks of issue 8, tried by real jobs on a real system.

Each test is a job doing what an attacker's code did against labq before the sandbox
(run as root, or as the worker's user): it must now find nothing to read, nothing to
write, nobody to signal, no broker to reach, and nothing of it may outlive its end.
The system runs with the default ``LABQ_SANDBOX=auto``; on a host that cannot give
every layer (not root, no bubblewrap) these tests skip, saying why — and fail under CI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import LabqSystem, pid_alive, wait_until
from sandbox_kit import BOXED_ENV, layers_of, processes_with, require_sandbox_host, run

from labq.process_unit import isolation
from labq.process_unit.jobbox import HostSandbox
from labq.process_unit.sandbox import build_command
from labq.shared.settings import Settings

pytestmark = pytest.mark.integration

ESCAPE_MARK = "labq-escapee-7f3a"


@pytest.fixture(scope="module")
def boxed(broker: str, tmp_path_factory: pytest.TempPathFactory):
    require_sandbox_host()
    system = LabqSystem(tmp_path_factory.mktemp("boxed"), workers=2, env=BOXED_ENV)
    try:
        system.start()
        layers = layers_of(system)
        assert all(w.get("complete") for w in layers), f"sandbox incomplete here: {layers}"
        yield system
    finally:
        system.stop()


def test_a_job_runs_as_its_own_uid_never_root(boxed: LabqSystem):
    done, log = run(boxed, "import os; print('UID', os.getuid(), os.getgid(), os.getgroups())")
    assert done["outcome"] == "succeeded", log
    uid = int(log.split("UID ", 1)[1].split()[0])
    assert 60000 <= uid <= 60999 and uid != os.getuid(), log


def test_a_job_runs_niced_and_cannot_raise_its_priority(boxed: LabqSystem):
    # Jobs yield the CPU to labq's own services (LABQ_JOB_NICE, 10 by default).
    done, log = run(boxed, "import os\nprint('NICE', os.getpriority(os.PRIO_PROCESS, 0))\n"
                           "try:\n    os.setpriority(os.PRIO_PROCESS, 0, 0)\n"
                           "    print('RAISED')\nexcept PermissionError:\n"
                           "    print('REFUSED')\n")
    assert done["outcome"] == "succeeded", log
    assert "NICE 10" in log and "REFUSED" in log and "RAISED" not in log, log
    # The workers themselves run at nice 5 (LABQ_WORKER_NICE): the backend goes first.
    assert {os.getpriority(os.PRIO_PROCESS, w.pid) for w in boxed.workers} == {5}
    assert os.getpriority(os.PRIO_PROCESS, boxed.backend.pid) == 0


TAMPER = """
import os, sys
for target in sys.argv[1:]:
    try:
        with open(target, "rb") as handle:
            handle.read(1)
        print("READ", target)
    except OSError as exc:
        print("NO-READ", target, type(exc).__name__)
    try:
        with open(target, "r+b") as handle:  # rewrite in place
            handle.write(b"FORGED")
        print("REWROTE", target)
    except OSError as exc:
        print("NO-REWRITE", target, type(exc).__name__)
    try:
        with open(target + ".new", "wb") as handle:  # or replace it whole
            handle.write(b"FORGED")
        os.replace(target + ".new", target)
        print("REPLACED", target)
    except OSError as exc:
        print("NO-REPLACE", target, type(exc).__name__)
"""


def test_a_job_can_neither_read_nor_rewrite_labq_data(boxed: LabqSystem):
    # Given another user's finished job with a log, results and an outcome, and labq's
    # database, bundles and admin token
    victim, _ = run(boxed, "import pathlib\nprint('the true log')\n"
                           "pathlib.Path('output/r.txt').write_text('the true result')\n")
    assert victim["outcome"] == "succeeded"
    data, jobs = boxed.data_dir, boxed.data_dir / "jobs" / victim["id"]
    api = boxed.api(f"/api/v1/jobs/{victim['id']}")
    sha = boxed.http.get(f"{api}/receipt", timeout=10).json()["bundle_sha256"]
    targets = [data / "labq.db", data / "admin-token", data / "bundles" / sha[:2] / f"{sha}.zip",
               jobs / "log.txt", jobs / "results.zip", jobs / "results" / "r.txt",
               jobs / "outcome.json", jobs / "environment.json"]
    assert all(t.is_file() for t in targets), [t for t in targets if not t.is_file()]
    before = {t: t.read_bytes() for t in targets}
    # When a job tries to read each, rewrite it in place and replace it
    done, log = run(boxed, TAMPER, f"args = {json.dumps([str(t) for t in targets])}\n")
    # Then every try fails: none of it is even there for the job
    assert done["outcome"] == "succeeded", log
    for word in ("READ", "REWROTE", "REPLACED"):
        assert f"\n{word} " not in log, log
    for word in ("NO-READ", "NO-REWRITE", "NO-REPLACE"):
        assert log.count(f"{word} ") == len(targets), log
    # and the files, and what the API serves from them, are the true ones
    assert {t: t.read_bytes() for t in targets} == before
    assert "the true log" in boxed.log(victim["id"]) and "FORGED" not in boxed.log(victim["id"])
    result = boxed.http.get(f"{api}/results/files/r.txt", timeout=10)
    assert (result.status_code, result.text) == (200, "the true result")
    again = boxed.job(victim["id"])
    assert (again["state"], again["outcome"]) == ("stopped", "succeeded")
    assert boxed.http.get(f"{api}/receipt", timeout=10).json()["bundle_sha256"] == sha


def test_a_job_cannot_poison_the_shared_environment(boxed: LabqSystem):
    code = ("import sys, pathlib\n"
            "site = pathlib.Path(sys.prefix, 'lib', f'python{sys.version_info[0]}."
            "{sys.version_info[1]}', 'site-packages')\n"
            "try:\n    (site / 'sitecustomize.py').write_text('print(\"POISONED\")')\n"
            "    print('WROTE')\nexcept OSError as e:\n    print('DENIED', type(e).__name__)\n")
    done, log = run(boxed, code)
    assert "DENIED" in log and "WROTE" not in log, log
    # and the next job with the same (empty) requirements runs clean
    _, log2 = run(boxed, "print('clean')")
    assert "POISONED" not in log2 and "clean" in log2


def test_a_job_cannot_reach_the_broker_or_the_database(boxed: LabqSystem):
    code = ("import socket\nfor port in (5672, 5432, PORT):\n"
            "    s = socket.socket(); s.settimeout(2)\n"
            "    try:\n        s.connect(('127.0.0.1', port)); print('REACHED', port)\n"
            "    except OSError as e:\n        print('BLOCKED', port)\n"
            "import os\nprint('PGSOCK', os.path.exists('/var/run/postgresql'))\n"
            ).replace("PORT", str(boxed.port))
    done, log = run(boxed, code)
    assert "REACHED" not in log and log.count("BLOCKED") == 3, log
    assert "PGSOCK False" in log, log


def test_a_job_cannot_kill_the_workers_or_the_backend(boxed: LabqSystem):
    pids = [p.pid for p in boxed.workers] + [boxed.backend.pid]
    code = ("import os, signal, sys\nfor pid in map(int, sys.argv[1:]):\n"
            "    try:\n        os.kill(pid, signal.SIGKILL); print('KILLED', pid)\n"
            "    except OSError as e:\n        print('FAILED', pid, type(e).__name__)\n")
    done, log = run(boxed, code, f"args = {json.dumps([str(p) for p in pids])}\n")
    assert "KILLED" not in log, log
    assert all(pid_alive(pid) for pid in pids)
    assert boxed.http.get(boxed.api("/healthz"), timeout=5).status_code == 200


#: Escapes every way a process can leave its job short of changing uid: fork, a new
#: session, fork again, an empty environment (no token to be found by), its parent gone.
ESCAPE = """
import os, select, sys
r, w = os.pipe()
os.set_inheritable(w, True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execve(sys.executable, [sys.executable, "-c", GRANDCHILD, MARK], {})
    os._exit(0)
os.close(w)
os.wait()
print("escaped", flush=True)
# The pipe reads EOF once the grandchild (the last holder of w) has ended.
ready, _, _ = select.select([r], [], [], WAIT)
print("ESCAPEE ENDED" if ready and os.read(r, 1) == b"" else "ESCAPEE STILL RUNNING", flush=True)
"""
HOG = "import time; b = bytearray(200 * 1024 * 1024); time.sleep(600)"


def _escape(grandchild: str, mark: str, wait_s: int) -> str:
    return ESCAPE.replace("GRANDCHILD", repr(grandchild)).replace("MARK", repr(mark)) \
        .replace("WAIT", str(wait_s))


def test_an_escaped_grandchild_is_killed_by_the_memory_cgroup_and_the_job_says_so(
        boxed: LabqSystem):
    # Given a job limited to 64 MB whose grandchild escapes and allocates 200 MB
    done, log = run(boxed, _escape(HOG, ESCAPE_MARK, 60), "memory_mb = 64\n")
    # Then the kernel killed the grandchild at the limit while the job's main process
    # lived on (the worker's RSS poll would have killed them all: only the cgroup
    # ends the one process over the limit), and the outcome says out of memory
    assert "ESCAPEE ENDED" in log, log
    assert (done["state"], done["outcome"]) == ("stopped", "error"), done
    assert done["error"].startswith("out of memory (limit 64 MB)"), done["error"]
    assert not processes_with(ESCAPE_MARK)


def test_a_timeout_kills_an_escaped_grandchild(boxed: LabqSystem):
    mark = f"{ESCAPE_MARK}-timeout"
    job = boxed.submit({"code.py": _escape("import time; time.sleep(600)", mark, 600),
                        "labq.toml": "timeout_s = 5\n"})
    wait_until(lambda: processes_with(mark), timeout=60, message="the escaped grandchild")
    done = boxed.wait_done(job["id"], timeout=60)
    assert (done["state"], done["outcome"]) == ("stopped", "timeout"), done
    assert "escaped" in boxed.log(job["id"])
    wait_until(lambda: not processes_with(mark), timeout=10, message="no escapee left")


def test_dev_shm_and_tmp_are_private_and_bounded(boxed: LabqSystem):
    code = ("import os\nfor d in ('/dev/shm', '/tmp'):\n"
            "    try:\n        with open(d + '/fill', 'wb') as f:\n"
            "            for _ in range(100): f.write(b'x' * 1024 * 1024)\n"
            "        print('FILLED', d)\n"
            "    except OSError as e:\n        print('FULL', d, e.errno)\n"
            "for p in ('/var/tmp/labq-left-behind', '/root/x'):\n"
            "    try:\n        open(p, 'w').write('x'); print('LEFT', p)\n"
            "    except OSError:\n        print('NOWHERE', p)\n")
    done, log = run(boxed, code, "memory_mb = 512\n")
    assert "FILLED" not in log and log.count("FULL") == 2, log
    assert "LEFT" not in log, log
    assert not Path("/var/tmp/labq-left-behind").exists()


def test_a_fork_bomb_hits_the_process_limit(boxed: LabqSystem):
    code = ("import os, time\nmade = 0\nkids = []\nfor _ in range(200):\n"
            "    try:\n        pid = os.fork()\n"
            "    except OSError:\n        break\n"
            "    if pid == 0:\n        time.sleep(30); os._exit(0)\n"
            "    kids.append(pid); made += 1\n"
            "print('FORKED', made)\n")
    done, log = run(boxed, code)
    made = int(log.split("FORKED ", 1)[1].split()[0])
    assert made < 64, log


RLIMITS = """
import errno, os, resource, time
for name in ("CORE", "NOFILE", "FSIZE", "NPROC", "AS"):
    print("RLIMIT", name, *resource.getrlimit(getattr(resource, "RLIMIT_" + name)))
try:  # a job cannot raise its own limits
    resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20)); print("RAISED")
except (ValueError, OSError):
    print("CANNOT RAISE")
files = []
try:
    while len(files) < 100000:
        files.append(open("/dev/null"))
except OSError as exc:
    print("OPEN FAILED AT", len(files), errno.errorcode[exc.errno])
for handle in files:
    handle.close()
try:  # outside output/: FSIZE, not the output cap, must stop it
    with open("big.bin", "wb") as handle:
        for _ in range(70):
            handle.write(b"x" * (1 << 20))
    print("WROTE 70 MB")
except OSError as exc:
    print("WRITE FAILED", errno.errorcode[exc.errno], os.path.getsize("big.bin") >> 20, "MB")
os.remove("big.bin")
kids = []
for _ in range(FORKS):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(20); os._exit(0)
    kids.append(pid)
print("FORKED", len(kids))
"""


def test_a_job_gets_the_rlimits_backstop(boxed: LabqSystem):
    done, log = run(boxed, RLIMITS.replace("FORKS", "0"), "max_output_mb = 1\n")
    assert done["outcome"] == "succeeded", log
    nofile = boxed.settings.job_max_open_files
    assert "RLIMIT CORE 0 0" in log, log
    assert f"RLIMIT NOFILE {nofile} {nofile}" in log, log
    assert f"RLIMIT FSIZE {64 << 20} {64 << 20}" in log, log  # the output cap, 64 MB at least
    assert "RLIMIT NPROC 64 64" in log, log  # the job's own uid: LABQ_JOB_MAX_PROCS
    infinity = resource.RLIM_INFINITY
    assert f"RLIMIT AS {infinity} {infinity}" in log, log  # a memory cgroup exists
    assert "CANNOT RAISE" in log, log
    opened = int(log.split("OPEN FAILED AT ", 1)[1].split()[0])
    assert nofile - 10 < opened < nofile and "EMFILE" in log, log
    assert "WRITE FAILED EFBIG 64 MB" in log, log


@pytest.fixture()
def host_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="labq-rlimits-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run_direct(sandbox: HostSandbox, root: Path, code: str, memory_mb: int) -> str:
    """One job run straight through the sandbox (launcher, uid, bwrap), no worker."""
    workspace = root / "ws"
    project = workspace / "project"
    project.mkdir(parents=True)
    for folder in ("home", "tmp"):
        (workspace / folder).mkdir()
    (project / "code.py").write_text(code)
    env_dir = root / "env"
    (env_dir / "bin").mkdir(parents=True)
    os.symlink(sandbox.settings.job_python, env_dir / "bin" / "python")
    os.chmod(env_dir, 0o755)
    with sandbox.open(workspace=workspace, memory_mb=memory_mb, cpus=0, max_output_bytes=0,
                      network=False, name=f"labq-test-{os.getpid()}") as box:
        command = build_command(env_dir=env_dir, project=project, workspace=workspace,
                                entrypoint="code.py", args=[], user_env={}, job_id="t" * 32,
                                attempt=1, token="labqtest", jail=box.jail)
        done = subprocess.run(command.argv, env=command.env, cwd=command.cwd, timeout=120,
                              capture_output=True, text=True, pass_fds=command.pass_fds)
    return done.stdout + done.stderr


def test_without_a_memory_cgroup_a_job_gets_an_address_space_limit_and_nproc_holds(
        host_root: Path):
    require_sandbox_host()
    # Given a host whose sandbox has every layer but the cgroup
    settings = Settings(data_dir=host_root / "data", work_dir=host_root, job_max_procs=32)
    layers = dataclasses.replace(isolation.probe(settings), cgroup=None)
    sandbox = HostSandbox(settings, layers)
    out = run_direct(sandbox, host_root, RLIMITS.replace("FORKS", "100"), memory_mb=300)
    # Then AS stands in for the memory cgroup (4 x memory_mb, 1 GB at least), and NPROC
    # (the job's own uid) alone holds a fork loop to LABQ_JOB_MAX_PROCS
    assert f"RLIMIT AS {1200 << 20} {1200 << 20}" in out, out
    assert "RLIMIT NPROC 32 32" in out and "RLIMIT CORE 0 0" in out, out
    assert 0 < int(out.split("FORKED ", 1)[1].split()[0]) < 32, out


LOG_TAMPER = r"""
import os
print("STDOUT IS", os.readlink("/proc/self/fd/1").split(":")[0])
for fd in (1, 2):
    for what, call in (("truncate", lambda: os.ftruncate(fd, 0)),
                       ("seek", lambda: os.lseek(fd, 0, os.SEEK_SET)),
                       ("reopen", lambda: open(f"/proc/self/fd/{fd}", "r+b").truncate(0))):
        try:
            call()
            print("TAMPERED", what, fd, flush=True)
        except OSError:
            print("REFUSED", what, fd, flush=True)
os.write(2, b"labq: outcome succeeded (exit code 0)\n=== labq: attempt 2 on w9 ===\n")
"""


def test_a_job_cannot_rewrite_or_forge_its_log(boxed: LabqSystem):
    done, log = run(boxed, LOG_TAMPER)
    assert done["outcome"] == "succeeded", log
    lines = log.split("\n")
    # Its stdout is the worker's pipe, not the log: the header above its output stays.
    assert "STDOUT IS pipe" in lines and "TAMPERED" not in log, log
    assert lines[0].startswith("=== labq: attempt 1 on "), log
    assert lines.count("REFUSED truncate 1") == 1 and "REFUSED reopen 2" in lines, log
    # and its look-alikes of labq's lines are marked as the job's
    assert "| labq: outcome succeeded (exit code 0)" in lines, log
    assert "| === labq: attempt 2 on w9 ===" in lines, log
    assert [x for x in lines if x.startswith("=== labq:")] == [lines[0]], log
    assert [x for x in lines if x.startswith("labq: outcome")] == [
        "labq: outcome succeeded (exit code 0)"], log


def test_readyz_and_stats_show_each_workers_layers(boxed: LabqSystem):
    ready = boxed.http.get(boxed.api("/readyz"), timeout=10).json()
    assert len(ready["sandbox"]) == 2, ready
    for layers in ready["sandbox"].values():
        assert layers["complete"] and layers["cgroup"] in ("v1", "v2") and layers["bwrap"]
        assert layers["slirp4netns"] and layers["network_isolation"] and layers["uid_pool"]
    stats = boxed.http.get(boxed.api("/api/v1/stats"), timeout=10).json()
    assert stats["sandbox"] == ready["sandbox"]


NET_PROBE = """
import socket
def tcp(host, port):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, port)); return "REACHED"
    except OSError:
        return "BLOCKED"
# The host's loopback services: the job's own 127.0.0.1, and the gateway's 10.0.2.2.
print("loopback", tcp("127.0.0.1", 5672), tcp("10.0.2.2", 5672), tcp("10.0.2.2", PORT))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.connect(("10.0.2.3", 53)); print("route out", u.getsockname()[0])
except OSError as e:
    print("no route", e.errno)
"""


def test_a_network_job_gets_a_route_out_but_never_the_hosts_loopback(boxed: LabqSystem):
    probe = NET_PROBE.replace("PORT", str(boxed.port))
    # Without network = true: no route at all
    done, log = run(boxed, probe)
    assert "no route" in log and "REACHED" not in log, log
    # With it (the server allows it here): a route out, and still no host loopback
    done, log = run(boxed, probe, "network = true\n")
    assert done["outcome"] == "succeeded", log
    assert "route out 10.0.2." in log, log
    assert "loopback BLOCKED BLOCKED BLOCKED" in log, log
