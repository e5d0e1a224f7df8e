#!/bin/sh
# Shows disk usage of a directory (metadata and schema in config.toml).
exec du -sh "${RR_PARAM_DIR:-.}"
