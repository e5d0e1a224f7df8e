#!/bin/sh
# Spins on the CPU until stopped.
echo "spinning"
while :; do :; done
