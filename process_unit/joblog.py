"""The job log, written by the worker alone: a job never holds a descriptor to it.

A run's stdout and stderr are the write end of a pipe; :class:`OutputCopier`, a worker
thread, reads it and appends each read to ``log.txt`` at once (no buffering: ``labq
logs -f`` sees a line as soon as the job printed it), counts the bytes against the
run's output cap, and drains until every holder of the pipe is gone (grandchildren
included) or the run's box is closed. So a job cannot truncate, seek or rewrite the
log: earlier attempts and labq's own lines stay as written.

Which lines are labq's: a line that starts with ``labq:`` or ``=== labq:`` was written
by the worker (attempt headers, notes). A line of the job's output that would start so
is written with :data:`ESCAPE` in front (``| labq: ...``), so no job can forge one. A
carriage return counts as a line start too (a terminal shows what follows it at the
start of the line). Bytes at a line start that could still become a marker (at most 8)
wait for the job's next bytes, or its end.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

#: How a labq line starts; a job's line that starts so gets ESCAPE in front.
MARKERS = (b"labq:", b"=== labq:")
ESCAPE = b"| "
_LONGEST = max(len(m) for m in MARKERS)
_BREAKS = (b"\n", b"\r")
#: One read of the pipe; the pipe is made this large too (fewer wake-ups of the copier
#: when a job prints fast, and the job blocks less often on a full pipe).
CHUNK = 1 << 20
F_SETPIPE_SZ = 1031


def _marker_at(data: bytes, i: int, at_line_start: bool) -> int:
    """Where a marker ending in the ``labq:`` at ``i`` starts, if it starts a line; -1
    when it does not."""
    for begin in (i, i - 4):  # "labq:", "=== labq:"
        if begin < 0 or (begin < i and data[begin:i] != b"=== "):
            continue
        if (begin == 0 and at_line_start) or (begin > 0 and data[begin - 1] in b"\n\r"):
            return begin
    return -1


def escape(data: bytes, at_line_start: bool) -> tuple[bytes, bytes]:
    """Job bytes → (what to write now, what to hold back). ``data`` follows a line
    start when ``at_line_start``; the held bytes (a possible marker's beginning) start
    a line, and come back in front of the next data. One scan for ``labq:`` (rare in
    output): a job printing fast pays little more than the copy."""
    pieces: list[bytes] = []
    pos = 0
    i = data.find(b"labq:")
    while i >= 0:
        begin = _marker_at(data, i, at_line_start)
        if begin >= 0:
            pieces += [data[pos:begin], ESCAPE]
            pos = begin
        i = data.find(b"labq:", i + 5)
    start = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
    held = b""
    if start or at_line_start:
        tail = data[start:]
        if tail and len(tail) < _LONGEST and any(m.startswith(tail) for m in MARKERS):
            held, data = tail, data[:start]
    if not pieces:
        return data, held
    pieces.append(data[pos:])
    return b"".join(pieces), held


class JobLog:
    """``log.txt`` of one job, opened for appending by the worker; thread-safe.

    :meth:`write` takes labq's own text (and uv's output, copied by the worker);
    :meth:`job_output` the job's, escaped; :meth:`note` writes a ``labq:`` line, always
    at the start of a line.
    """

    def __init__(self, fd: int, *, owned: bool = True, at_line_start: bool = True) -> None:
        self.fd = fd
        self._owned = owned
        self._lock = threading.Lock()
        self._held = b""
        self._at_line_start = at_line_start

    @classmethod
    def open(cls, path: os.PathLike[str] | str) -> JobLog:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o666)
        return cls(fd, at_line_start=_ends_a_line(path))

    def fileno(self) -> int:
        return self.fd

    def _put(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def _line_start(self) -> None:
        """Put what the job left unfinished out, and end its line."""
        pending = self._held
        self._held = b""
        if not self._at_line_start or pending:
            self._put(pending + b"\n")
        self._at_line_start = True

    def write(self, data: bytes) -> int:
        """labq's own bytes, as they are (BinaryIO-like: the environment build's output)."""
        if data:
            with self._lock:
                if self._held:
                    self._line_start()
                self._put(data)
                self._at_line_start = data.endswith(b"\n")
        return len(data)

    def flush(self) -> None:
        """Nothing to do: every write goes straight to the file."""

    def line(self, text: str) -> None:
        """One line of labq's own, at the start of a line."""
        with self._lock:
            self._line_start()
            self._put(text.rstrip("\n").encode() + b"\n")

    def note(self, text: str) -> None:
        """``labq: <text>``; every line of a longer text is marked so."""
        self.line("\n".join(f"labq: {part}" for part in text.rstrip("\n").split("\n")))

    def job_output(self, data: bytes) -> None:
        with self._lock:
            out, self._held = escape(self._held + data, self._at_line_start or
                                     bool(self._held))
            if out:
                self._put(out)
                self._at_line_start = out.endswith(_BREAKS)

    def end_job_output(self) -> None:
        """The job's output ended: what was held back is plain text."""
        with self._lock:
            if self._held:
                self._put(self._held)
                self._at_line_start = self._held.endswith(_BREAKS)
                self._held = b""

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> JobLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _ends_a_line(path: os.PathLike[str] | str) -> bool:
    """The file is empty or ends with a newline (a worker that died mid-line left none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return True
    try:
        size = os.fstat(fd).st_size
        return size == 0 or os.pread(fd, 1, size - 1) == b"\n"
    finally:
        os.close(fd)


class OutputCopier:
    """The pipe a run writes its stdout and stderr to, and the thread that copies it
    into the job log.

    ``limit_bytes`` (0: none) caps what one run may print: past it the rest is read and
    dropped, :attr:`over_limit` is set and ``on_limit`` called once (the job thread then
    stops the job). The thread runs until the pipe's last holder is gone (EOF) or
    :meth:`finish` gives up waiting for that.
    """

    def __init__(self, joblog: JobLog, limit_bytes: int = 0,
                 on_limit: Callable[[], None] | None = None) -> None:
        self.joblog = joblog
        self.limit_bytes = limit_bytes
        self.on_limit = on_limit
        self.copied = 0
        self.over_limit = False
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # capped by /proc/sys/fs/pipe-max-size
            fcntl.fcntl(self.read_fd, F_SETPIPE_SZ, CHUNK)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._write_failed = False
        self._thread = threading.Thread(target=self._copy, daemon=True, name="job-output")

    def start(self) -> None:
        """Once the job's process has its copy of the write end: drop ours and copy."""
        os.close(self.write_fd)
        self.write_fd = -1
        self._thread.start()

    def _copy(self) -> None:
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if ready.get(self.read_fd):  # data or EOF first, a stop after that
                    chunk = os.read(self.read_fd, CHUNK)
                    if not chunk:
                        break
                    self._take(chunk)
                elif ready.get(self._stop_r):
                    self._drain_ready()
                    break
        finally:
            with contextlib.suppress(OSError):
                self.joblog.end_job_output()

    def _drain_ready(self) -> None:
        """What is in the pipe now, and no more (whoever still holds it is no job of
        ours any longer: the box is closed)."""
        os.set_blocking(self.read_fd, False)
        for _ in range(64):
            try:
                chunk = os.read(self.read_fd, CHUNK)
            except BlockingIOError:
                return
            if not chunk:
                return
            self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        if self.over_limit:
            return
        if self.limit_bytes and self.copied + len(chunk) > self.limit_bytes:
            chunk = chunk[:self.limit_bytes - self.copied]
            self.over_limit = True
        self.copied += len(chunk)
        try:
            if chunk:
                self.joblog.job_output(chunk)
        except OSError as exc:  # a full disk: keep draining, or the job would block
            if not self._write_failed:
                log.error("cannot write the job's output to its log: %s", exc)
            self._write_failed = True
        if self.over_limit and self.on_limit is not None:
            self.on_limit()

    def finish(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the end of the output (every holder of the pipe
        gone), then stop copying anyway; True when it ended by itself. Idempotent."""
        if self.write_fd >= 0:  # never started
            os.close(self.write_fd)
            self.write_fd = -1
        ended = True
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                ended = False
                with contextlib.suppress(OSError):
                    os.write(self._stop_w, b"x")
                self._thread.join()
        for name in ("read_fd", "_stop_r", "_stop_w"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        return ended
