#!/bin/sh
# Leaves a daemon that drops RR_TASK_ID: setsid, a double fork and an empty environment, running
# `sleep RR_PARAM_MARK` (a number the test looks for); then the script itself ends.
setsid sh -c 'sh -c "env -i sleep $1 >/dev/null 2>&1 &" x "$1" &' x "${RR_PARAM_MARK:-1000}"
sleep 0.3
echo "left a daemon"
