"""A job with a requirement: labq installs numpy (once; later jobs reuse the cached
environment) and the script writes summary statistics of a random sample to output/."""

import json
from pathlib import Path

import numpy as np

rng = np.random.default_rng(seed=42)
sample = rng.normal(loc=10.0, scale=2.0, size=1_000_000)
stats = {
    "n": int(sample.size),
    "mean": float(sample.mean()),
    "std": float(sample.std()),
    "min": float(sample.min()),
    "max": float(sample.max()),
    "percentiles": {str(p): float(np.percentile(sample, p)) for p in (1, 25, 50, 75, 99)},
    "numpy": np.__version__,
}
out = Path("output")
out.mkdir(exist_ok=True)
(out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
counts, edges = np.histogram(sample, bins=20)
with open(out / "histogram.csv", "w") as fh:
    fh.write("left,right,count\n")
    for left, right, count in zip(edges[:-1], edges[1:], counts):
        fh.write(f"{left:.3f},{right:.3f},{count}\n")
print(json.dumps(stats, indent=2))
