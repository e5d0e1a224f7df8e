#!/bin/bash
# Prints part one, waits for the test to rewrite this file in place, then prints part two.
echo "part one from $0"
sleep 1.5
echo "part two"
