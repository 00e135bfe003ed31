"""Latency probes in a process of their own, so the benchmark's other work (a thousand
streams to read, clients to drive) never shows up in the figures they measure.

A :class:`Probe` asks for each of its paths in turn on one keep-alive connection per
path, pausing ``interval_s`` between requests (a steady, modest rate, as a page polling
or a script checking on a job would), and hands back each request's latency and status.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
import time
from dataclasses import dataclass, field


def _loop(host: str, port: int, paths: list[str], token: str, interval_s: float,
          stop: mp.synchronize.Event, out: mp.Queue, timeout_s: float) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conns = {p: http.client.HTTPConnection(host, port, timeout=timeout_s) for p in paths}
    samples: dict[str, list[tuple[float, int]]] = {p: [] for p in paths}
    while not stop.is_set():
        for path in paths:
            began = time.perf_counter()
            try:
                conn = conns[path]
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = 0
                conns[path].close()
                conns[path] = http.client.HTTPConnection(host, port, timeout=timeout_s)
            samples[path].append((time.perf_counter() - began, status))
            time.sleep(interval_s)
    out.put(samples)


@dataclass
class Probe:
    host: str
    port: int
    paths: list[str]
    token: str = ""
    interval_s: float = 0.02
    timeout_s: float = 10.0
    _ctx: mp.context.BaseContext = field(default_factory=lambda: mp.get_context("spawn"))

    def run(self, seconds: float) -> dict[str, list[tuple[float, int]]]:
        """Probe for ``seconds``; returns ``{path: [(latency_s, status), ...]}``."""
        self.start()
        time.sleep(seconds)
        return self.finish()

    def start(self) -> None:
        self._stop = self._ctx.Event()
        self._out = self._ctx.Queue()
        self._proc = self._ctx.Process(
            target=_loop, daemon=True,
            args=(self.host, self.port, self.paths, self.token, self.interval_s,
                  self._stop, self._out, self.timeout_s))
        self._proc.start()

    def finish(self) -> dict[str, list[tuple[float, int]]]:
        self._stop.set()
        samples = self._out.get(timeout=self.timeout_s * 2 + 30)
        self._proc.join(10)
        return samples


def latencies(samples: list[tuple[float, int]], ok: int = 200) -> tuple[list[float], int]:
    """(latencies of the answers with status ``ok``, how many others)."""
    good = [s for s, status in samples if status == ok]
    return good, len(samples) - len(good)
