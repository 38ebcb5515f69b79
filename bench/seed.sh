#!/usr/bin/env bash
# The seed-stack comparison (issue 18): this project against the stack the
# user's design notes recommend, side by side in one run, driven by the same
# client with the same gifts.
#
#   bench/seed.sh            (make bench; GIFT_BENCHES=seed selects it alone)
#
# Stacks, one after the other on free loopback ports under build/bench/seed
# (each stopped, by PID, before the next starts):
#   seed   bench/seed/: Fastify API (POST /gift -> BullMQ queue on
#          redis-server; GET /gift/events: SSE of the acknowledgements from
#          BullMQ's QueueEvents), a Node BullMQ worker (rounds = diamond x
#          quantity; MQTT RPC through mosquitto; waits for the answer), a
#          device simulator (mqtt.js, 4 motors)
#   run    `make run`'s configuration: scripts/run.sh itself with
#          GIFT_RUN_DIR and free GIFT_*_PORT ports (nginx.conf.example, the
#          dispatcher's example configuration, the ThingsBoard stand-in and
#          its motors)
#   tuned  bench/e2e.sh's setup: nginx (2 workers, keepalive_requests),
#          nats-server, mosquitto, tbsim (0 ms), the dispatcher
# and, first, giftbench's own ceiling against `giftbench echo`.  For each
# stack, with build/giftbench, one SSE client and 64 connections, the
# realistic mix (15 gift names, 1 to 29,999 diamonds, cycled):
#   warmup     200 gifts/s for 2 s (not reported)
#   reference  500 gifts/s (open loop) for GIFT_SEED_REF_SECONDS: latency
#              webhook -> SSE p50/p99, CPU per gift
#   saturate   closed loop on the acknowledgements for GIFT_SEED_SAT_SECONDS:
#              at most GIFT_SEED_WINDOW gifts sent and not yet acknowledged
#              (giftbench --max-unacked), so that the rate is what the whole
#              pipeline keeps up with, not how fast it answers 202s while a
#              backlog grows behind them; acknowledged gifts/s, CPU per gift
#   ramp       (GIFT_SEED_RAMP_STACKS: run, tuned) open-loop steps of
#              GIFT_SEED_STEP gifts/s for GIFT_SEED_STEP_SECONDS each, from
#              about half the saturated rate upward, stopped at the first
#              step not sustained, then one bisection: the maximum sustained
#              rate, decided as bench/e2e.sh decides it (bench/lib.sh:
#              accepted >= 95% of the rate, nothing lost or duplicated, every
#              answer a 202, p99 <= 100 ms)
# CPU per gift per process comes from /proc (giftbench --pids), grouped:
#   product    seed: api, worker, redis; ours: nginx master and workers,
#              nats-server, dispatcher
#   stand-ins  seed: device simulator, mosquitto; ours: the ThingsBoard
#              stand-in and its motors (run), mosquitto and tbsim (tuned)
#   client     giftbench
# Checks: no gift lost or acknowledged twice, every answer a 202, and the
# devices turned exactly the rounds the acknowledgements announced (seed:
# the device simulator's count; run: the stand-in's motors; tuned: tbsim);
# for run and tuned, every accepted gift of every run has its GiftAck in
# GIFT_ACKS in the end (giftctl info, waited for up to GIFT_SEED_DRAIN_SECONDS):
# a gift giftbench counted lost that is there was late, not lost.
# Writes build/bench/seed.json and build/bench/seed.md (a markdown table).
#
# Environment: GIFT_SEED_STACKS ("seed run tuned"), GIFT_SEED_REF_RATE
# (500), GIFT_SEED_REF_SECONDS (10), GIFT_SEED_SAT_SECONDS (5),
# GIFT_SEED_WINDOW (256; 0: the closed loop on 202s of before),
# GIFT_SEED_RAMP_STACKS ("run tuned"; "" for none), GIFT_SEED_STEP (1000
# below 6,000 gifts/s saturated, else 2000), GIFT_SEED_STEP_SECONDS (5),
# GIFT_SEED_DRAIN_SECONDS (60),
# GIFT_SEED_CONNS (64), GIFT_SEED_SSE (1), GIFT_SEED_MIX (the --gift list),
# GIFT_SEED_WORKER_CONCURRENCY (64), GIFT_SEED_REDIS_AOF (1: appendonly yes,
# appendfsync everysec, as BullMQ's production notes advise; 0: no
# persistence), GIFT_SEED_MQTT_NODELAY (1: TCP_NODELAY on the seed's mqtt.js
# sockets, which leave Nagle on by default; 0: as mqtt.js leaves them),
# GIFT_NATS_GOMAXPROCS (1, as make run; "" for Go's default: one thread per
# core) for the nats-server of run and tuned, GIFT_RUN_SCHED (batch, as
# make run: SCHED_BATCH for every stack's product processes, the seed's
# api, worker and redis-server as well as nginx, nats-server and the
# dispatcher of run and tuned; "" for the system's default; stand-ins and
# client keep the default), GIFT_BENCH_OUT (build/bench), GIFT_BENCH_KEEP=1 keeps the
# work directory.  Loopback only; bounded (about 4 minutes with the
# defaults); every process it starts is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

