"""A job that fails on purpose: it prints, then exits with code 3 (outcome "error")."""

import sys

print("about to fail on purpose")
print("something went wrong", file=sys.stderr)
sys.exit(3)
