"""Figures the capacity benchmarks print: latency summaries, a process tree's memory, and
targets checked against measured figures (a missed one makes the run exit non-zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stack import percentile


def summary_ms(values_s: list[float]) -> str:
    """``p50 .. p99 .. max ..`` in milliseconds of latencies given in seconds."""
    if not values_s:
        return "no samples"
    return (f"p50 {percentile(values_s, 50) * 1000:7.1f} ms  "
            f"p99 {percentile(values_s, 99) * 1000:7.1f} ms  "
            f"max {max(values_s) * 1000:7.1f} ms  (n={len(values_s)})")


def tree_rss_kib(pid: int | None) -> int | None:
    """VmRSS of ``pid`` and all its descendants (gunicorn master + workers), in KiB."""
    if not pid:
        return None
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo, seen = 0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
        todo.extend(children.get(current, []))
    return total if total else None


@dataclass
class Targets:
    """Targets of one benchmark: each check prints its line; ``exit_code`` is 1 if any
    missed."""

    title: str
    missed: list[str] = field(default_factory=list)

    def check(self, name: str, value: float, limit: float, unit: str = "ms",
              at_most: bool = True) -> bool:
        ok = value <= limit if at_most else value >= limit
        sign = "<=" if at_most else ">="
        shown = f"{value:.2f}" if unit == "x" else f"{value:.1f}"  # ratios need two places
        print(f"  [{'ok' if ok else 'MISSED'}] {name}: {shown} {unit} "
              f"(target {sign} {limit:g} {unit})")
        if not ok:
            self.missed.append(name)
        return ok

    def require(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"  [{'ok' if ok else 'MISSED'}] {name}" + (f": {detail}" if detail else ""))
        if not ok:
            self.missed.append(name)
        return ok

    def exit_code(self) -> int:
        if self.missed:
            print(f"{self.title}: MISSED {', '.join(self.missed)}")
            return 1
        print(f"{self.title}: every target met")
        return 0
