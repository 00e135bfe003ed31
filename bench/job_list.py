"""Job lists over a long history (issue 10, target 3): p99 <= 500 ms with 200 concurrent
clients over 100,000 stored jobs, on SQLite and on PostgreSQL.

    .venv/bin/python bench/job_list.py                       # SQLite, 100,000 jobs
    .venv/bin/python bench/job_list.py --database postgresql+psycopg://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/job_list.py --quick               # 20,000 jobs, shorter runs

Starts a labq of its own (``labq backend``, authentication on; on PostgreSQL in a schema
of its own, dropped at the end), writes a year of a lab's history into its database
(bench/seed.py: four researchers with accounts and more without, mostly finished jobs,
1,000 waiting in the queue, 20 running), then runs the lists the pages and the CLI ask
for: Home's recent jobs (10), the Results page (25) and its next page (keyset cursor),
``labq ls`` (20), search (``?q=``), ``?state=queued`` (every row with its place in the
queue), ``?outcome=error&sort=-duration`` and (admins) ``?owner=``. First one client
alone (the baseline), then 200 at once, each asking again as soon as it is answered.
Exits 1 when the p99 misses the target.

``--researchers N`` spreads the history and the clients over N researchers (default 4,
with the admin): with 200 every client is a researcher of its own, so no two clients ask
the same question with the same token and no answer can be shared (backend/turns.py).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections import defaultdict

from apiload import Client, Sample, run_clients
from figures import Targets, summary_ms
from lab import add_user, backend_env, database, raise_open_files
from seed import seed
from stack import Stack, load_note, percentile

from labq.shared.db import make_engine
from labq.shared.settings import Settings

P99_MS = 500.0
RESEARCHERS = ("alice", "bob", "carol", "dave")
OTHERS = tuple(f"user{n:02d}" for n in range(1, 16))
#: (kind, weight) of the requests a client makes: the Home page's recent jobs (10), the
#: Results page (25 a page) and its next page, ``labq ls`` (20), and the Results page's
#: search, state and outcome filters and (admins) one researcher's jobs.
MIX = (("home", 20), ("results", 20), ("next", 15), ("cli", 10), ("search", 10),
       ("queued", 10), ("duration", 5), ("owner", 10))
QUERIES = {"home": "/api/v1/jobs?limit=10", "results": "/api/v1/jobs",
           "cli": "/api/v1/jobs?limit=20", "search": "/api/v1/jobs?q=osc",
           "queued": "/api/v1/jobs?state=queued",
           "duration": "/api/v1/jobs?outcome=error&sort=-duration"}
PAGE = 25  # the Results page's size, which it leaves out of its URL


def picker(seed_value: int):  # noqa: ANN201 - a closure over its own random source
    rng = random.Random(seed_value)
    kinds = [k for k, w in MIX for _ in range(w)]

    def pick(client: Client) -> tuple[str, str]:
        kind = rng.choice(kinds)
        if kind == "next" and client.cursor:
            return "next", f"/api/v1/jobs?limit={PAGE}&cursor={client.cursor}"
        if kind == "owner" and client.user == "admin":
            return "owner", f"/api/v1/jobs?limit={PAGE}&owner={rng.choice(RESEARCHERS)}"
        if kind not in QUERIES:
            kind = "results"
        path = QUERIES[kind]
        if "limit=" not in path:
            path += ("&" if "?" in path else "?") + f"limit={PAGE}"
        return kind, path

    return pick


def researchers(n: int) -> tuple[str, ...]:
    """The researchers of a run: alice, bob, carol, dave, then r005, r006, ..."""
    return RESEARCHERS[:n] + tuple(f"r{i:03d}" for i in range(len(RESEARCHERS) + 1, n + 1))


def make_clients(n: int, tokens: dict[str, str]) -> list[Client]:
    users = list(tokens)
    return [Client(tokens[users[i % len(users)]], users[i % len(users)], picker(i))
            for i in range(n)]


def make_tokens(stack: Stack, names: tuple[str, ...]) -> dict[str, str]:
    """The admin's token and one for each researcher (the first four made with `labq user
    add`, as a lab does; the rest straight in the database, which is quicker)."""
    tokens = {"admin": stack.token, **{u: add_user(stack, u) for u in names[:4]}}
    if len(names) > 4:
        from labq.backend import accounts

        engine = make_engine(Settings.from_env(stack.env))
        try:
            for name in names[4:]:
                user = accounts.create_user(engine, name)
                tokens[name] = accounts.create_token(engine, user["id"], "bench")[1]
        finally:
            engine.dispose()
    return tokens


def report(title: str, samples: list[Sample], wall_s: float) -> list[float]:
    good = [s.seconds for s in samples if s.status == 200]
    bad = len(samples) - len(good)
    print(f"{title}: {len(samples)} requests in {wall_s:.1f} s "
          f"({len(samples) / wall_s:.0f}/s)" + (f", {bad} FAILED" if bad else ""))
    by_kind: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        if s.status == 200:
            by_kind[s.kind].append(s.seconds)
    for kind, values in sorted(by_kind.items()):
        print(f"  {kind:<9} {summary_ms(values)}")
    print(f"  {'all':<9} {summary_ms(good)}")
    return good


def store_history(stack: Stack, jobs: int, names: tuple[str, ...] = RESEARCHERS
                  ) -> dict[str, int]:
    """The lab's history, written before the backend starts (as a lab restarting labq
    finds it): the database made and migrated as labq does, then filled."""
    settings = Settings.from_env(stack.env)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    make_engine(settings).dispose()  # runs the migrations
    return seed(settings.resolved_database_url, jobs, ["admin", *names, *OTHERS],
                queued=1000, running=20)


def run(args: argparse.Namespace, stack: Stack, counts: dict[str, int], targets: Targets
        ) -> None:
    tokens = make_tokens(stack, researchers(args.researchers))
    print(f"stored {sum(counts.values())} jobs {counts}, {args.researchers} researchers")
    host, port = "127.0.0.1", stack.port
    one = make_clients(1, tokens)
    wall = asyncio.run(run_clients(one, host, port, args.seconds / 2))
    base = report("baseline, 1 client", one[0].samples, wall)
    many = make_clients(args.clients, tokens)
    wall = asyncio.run(run_clients(many, host, port, args.seconds))
    loaded = report(f"{args.clients} concurrent clients", [s for c in many for s in c.samples],
                    wall)
    errors = [e for c in many for e in c.errors]
    print(f"\ntargets ({load_note()}):")
    print(f"  baseline p99 (1 client): {percentile(base, 99) * 1000:.1f} ms")
    targets.require("every request answered 200",
                    not errors and len(loaded) == sum(len(c.samples) for c in many),
                    f"{len(errors)} client errors" + (f", e.g. {errors[0]}" if errors else ""))
    targets.check(f"list p99 with {args.clients} concurrent clients over "
                  f"{sum(counts.values())} jobs", percentile(loaded, 99) * 1000, P99_MS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="",
                        help="a postgresql:// URL (a schema of its own is made and dropped);"
                             " empty: SQLite in the data dir")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--researchers", type=int, default=len(RESEARCHERS),
                        help="researchers the history and the clients belong to (and the "
                             "admin); 200: every client a researcher of its own")
    parser.add_argument("--quick", action="store_true", help="20,000 jobs, 8 s")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.seconds = min(args.jobs, 20_000), min(args.seconds, 8.0)
    if not 2000 <= args.jobs <= 1_000_000 or not 1 <= args.clients <= 1000 \
            or not 1 <= args.seconds <= 120 or not 1 <= args.researchers <= 1000:
        parser.error("--jobs 2000..1000000, --clients 1..1000, --seconds 1..120, "
                     "--researchers 1..1000")
    raise_open_files(args.clients * 2 + 256)
    targets = Targets(f"job list ({'PostgreSQL' if args.database else 'SQLite'})")
    print(f"job list: {args.jobs} jobs, {args.clients} clients, "
          f"{'PostgreSQL' if args.database else 'SQLite'}, {load_note()}")
    print("before (issue 10): 1,000 concurrent GETs of the job list: p50 9.7 s, p99 19.7 s")
    with database(args.database) as env, Stack(
            "list", env={**backend_env(), **env, "LABQ_RECONCILE_INTERVAL_S": "3600"}) as stack:
        counts = store_history(stack, args.jobs, researchers(args.researchers))
        stack.start_backend()
        run(args, stack, counts, targets)
    return targets.exit_code()


if __name__ == "__main__":
    sys.exit(main())
