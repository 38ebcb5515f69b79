# Shared by bench/e2e.sh and bench/seed.sh (sourced, not run): ports,
# waiting for a server, reading giftbench's JSON, and the open-loop step
# search for the maximum sustained rate, so that both benches decide
# "sustained" the same way.
#
# The sourcing script defines say() (its own prefix) and, for the step
# search, ramp_run (below).

# free_port VAR: a free loopback port into VAR, never one handed out
# before in this run (BENCH_PORTS), since a port is only tested, not held
BENCH_PORTS=()
free_port() {
    local p
    p=$(perl -MIO::Socket::INET -e '
        for (1 .. 500) {
            my $p = 20000 + int(rand(12000));
            next if grep { $_ == $p } @ARGV;
            my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1",
                LocalPort => $p, Listen => 1, ReuseAddr => 1) or next;
            print $p; exit 0;
        }
        exit 1' "${BENCH_PORTS[@]}") || { say "no free port"; exit 1; }
    BENCH_PORTS+=("$p")
    printf -v "$1" '%s' "$p"
}
taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port, name, pid, log
    for _ in $(seq 150); do
        taken "$1" && return 0
        kill -0 "$3" 2>/dev/null || { say "$2 exited:"; tail -20 "$4" >&2; exit 1; }
        sleep 0.1
    done
    say "$2 did not open port $1"; exit 1
}
wait_log() {  # file, regex, count, name, pid
    for _ in $(seq 200); do
        (( $(grep -cE "$2" "$1" 2>/dev/null || true) >= $3 )) && return 0
        kill -0 "$5" 2>/dev/null || { say "$4 exited:"; tail -20 "$1" >&2; exit 1; }
        sleep 0.1
    done
    say "$4: no '$2' in $1"; tail -20 "$1" >&2; exit 1
}
jget() {  # file, perl expression over $d
    perl -MJSON::PP -e 'local $/; my $d = decode_json(<STDIN>); print eval $ARGV[0]' \
        "$2" <"$1"
}

# mosquitto_conf FILE PORT: the broker of the tbsim setups (loopback, no
# persistence, Nagle off, no queue limit)
mosquitto_conf() {
    cat >"$1" <<EOF
listener $2 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
max_queued_messages 0
persistence false
log_dest stderr
log_type error
log_type warning
EOF
}

# GiftAcks stored in GIFT_ACKS (giftctl info), 0 when unknown
gift_acks_stored() {  # NATS URL
    "$B/giftctl" -s "$1" info 2>/dev/null |
        awk '$1 == "GIFT_ACKS" { n = $2 } END { print n + 0 }'
}

# ---------------------------------------------------------------- ramp
# sustained FILE RATE: 1 when giftbench's run at RATE (open loop) kept up:
# accepted >= 95% of RATE, nothing lost or acknowledged twice, every answer
# a 202, every SSE client got every acknowledgement, p99 <= RAMP_P99_BOUND_MS
RAMP_P99_BOUND_MS=${RAMP_P99_BOUND_MS:-100}
sustained() {
    jget "$1" '
        my $R = '"$2"'; my $n = 0;
        $n += $d->{status}{$_} for grep { $_ ne "202" && $_ ne "conn_error" } keys %{$d->{status}};
        $n += $d->{status}{conn_error};
        ($d->{accepted_per_s} >= 0.95 * $R && $d->{lost} == 0 && $d->{dup_acks} == 0
         && $n == 0 && $d->{fanout}{incomplete} == 0
         && $d->{latency_ms}{p99} <= '"$RAMP_P99_BOUND_MS"') ? 1 : 0'
}

# ramp RATE...: open-loop steps upward; the highest sustained one is the
# maximum sustained rate (RAMP_MAX_OK; RAMP_FAILED_AT the first step that
# was not, 0 if none).  The caller's ramp_run TAG RATE runs giftbench at
# RATE and leaves its JSON in $RAMP_DIR/TAG.json (status 0), TAG being
# ${RAMP_TAG}RATE-ATTEMPT.  A step gets RAMP_ATTEMPTS tries (2); when even
# the first is not sustained, the rate is halved until one is (down to
# RAMP_FLOOR, 250); then RAMP_NARROW (2) bisections between the last
# sustained and the first failed step, on multiples of RAMP_GRAIN (250).
# RAMP_LOG gets a line "RATE ATTEMPT 1|0" per step run.
RAMP_ATTEMPTS=${RAMP_ATTEMPTS:-2}
RAMP_NARROW=${RAMP_NARROW:-2}
RAMP_GRAIN=${RAMP_GRAIN:-250}
RAMP_FLOOR=${RAMP_FLOOR:-250}
RAMP_TAG=${RAMP_TAG:-ramp-}
ramp_step() {  # rate: status 0 when sustained
    local R=$1 attempt tag ok
    for ((attempt = 1; attempt <= RAMP_ATTEMPTS; attempt++)); do
        tag=$RAMP_TAG$R-$attempt
        ramp_run "$tag" "$R" || exit 1
        ok=$(sustained "$RAMP_DIR/$tag.json" "$R")
        [[ -n ${RAMP_LOG:-} ]] && echo "$R $attempt $ok" >>"$RAMP_LOG"
        [[ $ok == 1 ]] && return 0
        say "$R gifts/s not sustained (attempt $attempt)"
        sleep 2     # let a backlog drain before the next run
    done
    return 1
}
ramp() {  # rate...
    local R first=$1
    RAMP_MAX_OK=0 RAMP_FAILED_AT=0
    for R in "$@"; do
        if ramp_step "$R"; then RAMP_MAX_OK=$R; else RAMP_FAILED_AT=$R; break; fi
    done
    # not even the first step: halve until one is sustained
    R=$first
    while (( RAMP_MAX_OK == 0 && R > RAMP_FLOOR )); do
        R=$(( R / 2 ))
        if ramp_step "$R"; then RAMP_MAX_OK=$R; else RAMP_FAILED_AT=$R; fi
    done
    # then narrow the gap between the last sustained and the first failed step
    local i
    for ((i = 0; i < RAMP_NARROW; i++)); do
        (( RAMP_FAILED_AT > 0 && RAMP_MAX_OK > 0 )) || break
        R=$(( (RAMP_MAX_OK + RAMP_FAILED_AT) / 2 / RAMP_GRAIN * RAMP_GRAIN ))
        (( R > RAMP_MAX_OK && R < RAMP_FAILED_AT )) || break
        if ramp_step "$R"; then RAMP_MAX_OK=$R; else RAMP_FAILED_AT=$R; fi
    done
}