STACKS=${GIFT_SEED_STACKS:-seed run tuned}
NATS_ENV=()
[[ -z ${GIFT_NATS_GOMAXPROCS-1} ]] || NATS_ENV=(env "GOMAXPROCS=${GIFT_NATS_GOMAXPROCS-1}")
# the product processes' scheduling policy, the same for every stack
# (scripts/run.sh sets run's from the same variable)
SCHED=()
case ${GIFT_RUN_SCHED-batch} in
    batch) SCHED=(chrt --batch 0)
           chrt --batch 0 true 2>/dev/null || SCHED=() ;;   # as make run
    "") ;;
    *) echo "seed: GIFT_RUN_SCHED=$GIFT_RUN_SCHED: batch or empty" >&2; exit 1 ;;
esac
REF_RATE=${GIFT_SEED_REF_RATE:-500}
REF_SECS=${GIFT_SEED_REF_SECONDS:-10}
SAT_SECS=${GIFT_SEED_SAT_SECONDS:-5}
WINDOW=${GIFT_SEED_WINDOW:-256}
RAMP_STACKS=${GIFT_SEED_RAMP_STACKS-run tuned}
STEP=${GIFT_SEED_STEP:-}
STEP_SECS=${GIFT_SEED_STEP_SECONDS:-5}
DRAIN_SECS=${GIFT_SEED_DRAIN_SECONDS:-60}
CONNS=${GIFT_SEED_CONNS:-64}
SSE=${GIFT_SEED_SSE:-1}
CONCURRENCY=${GIFT_SEED_WORKER_CONCURRENCY:-64}
REDIS_AOF=${GIFT_SEED_REDIS_AOF:-1}
NODELAY=${GIFT_SEED_MQTT_NODELAY:-1}
# TikTok-like gift names and diamond values, 1 to 29,999 (cycled evenly)
MIX=${GIFT_SEED_MIX:-Rose:1,TikTok:1,FingerHeart:5,Perfume:20,Doughnut:30,HandHearts:100,Corgi:299,MoneyGun:500,Galaxy:1000,WhaleDiving:2150,DramaQueen:5000,Interstellar:10000,Falcon:10999,RosaNebula:15000,Lion:29999}
OUT=${GIFT_BENCH_OUT:-$ROOT/build/bench}
WORK=$OUT/seed
B=$ROOT/build
T_START=$(date +%s)

say() { echo "seed: $*" >&2; }
. "$ROOT/bench/lib.sh"

# ---------------------------------------------------------------- what we need
need=()
for f in ngx_http_gift_module.so giftctl gift-dispatcher tbsim giftbench; do
    [[ -e $B/$f ]] || need+=("build/$f")
