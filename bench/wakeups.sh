#!/usr/bin/env bash
# Where the CPU of one gift goes at a steady rate (issue 18): make run's
# stack (scripts/run.sh itself, free ports, its own directory), giftbench
# at GIFT_WAKEUPS_RATE gifts/s (500) for GIFT_WAKEUPS_SECONDS (10) with
# bench/seed.sh's realistic mix and one SSE client, after a 2 s warm-up;
# then, per process of the product, CPU microseconds and context switches
# (voluntary + involuntary, all threads, /proc) per accepted gift.  At such
# rates nothing is batched and each wake-up of a thread is most of the
# cost on these virtual machines, so the context switches are the steadier
# figure.  GIFT_WAKEUPS_ROUNDS (1) repeats the run; GIFT_WAKEUPS_THREADS=1
# adds each thread's share (/proc/PID/task: CPU, voluntary and involuntary
# context switches per gift; a Go program's threads all bear its name:
# nats-server's first thread after the main one, which only sleeps, is
# the Go runtime's monitor, sysmon); the environment goes to make run
# (GIFT_NATS_GOMAXPROCS, GIFT_RUN_SCHED, GIFT_TB).  Writes $GIFT_BENCH_OUT/wakeups.json
# (build/bench; per round: the rate, accepted, lost, p50/p99, and per
# process us_per_gift and ctx_per_gift, with THREADS its `threads`); exits 1
# when a gift was lost or acknowledged twice.  Loopback only, bounded
# (about 25 s a round); stops what it started, by process group.
#
#   bench/wakeups.sh                       # one round (make bench runs it)
#   GIFT_WAKEUPS_ROUNDS=3 bench/wakeups.sh
#   GIFT_WAKEUPS_THREADS=1 bench/wakeups.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
say() { echo "wakeups: $*" >&2; }
# shellcheck source=bench/lib.sh
. bench/lib.sh

RATE=${GIFT_WAKEUPS_RATE:-500}
SECS=${GIFT_WAKEUPS_SECONDS:-10}
ROUNDS=${GIFT_WAKEUPS_ROUNDS:-1}
THREADS=${GIFT_WAKEUPS_THREADS:-0}
MIX=${GIFT_SEED_MIX:-Rose:1,TikTok:1,FingerHeart:5,Perfume:20,Doughnut:30,HandHearts:100,Corgi:299,MoneyGun:500,Galaxy:1000,WhaleDiving:2150,DramaQueen:5000,Interstellar:10000,Falcon:10999,RosaNebula:15000,Lion:29999}
for f in giftbench gift-dispatcher ngx_http_gift_module.so; do
    [[ -x build/$f || -f build/$f ]] || { say "build/$f missing: make build"; exit 1; }
done
OUT=${GIFT_BENCH_OUT:-$ROOT/build/bench}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gift-wakeups.XXXXXX)
RUNPID=
stop_run() {
    if [[ -n $RUNPID ]]; then
        kill -TERM -- "-$RUNPID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$RUNPID" 2>/dev/null || break; sleep 0.1; done
        RUNPID=
    fi
}
trap 'stop_run; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

# pid -> "cpu_ticks ctx_switches"
sample() {
    local p
    for p in "$@"; do
        echo "$p $(awk '{print $14 + $15}' "/proc/$p/stat")" \
            "$(cat /proc/"$p"/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}')"
    done
}

# pid -> one line per thread: "pid tid cpu_ticks voluntary involuntary"
sample_threads() {
    local p t
    for p in "$@"; do
        for t in /proc/"$p"/task/*; do
            echo "$p ${t##*/} $(awk '{print $14 + $15}' "$t/stat" 2>/dev/null)" \
                "$(awk '/^voluntary_ctxt/ {v = $2} /^nonvoluntary_ctxt/ {n = $2}
                        END {print v + 0, n + 0}' "$t/status" 2>/dev/null)"
        done
    done
}

