#!/bin/sh
# Reads stdin and answers each line; ends at end of input (an eof message, or Ctrl-D in a PTY).
echo "What is your name?"
while IFS= read -r line; do
  echo "Hello, $line! Anything else? (end with Ctrl-D)"
done
echo "Goodbye."