done
if (( ${#need[@]} )); then
    make -s "${need[@]}" >&2 || { say "build failed"; exit 1; }
fi
for b in nats-server nginx mosquitto redis-server node npm; do
    command -v "$b" >/dev/null || [[ -x /usr/sbin/$b || -x /usr/bin/$b ]] ||
        { say "$b not found; run 'make deps'"; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
REDIS=$(command -v redis-server || echo /usr/bin/redis-server)
SEED=$ROOT/bench/seed
if [[ " $STACKS " == *" seed "* ]]; then
    if [[ ! -f $SEED/node_modules/.package-lock.json ||
          $SEED/package-lock.json -nt $SEED/node_modules/.package-lock.json ]]; then
        say "npm ci in bench/seed"
        (cd "$SEED" && npm ci --no-audit --no-fund >&2) || { say "npm ci failed"; exit 1; }
    fi
fi
if [[ " $STACKS " == *" run "* && ! -d tools/tbstandin/node_modules/aedes ]]; then
    (cd tools/tbstandin && npm ci --no-audit --no-fund >&2) ||
        { say "npm ci in tools/tbstandin failed"; exit 1; }
fi

rm -rf "$WORK"
mkdir -p "$WORK/runs"

# started processes, stopped in reverse order, by PID
PIDS=()
stop_pid() {  # pid [signal]
    local pid=$1 sig=${2:-TERM}
    kill -"$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
# the processes of the current stack: PID and name, for --pids and stopping
STACK_PIDS=() STACK_SIG=()
stack_add() { STACK_PIDS+=("$1"); STACK_SIG+=("${2:-TERM}"); }
stop_stack() {
    local i
    for ((i = ${#STACK_PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${STACK_PIDS[i]}" "${STACK_SIG[i]}"
    done
    STACK_PIDS=() STACK_SIG=()
}
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    stop_stack
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
    [[ ${GIFT_BENCH_KEEP:-0} == 1 ]] || rm -rf "$WORK"/*/data "$WORK"/*/nats "$WORK"/*/tmp
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

GB=("$B/giftbench" -S "$SSE" -C "$CONNS" --gift "$MIX")
run_gb() {  # stack, tag, pids, giftbench arguments...
    local stack=$1 tag=$2 pids=$3 rc=0
    shift 3
    "${GB[@]}" -u "$URL" --label "$stack-$tag" --pids "$pids" "$@" \
        >"$WORK/runs/$stack-$tag.json" 2>"$WORK/runs/$stack-$tag.log" || rc=$?
    sed 's/^/  /' "$WORK/runs/$stack-$tag.log" >&2
    [[ -s $WORK/runs/$stack-$tag.json ]] || { say "$stack $tag: giftbench wrote nothing"; exit 1; }
}
# the runs of a stack: warm-up, reference, saturate (closed loop on the
# acknowledgements) and, for GIFT_SEED_RAMP_STACKS, the open-loop steps;
# then, given its NATS URL, the GiftAcks stored for every accepted gift, and
# the rounds its devices turned, by a command that prints the total
# (retried until equal or 10 s)
RAMP_DIR=$WORK/runs RAMP_ATTEMPTS=${GIFT_SEED_RAMP_ATTEMPTS:-1} RAMP_NARROW=1
ramp_run() {  # tag (stack-ramp-R-A), rate
    run_gb "$RAMP_STACK" "${1#"$RAMP_STACK"-}" "$RAMP_PIDS" -R "$2" -d "$STEP_SECS" \
        --grace 10 -q
}
drive() {  # stack, pids, rounds-command[, NATS URL]
    local stack=$1 pids=$2 nats=${4:-} expected late turned=0 sat rates
    local window_say="closed loop on 202s" runs
    (( WINDOW > 0 )) && window_say="closed loop, at most $WINDOW gifts unacknowledged"
    say "$stack: warm-up, 200 gifts/s for 2 s"
    run_gb "$stack" warmup "$pids" -R 200 -d 2 -q --grace 30
    say "$stack: reference, $REF_RATE gifts/s for ${REF_SECS}s"
    run_gb "$stack" reference "$pids" -R "$REF_RATE" -d "$REF_SECS" --grace 30 --reset-hwm
    say "$stack: saturate, $window_say, for ${SAT_SECS}s"
    run_gb "$stack" saturate "$pids" -d "$SAT_SECS" --grace 30 --max-unacked "$WINDOW"
    if [[ " $RAMP_STACKS " == *" $stack "* ]]; then
        sat=$(jget "$WORK/runs/$stack-saturate.json" 'int($d->{acked_per_s})')
        # from about half the saturated rate, STEP apart, at most 8 steps
        rates=$(perl -e 'my ($sat, $step) = @ARGV;
            $step ||= $sat < 6000 ? 1000 : 2000;
            my $r = int($sat / 2 / $step) * $step; $r = $step if $r < $step;
            print join " ", map { $r + $_ * $step } 0 .. 7' "$sat" "$STEP")
        say "$stack: ramp, ${STEP_SECS}s per step at $rates gifts/s (saturated: $sat/s), up to the first not sustained"
        RAMP_STACK=$stack RAMP_PIDS=$pids RAMP_TAG=$stack-ramp- RAMP_LOG=$WORK/runs/$stack-ramp.log
        : >"$RAMP_LOG"
        # shellcheck disable=SC2086
        ramp $rates
        say "$stack: maximum sustained rate $RAMP_MAX_OK gifts/s (not sustained: $RAMP_FAILED_AT)"
        echo "{\"max_sustained_rate\":$RAMP_MAX_OK,\"not_sustained_at\":$RAMP_FAILED_AT,\"steps\":\"$rates\"}" \
            >"$WORK/runs/$stack-ramp-result.json"
    fi
    runs=()
    for f in "$WORK/runs/$stack"-*.json; do
        [[ $f == *-rounds.json || $f == *-acks.json || $f == *-ramp-result.json ]] || runs+=("$f")
    done
    # every accepted gift has its GiftAck in GIFT_ACKS in the end: what a
    # run counted lost (no acknowledgement within its grace) was late
    if [[ -n $nats ]]; then
        local accepted stored=0 t0=$SECONDS
        accepted=$(perl -MJSON::PP -e 'my $t = 0; for my $f (@ARGV) { open my $h, "<", $f
            or next; local $/; $t += decode_json(<$h>)->{accepted} } print $t' "${runs[@]}")
        while :; do
            stored=$(gift_acks_stored "$nats")
            (( stored >= accepted || SECONDS - t0 >= DRAIN_SECS )) && break
            sleep 0.5
        done
        say "$stack: GIFT_ACKS holds $stored GiftAcks for $accepted accepted gifts" \
            "($(( SECONDS - t0 )) s after the last run)"
        echo "{\"accepted\":$accepted,\"stored\":$stored,\"waited_s\":$(( SECONDS - t0 ))}" \
            >"$WORK/runs/$stack-acks.json"
    fi
    # the rounds the acknowledgements announce (diamond x quantity x the
    # rule's multiplier: make run's configuration doubles Perfume); late
    # acknowledgements (counted lost by their run) announced none
    read -r expected late < <(perl -MJSON::PP -e 'my ($t, $l) = (0, 0); for my $f (@ARGV) {
        open my $h, "<", $f or next; local $/; my $d = decode_json(<$h>);
        $t += $d->{rounds}{acked}; $l += $d->{lost} } print "$t $l\n"' "${runs[@]}")
    for _ in $(seq 50); do
        turned=$($3 2>/dev/null || echo 0)
        [[ $turned == "$expected" ]] && break
        sleep 0.2
    done
    say "$stack: devices turned $turned rounds, $expected expected${late:+ ($late late acknowledgements)}"
    echo "{\"turned\":${turned:-0},\"expected\":$expected,\"late_acks\":${late:-0}}" \
        >"$WORK/runs/$stack-rounds.json"
}
# SIGUSR1, then the file's totals.rounds once its snapshot counter moved
usr1_rounds() {  # pid, file
    local before now
    before=$(jget "$2" '$d->{snapshot}' 2>/dev/null || echo 0)
    kill -USR1 "$1"
    for _ in $(seq 50); do
        now=$(jget "$2" '$d->{snapshot}' 2>/dev/null || echo 0)
        (( now > before )) && break
        sleep 0.05
    done
    jget "$2" '$d->{totals}{rounds}'
}

# ---------------------------------------------------------------- ceiling
free_port ECHO_PORT
"$B/giftbench" echo -l "127.0.0.1:$ECHO_PORT" -T 2 >"$WORK/echo.log" 2>&1 &
ECHO_PID=$!
stack_add "$ECHO_PID"
wait_port "$ECHO_PORT" "giftbench echo" "$ECHO_PID" "$WORK/echo.log"
URL=http://127.0.0.1:$ECHO_PORT
say "ceiling: giftbench vs giftbench echo, closed loop for ${SAT_SECS}s"
run_gb client ceiling "echo=$ECHO_PID" -d "$SAT_SECS"
stop_stack

# ---------------------------------------------------------------- seed
start_seed() {
    local d=$WORK/seedstack redis_port mqtt_port api_port aof
    mkdir -p "$d/data"
    free_port redis_port; free_port mqtt_port; free_port api_port
    aof=(--appendonly no)
    [[ $REDIS_AOF == 1 ]] && aof=(--appendonly yes --appendfsync everysec)
    # Debian's redis-server, its defaults but for the port, the directory,
    # no RDB snapshots, and BullMQ's required eviction policy
    "${SCHED[@]}" "$REDIS" --bind 127.0.0.1 --port "$redis_port" --dir "$d/data" \
        --save '' "${aof[@]}" --maxmemory-policy noeviction \
        --daemonize no --logfile "$d/redis.log" >/dev/null 2>&1 &
    REDIS_PID=$!
    stack_add "$REDIS_PID"
    wait_port "$redis_port" redis-server "$REDIS_PID" "$d/redis.log"
    mosquitto_conf "$d/mosquitto.conf" "$mqtt_port"
    "$MOSQ" -c "$d/mosquitto.conf" >"$d/mosquitto.log" 2>&1 &
    SMOSQ_PID=$!
    stack_add "$SMOSQ_PID"
    wait_port "$mqtt_port" mosquitto "$SMOSQ_PID" "$d/mosquitto.log"
    node "$SEED/device.mjs" --mqtt-port "$mqtt_port" --out "$d/device.json" \
        --nodelay "$NODELAY" >"$d/device.log" 2>&1 &
    DEV_PID=$!
    stack_add "$DEV_PID"
    wait_log "$d/device.log" serving 1 "seed device" "$DEV_PID"
    "${SCHED[@]}" node "$SEED/worker.mjs" --redis-port "$redis_port" --mqtt-port "$mqtt_port" \
        --concurrency "$CONCURRENCY" --nodelay "$NODELAY" >"$d/worker.log" 2>&1 &
    WORKER_PID=$!
    stack_add "$WORKER_PID"
    wait_log "$d/worker.log" running 1 "seed worker" "$WORKER_PID"
    "${SCHED[@]}" node "$SEED/api.mjs" --port "$api_port" --redis-port "$redis_port" \
        >"$d/api.log" 2>&1 &
    API_PID=$!
    stack_add "$API_PID"
    wait_log "$d/api.log" listening 1 "seed api" "$API_PID"
    URL=http://127.0.0.1:$api_port
    SEED_DIR=$d
}
if [[ " $STACKS " == *" seed "* ]]; then
    start_seed
    say "seed: Fastify $URL, BullMQ on redis-server (AOF $REDIS_AOF), worker" \
        "(concurrency $CONCURRENCY), mosquitto, device simulator"
    seed_rounds() { usr1_rounds "$DEV_PID" "$SEED_DIR/device.json"; }
    drive seed "api=$API_PID,worker=$WORKER_PID,redis=$REDIS_PID,device=$DEV_PID,mosquitto=$SMOSQ_PID" seed_rounds
    stop_stack
fi

# ---------------------------------------------------------------- run
# scripts/run.sh itself; its children found by their parent, each stopped
# by PID (run.sh first: it stops its own)
child_of() {  # parent, pattern of args: the first such child's PID
    ps -o pid=,args= --ppid "$1" | awk -v re="$2" '$0 ~ re { print $1; exit }'
}
if [[ " $STACKS " == *" run "* ]]; then
    d=$WORK/run
    mkdir -p "$d"
    free_port H; free_port N; free_port NH; free_port M; free_port MT
    GIFT_RUN_DIR=$d GIFT_HTTP_PORT=$H GIFT_NATS_PORT=$N GIFT_NATS_HTTP_PORT=$NH \
        GIFT_MQTT_PORT=$M GIFT_METRICS_PORT=$MT bash scripts/run.sh \
        >"$d/run.out" 2>&1 &
    RUNSH=$!
    stack_add "$RUNSH"          # at once: stopped even when it never came up
    wait_port "$H" "make run" "$RUNSH" "$d/run.out"
    wait_log "$d/logs/dispatcher.log" 'MQTT: listening|running:' 1 dispatcher "$RUNSH"
    NATS_PID=$(child_of "$RUNSH" nats-server) TB_PID=$(child_of "$RUNSH" 'tb[.]mjs')
    MOT_PID=$(child_of "$RUNSH" 'motors[.]mjs') DISP_PID=$(child_of "$RUNSH" gift-dispatcher)
    NGX_PID=$(child_of "$RUNSH" nginx)
    for _ in $(seq 50); do
        mapfile -t W < <(ps -o pid= --ppid "$NGX_PID" | tr -d ' ')
        (( ${#W[@]} > 0 )) && break
        sleep 0.1
    done
    # run.sh first (it stops its children); what it leaves is stopped here,
    # by PID (stop_stack goes from the last added to the first)
    STACK_PIDS=() STACK_SIG=()
    for p in "$NGX_PID" "$DISP_PID" "$MOT_PID" "$TB_PID" "$NATS_PID"; do
        [[ -n $p ]] && stack_add "$p"
    done
    stack_add "$RUNSH"
    pids="nginx-master=$NGX_PID,nats-server=$NATS_PID,dispatcher=$DISP_PID"
    for i in "${!W[@]}"; do pids+=",nginx-w$((i + 1))=${W[i]}"; done
    pids+=",tbstandin=$TB_PID,motors=$MOT_PID"
    URL=http://127.0.0.1:$H
    say "run: scripts/run.sh (nginx.conf.example, ${#W[@]} workers; the ThingsBoard stand-in) $URL"
    run_rounds() { usr1_rounds "$MOT_PID" "$d/motors.json"; }
    drive run "$pids" run_rounds "nats://127.0.0.1:$N"
    stop_stack
fi

# ---------------------------------------------------------------- tuned
# bench/e2e.sh's configuration (unsigned here, as the others)
if [[ " $STACKS " == *" tuned "* ]]; then
    d=$WORK/tuned
    mkdir -p "$d"/{nats,nginx/tmp}
    free_port N; free_port M; free_port H
    # as make run: GIFT_NATS_GOMAXPROCS (1; "" for Go's default)
    "${SCHED[@]}" "${NATS_ENV[@]}" "$NATS" -js -a 127.0.0.1 -p "$N" -sd "$d/nats" >"$d/nats.log" 2>&1 &
    NATS_PID=$!
    stack_add "$NATS_PID"
    wait_port "$N" nats-server "$NATS_PID" "$d/nats.log"
    "$B/giftctl" -s "nats://127.0.0.1:$N" setup >"$d/setup.log" 2>&1 ||
        { cat "$d/setup.log" >&2; exit 1; }
    mosquitto_conf "$d/mosquitto.conf" "$M"
    "$MOSQ" -c "$d/mosquitto.conf" >"$d/mosquitto.log" 2>&1 &
    TMOSQ_PID=$!
    stack_add "$TMOSQ_PID"
    wait_port "$M" mosquitto "$TMOSQ_PID" "$d/mosquitto.log"
    "$B/tbsim" --host 127.0.0.1 --port "$M" --out "$d/tbsim.json" \
        --latency-ms 0 --seed 1 >"$d/tbsim.log" 2>&1 &
    TBSIM_PID=$!
    stack_add "$TBSIM_PID"
    wait_log "$d/tbsim.log" serving 1 tbsim "$TBSIM_PID"
    cat >"$d/dispatcher.conf" <<CF
log_level = "info";
nats = { url = "nats://127.0.0.1:$N"; };
mqtt = { host = "127.0.0.1"; port = $M; };
# simulated motors, as in bench/e2e.sh and make run: without these, the
# defaults for real motors (6,000 rounds a minute, 1,000 a command) pace
# the realistic mix's 29,999-round gifts for minutes, and their GiftAcks
# with them
devices = { coalesce_max_rounds = 100000; rounds_per_minute = "unlimited"; };
rules = {
    max_rounds = 100000;
    default_device = "motor_01";
    rule = (
        { gift = "Rose";  device = "motor_02"; },
        { gift = "Galaxy"; device = "motor_03"; },
        { gift = "Lion";  device = "motor_04"; }
    );
};
CF
    "${SCHED[@]}" "$B/gift-dispatcher" -c "$d/dispatcher.conf" >"$d/dispatcher.log" 2>&1 &
    DISP_PID=$!
    stack_add "$DISP_PID"
    wait_log "$d/dispatcher.log" 'MQTT: listening' 1 gift-dispatcher "$DISP_PID"
    cat >"$d/nginx/nginx.conf" <<NG
load_module $B/ngx_http_gift_module.so;
worker_processes 2;
error_log $d/nginx/error.log notice;
pid $d/nginx/nginx.pid;
daemon off;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $d/nginx/tmp/body;
    proxy_temp_path $d/nginx/tmp/proxy;
    fastcgi_temp_path $d/nginx/tmp/fastcgi;
    uwsgi_temp_path $d/nginx/tmp/uwsgi;
    scgi_temp_path $d/nginx/tmp/scgi;
    keepalive_requests 100000000;
    gift_nats_url nats://127.0.0.1:$N;
    server {
        listen 127.0.0.1:$H backlog=4096;
        location = /gift { gift_webhook; client_body_buffer_size 64k; }
        location = /gift/events { gift_sse; }
    }
}
NG
    "${SCHED[@]}" "$NGINX" -p "$d/nginx/" -c "$d/nginx/nginx.conf" -e "$d/nginx/error.log" \
        >"$d/nginx/nginx.out" 2>&1 &
    NGX_PID=$!
    stack_add "$NGX_PID" QUIT
    wait_port "$H" nginx "$NGX_PID" "$d/nginx/nginx.out"
    wait_log "$d/nginx/error.log" 'following GIFT_ACKS' 2 nginx "$NGX_PID"
    mapfile -t W < <(pgrep -P "$NGX_PID" -f 'nginx: worker')
    pids="nginx-master=$NGX_PID,nats-server=$NATS_PID,dispatcher=$DISP_PID"
    for i in "${!W[@]}"; do pids+=",nginx-w$((i + 1))=${W[i]}"; done
    pids+=",mosquitto=$TMOSQ_PID,tbsim=$TBSIM_PID"
    URL=http://127.0.0.1:$H
    say "tuned: bench/e2e.sh's setup, $URL"
    tuned_rounds() { usr1_rounds "$TBSIM_PID" "$d/tbsim.json"; }
    drive tuned "$pids" tuned_rounds "nats://127.0.0.1:$N"
    stop_stack
fi

# ---------------------------------------------------------------- report
perl "$ROOT/bench/seed-report.pl" "$WORK/runs" "$OUT/seed.json" "$OUT/seed.md" \
    "$STACKS" "$REF_RATE" "$(( $(date +%s) - T_START ))" "$MIX" "$CONNS" "$SSE" \
    "$CONCURRENCY" "$REDIS_AOF" "$NODELAY" "$WINDOW" "$STEP_SECS" "$RAMP_STACKS" \
    "${GIFT_NATS_GOMAXPROCS-1}" "$( ((${#SCHED[@]})) && echo batch)"
