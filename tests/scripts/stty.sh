#!/bin/bash
# Reports the terminal size, then again on every SIGWINCH and every line typed.
# (bash, not sh: dash's `read` gives up when a trapped signal arrives.)
trap 'echo "winch $(stty size)"' WINCH
echo "size $(stty size)"
while IFS= read -r line; do
  echo "typed: $line size $(stty size)"
done
