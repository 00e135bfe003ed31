"""Network for the jobs the server lets reach it — without the host's loopback services.

A job with ``network = true`` (allowed by ``LABQ_ALLOW_NETWORK``) still gets its own
network namespace; slirp4netns gives it a user-mode route out (``10.0.2.0/24`` behind
NAT, DNS at ``10.0.2.3``) with ``--disable-host-loopback``, so 127.0.0.1 of the host —
the broker, the database, the backend — stays unreachable, as for every other job.

The order leaves no race between the job starting and its network existing: the job's
launcher (already the job's uid) enters a new user and network namespace, brings its
loopback up, reports its pid on the ready pipe and waits on the block pipe; the worker
starts slirp4netns on that pid, waits for its ready signal, then unblocks the launcher,
which execs bwrap *without* ``--unshare-net``: the sandbox keeps that network. Closing
the exit pipe ends slirp4netns with the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import subprocess
from dataclasses import dataclass, field

from labq.shared.errors import LabqError

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0
#: What the job's /etc/resolv.conf says: slirp4netns's DNS forwarder.
RESOLV_CONF = "nameserver 10.0.2.3\n"


def slirp_binary() -> str | None:
    return shutil.which("slirp4netns")


class NetworkSetupError(LabqError):
    """Raised when a network-enabled job's network could not be set up."""

    code = "network_setup_failed"


@dataclass
class JobNetwork:
    """The pipes and the slirp4netns process of one network-enabled run."""

    slirp: str
    ready_r: int = -1
    ready_w: int = -1
    block_r: int = -1
    block_w: int = -1
    proc: subprocess.Popen[bytes] | None = None
    _exit_w: int = field(default=-1, repr=False)

    @classmethod
    def prepare(cls) -> JobNetwork:
        slirp = slirp_binary()
        if slirp is None:
            raise NetworkSetupError("this job may use the network, but slirp4netns is not "
                                    "installed on its worker (apt-get install slirp4netns)")
        net = cls(slirp)
        net.ready_r, net.ready_w = os.pipe()
        net.block_r, net.block_w = os.pipe()
        return net

    def child_fds(self) -> tuple[int, int]:
        """(ready fd, block fd) the launcher inherits (``--netns READY,BLOCK``)."""
        return self.ready_w, self.block_r

    def start(self) -> None:
        """After the launcher started: give its namespace a route out, then let it go on."""
        for fd in (self.ready_w, self.block_r):  # the launcher has its copies
            os.close(fd)
        self.ready_w = self.block_r = -1
        pid = self._launcher_pid()
        ready_r, ready_w = os.pipe()
        exit_r, self._exit_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [self.slirp, "--configure", "--mtu=65520", "--disable-host-loopback",
                 "--ready-fd", str(ready_w), "--exit-fd", str(exit_r), str(pid), "tap0"],
                pass_fds=(ready_w, exit_r), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        finally:
            os.close(ready_w)
            os.close(exit_r)
        try:
            readable, _, _ = select.select([ready_r], [], [], READY_TIMEOUT_S)
            if not readable or not os.read(ready_r, 1):
                self.proc.kill()
                _, err = self.proc.communicate()
                raise NetworkSetupError("slirp4netns did not bring the job's network up: "
                                        + err.decode(errors="replace").strip()[-300:])
        finally:
            os.close(ready_r)
        os.write(self.block_w, b"1")

    def _launcher_pid(self) -> int:
        data = b""
        while not data.endswith(b"\n"):
            readable, _, _ = select.select([self.ready_r], [], [], READY_TIMEOUT_S)
            chunk = os.read(self.ready_r, 64) if readable else b""
            if not chunk:
                raise NetworkSetupError("the job's launcher did not make its network "
                                        "namespace (see the job's log)")
            data += chunk
        return int(data)

    def close(self) -> None:
        for name in ("ready_r", "ready_w", "block_r", "block_w", "_exit_w"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)  # closing the exit pipe ends it
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
