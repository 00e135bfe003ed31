"""The smallest labq job: print a greeting and leave a file in output/."""

import platform
from pathlib import Path

out = Path("output")
out.mkdir(exist_ok=True)
message = f"Hello from labq! Python {platform.python_version()} on {platform.node()}\n"
(out / "hello.txt").write_text(message)
print(message, end="")
print("wrote output/hello.txt")
