#!/bin/sh
# Leaves a daemon behind: setsid + fork escapes the task's process group, then the parent exits.
setsid sh -c 'sleep 1000 & echo "daemon $!"'
sleep 0.1
