#!/bin/sh
echo "name=$RR_PARAM_NAME count=$RR_PARAM_COUNT loud=$RR_PARAM_LOUD mode=$RR_PARAM_MODE"
echo "args: $*"
