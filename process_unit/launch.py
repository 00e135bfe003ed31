"""Tiny launcher between the worker and the job's interpreter.

Run as ``<worker python> -I -S launch.py --parent PID [--cpus 0,1] -- PROGRAM ARGS...``.
It asks the kernel to SIGKILL it when its parent dies (``PR_SET_PDEATHSIG``), pins
itself to the given CPUs, then ``execve``'s the job's program, which inherits both.
Doing this in a separate program instead of a ``preexec_fn`` keeps the worker (a
threaded process) from running Python code between fork and exec, which can deadlock.

Only the standard library is imported: this runs before the job's environment exists
in any meaningful sense, with ``-I -S`` so nothing from labq or site-packages loads.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
#: Exit status when the worker died before the death signal was armed.
EXIT_PARENT_GONE = 70
EXIT_USAGE = 64


def main(argv: list[str]) -> int:
    parent = 0
    cpus: set[int] = set()
    args = list(argv)
    while args and args[0] != "--":
        flag = args.pop(0)
        if flag == "--parent" and args:
            parent = int(args.pop(0))
        elif flag == "--cpus" and args:
            cpus = {int(c) for c in args.pop(0).split(",") if c}
        else:
            print(f"labq launch: unknown argument {flag!r}", file=sys.stderr)
            return EXIT_USAGE
    if not args or len(args) < 2:
        print("labq launch: usage: launch.py --parent PID -- PROGRAM ARGS...", file=sys.stderr)
        return EXIT_USAGE
    program = args[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
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
