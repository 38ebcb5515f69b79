#!/usr/bin/env bash
# make test: unit tests (Check), then integration tests (prove) against real
# nginx, nats-server, mosquitto and the dispatcher on free loopback ports.
#   GIFT_TESTS="t/01-ingest.t ..."   run only these integration tests
#   SANITIZE=1                        the ASan/UBSan build (see Makefile)
set -euo pipefail
cd "$(dirname "$0")/.."

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
# Check kills a test case after 4 s by default: too short on a loaded machine
export CK_DEFAULT_TIMEOUT=${CK_DEFAULT_TIMEOUT:-120}
BUILD=${BUILD:-build}
export GIFT_BUILD=$BUILD GIFT_BIN_DIR=$PWD/$BUILD
if [[ ${SANITIZE:-0} == 1 ]]; then
    # Debian's nginx is not instrumented: it runs with the runtime preloaded
    GIFT_NGINX_PRELOAD=$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)
    export GIFT_NGINX_PRELOAD
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
fi

echo "== unit tests"
for t in "$BUILD"/tests/test_*; do
    [[ -x $t ]] || continue
    echo "-- $t"
    "$t"
done

if compgen -G "$BUILD/fuzz/fuzz_*" >/dev/null; then
    echo "== fuzz targets over their saved corpora"
    for f in "$BUILD"/fuzz/fuzz_*; do
        name=$(basename "$f")
        "$f" -runs=0 "fuzz/corpus/${name#fuzz_}" 2>&1 | tail -1
    done
fi

echo "== integration tests"
# shellcheck disable=SC2086
prove -I t/lib ${PROVE_FLAGS:-} ${GIFT_TESTS:-t/*.t}
