"""Entrypoint named in labq.toml; shows the arguments and environment it was given."""

import argparse
import json
import os
import random
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=1)
args = parser.parse_args()

random.seed(int(os.environ.get("SEED", "0")))
print(os.environ.get("GREETING", "(no GREETING set)"))
losses = []
loss = 1.0
for epoch in range(1, args.epochs + 1):
    loss *= random.uniform(0.5, 0.9)
    losses.append(loss)
    print(f"epoch {epoch}/{args.epochs}: loss {loss:.4f}")

out = Path("output")
out.mkdir(exist_ok=True)
(out / "metrics.json").write_text(json.dumps({
    "epochs": args.epochs,
    "losses": losses,
    "seed": os.environ.get("SEED"),
    "job_id": os.environ.get("LABQ_JOB_ID"),
    "attempt": os.environ.get("LABQ_ATTEMPT"),
}, indent=2) + "\n")
