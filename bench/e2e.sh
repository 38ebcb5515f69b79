#!/usr/bin/env bash
# The end-to-end benchmark (issue 9): the whole pipeline, measured from the
# webhook's POST to the acknowledgement at SSE clients, next to the load
# generator's own ceiling measured in the same run.
#
#   bench/e2e.sh
#
# It starts the stack the way scripts/run.sh does, but on free loopback
# ports in build/bench/e2e with its own store: nats-server (JetStream, file
# store), ThingsBoard (the stand-in, tools/tbstandin/tb.mjs: the MQTT
# endpoint and the rule chain, 1 ms per queue hop, and its 8 motors as MQTT
# sessions of their own, tools/tbstandin/motors.mjs, answering at once;
# GIFT_TB=tbsim: mosquitto and tbsim, 0 ms reply latency, as before),
# gift-dispatcher, and nginx (2 workers, the module; webhook with an HMAC
# secret, SSE).  Then, with
# build/giftbench (C, epoll; see tools/giftbench.c):
#   ceiling    giftbench against `giftbench echo` (a trivial server: 202 and
#              the acknowledgement pushed at once), as fast as answered,
#              same clients and signing: what giftbench itself can drive
#   reference  500 gifts/s (the design's reference load) for 20 s with 10
#              SSE clients: latency p50/p99 (aim: p99 < 3 ms)
#   saturate   as fast as answered for a few seconds: the closed-loop rate
#   ramp       fixed rates (open loop) at fractions of the saturated rate,
#              upward; a step is sustained when the accepted rate keeps up
#              with R (>= 95%), nothing is lost or duplicated, every answer
#              is 202 and p99 stays under a bound (100 ms); the highest
#              sustained step is the maximum sustainable rate (aim: 20,000)
# and checks that the motors turned exactly the rounds of every accepted
# gift.  CPU seconds and peak RSS of each process of the stack
# (from /proc) come with every run; the bottleneck is the process that
# saturates at the first step that is not sustained.  Writes
# build/bench/e2e.json; bench/report.sh turns it into the report.
#
# Environment: GIFT_E2E_REF_RATE (500), GIFT_E2E_REF_SECONDS (20),
# GIFT_E2E_SSE (10 clients), GIFT_E2E_CONNS (64), GIFT_E2E_STEP_SECONDS (5),
# GIFT_E2E_RATES (explicit ramp steps, e.g. "5000 10000 20000"; default:
# fractions of the saturated rate), GIFT_E2E_P99_BOUND_MS (100),
# GIFT_E2E_SECRET (signing key; empty: unsigned), GIFT_TB (tbsim: mosquitto
# and tbsim instead of the stand-in), GIFT_E2E_THREADS (sender
# threads, 1), GIFT_E2E_NGINX_HTTP (more directives for nginx's http block,
# e.g. "gift_sse_max_backlog 16;"), GIFT_BENCH_OUT (build/bench),
# GIFT_BENCH_KEEP=1 keeps the
# work directory's store and logs.  Loopback only; everything it starts is
# stopped by PID.  Client and servers share the machine's cores: compare
# figures measured in the same run, and quote ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

REF_RATE=${GIFT_E2E_REF_RATE:-500}
REF_SECS=${GIFT_E2E_REF_SECONDS:-20}
SSE=${GIFT_E2E_SSE:-10}
CONNS=${GIFT_E2E_CONNS:-64}
THREADS=${GIFT_E2E_THREADS:-1}
STEP_SECS=${GIFT_E2E_STEP_SECONDS:-5}
RATES=${GIFT_E2E_RATES:-}
P99_BOUND_MS=${GIFT_E2E_P99_BOUND_MS:-100}
SECRET=${GIFT_E2E_SECRET-e2e-bench-secret}
GIFTS="Heart:2,Rose:1,Motor:10,Lion:5"     # -> motor_01 .. motor_04
OUT=${GIFT_BENCH_OUT:-$ROOT/build/bench}
WORK=$OUT/e2e
B=$ROOT/build
T_START=$(date +%s)

say() { echo "e2e: $*" >&2; }
. "$ROOT/bench/lib.sh"

# ThingsBoard: the stand-in unless GIFT_TB=tbsim
TB=standin
if [[ ${GIFT_TB:-} == tbsim ]]; then
    TB=tbsim
