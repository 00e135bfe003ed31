"""What a worker says about the mounts of its data dir and work dir (shared/mounts.py),
from mountinfo lines as Linux writes them for local disks and NFS mounts."""

from __future__ import annotations

from pathlib import Path

from labq.shared.mounts import check_worker_dirs, mount_of, parse_mountinfo

ROOT = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro"
NFS_GOOD = ("40 22 0:50 / /srv/labq/data rw,relatime shared:30 - nfs4 files:/export/labq "
            "rw,vers=4.2,rsize=1048576,wsize=1048576,hard,proto=tcp,timeo=600,"
            "lookupcache=pos,local_lock=none,addr=10.0.0.5")
NFS_LOCAL_LOCKS = NFS_GOOD.replace("local_lock=none", "local_lock=flock")
NFS_V3 = ("41 22 0:51 / /srv/labq/data rw,relatime - nfs files:/export/labq "
          "rw,vers=3,hard,proto=tcp,mountproto=udp,local_lock=none,addr=10.0.0.5")
SPACES = r"42 22 0:52 / /mnt/lab\040share rw - ext4 /dev/sdb1 rw"


def _warnings(*lines: str, data: str = "/srv/labq/data", work: str = "/var/lib/w") -> list[str]:
    return check_worker_dirs(data, work, "\n".join(lines))


def test_local_disks_and_a_well_mounted_nfs4_volume_raise_nothing():
    assert _warnings(ROOT) == []
    assert _warnings(ROOT, NFS_GOOD) == []


def test_an_nfs_volume_whose_locks_stay_on_the_host_is_named():
    [warning] = _warnings(ROOT, NFS_LOCAL_LOCKS)
    assert "local_lock=flock" in warning and "run twice" in warning


def test_nfsv3_and_a_negative_lookup_cache_are_named():
    warnings = _warnings(ROOT, NFS_V3)
    assert any("NFSv3" in w for w in warnings)
    assert any("lookupcache=positive" in w for w in warnings)


def test_a_work_dir_on_the_network_volume_is_named():
    [warning] = _warnings(ROOT, NFS_GOOD, work="/srv/labq/data/work")
    assert "LABQ_WORK_DIR" in warning


def test_the_deepest_mount_holds_a_path_and_escapes_are_read():
    mounts = parse_mountinfo("\n".join([ROOT, NFS_GOOD, SPACES, "junk line"]))
    assert mount_of("/srv/labq/data/jobs/x", mounts).fstype == "nfs4"
    assert mount_of("/srv/labq", mounts).point == "/"
    assert mount_of("/mnt/lab share/x", mounts).point == "/mnt/lab share"


def test_this_machines_own_mountinfo_is_read(tmp_path: Path):
    # The real file: the test's temporary folder is on a local mount of this machine.
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    assert mount_of(tmp_path, mounts) is not None
    assert check_worker_dirs(tmp_path, tmp_path) == []
