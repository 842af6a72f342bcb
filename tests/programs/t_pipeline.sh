#!/bin/sh
# t_pipeline: a shell pipeline with a slow producer, a stateful filter, a tee to a file and
# a consumer that holds everything until EOF.
#
# Usage: sh t_pipeline.sh WORKDIR PRODUCER COUNT
# The producer prints COUNT lines, 10 ms apart; awk keeps a running hash of the values and
# prints each line with it (flushing each line); tee copies the stream to WORKDIR/stream
# (progress can be watched there); sort orders the whole stream by hash and prints it when
# its input ends. Then the shell prints "END". The output must be exactly that of an
# uninterrupted run.
work=$1
producer=$2
count=$3
"$producer" "$count" 10 \
    | awk '{ s = (s * 31 + $3) % 1000003; printf "%d %d %d %s\n", $2, $3, s, $4; fflush() }' \
    | tee "$work/stream" \
    | sort -k3,3n -k1,1n
echo "END $?"
