"""Slow clients (issue 10, target 2): 100 connections trickling bytes change nothing for
other clients, and are cut off by the read deadlines; a big upload at full speed works.

    .venv/bin/python bench/slow_clients.py            # 1 GB uploads
    .venv/bin/python bench/slow_clients.py --quick    # 256 MB uploads, shorter probes

Starts a labq of its own (``labq backend``, authentication on, uploads up to the bundle's
size), then:

1. baseline: latency probes (``GET /api/v1/jobs/{id}``, ``/healthz``, in a process of
   their own) and one upload of the big bundle at full speed (throughput, backend RSS);
2. 100 trickling clients, one byte a second: half send their headers that way, half a
   ``POST /api/v1/jobs`` body; the probes and the big upload run again meanwhile;
3. each trickling connection must be ended by the server: headers within
   ``LABQ_HEADER_TIMEOUT_S`` (+2 s), bodies with a 408 within ``LABQ_BODY_TIMEOUT_S``
   (+5 s), the defaults being 10 s and 30 s.

Before (issue 10): 5 uploads at 1 byte/s were held 90 s, and 60 streams plus 5 slow
uploads stopped ``/healthz``. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from figures import Targets, summary_ms, tree_rss_kib
from lab import backend_env, raise_open_files
from probe import Probe, latencies
from stack import Stack, bundle, load_note, percentile

JOB_P99_MS = 50.0
HEALTH_P99_MS = 20.0
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
MIB = 1024 * 1024
BOUNDARY = "labqbenchboundary"


def big_bundle(path: Path, size: int) -> Path:
    """A valid bundle of about ``size`` bytes: code.py and one stored data file."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("big/code.py", "print('big')\n")
        block = b"\0" * MIB
        with zf.open("big/data.bin", "w", force_zip64=True) as member:
            for _ in range(max(1, size // MIB)):
                member.write(block)
    return path


@dataclass
class Upload:
    status: int
    seconds: float
    mb_per_s: float
    rss_before_kib: int
    rss_peak_kib: int


def upload(port: int, token: str, path: Path, backend_pid: int | None) -> Upload:
    """``POST /api/v1/jobs`` of ``path`` as fast as the socket takes it (multipart by
    hand, streamed from disk); the backend's RSS sampled throughout."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"bundle\"; "
            f"filename=\"big.zip\"\r\nContent-Type: application/zip\r\n\r\n").encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    length = len(head) + path.stat().st_size + len(tail)
    before = tree_rss_kib(backend_pid) or 0
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_rss_kib(backend_pid) or 0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=300) as sock:
        sock.sendall((f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Authorization: Bearer {token}\r\nContent-Length: {length}\r\n"
                      f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                      "Connection: close\r\n\r\n").encode() + head)
        with open(path, "rb") as handle:
            sock.sendfile(handle)
        sock.sendall(tail)
        answer = sock.recv(65536).decode("latin-1")
    seconds = time.perf_counter() - began
    done.set()
    sampler.join()
    status = int(answer.split()[1]) if answer.startswith("HTTP/") else 0
    return Upload(status, seconds, length / MIB / seconds, before, peak[0])


@dataclass
class Trickle:
    kind: str  # "headers" or "body"
    ended_after_s: float | None = None
    status: int = 0


async def trickle(port: int, token: str, item: Trickle, limit_s: float) -> None:
    """Send a request one byte a second until the server ends it (or ``limit_s``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if item.kind == "headers":
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode())
    else:
        writer.write((f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Authorization: Bearer {token}\r\nContent-Length: 100000\r\n"
                      f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
                      f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"bundle\"; "
                      f"filename=\"slow.zip\"\r\n\r\n").encode())
    began = time.monotonic()
    read = asyncio.ensure_future(reader.read(4096))
    try:
        while time.monotonic() - began < limit_s:
            done, _ = await asyncio.wait({read}, timeout=1.0)
            if done:
                answer = read.result()
                item.ended_after_s = time.monotonic() - began
                if answer.startswith(b"HTTP/"):
                    item.status = int(answer.split()[1])
                return
            writer.write(b"a")
            await writer.drain()
    except OSError:
        item.ended_after_s = time.monotonic() - began
    finally:
        read.cancel()
        writer.transport.abort()


def probes(port: int, token: str, job_id: str, seconds: float, title: str
           ) -> dict[str, list[float]]:
    samples = Probe("127.0.0.1", port, [f"/api/v1/jobs/{job_id}", "/healthz"], token).run(
        seconds)
    print(title)
    out = {}
    for path, values in samples.items():
        good, bad = latencies(values)
        out["job" if path.startswith("/api/v1/jobs/") else "health"] = good
        label = "/api/v1/jobs/{id}" if path.startswith("/api/v1/jobs/") else path
        print(f"  {label:<20} {summary_ms(good)}" + (f"  FAILED {bad}" if bad else ""))
    return out


def print_upload(name: str, result: Upload) -> None:
    print(f"  upload {name}: {result.status} in {result.seconds:.1f} s, "
          f"{result.mb_per_s:.0f} MiB/s, backend RSS {result.rss_before_kib / 1024:.0f} MiB"
          f" -> peak {result.rss_peak_kib / 1024:.0f} MiB "
          f"(+{(result.rss_peak_kib - result.rss_before_kib) / 1024:.1f})")


def run(args: argparse.Namespace, stack: Stack, path: Path, targets: Targets) -> None:
    port, token = stack.port, stack.token
    job_id = stack.submit(bundle({"code.py": "print(1)\n"}))[0]
    base = probes(port, token, job_id, args.seconds, f"1. baseline ({args.seconds:g} s)")
    first = upload(port, token, path, stack.backend.pid if stack.backend else None)
    print_upload("alone", first)

    items = [Trickle("headers" if i % 2 else "body") for i in range(args.slow)]
    limit_s = BODY_TIMEOUT_S + 20

    async def all_of_them() -> None:
        await asyncio.gather(*(trickle(port, token, item, limit_s) for item in items))

    tricklers = threading.Thread(target=asyncio.run, args=(all_of_them(),), daemon=True)
    began = time.monotonic()
    tricklers.start()
    time.sleep(1.0)
    slow = probes(port, token, job_id, args.seconds,
                  f"2. with {len(items)} clients trickling 1 byte/s ({args.seconds:g} s)")
    second = upload(port, token, path, stack.backend.pid if stack.backend else None)
    print_upload(f"beside {len(items)} trickling clients", second)
    tricklers.join(limit_s + 10)
    print(f"3. trickling clients all ended {time.monotonic() - began:.0f} s after they began")
    judge(targets, base, slow, (first, second), items)


def report_tricklers(items: list[Trickle]) -> tuple[list[Trickle], list[Trickle]]:
    """Print when and how the trickling clients were cut off; (headers, bodies)."""
    heads = [i for i in items if i.kind == "headers"]
    bodies = [i for i in items if i.kind == "body"]
    for name, group in (("headers", heads), ("bodies", bodies)):
        ends = [i.ended_after_s for i in group if i.ended_after_s is not None]
        print(f"  {name}: {len(ends)} of {len(group)} cut off, after "
              f"{min(ends, default=0):.1f}..{max(ends, default=0):.1f} s; answers "
              f"{sorted({i.status for i in group})}")
    return heads, bodies


def judge(targets: Targets, base: dict, slow: dict, uploads: tuple[Upload, Upload],
          items: list[Trickle]) -> None:
    """Print how the trickling clients ended, then check every target."""
    first, second = uploads
    heads, bodies = report_tricklers(items)
    print(f"\ntargets ({load_note()}):")
    for name, key, limit in (("GET /api/v1/jobs/{id}", "job", JOB_P99_MS),
                             ("/healthz", "health", HEALTH_P99_MS)):
        print(f"  baseline p99 of {name}: {percentile(base[key], 99) * 1000:.1f} ms")
        targets.check(f"{name} p99 beside {len(items)} trickling clients",
                      percentile(slow[key], 99) * 1000, limit)
    targets.require("the big upload is accepted, alone and beside them",
                    first.status == 201 and second.status == 201,
                    f"{first.status}, {second.status}")
    targets.check("its speed beside them, vs alone", 100 * second.mb_per_s / first.mb_per_s,
                  50, unit="%", at_most=False)
    targets.check("backend RSS growth during an upload",
                  (max(first.rss_peak_kib - first.rss_before_kib,
                       second.rss_peak_kib - second.rss_before_kib)) / 1024, 50, unit="MiB")
    targets.require(f"trickled headers cut off within {HEADER_TIMEOUT_S + 2:g} s",
                    all(i.ended_after_s is not None and i.ended_after_s <= HEADER_TIMEOUT_S + 2
                        for i in heads))
    targets.require(f"trickled bodies answered 408 within {BODY_TIMEOUT_S + 5:g} s",
                    all(i.status == 408 and (i.ended_after_s or 1e9) <= BODY_TIMEOUT_S + 5
                        for i in bodies))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upload-mb", type=int, default=1024)
    parser.add_argument("--slow", type=int, default=100, help="trickling clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each probe")
    parser.add_argument("--quick", action="store_true", help="256 MB uploads, 5 s probes")
    args = parser.parse_args()
    if args.quick:
        args.upload_mb, args.seconds = min(args.upload_mb, 256), min(args.seconds, 5.0)
    if not 1 <= args.upload_mb <= 4096 or not 2 <= args.slow <= 1000:
        parser.error("--upload-mb must be 1..4096 and --slow 2..1000")
    raise_open_files(args.slow * 2 + 256)
    targets = Targets("slow clients")
    print(f"{args.slow} trickling clients, {args.upload_mb} MiB uploads, {load_note()}")
    with tempfile.TemporaryDirectory(prefix="labq-bench-slow-") as tmp:
        path = big_bundle(Path(tmp) / "big.zip", args.upload_mb * MIB)
        limit = path.stat().st_size + MIB
        env = {"LABQ_MAX_UPLOAD_BYTES": str(limit),
               "LABQ_MAX_UNPACKED_BYTES": str(limit * 2)}
        with Stack("slow", env={**backend_env(), **env}) as stack:
            stack.start_backend()
            run(args, stack, path, targets)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
