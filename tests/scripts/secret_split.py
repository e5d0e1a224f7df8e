#!/usr/bin/env python3
"""Writes its secret param split across two writes on each stream (a pause between), then whole,
then its SHA-256; optionally fails its first attempt or sleeps at the end."""
import hashlib
import os
import sys
import time

secret = os.environ["RR_PARAM_TOKEN"]
half = len(secret) // 2
# On a PTY both streams are one: there, one stream's halves (interleaved, they would not be
# the secret written at all).
streams = (sys.stdout,) if os.isatty(1) else (sys.stdout, sys.stderr)
print(f"pid={os.getpid()} argv={sys.argv[1:]}", flush=True)
for stream in streams:
    stream.write("before " + secret[:half])
    stream.flush()
time.sleep(0.3)  # far past the coalescing window: the halves are two reads
for stream in streams:
    stream.write(secret[half:] + " after\n")
    stream.flush()
print("whole:" + secret, flush=True)
print("sha=" + hashlib.sha256(secret.encode()).hexdigest(), flush=True)
if os.environ.get("RR_PARAM_FAIL_FIRST") == "true" and os.environ["RR_ATTEMPT"] == "1":
    sys.exit(3)
time.sleep(float(os.environ.get("RR_PARAM_SLEEP_S", "0")))
