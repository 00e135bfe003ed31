"""Tiny launcher between the worker and the job's interpreter.

Run as ``<worker python> -I -S launch.py --parent PID [--cpus 0,1] [--cgroup FILE]...
[--rlimit NAME=N]... [--no-network 1] [--uid UID] -- PROGRAM ARGS...``. In this order it
joins the job's cgroups (while still root), sets its resource limits, enters an empty
network namespace of its own (``--no-network``: for a job without bwrap, which would
otherwise share the host's network, loopback included), drops every privilege to the
job's uid (groups, gid, uid), asks the kernel to SIGKILL it when its parent dies
(``PR_SET_PDEATHSIG``, armed after the uid change, which would clear it), pins itself to
the given CPUs, then ``execve``'s the program (bwrap, or the job's interpreter), which
inherits all of it: no process of the job ever runs outside its cgroup or as root.
Doing this in a separate program instead of a ``preexec_fn`` keeps the worker (a
threaded process) from running Python code between fork and exec, which can deadlock.

Only the standard library is imported: this runs before the job's environment exists
in any meaningful sense, with ``-I -S`` so nothing from labq or site-packages loads. It
runs once per job, so it imports no more than a plain job needs (the modules of the
network set-up are imported only for a network job, still as root: after the uid switch
the worker's interpreter folder, e.g. /root/.pyenv, may be closed to the job).
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

PR_SET_PDEATHSIG = 1
#: signal.SIGKILL on Linux (the signal module would pull in enum: a few ms per job).
SIGKILL = 9
PR_SET_DUMPABLE = 4
#: Exit status when the worker died before the death signal was armed.
EXIT_PARENT_GONE = 70
EXIT_USAGE = 64


RLIMITS = {"FSIZE": resource.RLIMIT_FSIZE, "NOFILE": resource.RLIMIT_NOFILE,
           "CORE": resource.RLIMIT_CORE, "NPROC": resource.RLIMIT_NPROC,
           "AS": resource.RLIMIT_AS}
#: Exit status when the job's box could not be set up (reported as a platform error).
EXIT_SETUP = 71


def _rlimit(value: str) -> tuple[int, int]:
    name, _, number = value.partition("=")
    return RLIMITS[name], int(number)


def _pair(value: str) -> tuple[int, int]:
    ready, block = value.split(",")
    return int(ready), int(block)


#: flag -> (option, how its value is read, whether it repeats)
_FLAGS = {
    "--parent": ("parent", int, False),
    "--cpus": ("cpus", lambda v: {int(c) for c in v.split(",") if c}, False),
    "--cgroup": ("cgroups", str, True),
    "--rlimit": ("rlimits", _rlimit, True),
    "--uid": ("uid", int, False),
    "--nice": ("nice", int, False),
    "--no-network": ("no_network", lambda v: v == "1", False),
    "--netns": ("netns", _pair, False),
}


def _options(argv: list[str]) -> dict | None:
    opts: dict = {"parent": 0, "cpus": set(), "cgroups": [], "rlimits": [], "uid": None,
                  "netns": None, "no_network": False, "nice": 0}
    args = list(argv)
    while args and args[0] != "--":
        flag = args.pop(0)
        value = args.pop(0) if args else None
        if value is None:
            break
        if flag not in _FLAGS:
            print(f"labq launch: unknown argument {flag!r}", file=sys.stderr)
            return None
        name, read, repeats = _FLAGS[flag]
        if repeats:
            opts[name].append(read(value))
        else:
            opts[name] = read(value)
    if len(args) < 2:
        print("labq launch: usage: launch.py --parent PID -- PROGRAM ARGS...", file=sys.stderr)
        return None
    opts["program"] = args[1:]
    return opts


def _box(opts: dict) -> None:
    """Join the cgroups, set the limits and become the job's uid (raises OSError)."""
    for path in opts["cgroups"]:
        with open(path, "w") as handle:
            handle.write(str(os.getpid()))
    for which, value in opts["rlimits"]:
        resource.setrlimit(which, (value, value))
    if opts["nice"]:
        # Jobs yield the CPU to labq's own services (worker, backend, broker) on a busy
        # host; a job's uid cannot lower it again (that needs CAP_SYS_NICE).
        os.setpriority(os.PRIO_PROCESS, 0, opts["nice"])
    if opts["no_network"]:
        _empty_network()
    uid = opts["uid"]
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise OSError("the uid switch did not take")


CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def _loopback_up() -> None:
    """Bring up ``lo`` of our network namespace (the job's own loopback, for servers
    it starts for itself). ``_socket`` and ``fcntl`` are C modules: no enum, no ms."""
    import _socket
    import fcntl

    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        ifreq = b"lo".ljust(16, b"\0") + bytes(24)  # struct ifreq: name, then flags
        flags = int.from_bytes(fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, ifreq)[16:18],
                               sys.byteorder)
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, ifreq[:16]
                    + (flags | IFF_UP).to_bytes(2, sys.byteorder) + bytes(22))
    finally:
        sock.close()


def _empty_network() -> None:
    """As root: a new network namespace with nothing but its loopback (no route, no
    device), so the job reaches neither the host's loopback services nor anything else."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(net) failed")
    _loopback_up()


def _load_network_modules() -> None:
    """Import what :func:`_own_network` uses while still root: once in ``sys.modules``
    a module needs no file access after the uid switch."""
    import fcntl  # noqa: F401
    import socket  # noqa: F401
    import struct  # noqa: F401


def _own_network(ready_fd: int, block_fd: int) -> None:
    """Enter a new user + network namespace, bring its loopback up, tell the worker our
    pid (on ``ready_fd``) and wait (on ``block_fd``) until it gave the namespace a route
    out (slirp4netns). bwrap, exec'd next without ``--unshare-net``, keeps this network.
    Done here, in a process that waits for sure, so no race with the job's start."""
    import fcntl
    import socket
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    # The switch from root made us non-dumpable, which hands /proc/self to root: we
    # could not write our own uid map. We are the job's own process now: allow it.
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(user, net) failed")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as handle:
            handle.write(text)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH14s", b"lo", 0, b"")
        flags = struct.unpack("16sH14s", fcntl.ioctl(sock, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))
    os.write(ready_fd, f"{os.getpid()}\n".encode())
    os.close(ready_fd)
    if os.read(block_fd, 1) != b"1":
        raise OSError("the worker could not set up the job's network")
    os.close(block_fd)


def main(argv: list[str]) -> int:
    opts = _options(argv)
    if opts is None:
        return EXIT_USAGE
    parent, cpus, program = opts["parent"], opts["cpus"], opts["program"]
    try:
        if opts["netns"]:
            _load_network_modules()  # as root, before _box switches the uid
        _box(opts)
        if opts["netns"]:
            _own_network(*opts["netns"])
    except (OSError, ValueError) as exc:
        print(f"labq launch: could not set up the job's sandbox: {exc}", file=sys.stderr)
        return EXIT_SETUP
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0:
        print("labq launch: prctl(PR_SET_PDEATHSIG) failed", file=sys.stderr)
    # The parent may have died between fork and prctl: then no signal would ever come.
    if parent and os.getppid() != parent:
        return EXIT_PARENT_GONE
    if cpus:
        os.sched_setaffinity(0, cpus)
    os.execve(program[0], program, dict(os.environ))
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
