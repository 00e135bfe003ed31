"""Process hardening shared by labq's long-running services.

Jobs run as the same user as the worker (until the sandbox step gives them a user of
their own), and a same-user process may read ``/proc/<pid>/environ`` of any other,
which holds the broker and database URLs with their passwords. Marking labq's own
processes non-dumpable makes those files root-only. The flag is reset by ``execve``,
so the jobs a worker starts are ordinary processes again.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4


def protect_process() -> bool:
    """Hide this process's environment and memory from same-user processes (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    except (OSError, AttributeError) as exc:
        log.warning("could not hide this process's environment from jobs: %s", exc)
        return False
    return True
