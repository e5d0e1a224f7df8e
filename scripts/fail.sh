#!/bin/sh
# Fails on purpose with exit code 3.
echo "checking the thing..."
echo "error: the thing is broken" >&2
exit 3
