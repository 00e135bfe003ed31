"""What authentication costs on ``GET /api/v1/jobs/{id}`` (issue 9: within 2 ms at p50).

    .venv/bin/python bench/auth_get.py                  # 2,000 requests per variant
    .venv/bin/python bench/auth_get.py --requests 500

In one process, on one app (SQLite in a temporary data dir, no broker needed), the same
request is timed three ways, interleaved in rounds so drift hits all of them alike:

* ``off``     — the baseline, "today's" request: authentication switched off. labq has
  no setting for that, so the run takes auth's ``before_request`` hook out of the app
  and puts in its place one that only sets the admin identity (before accounts every
  caller saw and steered every job, which is what an admin does), so the views and
  their owner-scope check run unchanged. The request carries no credentials.
* ``token``   — ``Authorization: Bearer``: the real hook, sha256 looked up in the unique
  index;
* ``session`` — the real hook with a signed-in browser's session cookie (user by id).

Prints p50/p90/p99 in milliseconds, each authenticated variant's p50 difference to the
baseline beside the target (at most +2 ms), and exits 1 when a variant misses it.
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

#: Issue 9: an authenticated request stays within this of today's at p50.
TARGET_EXTRA_MS = 2.0
ROUND = 100


def _bundle() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("proj/code.py", "print(1)\n")
    return buf.getvalue()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class AuthSwitch:
    """Switches authentication of one Flask app off (a hook that only sets a fixed admin
    identity) and on (labq's own hook) between rounds."""

    def __init__(self, app, identity) -> None:  # noqa: ANN001
        from flask import g

        self.hooks = app.before_request_funcs.setdefault(None, [])
        # labq's authentication is the one request hook defined in labq.backend.auth.
        found = [i for i, f in enumerate(self.hooks) if f.__module__ == "labq.backend.auth"]
        assert len(found) == 1, self.hooks
        self.index = found[0]
        self.real = self.hooks[self.index]

        def no_authentication() -> None:
            g.identity = identity

        self.off_hook = no_authentication

    def off(self) -> None:
        self.hooks[self.index] = self.off_hook

    def on(self) -> None:
        self.hooks[self.index] = self.real


def measure(requests: int) -> tuple[int, dict[str, list[float]]]:
    import logging

    logging.disable(logging.WARNING)
    from labq.backend import accounts
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
    admin = accounts.get_user(svc.engine, "admin")
    switch = AuthSwitch(app, accounts.Identity(admin["id"], "admin", True))
    path = f"/api/v1/jobs/{job_id}"
    anonymous = app.test_client()

    def timed(c, headers: dict | None) -> float:  # noqa: ANN001
        start = time.perf_counter()
        resp = c.get(path, headers=headers or {})
        elapsed = (time.perf_counter() - start) * 1000
        assert resp.status_code == 200, (resp.status_code, resp.get_data(as_text=True))
        return elapsed

    samples: dict[str, list[float]] = {"off": [], "token": [], "session": []}
    assert anonymous.get(path).status_code == 401  # authentication is on to begin with
    for _ in range(50):  # warm up
        timed(client, bearer)
    rounds = max(1, requests // ROUND)
    try:
        for _ in range(rounds):
            switch.off()
            samples["off"] += [timed(anonymous, None) for _ in range(ROUND)]
            switch.on()
            samples["token"] += [timed(client, bearer) for _ in range(ROUND)]
            samples["session"] += [timed(browser, None) for _ in range(ROUND)]
    finally:
        switch.on()
        svc.shutdown()
    return rounds * ROUND, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    if not 100 <= args.requests <= 100_000:
        parser.error("--requests must be between 100 and 100000")
    count, samples = measure(args.requests)
    base = statistics.median(samples["off"])
    print(f"GET /api/v1/jobs/{{id}}, {count} requests per variant, in-process "
          "(Flask test client, SQLite)")
    print(f"target: an authenticated request at most +{TARGET_EXTRA_MS:.1f} ms over the "
          "baseline at p50 (baseline: the same request with authentication off)")
    missed = []
    for name, values in samples.items():
        p50 = statistics.median(values)
        line = (f"  {name:<8} p50 {p50:6.3f} ms  p90 {_pct(values, 0.9):6.3f} ms  "
                f"p99 {_pct(values, 0.99):6.3f} ms")
        if name == "off":
            print(f"{line}  (baseline)")
            continue
        extra = p50 - base
        ok = extra <= TARGET_EXTRA_MS
        print(f"{line}  p50 {extra:+.3f} ms vs off, target <= +{TARGET_EXTRA_MS:.1f} ms: "
              f"{'met' if ok else 'MISSED'}")
        if not ok:
            missed.append(name)
    if missed:
        print(f"target missed by: {', '.join(missed)}")
        return 1
    print("target met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
