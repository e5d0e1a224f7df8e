#!/usr/bin/env python3
"""Prints lines matching the tests' [redaction] patterns, one split across two reads, and a
prompt without a newline that waits."""
import sys
import time

out = sys.stdout
out.write("key AKIA1234")
out.flush()
time.sleep(0.03)  # past the coalescing window, inside the line hold
out.write("567890ABCDEF end\n")
out.write("login password=hunter22 ok\n")
out.flush()
out.write("prompt> ")
out.flush()
time.sleep(0.6)
out.write("\nbye\n")
