#!/bin/sh
# Hello world: prints a greeting (free-form params; try -p name=ops).
echo "Hello, ${RR_PARAM_NAME:-world}!"
