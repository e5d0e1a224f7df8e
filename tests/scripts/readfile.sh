#!/bin/sh
# Prints the file named by its path param (the sandbox tests: what a task can read).
exec cat -- "$RR_PARAM_PATH"
