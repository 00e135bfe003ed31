"""What authentication costs on ``GET /api/v1/jobs/{id}`` (issue 9: within 2 ms at p50).

    .venv/bin/python bench/auth_get.py                  # 2,000 requests per variant
    .venv/bin/python bench/auth_get.py --requests 500

In one process, on one app (SQLite in a temporary data dir, no broker needed), the same
request is timed three ways, interleaved in rounds so drift hits all of them alike:

* ``bypass``  — the auth hook's lookup replaced by a fixed admin identity (the baseline:
  today's route plus the host check, headers and the owner-scope comparison);
* ``token``   — ``Authorization: Bearer`` looked up by sha256 in the unique index;
* ``session`` — the signed session cookie of a signed-in browser (user row by id).

Prints p50/p90/p99 in milliseconds and the differences to the baseline.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _bundle() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("proj/code.py", "print(1)\n")
    return buf.getvalue()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    import logging

    logging.disable(logging.WARNING)
    from labq.backend import accounts, auth
    from labq.backend.app import create_app
    from labq.shared.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="labq-bench-auth-"))
    settings = Settings(data_dir=tmp, prefix="benchauth",
                        rabbitmq_url="amqp://guest:guest@127.0.0.1:1/%2F")
    app = create_app(settings)
    svc = app.extensions["labq"]
    token = (tmp / "admin-token").read_text().strip()
    bearer = {"Authorization": f"Bearer {token}"}
    client = app.test_client()
    made = client.post("/api/v1/jobs", headers=bearer, content_type="multipart/form-data",
                       data={"bundle": (io.BytesIO(_bundle()), "b.zip")})
    job_id = made.json["id"]
    accounts.set_password(svc.engine, "admin", "bench-password")
    browser = app.test_client()
    signed_in = browser.post("/login", json={"name": "admin", "password": "bench-password"})
    assert signed_in.status_code == 200, signed_in.json

    real = auth.authenticate
    fixed = accounts.Identity(1, "admin", True, token_id=1)
    path = f"/api/v1/jobs/{job_id}"

    def timed(c, headers: dict | None) -> float:  # noqa: ANN001
        start = time.perf_counter()
        resp = c.get(path, headers=headers or {})
        elapsed = (time.perf_counter() - start) * 1000
        assert resp.status_code == 200, resp.status_code
        return elapsed

    samples: dict[str, list[float]] = {"bypass": [], "token": [], "session": []}
    for _ in range(50):  # warm up
        timed(client, bearer)
    rounds = max(1, args.requests // 100)
    for _ in range(rounds):
        auth.authenticate = lambda: fixed
        samples["bypass"] += [timed(client, None) for _ in range(100)]
        auth.authenticate = real
        samples["token"] += [timed(client, bearer) for _ in range(100)]
        samples["session"] += [timed(browser, None) for _ in range(100)]
    svc.shutdown()

    base = statistics.median(samples["bypass"])
    print(f"GET /api/v1/jobs/{{id}}, {rounds * 100} requests per variant, in-process "
          f"(Flask test client, SQLite)")
    for name, values in samples.items():
        p50 = statistics.median(values)
        print(f"  {name:<8} p50 {p50:6.3f} ms  p90 {_pct(values, 0.9):6.3f} ms  "
              f"p99 {_pct(values, 0.99):6.3f} ms  (p50 {p50 - base:+.3f} ms vs bypass)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
