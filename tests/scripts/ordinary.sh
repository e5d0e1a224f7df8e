#!/bin/bash
# Ordinary work, for the sandbox's seccomp filter: a pipeline, python threads and a subprocess,
# a subshell, then whether stdout is a terminal.
set -euo pipefail
echo a | tr a B
python3 - <<'PY'
import subprocess
import threading

thread = threading.Thread(target=print, args=("thread",))
thread.start()
thread.join()
print(subprocess.run(["echo", "child"], capture_output=True, text=True, check=True).stdout)
PY
(printf '1\n2\n3\n' | wc -l)
if [ -t 1 ]; then echo tty; else echo notty; fi
