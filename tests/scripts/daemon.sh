#!/bin/sh
# Leaves a daemon behind: setsid + fork escapes the task's process group, then the parent
# exits after RR_PARAM_STAY seconds (0.1 by default).
setsid sh -c 'sleep 1000 & echo "daemon $!"'
sleep "${RR_PARAM_STAY:-0.1}"
