#!/usr/bin/env python3
"""Writes bytes that are not UTF-8, and a multi-byte character split across two writes."""
import sys
import time

out = sys.stdout.buffer
out.write(b"bad:\xff\xfe\x00:end\n")
out.flush()
time.sleep(0.05)
chars = "é€😀".encode()
out.write(b"split:" + chars[:3])
out.flush()
time.sleep(0.1)
out.write(chars[3:] + b"\n")
out.flush()
