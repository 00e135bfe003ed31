"""A lab's history, written straight into a labq database: many stored jobs (100,000 take
a few seconds), as a year of use leaves them.

Jobs belong to a handful of researchers, have names from a lab's usual experiments
(``oscillator-sweep-17``, ``mnist-cnn-3``, ...), were created over a year, and are
mostly finished (succeeded, some errors, timeouts and cancellations, a few failed);
some wait in the queue and a few run. Rows are shaped exactly as labq writes them
(the columns of :mod:`labq.shared.db`, a real job spec), with one lifecycle event each.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from typing import Any

from sqlalchemy import create_engine, insert, text

from labq.shared import db

EXPERIMENTS = ("oscillator-sweep", "mnist-cnn", "protein-fold", "climate-ensemble",
               "bayes-opt", "graph-walk", "lattice-qcd", "rl-cartpole", "spectra-fit",
               "monte-carlo-pi", "bert-finetune", "ode-stiff", "fluid-2d", "genome-align",
               "kmeans-bench", "ising-model", "fft-filter", "sgd-tuning", "pca-faces",
               "neuron-sim")
SPEC = json.dumps({"entrypoint": "code.py", "args": [], "env": {}, "timeout_s": 86400,
                   "memory_mb": 4096, "cpus": 0, "max_output_bytes": 1073741824,
                   "network": False})
YEAR_S = 365 * 24 * 3600.0


def _finished(rng: random.Random, row: dict[str, Any]) -> None:
    created = row["created_at"]
    queued_s, env_s, run_s = rng.expovariate(1 / 30), rng.uniform(0.1, 8), \
        rng.lognormvariate(4, 1.5)
    started = created + queued_s + env_s
    stopped = started + run_s + 0.5
    pick = rng.random()
    if pick < 0.80:
        outcome, code = "succeeded", 0
    elif pick < 0.92:
        outcome, code = "error", 1
    elif pick < 0.95:
        outcome, code = "timeout", None
    elif pick < 0.99:
        outcome, code = "cancelled", None
    else:
        outcome, code = "failed", None
    state = "failed" if outcome == "failed" else "stopped"
    row.update(state=state, outcome=outcome, exit_code=code, attempts=1, seq=6,
               worker=f"lab-w{rng.randint(1, 4)}", queued_at=created + 0.01,
               initialized_at=created + queued_s, started_at=started,
               completed_at=stopped - 0.5, updated_at=stopped, env_s=env_s, run_s=run_s,
               paused_s=0.0, peak_rss_mb=rng.uniform(20, 3000), cpu_s=run_s * 0.9)
    row["failed_at" if state == "failed" else "stopped_at"] = stopped


def job_row(rng: random.Random, owner: str, created: float, kind: str) -> dict[str, Any]:
    """One job row; ``kind`` is ``finished``, ``queued`` or ``running``."""
    row: dict[str, Any] = {c.name: None for c in db.jobs.columns}
    name = f"{rng.choice(EXPERIMENTS)}-{rng.randint(1, 40)}"
    row.update(id=uuid.uuid4().hex, name=name, owner=owner, state="queued", attempts=0,
               seq=1, bundle_sha256=uuid.uuid4().hex * 2, bundle_bytes=rng.randint(500, 10**6),
               spec=SPEC, created_at=created, updated_at=created, queued_at=created + 0.01)
    if kind == "finished":
        _finished(rng, row)
    elif kind == "running":
        row.update(state="started", attempts=1, seq=3, worker=f"lab-w{rng.randint(1, 4)}",
                   initialized_at=created + 1, started_at=created + 2, env_s=1.0)
    return row


def seed(url: str, n: int, owners: list[str], queued: int = 1000, running: int = 20,
         seed_value: int = 10) -> dict[str, int]:
    """Write ``n`` jobs into the labq database at ``url`` (already migrated); the newest
    ``queued`` wait in the queue and ``running`` more run. Returns counts by kind."""
    rng = random.Random(seed_value)
    now = time.time()
    engine = create_engine(url)
    counts = {"finished": 0, "queued": 0, "running": 0}
    batch: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    try:
        for i in range(n):
            # Oldest first; the newest jobs are the ones still waiting or running.
            created = now - YEAR_S * (1 - i / n) - 60
            left = n - i
            kind = "queued" if left <= queued else \
                "running" if left <= queued + running else "finished"
            counts[kind] += 1
            row = job_row(rng, rng.choice(owners), created, kind)
            batch.append(row)
            events.append({"job_id": row["id"], "seq": row["seq"], "state": row["state"],
                           "outcome": row["outcome"], "at": row["updated_at"],
                           "data": json.dumps({"kind": "lifecycle", "job_id": row["id"],
                                               "state": row["state"]})})
            if len(batch) >= 5000:
                _write(engine, batch, events)
        _write(engine, batch, events)
        if engine.dialect.name == "postgresql":
            # A lab's year of history has had its statistics gathered by autovacuum long
            # ago; rows written a moment ago have none, and without them the planner
            # picks the wrong index for one researcher's search (40 ms instead of 1.5).
            with engine.begin() as conn:
                conn.execute(text("ANALYZE"))
    finally:
        engine.dispose()
    return counts


def _write(engine: Any, jobs: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    if jobs:
        with engine.begin() as conn:
            conn.execute(insert(db.jobs), jobs)
            conn.execute(insert(db.events), events)
    jobs.clear()
    events.clear()
