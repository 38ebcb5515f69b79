#!/usr/bin/env bash
# The dispatcher benchmark (issue 6): GIFTS pre-filled with N gifts over 8
# devices, then gift-dispatcher started against ThingsBoard: the stand-in
# (tools/tbstandin: the MQTT endpoint and the rule chain, 1 ms per queue
# hop, and 8 motors as MQTT sessions answering at once; GIFT_TB=tbsim:
# tbsim on mosquitto, 0 ms latency, as before): gifts
# per second from the stream to their GiftAcks, with coalescing (the
# defaults: 64 gifts per RPC) and without (coalesce_max_events = 1), and
# with coalescing but nats.done_markers = false (no GIFT_DONE write per
# gift), next to two ceilings measured in the same run on the same servers:
#   - JetStream pull-and-ack: a plain consumer fetching 256 at a time and
#     acking each (what the dispatcher's NATS side could do at best);
#   - Mosquitto round trips: RPCs of the dispatcher's shape answered by
#     tbsim, 8 in flight (one per device, as without coalescing) and 64.
# Then the coalescing run again through the other one (tbsim on mosquitto,
# or with GIFT_TB=tbsim the stand-in; GIFT_BENCH_STANDIN=0 skips it).
# It checks that the motors turned exactly the expected rounds, and
# reports the daemon's RSS (peak and at the end).
#
# Loopback only, free ports, its own nats-server, mosquitto, tbsim and the
# stand-in in a
# temporary directory; it stops what it started, by PID.  Writes
# $GIFT_BENCH_OUT/dispatcher.json and prints a table.
#
# Environment: GIFT_BENCH_GIFTS (200000), GIFT_BENCH_RTT (20000 RPCs per
# window), GIFT_BENCH_OUT (build/bench), GIFT_BENCH_KEEP=1 keeps the
# temporary directory.  Client and servers share the machine's cores:
# quote ratios, and re-measure before comparing with another machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

N=${GIFT_BENCH_GIFTS:-200000}
RTT_N=${GIFT_BENCH_RTT:-20000}
OUT=${GIFT_BENCH_OUT:-$ROOT/build/bench}
BIN=${GIFT_BIN_DIR:-$ROOT/build}
HAVE_STANDIN=0
command -v node >/dev/null && [[ -d $ROOT/tools/tbstandin/node_modules/aedes ]] && HAVE_STANDIN=1
TB=standin OTHER=tbsim
[[ ${GIFT_TB:-} == tbsim ]] && TB=tbsim OTHER=standin
if [[ $TB == standin && $HAVE_STANDIN == 0 ]]; then
    echo "dispatcher bench: the ThingsBoard stand-in needs node and tools/tbstandin/node_modules (run 'make deps'); GIFT_TB=tbsim uses tbsim" >&2
    exit 1
fi
for f in gift-dispatcher tbsim dispbench; do
    [[ -x $BIN/$f ]] || { echo "dispatcher bench: $BIN/$f missing; run 'make build'" >&2; exit 1; }
done
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
MOSQ=$(command -v mosquitto || echo /usr/sbin/mosquitto)
for b in "$NATS" "$MOSQ"; do
    [[ -x $b ]] || { echo "dispatcher bench: $b not found; run 'make deps'" >&2; exit 1; }
done

mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/dispatcher.XXXXXX")

free_port() {
    perl -MIO::Socket::INET -e '
        for (1 .. 500) {
            my $p = 20000 + int(rand(12000));
            next if grep { $_ == $p } @ARGV;
            my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1",
                LocalPort => $p, Listen => 1, ReuseAddr => 1) or next;
            print $p; exit 0;
        }
        exit 1' "$@"
}
taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

PIDS=()
stop_pid() {    # pid [signal]: stop one process we started, wait for it
    local pid=$1
    kill -"${2:-TERM}" "$pid" 2>/dev/null || true
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do
        stop_pid "$p"
    done
    if [[ ${GIFT_BENCH_KEEP:-0} != 1 ]]; then
        rm -rf "$WORK"
    else
        echo "dispatcher bench: kept $WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {  # port, name, pid, log
    for _ in $(seq 100); do
        taken "$1" && return 0
        kill -0 "$3" 2>/dev/null ||
            { echo "dispatcher bench: $2 exited:" >&2; tail -20 "$4" >&2; exit 1; }
        sleep 0.1
    done
    echo "dispatcher bench: $2 did not open port $1" >&2; exit 1
}
forget() {      # pid: no longer ours to stop
    local p keep=()
    for p in "${PIDS[@]}"; do
        if [[ $p != "$1" ]]; then
            keep+=("$p")
        fi
    done
    PIDS=("${keep[@]}")
}

