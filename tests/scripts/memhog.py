#!/usr/bin/env python3
"""Allocates and touches RR_PARAM_MB MiB, 8 MiB at a time, saying how far it got."""
import os

chunks = []
for i in range(int(os.environ.get("RR_PARAM_MB", "1024")) // 8):
    chunks.append(bytearray(8 * 1024 * 1024))  # zeroed: every page touched
    print(f"{(i + 1) * 8} MiB", flush=True)
print("done")
