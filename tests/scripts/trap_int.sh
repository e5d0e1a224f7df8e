#!/bin/sh
# Says "got INT" on each SIGINT instead of dying; runs until killed.
trap 'echo "got INT"' INT
echo "ready"
while :; do sleep 0.1; done
