#!/bin/sh
# Prints ANSI colours and styles, to show the terminal passes them through.
for c in 31 32 33 34 35 36; do
  printf '\033[%sm colour %s \033[0m' "$c" "$c"
done
printf '\n\033[1mbold\033[0m \033[4munderline\033[0m \033[7mreverse\033[0m\n'
printf '\033[38;5;208m256-colour orange\033[0m \033[38;2;0;160;255mtruecolor blue\033[0m\n'