for round in $(seq "$ROUNDS"); do
    d=$WORK/$round
    mkdir -p "$d"
    free_port H; free_port N; free_port NH; free_port M; free_port X
    GIFT_RUN_DIR=$d GIFT_HTTP_PORT=$H GIFT_NATS_PORT=$N GIFT_NATS_HTTP_PORT=$NH \
        GIFT_MQTT_PORT=$M GIFT_METRICS_PORT=$X setsid scripts/run.sh >"$d/run.out" 2>&1 &
    RUNPID=$!
    wait_port "$H" "make run" "$RUNPID" "$d/run.out"
    wait_port "$X" "the dispatcher" "$RUNPID" "$d/run.out"
    sleep 2
    DSP=$(pgrep -s "$RUNPID" -f build/gift-dispatcher | head -1)
    NATS=$(pgrep -s "$RUNPID" -x nats-server | head -1)
    mapfile -t WRK < <(pgrep -s "$RUNPID" -f "nginx: worker")
    # the policy make run applied (/proc/PID/stat field 41; 3: SCHED_BATCH)
    POLICY=$(sed 's/^.*) //' "/proc/$NATS/stat" | awk '{print $39 == 3 ? "batch" : "default"}')
    [[ -n $DSP && -n $NATS && ${#WRK[@]} -gt 0 ]] || { say "make run's processes not found"; exit 1; }
    GB=(build/giftbench -u "http://127.0.0.1:$H/gift" -S 1 -C 64 --gift "$MIX")
    "${GB[@]}" -R 200 -d 2 -q --grace 30 >/dev/null 2>"$d/warmup.log"
    sample "$DSP" "$NATS" "${WRK[@]}" >"$d/before"
    [[ $THREADS == 1 ]] && sample_threads "$DSP" "$NATS" "${WRK[@]}" >"$d/before.threads"
    "${GB[@]}" -R "$RATE" -d "$SECS" --grace 30 >"$d/gb.json" 2>"$d/gb.log"
    sample "$DSP" "$NATS" "${WRK[@]}" >"$d/after"
    [[ $THREADS == 1 ]] && sample_threads "$DSP" "$NATS" "${WRK[@]}" >"$d/after.threads"
    stop_run
    perl -MJSON::PP -e '
        my ($dir, $dsp, $nats, $round, $rate, $secs, $jsonl) = @ARGV;
        my $gb = do { open(my $f, "<", "$dir/gb.json") or die; my $l; $l = $_ while <$f>; decode_json($l) };
        my $g = $gb->{accepted} or die "no gift accepted\n";
        my (%a, %b);
        for my $s (["before", \%a], ["after", \%b]) {
            open(my $f, "<", "$dir/$s->[0]") or die;
            while (my $l = <$f>) { my ($p, $t, $c) = split " ", $l; $s->[1]{$p} = [$t, $c] }
        }
        my $hz = 0 + `getconf CLK_TCK`;
        my ($w, $tu, $tc, %proc) = (0, 0, 0);
        printf "round %d: %d gifts/s for %d s, %d accepted, lost %d, p50 %.2f ms, p99 %.2f ms\n",
            $round, $rate, $secs, $g, $gb->{lost}, $gb->{latency_ms}{p50}, $gb->{latency_ms}{p99};
        for my $p (sort { $a <=> $b } keys %b) {
            my $name = $p == $dsp ? "dispatcher" : $p == $nats ? "nats-server" : "nginx-w" . ++$w;
            my $us = ($b{$p}[0] - $a{$p}[0]) * 1e6 / $hz / $g;
            my $cs = ($b{$p}[1] - $a{$p}[1]) / $g;
            ($tu, $tc) = ($tu + $us, $tc + $cs);
            $proc{$name} = { us_per_gift => 0 + sprintf("%.1f", $us),
                ctx_per_gift => 0 + sprintf("%.2f", $cs) };
            printf "  %-12s %7.1f us/gift %6.2f context switches/gift\n", $name, $us, $cs;
            next unless -f "$dir/after.threads";
            my (%ta, %tb);
            for my $s (["before.threads", \%ta], ["after.threads", \%tb]) {
                open(my $f, "<", "$dir/$s->[0]") or die;
                while (my $l = <$f>) {
                    my ($pp, $tid, $t, $v, $n) = split " ", $l;
                    $s->[1]{$tid} = [$t, $v, $n] if $pp == $p && defined $n;
                }
            }
            my @th;
            for my $tid (sort { $a <=> $b } keys %tb) {
                my $o = $ta{$tid} // [0, 0, 0];     # a thread started meanwhile
                my ($tus, $tv, $tn) = (($tb{$tid}[0] - $o->[0]) * 1e6 / $hz / $g,
                    ($tb{$tid}[1] - $o->[1]) / $g, ($tb{$tid}[2] - $o->[2]) / $g);
                next if $tus == 0 && $tv + $tn < 0.01;
                push @th, { tid => 0 + $tid, us_per_gift => 0 + sprintf("%.1f", $tus),
                    voluntary_per_gift => 0 + sprintf("%.2f", $tv),
                    involuntary_per_gift => 0 + sprintf("%.2f", $tn) };
                printf "    thread %-8d %7.1f us/gift %6.2f voluntary %5.2f involuntary\n",
                    $tid, $tus, $tv, $tn;
            }
            $proc{$name}{threads} = \@th;
        }
        printf "  %-12s %7.1f us/gift %6.2f context switches/gift\n", "product", $tu, $tc;
        $proc{product} = { us_per_gift => 0 + sprintf("%.1f", $tu),
            ctx_per_gift => 0 + sprintf("%.2f", $tc) };
        open(my $j, ">>", $jsonl) or die;
        print $j JSON::PP->new->canonical->encode({ round => 0 + $round,
            rate => 0 + $rate, seconds => 0 + $secs, accepted => 0 + $g,
            lost => 0 + $gb->{lost}, dup_acks => 0 + ($gb->{dup_acks} // 0),
            latency_ms => { p50 => $gb->{latency_ms}{p50}, p99 => $gb->{latency_ms}{p99} },
            processes => \%proc }), "\n";
    ' "$d" "$DSP" "$NATS" "$round" "$RATE" "$SECS" "$WORK/rounds.jsonl"
done
perl -MJSON::PP -e '
    my @r = map { decode_json($_) } <STDIN>;
    my $bad = grep { $_->{lost} || $_->{dup_acks} } @r;
    open(my $o, ">", $ARGV[0]) or die;
    print $o JSON::PP->new->canonical->pretty->encode({ bench => "wakeups",
        date => scalar(gmtime) . " UTC", nats_gomaxprocs => $ARGV[1],
        product_sched => $ARGV[2] eq "" ? "default" : $ARGV[2],
        rounds => \@r });
    exit($bad ? 1 : 0);
' "$OUT/wakeups.json" "${GIFT_NATS_GOMAXPROCS-1}" "${POLICY:-}" <"$WORK/rounds.jsonl" \
    || { say "a gift was lost or acknowledged twice"; exit 1; }
say "wrote $OUT/wakeups.json"