elif ! command -v node >/dev/null || [[ ! -d $ROOT/tools/tbstandin/node_modules/aedes ]]; then
    say "the ThingsBoard stand-in needs node and tools/tbstandin/node_modules (run 'make deps'); GIFT_TB=tbsim uses tbsim"
    exit 1
fi

# ---------------------------------------------------------------- what we need
need=()
for f in ngx_http_gift_module.so giftctl gift-dispatcher tbsim giftbench; do
    [[ -e $B/$f ]] || need+=("build/$f")
done
if (( ${#need[@]} )); then
    make -s "${need[@]}" >&2 || { say "build failed"; exit 1; }
fi
NEED_BINS=(nats-server nginx)
[[ $TB == tbsim ]] && NEED_BINS+=(mosquitto)
for b in "${NEED_BINS[@]}"; do
    command -v "$b" >/dev/null || [[ -x /usr/sbin/$b ]] ||
        { say "$b not found; run 'make deps'"; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)

rm -rf "$WORK"
mkdir -p "$WORK"/{nats,nginx/tmp,runs}

free_port NATS_PORT
free_port MQTT_PORT
free_port HTTP_PORT
free_port METRICS_PORT
free_port ECHO_PORT

# started processes, stopped in reverse order, by PID
PIDS=() NAMES=()
cleanup() {
    local rc=$? i pid
    trap - EXIT INT TERM
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        if [[ ${NAMES[i]} == nginx ]]; then
            kill -QUIT "$pid" 2>/dev/null || true
        else
            kill -TERM "$pid" 2>/dev/null || true
        fi
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ ${GIFT_BENCH_KEEP:-0} != 1 ]]; then
        rm -rf "$WORK/nats" "$WORK/nginx/tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

started() { PIDS+=("$1"); NAMES+=("$2"); }
stop_one() {  # pid: stop now (and forget it)
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${!PIDS[@]}"; do
        [[ ${PIDS[i]} == "$pid" ]] && unset 'PIDS[i]' 'NAMES[i]'
    done
    PIDS=("${PIDS[@]}") NAMES=("${NAMES[@]}")
}

# ---------------------------------------------------------------- ceiling
# giftbench against its trivial echo server: nothing else runs yet.
GB=("$B/giftbench" -S "$SSE" -C "$CONNS" -T "$THREADS" --gift "$GIFTS")
[[ -n $SECRET ]] && GB+=(--secret "$SECRET")

"$B/giftbench" echo -l "127.0.0.1:$ECHO_PORT" -T 2 >"$WORK/echo.log" 2>&1 &
ECHO_PID=$!
started "$ECHO_PID" echo
wait_port "$ECHO_PORT" "giftbench echo" "$ECHO_PID" "$WORK/echo.log"
say "ceiling: giftbench vs giftbench echo (:$ECHO_PORT), ${STEP_SECS}s as fast as answered"
"${GB[@]}" -u "http://127.0.0.1:$ECHO_PORT" -d "$STEP_SECS" --label ceiling \
    --pids "echo=$ECHO_PID" --reset-hwm >"$WORK/runs/ceiling.json" \
    2>"$WORK/runs/ceiling.log" || { cat "$WORK/runs/ceiling.log" >&2; exit 1; }
sed 's/^/  /' "$WORK/runs/ceiling.log" >&2
stop_one "$ECHO_PID"

# giftbench's accounting, checked: an echo server that leaves out every
# 100th acknowledgement and repeats every 150th must be reported as such
"$B/giftbench" echo -l "127.0.0.1:$ECHO_PORT" -T 2 --drop-every 100 \
    --dup-every 150 >"$WORK/echo-faults.log" 2>&1 &
ECHO_PID=$!
started "$ECHO_PID" echo
wait_port "$ECHO_PORT" "giftbench echo" "$ECHO_PID" "$WORK/echo-faults.log"
"$B/giftbench" -u "http://127.0.0.1:$ECHO_PORT" -S 3 -K 3000 -R 3000 \
    --grace 0.5 -q --label selfcheck >"$WORK/selfcheck.json" || true
stop_one "$ECHO_PID"
SELF=$(perl -MJSON::PP -e 'local $/; my $d = decode_json(<STDIN>);
    # seq 1..3000: 30 dropped; 20 repeated (300 of them are also dropped
    # every 300: 10), each seen by 3 clients
    print(($d->{lost} == 30 && $d->{dup_acks} == 30 && $d->{accepted} == 3000)
        ? "ok" : "lost $d->{lost} (30 expected), duplicates $d->{dup_acks} (30 expected)")' \
    <"$WORK/selfcheck.json")
[[ $SELF == ok ]] || { say "giftbench self-check failed: $SELF"; exit 1; }
say "self-check: giftbench counted the echo server's 30 dropped and 10x3 repeated acknowledgements"

# ---------------------------------------------------------------- the stack
# GIFT_NATS_GOMAXPROCS: nats-server's GOMAXPROCS (unset: Go's default,
# one per core, for the peak; make run and bench/seed.sh use 1)
NATS_ENV=()
[[ -z ${GIFT_NATS_GOMAXPROCS:-} ]] || NATS_ENV=(env "GOMAXPROCS=$GIFT_NATS_GOMAXPROCS")
"${NATS_ENV[@]}" "$NATS" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/nats" \
    >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
started "$NATS_PID" nats-server
wait_port "$NATS_PORT" nats-server "$NATS_PID" "$WORK/nats.log"
NATS_URL=nats://127.0.0.1:$NATS_PORT
"$B/giftctl" -s "$NATS_URL" setup >"$WORK/setup.log" 2>&1 ||
    { cat "$WORK/setup.log" >&2; exit 1; }

if [[ $TB == standin ]]; then
# the endpoint (ThingsBoard's MQTT transport and the rule chain) on the MQTT
# port, the motors as separate sessions; the motors' totals are read like
# tbsim's (tbsim.json: {totals}{rounds})
node "$ROOT/tools/tbstandin/tb.mjs" --host 127.0.0.1 --port "$MQTT_PORT" \
    --motors 8 --dispatchers 1 --out "$WORK/tbstandin.json" \
    >"$WORK/tbstandin.log" 2>&1 &
SB_PID=$!
started "$SB_PID" tbstandin
wait_log "$WORK/tbstandin.log" 'serving MQTT' 1 gift-tbstandin "$SB_PID"
node "$ROOT/tools/tbstandin/motors.mjs" --host 127.0.0.1 --port "$MQTT_PORT" \
    --motors 8 --window 1048576 --out "$WORK/tbsim.json" \
    >"$WORK/motors.log" 2>&1 &
TBSIM_PID=$!
started "$TBSIM_PID" motors
wait_log "$WORK/motors.log" 'serving [0-9]+ motors' 1 gift-motors "$TBSIM_PID"
MQTT_CONF="access_token = \"gift-dispatcher-1\";"
TB_PROCS="tbstandin=$SB_PID,motors=$TBSIM_PID"
TB_SAY="the ThingsBoard stand-in :$MQTT_PORT (1 ms per queue hop) and its motors"
else
mosquitto_conf "$WORK/mosquitto.conf" "$MQTT_PORT"
"$MOSQ" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
MOSQ_PID=$!
started "$MOSQ_PID" mosquitto
wait_port "$MQTT_PORT" mosquitto "$MOSQ_PID" "$WORK/mosquitto.log"

"$B/tbsim" --host 127.0.0.1 --port "$MQTT_PORT" --out "$WORK/tbsim.json" \
    --latency-ms 0 --seed 1 >"$WORK/tbsim.log" 2>&1 &
TBSIM_PID=$!
started "$TBSIM_PID" tbsim
wait_log "$WORK/tbsim.log" serving 1 tbsim "$TBSIM_PID"
MQTT_CONF=
TB_PROCS="mosquitto=$MOSQ_PID,tbsim=$TBSIM_PID"
TB_SAY="mosquitto :$MQTT_PORT, tbsim"
fi

cat >"$WORK/dispatcher.conf" <<EOF
# written by bench/e2e.sh: the example's settings, this run's ports
log_level = "info";
nats = {
    url = "$NATS_URL";
};
mqtt = {
    host = "127.0.0.1";
    port = $MQTT_PORT;
    $MQTT_CONF
};
devices = {
    # simulated motors: the pipeline is measured, not a motor's pace
    coalesce_max_rounds = 100000;
    rounds_per_minute = "unlimited";
};
metrics = {
    listen = "127.0.0.1:$METRICS_PORT";
};
rules = {
    max_rounds = 100000;
    default_device = "motor_01";
    rule = (
        { gift = "Rose";  device = "motor_02"; },
        { gift = "Motor"; device = "motor_03"; },
        { gift = "Lion";  device = "motor_04"; }
    );
};
EOF
# a dispatcher built before its metrics endpoint does not know the group
if ! "$B/gift-dispatcher" -t -c "$WORK/dispatcher.conf" >/dev/null 2>&1; then
    sed -i '/^metrics = {/,/^};/d' "$WORK/dispatcher.conf"
    "$B/gift-dispatcher" -t -c "$WORK/dispatcher.conf" >&2 ||
        { say "bad dispatcher configuration"; exit 1; }
fi
"$B/gift-dispatcher" -c "$WORK/dispatcher.conf" >"$WORK/dispatcher.log" 2>&1 &
DISP_PID=$!
started "$DISP_PID" dispatcher
wait_log "$WORK/dispatcher.log" 'running:' 1 gift-dispatcher "$DISP_PID"
wait_log "$WORK/dispatcher.log" 'MQTT: listening' 1 gift-dispatcher "$DISP_PID"

cat >"$WORK/nginx/nginx.conf" <<EOF
load_module $B/ngx_http_gift_module.so;
worker_processes 2;
error_log $WORK/nginx/error.log notice;
pid $WORK/nginx/nginx.pid;
daemon off;
events {
    worker_connections 8192;
}
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    keepalive_requests 100000000;
    gift_nats_url $NATS_URL;
    ${GIFT_E2E_NGINX_HTTP:-}
    server {
        listen 127.0.0.1:$HTTP_PORT backlog=4096;
        location = /gift {
            gift_webhook;
            ${SECRET:+gift_webhook_secret $SECRET;}
            client_body_buffer_size 64k;
        }
        location = /gift/events {
            gift_sse;
        }
    }
}
EOF
"$NGINX" -p "$WORK/nginx/" -c "$WORK/nginx/nginx.conf" \
    -e "$WORK/nginx/error.log" >"$WORK/nginx/nginx.out" 2>&1 &
NGINX_PID=$!
started "$NGINX_PID" nginx
wait_port "$HTTP_PORT" nginx "$NGINX_PID" "$WORK/nginx/nginx.out"
wait_log "$WORK/nginx/error.log" 'following GIFT_ACKS' 2 nginx "$NGINX_PID"
mapfile -t WORKERS < <(pgrep -P "$NGINX_PID" -f 'nginx: worker')
(( ${#WORKERS[@]} == 2 )) || { say "expected 2 nginx workers, got ${#WORKERS[@]}"; exit 1; }

STACK="nginx-w1=${WORKERS[0]},nginx-w2=${WORKERS[1]},nats-server=$NATS_PID"
STACK+=",dispatcher=$DISP_PID,$TB_PROCS"
say "stack: nginx :$HTTP_PORT (workers ${WORKERS[*]}), nats-server :$NATS_PORT," \
    "$TB_SAY, gift-dispatcher; $SSE SSE clients," \
    "$CONNS connections, ${SECRET:+signed}${SECRET:-unsigned}"

URL=http://127.0.0.1:$HTTP_PORT
run_gb() {  # tag, giftbench arguments...: prints nothing, fills runs/TAG.*
    local tag=$1 rc=0
    shift
    "${GB[@]}" -u "$URL" --label "$tag" --pids "$STACK" "$@" \
        >"$WORK/runs/$tag.json" 2>"$WORK/runs/$tag.log" || rc=$?
    sed 's/^/  /' "$WORK/runs/$tag.log" >&2
    [[ -s $WORK/runs/$tag.json ]] || { say "$tag: giftbench wrote nothing"; return 2; }
    return 0
}
# ---------------------------------------------------------------- runs
say "warm-up: 1000 gifts/s for 2 s"
run_gb warmup -R 1000 -d 2 -q || exit 1

say "reference: $REF_RATE gifts/s for ${REF_SECS}s"
run_gb reference -R "$REF_RATE" -d "$REF_SECS" --reset-hwm || exit 1

say "saturate: as fast as answered for ${STEP_SECS}s"
run_gb saturate -d "$STEP_SECS" --grace 20 || exit 1
SAT=$(jget "$WORK/runs/saturate.json" 'int($d->{acked_per_s})')
sleep 1

if [[ -z $RATES ]]; then
    # upward from half the saturated rate, in steps of 10% of it, to 120%
    RATES=$(perl -e 'my $s = shift; my %u;
        print join " ", grep { $_ > 0 && !$u{$_}++ }
            map { int($s * $_ / 10 / 500 + 0.5) * 500 } 5 .. 12' "$SAT")
fi
say "ramp: ${STEP_SECS}s per step at $RATES gifts/s (saturated: $SAT/s)"
RAMP_DIR=$WORK/runs RAMP_P99_BOUND_MS=$P99_BOUND_MS
ramp_run() { run_gb "$1" -R "$2" -d "$STEP_SECS" --grace 15; }
# shellcheck disable=SC2086
ramp $RATES
MAX_OK=$RAMP_MAX_OK FAILED_AT=$RAMP_FAILED_AT
say "maximum sustained rate: $MAX_OK gifts/s${FAILED_AT:+ (not sustained: $FAILED_AT)}"

# ---------------------------------------------------------------- motors
# Every accepted gift of every run turned its motor exactly once:
# the motors' rounds == the sum of the accepted gifts' rounds.
EXPECTED=$(perl -MJSON::PP -e 'my $t = 0; for my $f (@ARGV) { open my $h, "<", $f
    or next; local $/; my $d = decode_json(<$h>); $t += $d->{rounds}{expected} }
    print $t' $(ls "$WORK"/runs/*.json | grep -v /ceiling.json))
TB_OK=0
for _ in $(seq 50); do
    before=$(jget "$WORK/tbsim.json" '$d->{snapshot}' 2>/dev/null || echo 0)
    kill -USR1 "$TBSIM_PID"
    for _ in $(seq 50); do
        now=$(jget "$WORK/tbsim.json" '$d->{snapshot}' 2>/dev/null || echo 0)
        (( now > before )) && break
        sleep 0.05
    done
    TB_ROUNDS=$(jget "$WORK/tbsim.json" '$d->{totals}{rounds}')
    if [[ $TB_ROUNDS == "$EXPECTED" ]]; then TB_OK=1; break; fi
    sleep 0.2
done
cp "$WORK/tbsim.json" "$WORK/tbsim-final.json"

# "lost" in a run means: accepted, and no acknowledgement reached the SSE
# clients within the grace period (late, or never).  Never: every accepted
# gift must have its GiftAck in GIFT_ACKS (one per event id, deduplicated).
ACCEPTED_ALL=$(perl -MJSON::PP -e 'my $t = 0; for my $f (@ARGV) { open my $h, "<", $f
    or next; local $/; my $d = decode_json(<$h>); $t += $d->{accepted} } print $t' \
    $(ls "$WORK"/runs/*.json | grep -v /ceiling.json))
ACKS_STORED=0
for _ in $(seq 100); do
    ACKS_STORED=$("$B/giftctl" -s "$NATS_URL" info 2>/dev/null |
        awk '$1 == "GIFT_ACKS" { print $2 }')
    (( ${ACKS_STORED:-0} >= ACCEPTED_ALL )) && break
    sleep 0.3
done
say "GIFT_ACKS: ${ACKS_STORED:-?} acknowledgements stored for $ACCEPTED_ALL accepted gifts"
say "motors: $TB_ROUNDS rounds turned, $EXPECTED expected: $( ((TB_OK)) && echo equal || echo MISMATCH)"

# ---------------------------------------------------------------- JSON
rc=0
NGINX_ALERTS=$(grep -cE '\[(alert|emerg|crit)\]' "$WORK/nginx/error.log" || true)
perl -MJSON::PP -e '
    my ($runs, $out, $secs, $sat, $max_ok, $failed_at, $ref_rate, $bound,
        $tb_ok, $tb_rounds, $expected, $tbsim, $alerts, $rates, $self,
        $accepted_all, $acks_stored, $tbmode) = @ARGV;
    my $js = JSON::PP->new->canonical;
    sub rd { my $f = shift; open(my $h, "<", $f) or return undef; local $/;
        my $d = eval { $js->decode(<$h>) }; $d }
    my %run;
    for my $f (glob "$runs/*.json") {
        my ($tag) = $f =~ m{/([^/]+)\.json$};
        $run{$tag} = rd($f);
    }
    my @ramp;
    for my $tag (sort { ($a =~ /ramp-(\d+)-(\d)/)[0] <=> ($b =~ /ramp-(\d+)-(\d)/)[0]
                        || $a cmp $b } grep { /^ramp-/ } keys %run) {
        my ($r, $att) = $tag =~ /ramp-(\d+)-(\d)/;
        push @ramp, { rate => 0 + $r, attempt => 0 + $att, %{ summary($run{$tag}, $r) } };
    }
    sub summary {
        my ($d, $r) = @_;
        return {} unless $d;
        my %p;
        for my $n (keys %{$d->{processes}}) {
            my $x = $d->{processes}{$n};
            next if $x->{gone};
            $p{$n} = { map { $_ => $x->{$_} } qw(cpu_s cpu_pct us_per_gift peak_rss_kb threads) };
        }
        my $non202 = 0;
        $non202 += $d->{status}{$_} for grep { $_ ne "202" } keys %{$d->{status}};
        my %s = (
            sent => $d->{sent}, accepted => $d->{accepted},
            accepted_per_s => $d->{accepted_per_s}, acked_per_s => $d->{acked_per_s},
            status => $d->{status}, non_202 => $non202,
            lost => $d->{lost}, dup_acks => $d->{dup_acks},
            latency_ms => $d->{latency_ms}, accept_latency_ms => $d->{accept_latency_ms},
            send_lag_ms => $d->{send_lag_ms},
            fanout => { map { $_ => $d->{fanout}{$_} } qw(clients deliveries expected deliveries_per_s incomplete) },
            processes => \%p, machine_cpu_pct => $d->{machine_cpu_pct},
            others_cpu_pct => $d->{others_cpu_pct},
            window_seconds => $d->{window_seconds}, ok => $d->{ok},
        );
        if (defined $r && $r > 0) {
            $s{sustained} = ($d->{accepted_per_s} >= 0.95 * $r && !$d->{lost}
                && !$d->{dup_acks} && !$non202 && !$d->{fanout}{incomplete}
                && $d->{latency_ms}{p99} <= $bound) ? JSON::PP::true : JSON::PP::false;
        }
        return \%s;
    }
    # the bottleneck: at the first step not sustained (else the saturated
    # run), the process with the most CPU, and whether the machine was full
    # a rate is sustained when one of its attempts was
    my %rate_ok;
    $rate_ok{$_->{rate}} ||= $_->{sustained} ? 1 : 0 for @ramp;
    $_->{step_sustained} = $rate_ok{$_->{rate}} ? JSON::PP::true : JSON::PP::false for @ramp;
    my ($at) = reverse grep { !$rate_ok{$_->{rate}} && $_->{rate} == (sort { $a <=> $b }
        grep { !$rate_ok{$_} } keys %rate_ok)[0] } @ramp;
    my $bn_src = $at ? "ramp at $at->{rate}/s" : "saturate";
    my $bs = $at // summary($run{saturate});
    my %ps = %{$bs->{processes} // {}};
    my @by = sort { $ps{$b}{cpu_pct} <=> $ps{$a}{cpu_pct} } grep { $_ ne "giftbench" } keys %ps;
    my $stack_pct = 0; $stack_pct += $ps{$_}{cpu_pct} for @by;
    my $us = 0; $us += $ps{$_}{us_per_gift} for @by;
    my $top = $by[0];
    my $cpus = 0 + `nproc`;
    my $mpct = $bs->{machine_cpu_pct} // 0;
    my $others = $bs->{others_cpu_pct} // 0;
    my $verdict;
    if ($top && $ps{$top}{cpu_pct} >= 90 && ($ps{$top}{threads} // 1) <= 2) {
        $verdict = sprintf("%s saturates: %.0f%% of a core (%.1f us per gift)",
            $top, $ps{$top}{cpu_pct}, $ps{$top}{us_per_gift});
    } elsif ($mpct >= 90 * $cpus) {
        $verdict = sprintf("the machine is CPU-bound (%.0f%% of %d cores busy; the stack %.0f%%, "
            . "%.1f us of CPU per gift); largest share: %s %.0f%% (%.1f us per gift)",
            $mpct, $cpus, $stack_pct, $us, $top, $ps{$top}{cpu_pct}, $ps{$top}{us_per_gift});
    } elsif ($top) {
        $verdict = sprintf("no process and not the machine is saturated (machine %.0f%% of %d cores); "
            . "largest share: %s %.0f%%: latency, not CPU, limits (queues, batching or windows)",
            $mpct, $cpus, $top, $ps{$top}{cpu_pct});
    }
    $verdict .= sprintf("; other programs on the machine took %.0f%% meanwhile", $others)
        if $verdict && $others >= 20;
    # capacity: CPU per gift at the saturated run (closed loop, the most
    # batching), what it allows on these cores if nothing else ran
    my %cap;
    if (my $sp = summary($run{saturate})->{processes}) {
        my $st = 0; $st += $sp->{$_}{us_per_gift} for grep { $_ ne "giftbench" } keys %$sp;
        my $gb = $sp->{giftbench}{us_per_gift} // 0;
        %cap = (from => "saturate",
            stack_us_per_gift => 0 + sprintf("%.1f", $st),
            giftbench_us_per_gift => 0 + sprintf("%.1f", $gb),
            projected_max_per_s => $st + $gb > 0 ? 0 + sprintf("%.0f", $cpus * 1e6 / ($st + $gb)) : undef,
            projected_max_without_client_per_s => $st > 0 ? 0 + sprintf("%.0f", $cpus * 1e6 / $st) : undef,
            us_per_gift_budget_at_20000 => 0 + sprintf("%.1f", $cpus * 1e6 / 20000),
            by_process => { map { $_ => $sp->{$_}{us_per_gift} } keys %$sp });
    }
    my $ref = summary($run{reference}, $ref_rate);
    my $ceil = summary($run{ceiling});
    my $sat_s = summary($run{saturate});
    my $tb = rd($tbsim);
    my %doc = (
        bench => "e2e", date => scalar(gmtime) . " UTC", cpus => $cpus,
        seconds => 0 + $secs, nginx_workers => 2,
        settings => { sse_clients => $run{reference}{sse_clients},
            conns => $run{reference}{conns}, threads => $run{reference}{threads},
            signed => $run{reference}{signed}, tbsim_latency_ms => 0,
            thingsboard => $tbmode eq "standin"
                ? "stand-in (tools/tbstandin: rule chain, 1 ms per queue hop; motors as MQTT sessions, answering at once)"
                : "tbsim on mosquitto (0 ms)",
            p99_bound_ms => 0 + $bound, steps => $rates,
            gifts => "Heart:2,Rose:1,Motor:10,Lion:5 over motor_01..04" },
        ceiling => $ceil,
        reference => { rate => 0 + $ref_rate, %$ref },
        saturate => $sat_s,
        ramp => \@ramp,
        max_sustained_rate => 0 + $max_ok,
        capacity => \%cap,
        not_sustained_at => 0 + $failed_at,
        bottleneck => { at => $bn_src, verdict => $verdict,
            by_cpu => [ map { { process => $_, %{$ps{$_}} } } @by ],
            stack_cpu_pct => 0 + sprintf("%.1f", $stack_pct),
            stack_us_per_gift => 0 + sprintf("%.1f", $us),
            projected_max_per_s => $us > 0 ? 0 + sprintf("%.0f", $cpus * 1e6 / $us) : undef,
            machine_cpu_pct => $mpct, others_cpu_pct => $others,
            giftbench => $ps{giftbench} },
        motors => { rounds => 0 + $tb_rounds, expected => 0 + $expected,
            equal => $tb_ok ? JSON::PP::true : JSON::PP::false,
            totals => $tb->{totals}, devices => $tb->{devices} },
        acknowledgements => { accepted => 0 + $accepted_all,
            stored_in_gift_acks => 0 + $acks_stored,
            never_acknowledged => $accepted_all > $acks_stored ? $accepted_all - $acks_stored : 0,
            late_counted_as_lost => 0 + eval { my $t = 0; $t += ($_->{lost} // 0)
                for map { $run{$_} } grep { $_ ne "ceiling" } keys %run; $t } },
        nginx_alerts => 0 + $alerts,
        giftbench_self_check => $self,
        aims => {
            rate => { aim => 20000, measured => 0 + $max_ok,
                met => $max_ok >= 20000 ? JSON::PP::true : JSON::PP::false },
            p99_at_500_ms => { aim => 3, measured => $ref->{latency_ms}{p99},
                met => ($ref->{latency_ms}{p99} // 1e9) < 3 ? JSON::PP::true : JSON::PP::false },
            lost => { aim => 0,
                measured => $accepted_all > $acks_stored ? $accepted_all - $acks_stored : 0,
                met => $acks_stored >= $accepted_all ? JSON::PP::true : JSON::PP::false,
                note => "accepted gifts without a GiftAck in GIFT_ACKS at the end; "
                    . "a run counts as lost what was not acknowledged at its SSE "
                    . "clients within its grace period (overloaded steps)" },
        },
    );
    my $ok = $tb_ok && !$alerts && !$ref->{lost} && $ref->{ok}
        && $acks_stored >= $accepted_all;
    $doc{ok} = $ok ? JSON::PP::true : JSON::PP::false;
    open(my $o, ">", $out) or die "$out: $!";
    print $o JSON::PP->new->canonical->pretty->encode(\%doc);
    close $o;

    printf "\n%-22s %9s %9s %8s %8s %8s %6s %6s\n", "run", "offered", "accepted/s",
        "p50 ms", "p99 ms", "max ms", "lost", "ok";
    my $line = sub {
        my ($n, $r, $s) = @_;
        printf "%-22s %9s %9.0f %8.2f %8.2f %8.2f %6d %6s\n", $n, $r,
            $s->{accepted_per_s}, $s->{latency_ms}{p50}, $s->{latency_ms}{p99},
            $s->{latency_ms}{max}, $s->{lost},
            exists $s->{sustained} ? ($s->{sustained} ? "yes" : "NO") : "-";
    };
    $line->("ceiling (echo)", "max", $ceil);
    $line->("reference", $ref_rate, $ref);
    $line->("saturate", "max", $sat_s);
    $line->("ramp", $_->{rate}, $_) for @ramp;
    printf "\nmax sustained %d gifts/s (aim 20000: %s); p99 at %d/s %.2f ms (aim < 3: %s)\n",
        $max_ok, $max_ok >= 20000 ? "met" : "MISSED", $ref_rate,
        $ref->{latency_ms}{p99}, $ref->{latency_ms}{p99} < 3 ? "met" : "MISSED";
    printf "bottleneck (%s): %s\n", $bn_src, $verdict // "?";
    printf "CPU per gift when saturated: stack %.1f us + giftbench %.1f us -> at most ~%d gifts/s "
        . "on %d cores (20,000/s allows %.0f us)\n", $cap{stack_us_per_gift},
        $cap{giftbench_us_per_gift}, $cap{projected_max_per_s} // 0, $cpus,
        $cap{us_per_gift_budget_at_20000} if %cap;
    printf "motors: %d rounds, %d expected: %s\n", $tb_rounds, $expected,
        $tb_ok ? "equal" : "MISMATCH";
    printf "GIFT_ACKS: %d acknowledgements for %d accepted gifts: %s\n", $acks_stored,
        $accepted_all, $acks_stored >= $accepted_all ? "none missing"
        : ($accepted_all - $acks_stored) . " MISSING";
    exit($ok ? 0 : 1);
' "$WORK/runs" "$OUT/e2e.json" "$(( $(date +%s) - T_START ))" "$SAT" "$MAX_OK" \
    "$FAILED_AT" "$REF_RATE" "$P99_BOUND_MS" "$TB_OK" "${TB_ROUNDS:-0}" \
    "$EXPECTED" "$WORK/tbsim-final.json" "$NGINX_ALERTS" "$RATES" "$SELF" "$ACCEPTED_ALL" "${ACKS_STORED:-0}" "$TB" || rc=$?
say "wrote $OUT/e2e.json ($(( $(date +%s) - T_START )) s)"
exit $rc