MQTT_PORT=$(free_port)
cat >"$WORK/mosquitto.conf" <<EOC
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
persistence false
max_queued_messages 0
log_dest stderr
log_type error
log_type warning
EOC
"$MOSQ" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
MOSQ_PID=$!
PIDS+=("$MOSQ_PID")
wait_port "$MQTT_PORT" mosquitto "$MOSQ_PID" "$WORK/mosquitto.log"

start_tbsim() {  # name
    "$BIN/tbsim" --host 127.0.0.1 --port "$MQTT_PORT" --out "$WORK/$1.json" \
        --seed 1 --window 262144 >"$WORK/$1.log" 2>&1 &
    TB_PID=$!
    PIDS+=("$TB_PID")
    for _ in $(seq 100); do
        grep -q serving "$WORK/$1.log" && return 0
        sleep 0.05
    done
    echo "dispatcher bench: tbsim did not connect" >&2; exit 1
}

# The ThingsBoard stand-in (tools/tbstandin) and its 8 motors, on their own
# port: sets SB_PORT, SB_PID (endpoint), TB_PID (motors).
start_standin() {  # name
    SB_PORT=$(free_port "$MQTT_PORT")
    node "$ROOT/tools/tbstandin/tb.mjs" --host 127.0.0.1 --port "$SB_PORT" \
        --motors 8 --dispatchers 1 --out "$WORK/$1-tb.json" >"$WORK/$1-tb.log" 2>&1 &
    SB_PID=$!
    PIDS+=("$SB_PID")
    wait_port "$SB_PORT" gift-tbstandin "$SB_PID" "$WORK/$1-tb.log"
    node "$ROOT/tools/tbstandin/motors.mjs" --host 127.0.0.1 --port "$SB_PORT" \
        --motors 8 --window 262144 --out "$WORK/$1.json" >"$WORK/$1.log" 2>&1 &
    TB_PID=$!
    PIDS+=("$TB_PID")
    for _ in $(seq 200); do
        grep -q serving "$WORK/$1.log" && return 0
        sleep 0.05
    done
    echo "dispatcher bench: gift-motors did not connect" >&2; exit 1
}

