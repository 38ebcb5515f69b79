#!/usr/bin/env bash
# make test: unit tests (Check), then integration tests (prove) against real
# nginx, nats-server, mosquitto and the dispatcher on free loopback ports.
#   GIFT_TESTS="t/01-ingest.t ..."   run only these integration tests
#   SANITIZE=1                        the ASan/UBSan build (see Makefile)
#   GIFT_TEST_TIMEOUT=600             seconds one test file (or unit test
#                                     program) may run before it fails
#   GIFT_SUITE_TIMEOUT=2700           seconds for all the integration files
# A missing prerequisite (node, npm and its packages, chromium, promtool,
# systemd-analyze, ...) fails the test that needs it (GIFT_REQUIRE_ALL=1);
# prove run by hand skips it instead.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
export GIFT_REQUIRE_ALL=${GIFT_REQUIRE_ALL:-1}
TEST_TIMEOUT=${GIFT_TEST_TIMEOUT:-600}

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
# Check kills a test case after 4 s by default, or what the case sets: too
# short on a loaded machine or under the sanitizers (a 30 s case of 3
# million ids ran out there); the hang guard is TEST_TIMEOUT per program
export CK_DEFAULT_TIMEOUT=${CK_DEFAULT_TIMEOUT:-120}
export CK_TIMEOUT_MULTIPLIER=${CK_TIMEOUT_MULTIPLIER:-10}
BUILD=${BUILD:-build}
export GIFT_BUILD=$BUILD GIFT_BIN_DIR=$PWD/$BUILD
if [[ ${SANITIZE:-0} == 1 ]]; then
    # Debian's nginx is not instrumented: it runs with the runtime preloaded
    GIFT_NGINX_PRELOAD=$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)
    export GIFT_NGINX_PRELOAD
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
    # t/lib sends reports to files (log_path) and fails the test whose
    # processes wrote one
    export GIFT_SANITIZE=1
fi

# run "$@" bounded by TEST_TIMEOUT, failing with its name when it is over
bounded() {
    local rc=0
    timeout -k 15 "$TEST_TIMEOUT" "$@" || rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "$1: TIMEOUT: still running after $TEST_TIMEOUT s" >&2
    fi
    return $rc
}

echo "== unit tests"
for t in "$BUILD"/tests/test_*; do
    [[ -x $t ]] || continue
    echo "-- $t"
    bounded "$t"
done

if compgen -G "$BUILD/fuzz/fuzz_*" >/dev/null; then
    echo "== fuzz targets over their saved corpora"
    for f in "$BUILD"/fuzz/fuzz_*; do
        name=$(basename "$f")
        bounded "$f" -runs=0 "fuzz/corpus/${name#fuzz_}" 2>&1 | tail -1
    done
fi

echo "== integration tests"
# each file through scripts/test-file.sh: GIFT_TEST_TIMEOUT per file, and
# none starts (or runs on) past the deadline of the whole run
export GIFT_TEST_TIMEOUT=$TEST_TIMEOUT
export GIFT_SUITE_DEADLINE=$(( $(date +%s) + ${GIFT_SUITE_TIMEOUT:-2700} ))
rc=0
# shellcheck disable=SC2086
prove --exec scripts/test-file.sh ${PROVE_FLAGS:-} ${GIFT_TESTS:-t/*.t} || rc=$?
echo "== make test: $(( $(date +%s) - T0 )) s, $([[ $rc == 0 ]] && echo PASS || echo FAIL)"
exit $rc
