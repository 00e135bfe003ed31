"""Job cgroups in both layouts: v2 against a folder laid out like cgroupfs (this host's
v2 hierarchy has no controllers), v1 for real where the host lets us, and the uid pool."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from helpers import pid_alive, wait_until

from labq.process_unit import cgroups, uidpool
from labq.process_unit.cgroups import JobCgroup
from labq.shared.settings import MIB

V2_PROC = "0::/workers/w1\n"
V1_PROC = "4:memory:/workers/w1\n8:pids:/workers/w1\n1:cpu,cpuacct:/workers/w1\n"


def _fake_v2(root: Path) -> Path:
    base = root / "workers" / "w1"
    base.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (base / "cgroup.subtree_control").write_text("cpu memory pids\n")
    return base


def test_v2_is_chosen_when_memory_and_pids_are_delegated(tmp_path: Path):
    _fake_v2(tmp_path)
    assert cgroups.detect(tmp_path, V2_PROC) == "v2"


def test_v2_limits_are_written_and_an_oom_kill_is_noticed(tmp_path: Path):
    base = _fake_v2(tmp_path)
    group = JobCgroup.create("labq-job-1", layout="v2", memory_mb=100, max_procs=64, cpus=2,
                             root=tmp_path, proc_cgroup=V2_PROC)
    folder = base / "labq-job-1"
    assert (folder / "memory.max").read_text() == str(100 * MIB)
    assert (folder / "memory.swap.max").read_text() == "0"
    assert (folder / "pids.max").read_text() == "64"
    assert (folder / "cpu.max").read_text() == "200000 100000"
    assert group.procs_files() == [folder / "cgroup.procs"]
    # When the kernel reports an OOM kill after the job started
    assert not group.out_of_memory()
    (folder / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert group.out_of_memory()
    # and a kill writes cgroup.kill
    group.kill()
    assert (folder / "cgroup.kill").read_text() == "1"


def test_a_hybrid_host_without_v2_controllers_uses_v1(tmp_path: Path):
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("")
    for controller in ("memory", "pids", "cpu"):
        (tmp_path / controller / "workers" / "w1").mkdir(parents=True)
    assert cgroups.detect(tmp_path, "0::/\n" + V1_PROC) == "v1"
    group = JobCgroup.create("j", layout="v1", memory_mb=64, max_procs=32, cpus=1,
                             root=tmp_path, proc_cgroup=V1_PROC)
    memory = tmp_path / "memory" / "workers" / "w1" / "j"
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 * MIB)
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(64 * MIB)
    assert (tmp_path / "pids" / "workers" / "w1" / "j" / "pids.max").read_text() == "32"
    assert (tmp_path / "cpu" / "workers" / "w1" / "j" / "cpu.cfs_quota_us").read_text() \
        == "100000"
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert group.out_of_memory()


def test_a_run_without_a_cpu_limit_gets_no_cpu_cgroup(tmp_path: Path):
    for controller in ("memory", "pids", "cpu"):
        (tmp_path / controller / "workers" / "w1").mkdir(parents=True)
    group = JobCgroup.create("j0", layout="v1", memory_mb=64, max_procs=32, cpus=0,
                             root=tmp_path, proc_cgroup=V1_PROC)
    assert set(group.dirs) == {"memory", "pids"}
    assert not (tmp_path / "cpu" / "workers" / "w1" / "j0").exists()


needs_v1 = pytest.mark.skipif(
    os.geteuid() != 0 or cgroups.detect() != "v1",
    reason="needs root and a writable cgroup v1 memory and pids hierarchy")


@needs_v1
def test_a_real_v1_cgroup_kills_a_process_over_its_memory_limit_and_says_so():
    group = JobCgroup.create(f"labq-test-{os.getpid()}", layout="v1", memory_mb=50,
                             max_procs=16, cpus=0)
    try:
        join = "".join(f"open({str(p)!r}, 'w').write(str(__import__('os').getpid()));"
                       for p in group.procs_files())
        proc = subprocess.run([sys.executable, "-c", join + "b = bytearray(200 * 2**20)"],
                              timeout=60)
        assert proc.returncode == -9
        assert group.out_of_memory()
    finally:
        group.remove()


@needs_v1
def test_a_real_v1_cgroup_kill_ends_every_process_in_it():
    group = JobCgroup.create(f"labq-test-k{os.getpid()}", layout="v1", memory_mb=0,
                             max_procs=0, cpus=0)
    try:
        join = "".join(f"open({str(p)!r}, 'w').write(str(__import__('os').getpid()));"
                       for p in group.procs_files())
        code = join + "import os, time\nif os.fork() == 0:\n os.setsid()\ntime.sleep(60)"
        proc = subprocess.Popen([sys.executable, "-c", code])
        wait_until(lambda: len(group.pids()) == 2, timeout=10, message="two processes")
        pids = group.pids()
        group.kill()
        proc.wait(timeout=10)
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5, message="all dead")
        # Removed, so empty: the job's uid need not be swept after it (JobBox.close)
        assert group.remove() is True
        assert not any(folder.exists() for folder in group.dirs.values())
    finally:
        group.remove()


def test_the_uid_pool_never_gives_one_uid_twice(tmp_path: Path):
    pool = uidpool.UidPool(range(61000, 61004), tmp_path / "locks")
    leases = [pool.acquire() for _ in range(4)]
    assert len({lease.uid for lease in leases}) == 4
    with pytest.raises(uidpool.NoFreeUidError):
        pool.acquire()
    leases[0].release()
    assert pool.acquire().uid == leases[0].uid


def test_two_pools_on_one_host_share_the_locks(tmp_path: Path):
    # Two workers on one host: separate processes in real life, separate pools here.
    a = uidpool.UidPool(range(61010, 61012), tmp_path / "locks")
    b = uidpool.UidPool(range(61010, 61012), tmp_path / "locks")
    # (the leases are kept: a lease that is garbage collected closes its lock file)
    got: list[uidpool.Lease] = []
    threads = [threading.Thread(target=lambda p=p: got.append(p.acquire())) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(lease.uid for lease in got) == [61010, 61011]
    for lease in got:
        lease.release()


@pytest.mark.parametrize("text", ["0-10", "70000-60000", "abc", "500-600"])
def test_bad_uid_ranges_are_refused(text: str):
    from labq.shared.errors import ConfigError

    with pytest.raises(ConfigError):
        uidpool.parse_range(text)


def test_a_uid_left_busy_by_a_dead_worker_is_swept_before_reuse(tmp_path: Path):
    pool = uidpool.UidPool(range(61020, 61021), tmp_path / "locks")
    lease = pool.acquire()
    assert (tmp_path / "locks" / "uid-61020.lock").read_bytes() == uidpool.BUSY
    # A worker that dies drops its flock but leaves "busy": the next one sweeps.
    lease._handle.close()
    swept: list[int] = []
    original = uidpool.Lease.clean
    uidpool.Lease.clean = lambda self, kill=True: swept.append(self.uid)  # type: ignore[method-assign]
    try:
        again = pool.acquire()
        assert swept == [61020]
        again.release()
        assert (tmp_path / "locks" / "uid-61020.lock").read_bytes() == uidpool.CLEAN
        pool.acquire()
        assert swept == [61020, 61020]  # release cleans; a clean lease is not swept again
    finally:
        uidpool.Lease.clean = original  # type: ignore[method-assign]


needs_v2_kill = pytest.mark.skipif(
    os.geteuid() != 0 or not any(Path(p, "cgroup.controllers").exists()
                                 for p in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")),
    reason="needs root and a cgroup v2 hierarchy")


@needs_v2_kill
def test_a_real_v2_cgroup_kill_ends_every_process_in_it():
    # This host's v2 hierarchy offers no controllers, but cgroup.kill works: the v2 path
    # of the kill is tested for real, its limits against a folder above.
    group = JobCgroup.create(f"labq-test-v2-{os.getpid()}", layout="v2", memory_mb=0,
                             max_procs=0, cpus=0)
    try:
        join = "".join(f"open({str(p)!r}, 'w').write(str(__import__('os').getpid()));"
                       for p in group.procs_files())
        code = join + "import os, time\nif os.fork() == 0:\n os.setsid()\ntime.sleep(60)"
        proc = subprocess.Popen([sys.executable, "-c", code])
        wait_until(lambda: len(group.pids()) == 2, timeout=10, message="two processes")
        pids = group.pids()
        group.kill()
        assert proc.wait(timeout=10) == -9
        wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=5, message="all dead")
    finally:
        group.remove()


def test_required_refuses_to_start_without_every_layer(tmp_path: Path, monkeypatch):
    from labq.process_unit import isolation
    from labq.shared.errors import ConfigError
    from labq.shared.settings import Settings

    monkeypatch.setattr(isolation, "bwrap_binary", lambda: None)
    settings = Settings(data_dir=tmp_path, sandbox="required")
    with pytest.raises(ConfigError) as info:
        isolation.probe(settings)
    assert "bubblewrap is not installed" in info.value.message
    # while auto runs with what there is, and says what is missing
    layers = isolation.probe(settings.replace(sandbox="auto"))
    assert not layers.complete and any("bwrap" in m for m in layers.missing)
    assert "missing: " in layers.describe()


def test_required_refuses_to_start_without_slirp4netns(tmp_path: Path, monkeypatch):
    # Without it no network job can run, and a build from source would share the host's
    # loopback: production (required) needs it, auto says what it costs.
    from labq.process_unit import isolation
    from labq.shared.errors import ConfigError
    from labq.shared.settings import Settings

    monkeypatch.setattr(isolation, "slirp_binary", lambda: None)
    settings = Settings(data_dir=tmp_path, sandbox="required")
    with pytest.raises(ConfigError) as info:
        isolation.probe(settings)
    assert "slirp4netns: not installed" in info.value.message
    layers = isolation.probe(settings.replace(sandbox="auto"))
    assert not layers.slirp4netns and not layers.complete
    assert "built from source" in layers.describe()


@pytest.mark.skipif(os.geteuid() != 0 or not __import__("shutil").which("bwrap"),
                    reason="needs root (to become nobody) and bubblewrap")
def test_a_worker_without_root_still_gets_bwrap_and_says_what_is_missing(tmp_path: Path):
    # Given a worker that is not root (nobody), probing its host
    code = ("from labq.process_unit import isolation\n"
            "from labq.shared.settings import Settings\n"
            f"layers = isolation.probe(Settings(data_dir={str(tmp_path)!r}))\n"
            "print(layers.bwrap, layers.uid_pool, layers.cgroup)\n"
            "print(layers.describe())\n")
    import shutil

    import labq.process_unit
    import labq.shared

    # A copy of labq's code where nobody can read it (the dev tree may be private).
    site = Path(tempfile.mkdtemp(dir="/var/tmp"))
    for package in (labq.shared, labq.process_unit):
        shutil.copytree(Path(package.__file__).parent, site / "labq" / package.__name__[5:])
    for path in [site, *site.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)

    def nobody() -> None:  # pragma: no cover - runs in the child
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    try:
        done = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, text=True,
                              preexec_fn=nobody, env={"PYTHONPATH": str(site)}, timeout=60,
                              cwd="/")
    finally:
        shutil.rmtree(site, ignore_errors=True)
    # Then it still boxes jobs in bwrap (user namespaces), and says uid and cgroup are off
    first, describe = done.stdout.splitlines()[:2]
    assert first == "True False None", done.stdout + done.stderr
    assert "missing: uid pool" in describe and "cgroup" in describe


@needs_v1
def test_cgroups_of_a_dead_worker_are_swept_and_a_live_workers_kept():
    from labq.process_unit.proctree import own_start_time

    dead = JobCgroup.create("labq-999999999-1-job-1", layout="v1", memory_mb=64,
                            max_procs=8, cpus=0)
    mine = JobCgroup.create(f"labq-{os.getpid()}-{own_start_time()}-job-2", layout="v1",
                            memory_mb=64, max_procs=8, cpus=0)
    try:
        assert cgroups.sweep_stale("v1") >= 1
        assert not any(folder.exists() for folder in dead.dirs.values())
        assert all(folder.exists() for folder in mine.dirs.values())
    finally:
        dead.remove()
        mine.remove()
