#!/bin/sh
# Echoes each line of stdin; then says how many it read.
n=0
echo "ready"
while IFS= read -r line; do
  n=$((n + 1))
  echo "got: $line"
done
echo "lines: $n"
