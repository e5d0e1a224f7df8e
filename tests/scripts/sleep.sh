#!/bin/sh
# Prints its pid, starts a background child that outlives nothing, then sleeps.
sleep 1000 &
echo "child $!"
echo "started $$"
sleep "${RR_PARAM_SECONDS:-1000}"
echo "woke"
