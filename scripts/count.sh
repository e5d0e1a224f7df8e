#!/bin/sh
# Counts slowly on both stdout and stderr: n lines each, delay seconds apart.
n=${RR_PARAM_N:-10}
delay=${RR_PARAM_DELAY:-0.5}
i=1
while [ "$i" -le "$n" ]; do
  echo "stdout line $i of $n"
  echo "stderr line $i of $n" >&2
  i=$((i + 1))
  sleep "$delay"
done
