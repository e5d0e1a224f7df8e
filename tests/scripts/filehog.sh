#!/bin/sh
# Writes RR_PARAM_BYTES zero bytes to a file in its work folder.
echo "writing ${RR_PARAM_BYTES:-1000000000} bytes"
exec head -c "${RR_PARAM_BYTES:-1000000000}" /dev/zero > "$RR_WORKDIR/big"
