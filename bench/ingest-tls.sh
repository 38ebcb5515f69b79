#!/usr/bin/env bash
# The ingest benchmark over tls:// (the module's NATS connection with
# nginx's SSL), beside bench/ingest.sh's nats:// figure: /gift, /plain and
# /discard in one nginx, written as ingest-tls.json.  Same environment as
# bench/ingest.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
GIFT_BENCH_TLS=1 exec bench/ingest.sh --rates
