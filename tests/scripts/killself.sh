#!/bin/sh
# Kills itself with a signal (default TERM).
echo "killing myself with ${RR_PARAM_SIG:-TERM}"
kill -"${RR_PARAM_SIG:-TERM}" $$
