#!/bin/sh
# Reports the terminal size, then again on every SIGWINCH and every line typed.
trap 'echo "winch $(stty size)"' WINCH
echo "size $(stty size)"
while IFS= read -r line; do
  echo "typed: $line size $(stty size)"
done
