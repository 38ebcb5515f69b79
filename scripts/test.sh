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
if [[ ${SANITIZE:-0} == 1 ]]; then
    GIFT_NGINX_PRELOAD=$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)
    export GIFT_NGINX_PRELOAD
    # nginx's master and cnats keep memory until exit by design
    export ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0"
fi

echo "== unit tests"
for t in build/tests/test_*; do
    [[ -x $t ]] || continue
    echo "-- $t"
    "$t"
done

echo "== integration tests"
# shellcheck disable=SC2086
prove -I t/lib ${PROVE_FLAGS:-} ${GIFT_TESTS:-t/*.t}
