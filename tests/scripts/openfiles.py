#!/usr/bin/env python3
"""Opens RR_PARAM_N descriptors; exits 4 when one is refused."""
import os
import sys

held = []
for i in range(int(os.environ.get("RR_PARAM_N", "100"))):
    try:
        held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as exc:
        print(f"open {i} refused: {exc.strerror}", flush=True)
        sys.exit(4)
print("opened all")
