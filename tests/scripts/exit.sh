#!/bin/sh
echo "exiting with ${RR_PARAM_CODE:-0}"
exit "${RR_PARAM_CODE:-0}"