# One run: a fresh nats-server, N gifts stored, then the dispatcher.
# Sets RUN_* variables.
run() {  # name coalesce_max_events ceiling(0|1) done_markers(true|false) [standin]
    local name=$1 events=$2 ceiling=$3 markers=${4:-true} tb=${5:-tbsim}
    local port url fill line mqtt_conf
    port=$(free_port "$MQTT_PORT")
    url=nats://127.0.0.1:$port
    mkdir -p "$WORK/nats-$name"
    "$NATS" -js -a 127.0.0.1 -p "$port" -sd "$WORK/nats-$name" \
        >"$WORK/nats-$name.log" 2>&1 &
    NATS_PID=$!
    PIDS+=("$NATS_PID")
    wait_port "$port" nats-server "$NATS_PID" "$WORK/nats-$name.log"
    "$BIN/dispbench" -s "$url" setup --max-ack-pending 20000
    fill=$("$BIN/dispbench" -s "$url" fill --count "$N" --devices 8 --tag "$name")
    echo "  $name: $fill"
    RUN_FILL=$(sed -E 's/.*\(([0-9]+)\/s\).*/\1/' <<<"$fill")
    RUN_WANT=$(sed -E 's/.*rounds: //' <<<"$fill")
    if [[ $ceiling == 1 ]]; then
        line=$("$BIN/dispbench" -s "$url" pull --count "$N")
        echo "  JetStream pull-and-ack ceiling: $line"
        PULL_RATE=$(sed -E 's/.*\(([0-9]+)\/s\).*/\1/' <<<"$line")
    fi

    if [[ $tb == standin ]]; then
        start_standin "tbsim-$name"
        mqtt_conf="port = $SB_PORT; access_token = \"gift-dispatcher-1\";"
    else
        start_tbsim "tbsim-$name"
        mqtt_conf="port = $MQTT_PORT;"
    fi
    cat >"$WORK/$name.conf" <<EOC
log_level = "warning";
nats = { url = "$url"; max_inflight = 8000; fetch_batch = 256; done_markers = $markers; };
mqtt = { host = "127.0.0.1"; $mqtt_conf };
devices = { max_inflight = 1; coalesce_max_events = $events;
            coalesce_max_rounds = 100000; rounds_per_minute = "unlimited"; };
metrics = { enabled = false; };
rules = {
    max_rounds = 100000;
    rule = (
$(for k in 1 2 3 4 5 6 7 8; do echo "        { gift = \"G$k\"; device = \"motor_0$k\"; },"; done | sed '$ s/,$//')
    );
};
EOC
    # the stand-in's queue hops make each RPC slower (without coalescing)
    "$BIN/dispbench" -s "$url" watch --count "$N" --timeout $([[ $tb == standin ]] && echo 600 || echo 150) \
        >"$WORK/watch-$name.out" &
    local watch_pid=$!
    PIDS+=("$watch_pid")
    "$BIN/gift-dispatcher" -c "$WORK/$name.conf" >"$WORK/dispatcher-$name.log" 2>&1 &
    DISP_PID=$!
    PIDS+=("$DISP_PID")
    local hwm=0 rss=0 l
    while kill -0 "$watch_pid" 2>/dev/null; do
        l=$(awk '/VmHWM/ {print $2}' "/proc/$DISP_PID/status" 2>/dev/null || echo 0)
        [[ -n $l ]] && hwm=$l
        sleep 0.2
    done
    wait "$watch_pid" || { echo "dispatcher bench: $name: $(cat "$WORK/watch-$name.out")" >&2; exit 1; }
    forget "$watch_pid"
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$DISP_PID/status")
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$DISP_PID/status")
    line=$(cat "$WORK/watch-$name.out")
    RUN_RATE=$(awk '{ for (i = 1; i <= NF; i++) if ($i == "all") { print int('"$N"' / $(i + 1)); exit } }' <<<"$line")
    RUN_STEADY=$(sed -E 's/.*steady ([0-9]+)\/s.*/\1/' <<<"$line")
    RUN_SECS=$(sed -E 's/.*all ([0-9.]+) s.*/\1/' <<<"$line")
    RUN_RSS=$rss
    RUN_HWM=$hwm
    stop_pid "$DISP_PID"
    forget "$DISP_PID"
    kill -USR1 "$TB_PID"
    sleep 0.3
    stop_pid "$TB_PID"
    forget "$TB_PID"
    # the motors turned exactly what was stored
    RUN_RPCS=$(perl -MJSON::PP -e '
        my $t = decode_json(do { local $/; open my $f, "<", $ARGV[0] or die; <$f> });
        my %want = map { split /=/ } split " ", $ARGV[1];
        for (keys %want) {
            my $got = $t->{devices}{$_}{rounds} // 0;
            die "$_: $got rounds, expected $want{$_}\n" if $got != $want{$_};
        }
        die "duplicates: $t->{totals}{duplicates}\n" if $t->{totals}{duplicates};
        print $t->{totals}{rpcs};' "$WORK/tbsim-$name.json" "$RUN_WANT") ||
        { echo "dispatcher bench: $name: the motors' totals are wrong" >&2; exit 1; }
    echo "  $name: $N gifts in $RUN_SECS s from start = $RUN_RATE/s (steady $RUN_STEADY/s), $RUN_RPCS RPCs, RSS $((RUN_RSS / 1024)) MiB (peak $((RUN_HWM / 1024)) MiB)"
    if [[ $tb == standin ]]; then
        stop_pid "$SB_PID"
        forget "$SB_PID"
    fi
    stop_pid "$NATS_PID"
    forget "$NATS_PID"
    rm -rf "$WORK/nats-$name"
}

if [[ $TB == standin ]]; then
    echo "== dispatcher: $N gifts over 8 devices, the ThingsBoard stand-in (1 ms per queue hop), motors 0 ms"
else
    echo "== dispatcher: $N gifts over 8 devices, tbsim 0 ms"
fi
run coalesce 64 1 true "$TB"
C_RATE=$RUN_RATE C_STEADY=$RUN_STEADY C_SECS=$RUN_SECS C_RPCS=$RUN_RPCS
C_RSS=$RUN_RSS C_HWM=$RUN_HWM FILL=$RUN_FILL
run single 1 0 true "$TB"
S_RATE=$RUN_RATE S_STEADY=$RUN_STEADY S_SECS=$RUN_SECS S_RPCS=$RUN_RPCS
S_RSS=$RUN_RSS S_HWM=$RUN_HWM
run nomarkers 64 0 false "$TB"
P_RATE=$RUN_RATE P_STEADY=$RUN_STEADY P_SECS=$RUN_SECS P_RPCS=$RUN_RPCS
P_RSS=$RUN_RSS P_HWM=$RUN_HWM

# The coalescing run through the other one: the ThingsBoard stand-in
# (aedes, the rule chain, a 1 ms queue delay per hop, motors as MQTT
# sessions of their own) against tbsim answering on mosquitto: what
# ThingsBoard's routing costs in time per command, which coalescing absorbs.
# SB_*: through the stand-in, TS_*: through tbsim (0: not run).
SB_RATE=0 SB_STEADY=0 SB_SECS=0 SB_RPCS=0 SB_RSS=0 SB_HWM=0
TS_RATE=0 TS_STEADY=0 TS_SECS=0 TS_RPCS=0 TS_RSS=0 TS_HWM=0
if [[ $TB == standin ]]; then
    SB_RATE=$C_RATE SB_STEADY=$C_STEADY SB_SECS=$C_SECS SB_RPCS=$C_RPCS
    SB_RSS=$C_RSS SB_HWM=$C_HWM
else
    TS_RATE=$C_RATE TS_STEADY=$C_STEADY TS_SECS=$C_SECS TS_RPCS=$C_RPCS
    TS_RSS=$C_RSS TS_HWM=$C_HWM
fi
if [[ ${GIFT_BENCH_STANDIN:-1} == 1 && ( $OTHER == tbsim || $HAVE_STANDIN == 1 ) ]]; then
    run "$OTHER" 64 0 true "$OTHER"
    if [[ $OTHER == standin ]]; then
        SB_RATE=$RUN_RATE SB_STEADY=$RUN_STEADY SB_SECS=$RUN_SECS SB_RPCS=$RUN_RPCS
        SB_RSS=$RUN_RSS SB_HWM=$RUN_HWM
    else
        TS_RATE=$RUN_RATE TS_STEADY=$RUN_STEADY TS_SECS=$RUN_SECS TS_RPCS=$RUN_RPCS
        TS_RSS=$RUN_RSS TS_HWM=$RUN_HWM
    fi
fi

start_tbsim tbsim-rtt
RTT8=$("$BIN/dispbench" rtt --host 127.0.0.1 --port "$MQTT_PORT" --count "$RTT_N" --window 8)
RTT64=$("$BIN/dispbench" rtt --host 127.0.0.1 --port "$MQTT_PORT" --count "$RTT_N" --window 64)
echo "  Mosquitto round trips (tbsim answering), window 8: $RTT8"
echo "  Mosquitto round trips (tbsim answering), window 64: $RTT64"
rate_of() { sed -E 's/.*\(([0-9]+)\/s\).*/\1/' <<<"$1"; }
p50_of() { sed -E 's/.*p50 ([0-9]+) us.*/\1/' <<<"$1"; }
R8=$(rate_of "$RTT8") R64=$(rate_of "$RTT64")

perl -MJSON::PP -e '
    my %a = @ARGV;
    my $j = JSON::PP->new->canonical->pretty;
    my $out = {
        gifts => 0 + $a{n}, devices => 8, tbsim_latency_ms => 0,
        thingsboard => $a{tb} eq "standin"
            ? "stand-in (tools/tbstandin: rule chain, 1 ms per queue hop; motors as MQTT sessions, 0 ms)"
            : "tbsim on mosquitto (0 ms)",
        fill_per_s => 0 + $a{fill},
        coalescing => { coalesce_max_events => 64, gifts_per_s => 0 + $a{c_rate},
            steady_gifts_per_s => 0 + $a{c_steady}, seconds => 0 + $a{c_secs},
            rpcs => 0 + $a{c_rpcs}, gifts_per_rpc => sprintf("%.1f", $a{n} / $a{c_rpcs}) + 0,
            rss_kib => 0 + $a{c_rss}, peak_rss_kib => 0 + $a{c_hwm} },
        no_coalescing => { coalesce_max_events => 1, gifts_per_s => 0 + $a{s_rate},
            steady_gifts_per_s => 0 + $a{s_steady}, seconds => 0 + $a{s_secs},
            rpcs => 0 + $a{s_rpcs}, rss_kib => 0 + $a{s_rss}, peak_rss_kib => 0 + $a{s_hwm} },
        coalescing_without_done_markers => { coalesce_max_events => 64, done_markers => JSON::PP::false,
            gifts_per_s => 0 + $a{p_rate}, steady_gifts_per_s => 0 + $a{p_steady},
            seconds => 0 + $a{p_secs}, rpcs => 0 + $a{p_rpcs}, rss_kib => 0 + $a{p_rss},
            peak_rss_kib => 0 + $a{p_hwm} },
        coalescing_through_tbstandin => { coalesce_max_events => 64,
            gifts_per_s => 0 + $a{sb_rate}, steady_gifts_per_s => 0 + $a{sb_steady},
            seconds => 0 + $a{sb_secs}, rpcs => 0 + $a{sb_rpcs}, rss_kib => 0 + $a{sb_rss},
            peak_rss_kib => 0 + $a{sb_hwm},
            note => "the ThingsBoard stand-in (rule chain, 1 ms per queue hop) and motors as MQTT sessions; 0: not run" },
        coalescing_through_tbsim => { coalesce_max_events => 64,
            gifts_per_s => 0 + $a{ts_rate}, steady_gifts_per_s => 0 + $a{ts_steady},
            seconds => 0 + $a{ts_secs}, rpcs => 0 + $a{ts_rpcs}, rss_kib => 0 + $a{ts_rss},
            peak_rss_kib => 0 + $a{ts_hwm},
            note => "tbsim answering on mosquitto (0 ms); 0: not run" },
        ceilings => {
            jetstream_pull_ack_per_s => 0 + $a{pull},
            mosquitto_rtt_window8_per_s => 0 + $a{r8},
            mosquitto_rtt_window8_p50_us => 0 + $a{p8},
            mosquitto_rtt_window64_per_s => 0 + $a{r64},
            mosquitto_rtt_window64_p50_us => 0 + $a{p64} },
        aim_gifts_per_s => 30000,
        note => "gifts/s: N / (dispatcher start -> N-th GiftAck stored); steady: first to last GiftAck. Everything on the same cores.",
    };
    open(my $f, ">", $a{file}) or die;
    print $f $j->encode($out);
    printf "\n%-44s %12s %8s %10s\n", "dispatcher ($a{n} gifts, 8 devices, " . ($a{tb} eq "standin" ? "stand-in" : "tbsim") . ")", "gifts/s", "RPCs", "RSS MiB";
    printf "%-44s %12d %8d %10.1f\n", "with coalescing (64 per RPC)", $a{c_rate}, $a{c_rpcs}, $a{c_hwm} / 1024;
    printf "%-44s %12d %8d %10.1f\n", "without coalescing (1 per RPC)", $a{s_rate}, $a{s_rpcs}, $a{s_hwm} / 1024;
    printf "%-44s %12d %8d %10.1f\n", "coalescing, done_markers = false (probe)", $a{p_rate}, $a{p_rpcs}, $a{p_hwm} / 1024;
    printf "%-44s %12d %8d %10.1f\n", "coalescing, through the ThingsBoard stand-in", $a{sb_rate}, $a{sb_rpcs}, $a{sb_hwm} / 1024;
    printf "%-44s %12d %8d %10.1f\n", "coalescing, through tbsim on mosquitto", $a{ts_rate}, $a{ts_rpcs}, $a{ts_hwm} / 1024;
    printf "%-44s %12d\n", "ceiling: JetStream pull + ack", $a{pull};
    printf "%-44s %12d   (p50 %d us)\n", "ceiling: Mosquitto RPC round trips, window 8", $a{r8}, $a{p8};
    printf "%-44s %12d   (p50 %d us)\n", "ceiling: Mosquitto RPC round trips, window 64", $a{r64}, $a{p64};
    printf "aim with coalescing, 30000 gifts/s: %s with GIFT_DONE markers (the default), %s without\n",
        $a{c_rate} >= 30000 ? "met" : "not met", $a{p_rate} >= 30000 ? "met" : "not met";
' n "$N" fill "$FILL" c_rate "$C_RATE" c_steady "$C_STEADY" c_secs "$C_SECS" \
  c_rpcs "$C_RPCS" c_rss "$C_RSS" c_hwm "$C_HWM" s_rate "$S_RATE" \
  s_steady "$S_STEADY" s_secs "$S_SECS" s_rpcs "$S_RPCS" s_rss "$S_RSS" \
  s_hwm "$S_HWM" p_rate "$P_RATE" p_steady "$P_STEADY" p_secs "$P_SECS" \
  p_rpcs "$P_RPCS" p_rss "$P_RSS" p_hwm "$P_HWM" sb_rate "$SB_RATE" \
  sb_steady "$SB_STEADY" sb_secs "$SB_SECS" sb_rpcs "$SB_RPCS" sb_rss "$SB_RSS" \
  sb_hwm "$SB_HWM" ts_rate "$TS_RATE" ts_steady "$TS_STEADY" ts_secs "$TS_SECS" \
  ts_rpcs "$TS_RPCS" ts_rss "$TS_RSS" ts_hwm "$TS_HWM" tb "$TB" pull "$PULL_RATE" r8 "$R8" p8 "$(p50_of "$RTT8")" \
  r64 "$R64" p64 "$(p50_of "$RTT64")" file "$OUT/dispatcher.json"
echo "dispatcher bench: $OUT/dispatcher.json"
