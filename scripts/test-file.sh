#!/usr/bin/env bash
# One integration test file, bounded in time: prove runs each file through
# this (scripts/test.sh: prove --exec).  A file still running after
# GIFT_TEST_TIMEOUT seconds (600), or past the whole run's deadline
# (GIFT_SUITE_DEADLINE, seconds since the epoch), is stopped with everything
# it started (timeout signals its own process group) and fails, named.
f=${!#}
limit=${GIFT_TEST_TIMEOUT:-600}
if [[ -n ${GIFT_SUITE_DEADLINE:-} ]]; then
    left=$((GIFT_SUITE_DEADLINE - $(date +%s)))
    if ((left <= 0)); then
        echo "1..0 # SKIP not run: the suite's time limit was reached"
        echo "$f: not run: the suite's time limit (GIFT_SUITE_TIMEOUT) was reached" >&2
        exit 1
    fi
    ((left < limit)) && limit=$left
fi
timeout -k 15 "$limit" perl -I t/lib "$@"
rc=$?
if ((rc == 124 || rc == 137)); then
    echo "$f: TIMEOUT: still running after $limit s, stopped (a test waiting" \
         "on a wedged server or a hang; see its output above)" >&2
fi
exit $rc
