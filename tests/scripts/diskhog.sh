#!/bin/sh
# Writes RR_PARAM_FILES files of 1 MiB, in turn to its temp folder and its work folder; at
# the first that fails, says which and how many bytes its files hold, and exits 3.
n=${RR_PARAM_FILES:-50}
tmp=${TMPDIR:-/tmp}
i=0
while [ "$i" -lt "$n" ]; do
    i=$((i + 1))
    dir=$tmp
    [ $((i % 2)) -eq 0 ] && dir=$RR_WORKDIR
    if ! head -c 1048576 /dev/zero > "$dir/f$i"; then
        echo "file $i failed"
        echo "held $(cat "$RR_WORKDIR"/f* "$tmp"/f* | wc -c) bytes"
        exit 3
    fi
done
echo "wrote $n files"
