"""Run one job's command as a supervised subprocess and control its whole tree.

The job runs in a new session; its stdout and stderr are a pipe that a worker thread
copies into the job log (:mod:`labq.process_unit.joblog`: the job holds no descriptor
of the log itself). :class:`Supervisor` can freeze (SIGSTOP) and thaw (SIGCONT) every
process of the run, stop it (SIGTERM, then SIGKILL after a grace), and measure its
memory; its exit thread reaps the main process with its resource usage. Exit statuses
are classified by :func:`classify`.

``exit_code`` for a job killed by a signal is ``-signum`` (the convention of
``subprocess.Popen.returncode``), so ``exit_code == -9`` means SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from labq.process_unit import proctree
from labq.process_unit.joblog import JobLog, OutputCopier
from labq.process_unit.sandbox import TOKEN_VAR, Command

log = logging.getLogger(__name__)

#: How often :meth:`Supervisor.poll` collects zombie orphans (it reads all of /proc).
REAP_EVERY_S = 1.0
#: How long :meth:`Supervisor.wait` waits for the job's output to end after its main
#: process did (the box is killed by then: only a process outside it holds the pipe).
OUTPUT_END_S = 2.0


def new_token() -> str:
    """A run token naming this worker process (pid + start time), the run, and the pid
    namespace the pid is in (a worker on the host must not judge a container's jobs)."""
    return (f"{os.getpid()}:{proctree.own_start_time()}:{secrets.token_hex(8)}"
            f":{proctree.pid_namespace()}")


@dataclass(frozen=True)
class Exit:
    exit_code: int
    #: "killed by SIGSEGV" for a signal, "" for a normal exit.
    signal_text: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def classify(returncode: int, shell_convention: bool = False) -> Exit:
    """``shell_convention``: the job ran under bwrap, which reports a child killed by
    signal N as exit code 128+N (as shells do); turn that back into ``-N``."""
    if shell_convention and 128 < returncode < 128 + 32:
        returncode = 128 - returncode
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return Exit(returncode, f"killed by {name}")
    return Exit(returncode, "")


class Supervisor:
    """One run of a job's command. Not thread-safe: the job thread drives it alone.

    The thread that calls :meth:`start` must outlive the child: the child's death
    signal (PR_SET_PDEATHSIG) fires when the *thread* that forked it exits.
    """

    def __init__(self, command: Command, log: JobLog | int, token: str | None = None,
                 finder: Callable[[], dict[int, proctree.Proc] | None] | None = None,
                 output_limit: int = 0) -> None:
        self.command = command
        #: The sandbox's view of the run's processes (its uid and cgroup), which no
        #: setsid, double fork or empty environment escapes; else the tree walk.
        self.finder = finder
        self.log = log if isinstance(log, JobLog) else JobLog(log, owned=False)
        #: Bytes the job may print in this run (0: no cap).
        self.output_limit = output_limit
        self.output: OutputCopier | None = None
        self.token = token or command.env.get(TOKEN_VAR) or new_token()
        self.popen: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.started_at = 0.0
        #: Set the moment the main process has exited (and been reaped).
        self.exited = threading.Event()
        self.returncode: int | None = None
        #: CPU seconds of the processes this run reaped: the main process with its own
        #: reaped descendants (wait4), and orphans collected by :meth:`reap_orphans`;
        #: and the largest resident size one of them reached (bytes).
        self.reaped_cpu_s = 0.0
        self.reaped_rss_bytes = 0
        self._next_reap = 0.0
        self._pidfd: int | None = None
        #: Held from the main process's exit until it is reaped, and by kill_main.
        self._reap_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------
    def start(self, on_exit: Callable[[], None] | None = None,
              on_output_limit: Callable[[], None] | None = None) -> None:
        """Start the command; ``on_exit`` is called (from another thread) the moment its
        main process ends, so the caller need not poll for it; ``on_output_limit`` once
        the job printed more than ``output_limit`` bytes."""
        self.output = OutputCopier(self.log, self.output_limit, on_output_limit)
        try:
            self.popen = subprocess.Popen(
                self.command.argv,
                cwd=self.command.cwd,
                env=self.command.env,
                stdin=subprocess.DEVNULL,
                stdout=self.output.write_fd,
                stderr=self.output.write_fd,
                start_new_session=True,  # its own session: terminal signals never reach it
                close_fds=True,
                pass_fds=self.command.pass_fds,
            )
        except BaseException:
            self.output.finish(0)
            raise
        self.output.start()
        self.started_at = time.monotonic()
        self._next_reap = self.started_at + REAP_EVERY_S
        # Opened before the exit thread can reap it, so it names this process for sure.
        try:
            self._pidfd = os.pidfd_open(self.popen.pid)
        except OSError:  # a kernel older than 5.3: kill_main falls back to the pid
            self._pidfd = None
        log.info("started pid %d: %s", self.popen.pid, " ".join(self.command.argv[-3:]))
        threading.Thread(target=self._wait_exit, args=(self.popen, on_exit), daemon=True,
                         name=f"exit-{self.popen.pid}").start()

    def _wait_exit(self, popen: subprocess.Popen[bytes], on_exit: Callable[[], None] | None
                   ) -> None:
        # Blocks in waitid() until the main process ends, then reaps it with wait4() for
        # its resource usage: the end of a job is noticed at once. Nothing else reaps it
        # (poll and the zombie sweeps skip it until then), and kill_main takes the lock,
        # so it never signals a pid that was reaped and reused. It forks nothing, so the
        # death signal of the job (tied to the thread that forked it) is unaffected.
        try:
            os.waitid(os.P_PID, popen.pid, os.WEXITED | os.WNOWAIT)
            with self._reap_lock:
                _, status, usage = os.wait4(popen.pid, 0)
                self.reaped_cpu_s += usage.ru_utime + usage.ru_stime
                self.reaped_rss_bytes = max(self.reaped_rss_bytes, usage.ru_maxrss * 1024)
                self.returncode = popen.returncode = os.waitstatus_to_exitcode(status)
                self.exited.set()
        except ChildProcessError:  # reaped behind our back: its status is lost
            log.error("job process %d was reaped by someone else", popen.pid)
            self.returncode = popen.returncode = -signal.SIGKILL
        finally:
            self.exited.set()
            if on_exit is not None:
                on_exit()

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else 0

    def poll(self) -> int | None:
        """The main process's return code once it exited, else None (reaps strays too,
        every REAP_EVERY_S: each reap reads all of /proc)."""
        assert self.popen is not None
        code = self.returncode
        now = time.monotonic()
        if now >= self._next_reap:
            self._next_reap = now + REAP_EVERY_S
            self.reap_orphans()
        return code

    def reap_orphans(self) -> None:
        """Collect zombie orphans re-parented to the worker (the subreaper), counting
        their CPU time; never the main process before the exit thread reaped it."""
        skip = set() if self.exited.is_set() else {self.pid}
        cpu_s, rss = proctree.reap_zombies(skip=skip)
        self.reaped_cpu_s += cpu_s
        self.reaped_rss_bytes = max(self.reaped_rss_bytes, rss)

    @property
    def output_over_limit(self) -> bool:
        return self.output is not None and self.output.over_limit

    def kill_main(self) -> None:
        """SIGKILL the main process if it still runs (through its pidfd: never another
        process that got its pid after it was reaped)."""
        if self.popen is None:
            return
        with self._reap_lock, contextlib.suppress(ProcessLookupError):
            if self.exited.is_set():
                return
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            else:  # not reaped yet (the lock): the pid is still this process's
                os.kill(self.popen.pid, signal.SIGKILL)

    def processes(self) -> dict[int, proctree.Proc]:
        if self.finder is not None:
            found = self.finder()
            if found is not None:
                return found
        root = self.pid if self.popen and not self.exited.is_set() else None
        return proctree.tree(root, TOKEN_VAR, self.token)

    def memory_bytes(self) -> int:
        return proctree.rss_bytes(self.processes())

    # -- control ----------------------------------------------------------------
    def pause(self) -> None:
        """SIGSTOP every process; walk again until no new process appeared meanwhile."""
        stopped: set[int] = set()
        for _ in range(50):
            pids = set(self.processes())
            new = pids - stopped
            if not new:
                break
            proctree.signal_all(sorted(new), signal.SIGSTOP)
            stopped |= new
        self.paused = True

    def resume(self) -> None:
        proctree.signal_all(self.processes(), signal.SIGCONT)
        self.paused = False

    def kill(self, grace_s: float) -> None:
        """SIGTERM the tree, SIGKILL what is left after ``grace_s``; returns when it is gone."""
        procs = self.processes()
        if procs:
            proctree.signal_all(procs, signal.SIGTERM)
            # A frozen process would never see SIGTERM until thawed.
            proctree.signal_all(procs, signal.SIGCONT)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not self.processes():
                break
            time.sleep(0.05)
        self.kill_now()

    def kill_now(self) -> None:
        """SIGKILL the tree until nothing of it is left (new forks included)."""
        for _ in range(200):
            procs = self.processes()
            if not procs:
                break
            proctree.signal_all(procs, signal.SIGKILL)
            time.sleep(0.02)
        else:
            log.error("could not kill every process of run %s", self.token)
        self.paused = False
        if self.popen is not None and not self.exited.wait(timeout=5):
            log.error("job process %d did not exit after SIGKILL", self.pid)
        self.reap_orphans()

    def wait(self) -> int:
        """The main process's return code, once it ended and the job's output is in the
        log (every holder of the pipe gone, or OUTPUT_END_S later)."""
        assert self.popen is not None
        self.exited.wait()
        self.close_output()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        assert self.returncode is not None
        return self.returncode

    def close_output(self, timeout_s: float = OUTPUT_END_S) -> None:
        """Stop copying the job's output (waiting ``timeout_s`` for its end first)."""
        if self.output is not None and not self.output.finish(timeout_s):
            log.warning("a process outside run %s still held its output after %.0f s; "
                        "the rest of its output is not logged", self.token, timeout_s)
