"""Counts once a second, for pause / resume / stop demos.

    labq submit examples/long-counter        # prints the job id
    labq logs -f ID                          # watch it count
    labq pause ID; sleep 5; labq resume ID   # the count stops, then goes on where it was
    labq stop ID                             # outcome "cancelled"

How long it counts: the first argument (seconds), else 120.
"""

import sys
import time
from pathlib import Path

seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 120
out = Path("output")
out.mkdir(exist_ok=True)
for i in range(1, seconds + 1):
    print(f"count {i}", flush=True)
    (out / "count.txt").write_text(f"{i}\n")
    time.sleep(1)
print("done counting")
