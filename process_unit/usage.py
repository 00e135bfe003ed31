"""Memory and CPU use of a job's process tree, sampled while it runs.

:class:`Usage` keeps the peak resident memory and a bounded list of samples
``(seconds into the run, rss MB, cpu seconds)`` for the job page's chart; the worker
stores them beside the outcome (``usage.json``). While it runs, CPU seconds come from
``/proc/<pid>/stat`` (user + system, plus reaped children's) of the live tree. The final
figures are measured once every process of the run is gone (:meth:`Usage.finish`): the
run's cgroup counts CPU time and the memory high-water mark to the end, exits included;
without one, CPU time is what ``wait4`` reported for the processes the worker reaped
(the main process, with the descendants it reaped, and the orphans). They are never
less than the last sample: samples come once a second at most, so the tail of a run
would be lost without them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from labq.shared.settings import MIB

TICKS = os.sysconf("SC_CLK_TCK")
#: Samples kept; beyond this every other one is dropped (the chart needs no more).
MAX_SAMPLES = 600


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as handle:
                raw = handle.read().decode("ascii", "replace")
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()
        try:  # utime, stime, cutime, cstime (fields 14-17 of proc(5))
            total += sum(int(v) for v in rest[11:15])
        except ValueError:
            continue
    return total / TICKS


class Usage:
    def __init__(self) -> None:
        self.peak_rss_mb = 0.0
        self.cpu_s = 0.0
        self.samples: list[list[float]] = []
        self._step = 1  # keep every _step-th sample once the list is full
        self._count = 0

    def sample(self, at_s: float, rss_bytes: int, cpu_s: float) -> None:
        rss_mb = round(rss_bytes / MIB, 1)
        self.peak_rss_mb = max(self.peak_rss_mb, rss_mb)
        self.cpu_s = max(self.cpu_s, round(cpu_s, 2))
        self._count += 1
        if self._count % self._step:
            return
        self.samples.append([round(at_s, 1), rss_mb, round(cpu_s, 2)])
        if len(self.samples) >= MAX_SAMPLES:
            self.samples = self.samples[::2]
            self._step *= 2

    def finish(self, cpu_s: float | None, peak_bytes: int | None = None) -> None:
        """After the tree is gone and reaped: the run's own totals (None: not known)."""
        if cpu_s is not None:
            self.cpu_s = round(max(self.cpu_s, cpu_s), 2)
        if peak_bytes:
            self.peak_rss_mb = max(self.peak_rss_mb, round(peak_bytes / MIB, 1))

    def to_dict(self) -> dict[str, object]:
        return {"peak_rss_mb": self.peak_rss_mb, "cpu_s": self.cpu_s,
                "columns": ["t_s", "rss_mb", "cpu_s"], "samples": self.samples}


def write_usage(storage: object, job_id: str, usage: Usage) -> None:
    """``usage.json`` beside the outcome: the samples behind the job page's chart."""
    import json

    path = storage.job_dir(job_id) / "usage.json"  # type: ignore[attr-defined]
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)  # never write through a link a job left there
    tmp.write_text(json.dumps(usage.to_dict(), separators=(",", ":")))
    os.replace(tmp, path)
