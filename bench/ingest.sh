#!/usr/bin/env bash
# The ingest benchmark: how fast gift_webhook takes gifts, next to what nginx
# alone does with the same requests, in the same nginx and the same run.
#
#   bench/ingest.sh              both of these, in one nginx and nats-server:
#   bench/ingest.sh --rates      /gift, /plain and /discard: ROUNDS rounds of
#                                DURATION seconds each, interleaved
#   bench/ingest.sh --million    the worker's RSS before, during and after a
#                                million webhooks (must not grow without bound)
#
# It starts its own nats-server (JetStream, file store) and nginx (one
# worker) on free loopback ports in a temporary directory under build/bench,
# runs wrk with bench/gift.lua (unique canonical gifts over keep-alive
# connections), checks with giftctl that every 202 is in GIFTS, prints a
# report and writes build/bench/ingest.json (ingest-million.json).
#
# GIFT_BENCH_TLS=1: the same over tls:// (nats-server with a certificate of
# a CA made here by the openssl CLI; nginx verifies it), written as
# ingest-tls.json; bench/ingest-tls.sh runs it in make bench.
#
# Environment: GIFT_BENCH_DURATION (s, default 10), GIFT_BENCH_ROUNDS (3),
# GIFT_BENCH_CONNS (64), GIFT_BENCH_THREADS (2), GIFT_BENCH_MILLION
# (1000000), GIFT_BENCH_OUT (build/bench), GIFT_BENCH_KEEP=1 keeps the
# temporary directory.  Client and servers share the machine's cores: quote
# the ratio, and re-measure before comparing with another machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

MODE=all
case "${1:-}" in
    --rates) MODE=rates ;;
    --million) MODE=million ;;
    "") ;;
    *) echo "usage: bench/ingest.sh [--rates|--million]" >&2; exit 2 ;;
esac

DURATION=${GIFT_BENCH_DURATION:-10}
ROUNDS=${GIFT_BENCH_ROUNDS:-3}
CONNS=${GIFT_BENCH_CONNS:-64}
THREADS=${GIFT_BENCH_THREADS:-2}
MILLION=${GIFT_BENCH_MILLION:-1000000}
OUT=${GIFT_BENCH_OUT:-$ROOT/build/bench}
# GIFT_BENCH_MODULE: another build of the module, to compare two
MODULE=${GIFT_BENCH_MODULE:-$ROOT/build/ngx_http_gift_module.so}
GIFTCTL=$ROOT/build/giftctl

for f in "$MODULE" "$GIFTCTL"; do
    [[ -e $f ]] || { echo "ingest: $f missing; run 'make build'" >&2; exit 1; }
done
for b in wrk nats-server nginx; do
    command -v "$b" >/dev/null || [[ -x /usr/sbin/$b ]] ||
        { echo "ingest: $b not found; run 'make deps'" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)

mkdir -p "$OUT"
WORK=$(mktemp -d "$OUT/ingest.XXXXXX")
mkdir -p "$WORK"/{nats,tmp,wrk}

# A free port below the ephemeral range (32768 and up), as the tests do.
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

NATS_PORT=$(free_port)
HTTP_PORT=$(free_port "$NATS_PORT")

NATS_PID= NGINX_PID=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $NGINX_PID ]]; then
        kill -QUIT "$NGINX_PID" 2>/dev/null || true
        wait "$NGINX_PID" 2>/dev/null || true
    fi
    if [[ -n $NATS_PID ]]; then
        kill -TERM "$NATS_PID" 2>/dev/null || true
        wait "$NATS_PID" 2>/dev/null || true
    fi
    if [[ ${GIFT_BENCH_KEEP:-0} != 1 ]]; then
        rm -rf "$WORK"
    else
        echo "ingest: kept $WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {  # port, name, pid, log
    for _ in $(seq 100); do
        taken "$1" && return 0
        kill -0 "$3" 2>/dev/null ||
            { echo "ingest: $2 exited:" >&2; tail -20 "$4" >&2; exit 1; }
        sleep 0.1
    done
    echo "ingest: $2 did not open port $1" >&2; exit 1
}

NAME=ingest
NATS_TLS=()
GIFTCTL_TLS=()
NGINX_TLS=
NATS_URL=nats://127.0.0.1:$NATS_PORT
if [[ ${GIFT_BENCH_TLS:-0} == 1 ]]; then
    NAME=ingest-tls
    (
        cd "$WORK"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
            -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
            -nodes -keyout server.key -out server.csr -subj /CN=localhost
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key \
            -CAcreateserial -out server.pem -days 2 -extfile server.ext
    ) >"$WORK/openssl.log" 2>&1 || { cat "$WORK/openssl.log" >&2; exit 1; }
    NATS_TLS=(--tls --tlscert "$WORK/server.pem" --tlskey "$WORK/server.key")
    GIFTCTL_TLS=(--tls-ca "$WORK/ca.pem")
    NGINX_TLS="gift_nats_ssl_trusted_certificate $WORK/ca.pem;"
    NATS_URL=tls://localhost:$NATS_PORT
fi

"$NATS" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/nats" "${NATS_TLS[@]}" \
    >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
wait_port "$NATS_PORT" nats-server "$NATS_PID" "$WORK/nats.log"
"$GIFTCTL" "${GIFTCTL_TLS[@]}" -s "$NATS_URL" setup >"$WORK/setup.log" 2>&1 ||
    { cat "$WORK/setup.log" >&2; exit 1; }

cat >"$WORK/nginx.conf" <<EOF
load_module $MODULE;
worker_processes 1;
error_log $WORK/error.log notice;
pid $WORK/nginx.pid;
daemon off;

events {
    worker_connections 4096;
}

http {
    access_log off;
    client_body_temp_path $WORK/tmp/body;
    proxy_temp_path $WORK/tmp/proxy;
    fastcgi_temp_path $WORK/tmp/fastcgi;
    uwsgi_temp_path $WORK/tmp/uwsgi;
    scgi_temp_path $WORK/tmp/scgi;
    # the default (1000) would reconnect every thousand requests
    keepalive_requests 100000000;
    gift_nats_url $NATS_URL;
    $NGINX_TLS

    server {
        listen 127.0.0.1:$HTTP_PORT backlog=4096;

        location = /gift {
            gift_webhook;
        }

        # What nginx alone does with the same request: read the whole body
        # into memory, in one buffer (ngx_http_read_client_request_body, as
        # the webhook does), and answer 202 with a small JSON body.  Stock
        # nginx has no content handler that both reads a body and answers
        # without an upstream (return, empty_gif and static only discard
        # it; proxy_pass would add a network hop).  So: the mirror module
        # reads the body before the content phase (mirror_request_body on);
        # its mirror subrequest goes to an internal location that returns at
        # once (in process, no network); then empty_gif refuses the POST
        # with 405, and error_page turns that into the 202.  Those two
        # detours cost /plain a little, which flatters the webhook's ratio
        # slightly: /discard below bounds that from the other side.
        location = /plain {
            client_body_buffer_size 64k;
            client_body_in_single_buffer on;
            mirror /plain-mirror;
            mirror_request_body on;
            empty_gif;
            error_page 405 =202 @plain-accepted;
        }
        location = /plain-mirror {
            internal;
            return 204;
        }
        location @plain-accepted {
            default_type application/json;
            return 202 '{"id":"plain","seq":1,"duplicate":false}\n';
        }

        # return 202: the body is read off the socket and dropped (nginx
        # must, to keep the connection), never buffered: the ceiling.
        location = /discard {
            default_type application/json;
            return 202 '{"id":"discard","seq":1,"duplicate":false}\n';
        }
    }
}
EOF

"$NGINX" -p "$WORK/" -c "$WORK/nginx.conf" -e "$WORK/error.log" \
    >"$WORK/nginx.out" 2>&1 &
NGINX_PID=$!
wait_port "$HTTP_PORT" nginx "$NGINX_PID" "$WORK/nginx.out"

worker_pid() { pgrep -P "$NGINX_PID" -f 'nginx: worker' | head -1; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

for _ in $(seq 100); do
    grep -q 'connected to NATS' "$WORK/error.log" 2>/dev/null && break
    sleep 0.1
done
grep -q 'connected to NATS' "$WORK/error.log" ||
    { echo "ingest: the worker did not connect to NATS" >&2; exit 1; }
WORKER=$(worker_pid)

# CPU time (user + system, clock ticks) a process has used, all threads.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# run_wrk TARGET TAG SECONDS -> the "GIFT ..." line plus rps=, and the CPU
# each side used per request (us): nginx's worker, nats-server and wrk.
# Other jobs on the machine lower the rates but hardly these costs, so the
# costs say what the rates would be on a machine of our own.
run_wrk() {
    local target=$1 tag=$2 secs=$3 out gift rps n w0 w1 s0 s1 cpu hz
    out=$WORK/wrk/$tag.txt
    w0=$(cpu_ticks "$WORKER") s0=$(cpu_ticks "$NATS_PID")
    TIMEFORMAT='%U %S'
    { time GIFT_RUN="$tag-$$" wrk -t"$THREADS" -c"$CONNS" -d"${secs}s" \
        -s "$ROOT/bench/gift.lua" "http://127.0.0.1:$HTTP_PORT/$target" \
        >"$out" 2>&1; } 2>"$out.cpu" || { cat "$out" >&2; return 1; }
    w1=$(cpu_ticks "$WORKER") s1=$(cpu_ticks "$NATS_PID")
    gift=$(grep '^GIFT ' "$out" || true)
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    [[ -n $gift && -n $rps ]] || { cat "$out" >&2; return 1; }
    hz=$(getconf CLK_TCK)
    n=$(awk '/requests in/ { print $1 }' "$out")
    cpu=$(awk -v n="$n" -v hz="$hz" -v w="$((w1 - w0))" -v s="$((s1 - s0))" \
        '{ printf "cpu_nginx_us=%.1f cpu_nats_us=%.1f cpu_wrk_us=%.1f",
             w * 1e6 / hz / n, s * 1e6 / hz / n, ($1 + $2) * 1e6 / n }' \
        "$out.cpu")
    echo "$gift rps=$rps secs=$secs $cpu"
}

gifts_stored() {
    "$GIFTCTL" "${GIFTCTL_TLS[@]}" -s "$NATS_URL" info | awk '$1 == "GIFTS" { print $2 }'
}

# ---------------------------------------------------------------- rates
bench_rates() {
    local base rss0 rss1 r target line stored WORKER_NOW rc load0 load1
    echo "ingest: nginx 1 worker on :$HTTP_PORT, nats-server on :$NATS_PORT;" \
         "wrk -t$THREADS -c$CONNS, $ROUNDS x ${DURATION}s per location"
    run_wrk gift warm-gift 2 >/dev/null || return 1
    run_wrk plain warm-plain 2 >/dev/null || return 1
    base=$(gifts_stored)
    rss0=$(rss_kb "$WORKER")
    load0=$(cut -d' ' -f1 /proc/loadavg)
    : >"$WORK/runs.txt"
    for r in $(seq "$ROUNDS"); do
        for target in plain gift discard; do
            line=$(run_wrk "$target" "$target$r" "$DURATION") || return 1
            echo "target=$target round=$r $line" >>"$WORK/runs.txt"
            printf '  round %d  /%-8s %s\n' "$r" "$target" "$line"
        done
    done
    rss1=$(rss_kb "$WORKER")
    load1=$(cut -d' ' -f1 /proc/loadavg)
    sleep 1                     # requests cut by wrk's stop get their PubAck
    stored=$(( $(gifts_stored) - base ))
    WORKER_NOW=$(worker_pid)

    rc=0
    perl -MJSON::PP -e '
        my ($runs, $out, $stored, $rss0, $rss1, $w0, $w1, $conns, $rounds,
            $dur, $threads, $load0, $load1) = @ARGV;
        my %t;
        open(my $fh, "<", $runs) or die;
        while (<$fh>) {
            my %f = /(\w+)=(\S+)/g;
            push @{$t{$f{target}}}, \%f;
        }
        sub med { my @v = sort { $a <=> $b } @_; $v[$#v / 2] }
        my %s;
        for my $k (keys %t) {
            my @r = @{$t{$k}};
            $s{$k} = {
                rps => 0 + sprintf("%.0f", med(map { $_->{rps} } @r)),
                p50_us => 0 + med(map { $_->{p50_us} } @r),
                p99_us => 0 + med(map { $_->{p99_us} } @r),
                accepted => 0 + eval { my $n = 0; $n += $_->{accepted} for @r; $n },
                duplicates => 0 + eval { my $n = 0; $n += $_->{duplicates} for @r; $n },
                other => 0 + eval { my $n = 0; $n += $_->{other} for @r; $n },
                # CPU per request (us), medians of the rounds
                cpu_us => { map { my $k = $_;
                    ($k => 0 + med(map { $_->{"cpu_${k}_us"} } @r)) }
                    qw(nginx nats wrk) },
                runs => [ map { { rps => 0 + $_->{rps}, p50_us => 0 + $_->{p50_us},
                    p99_us => 0 + $_->{p99_us} } } @r ],
            };
        }
        my $g = $s{gift};
        # with the CPU the limit and shared by client and servers (as here),
        # the rates go inversely to the total CPU a request costs
        my $tot = sub { my $c = $s{$_[0]}{cpu_us}; $c->{nginx} + $c->{nats}
            + $c->{wrk} };
        my $cpu_ratio = $tot->("plain") / $tot->("gift");
        # wrk stops with up to one request per connection in flight: those
        # may be stored without their 202 having been counted
        my $slack = $conns * $rounds;
        my $ok = $stored >= $g->{accepted} && $stored <= $g->{accepted} + $slack
            && $g->{duplicates} == 0 && $g->{other} == 0;
        my %r = (
            bench => ($out =~ m{([^/]+)\.json$})[0],
            date => scalar(gmtime) . " UTC",
            cpus => 0 + `nproc`,
            # other jobs on the machine skew every figure: the 1-minute
            # load average before and after the measured rounds
            loadavg => [0 + $load0, 0 + $load1],
            nginx_workers => 1,
            wrk => { threads => 0 + $threads, connections => 0 + $conns,
                duration_s => 0 + $dur, rounds => 0 + $rounds,
                script => "bench/gift.lua" },
            webhook => $g, plain => $s{plain}, discard => $s{discard},
            ratio_webhook_plain => 0 + sprintf("%.3f", $g->{rps} / $s{plain}{rps}),
            ratio_webhook_discard => 0 + sprintf("%.3f", $g->{rps} / $s{discard}{rps}),
            ratio_webhook_plain_by_cpu => 0 + sprintf("%.3f", $cpu_ratio),
            gifts => { accepted => $g->{accepted}, stored => 0 + $stored,
                in_flight_allowance => $slack,
                every_202_stored => $stored >= $g->{accepted} ? JSON::PP::true : JSON::PP::false,
                ok => $ok ? JSON::PP::true : JSON::PP::false },
            worker_rss_kb => { before => 0 + $rss0, after => 0 + $rss1,
                same_worker => $w0 == $w1 ? JSON::PP::true : JSON::PP::false },
        );
        open(my $o, ">", $out) or die;
        print $o JSON::PP->new->canonical->pretty->encode(\%r);
        close $o;
        printf "\n%-10s %10s %9s %9s\n", "location", "req/s", "p50 ms",
            "p99 ms";
        for my $k (qw(gift plain discard)) {
            printf "/%-9s %10d %9.2f %9.2f\n", $k, $s{$k}{rps},
                $s{$k}{p50_us} / 1000, $s{$k}{p99_us} / 1000;
        }
        printf "\nwebhook / plain   %.1f%%  (aim: 40%% or more)\n",
            100 * $r{ratio_webhook_plain};
        printf "webhook / discard %.1f%%\n", 100 * $r{ratio_webhook_discard};
        printf "\nCPU per request (us)  %8s %8s %8s\n", "nginx", "nats", "wrk";
        printf "/%-20s %8.1f %8.1f %8.1f\n", $_, @{$s{$_}{cpu_us}}{qw(nginx
            nats wrk)} for qw(gift plain discard);
        printf "webhook / plain by CPU cost %.1f%% (the rate ratio when "
            . "nothing else runs)\n\n", 100 * $cpu_ratio;
        printf "GIFTS: %d stored, %d answered 202 (+ up to %d in flight at "
            . "wrk stop), %d duplicate, %d other: %s\n", $stored,
            $g->{accepted}, $slack, $g->{duplicates}, $g->{other},
            $ok ? "every 202 is stored" : "MISMATCH";
        printf "worker RSS %d kB -> %d kB\n", $rss0, $rss1;
        my $cpus = 0 + `nproc`;
        printf "note: load average %s before, %s after on %d CPUs: other "
            . "jobs were running, the figures are low and noisy\n", $load0,
            $load1, $cpus if $load0 > $cpus || $load1 > $cpus + 4;
        exit($ok ? 0 : 1);
    ' "$WORK/runs.txt" "$OUT/$NAME.json" "$stored" "$rss0" "$rss1" \
        "$WORKER" "$WORKER_NOW" "$CONNS" "$ROUNDS" "$DURATION" "$THREADS" \
        "$load0" "$load1" ||
        rc=$?
    echo "ingest: wrote $OUT/$NAME.json"
    return $rc
}

# ---------------------------------------------------------------- million
bench_million() {
    local CHUNK=${GIFT_BENCH_CHUNK:-10} rss0 rss1 base total chunk line acc
    local other dup rss stored rc
    echo "ingest --million: $MILLION webhooks, wrk -t$THREADS -c$CONNS in" \
         "${CHUNK}s chunks, worker $WORKER"
    run_wrk gift warm 2 >/dev/null || return 1
    sleep 1
    rss0=$(rss_kb "$WORKER")
    base=$(gifts_stored)
    total=0 chunk=0
    : >"$WORK/series.txt"
    echo "0 $rss0" >>"$WORK/series.txt"
    printf '  %9s webhooks  RSS %6d kB\n' 0 "$rss0"
    while (( total < MILLION && chunk < 200 )); do
        chunk=$((chunk + 1))
        line=$(run_wrk gift "m$chunk" "$CHUNK") || return 1
        acc=$(sed -n 's/.*accepted=\([0-9]*\).*/\1/p' <<<"$line")
        other=$(sed -n 's/.*other=\([0-9]*\).*/\1/p' <<<"$line")
        dup=$(sed -n 's/.*duplicates=\([0-9]*\).*/\1/p' <<<"$line")
        total=$((total + acc))
        [[ $(worker_pid) == "$WORKER" ]] ||
            { echo "ingest: the worker changed (crash?)" >&2; return 1; }
        rss=$(rss_kb "$WORKER")
        echo "$total $rss $other $dup" >>"$WORK/series.txt"
        printf '  %9d webhooks  RSS %6d kB  (%s)\n' "$total" "$rss" "$line"
    done
    sleep 1
    rss1=$(rss_kb "$WORKER")
    stored=$(( $(gifts_stored) - base ))

    rc=0
    perl -MJSON::PP -e '
        my ($series, $out, $rss0, $rss1, $stored, $conns, $chunks) = @ARGV;
        my (@s, $other, $dup);
        open(my $fh, "<", $series) or die;
        while (<$fh>) {
            my ($n, $rss, $o, $d) = split;
            push @s, { webhooks => 0 + $n, rss_kb => 0 + $rss };
            $other += $o // 0;
            $dup += $d // 0;
        }
        my $total = $s[-1]{webhooks};
        # "not without bound": after the first chunk (pools, cnats buffers and
        # malloc arenas at their working size) RSS stays within 10%
        my $first = $s[1]{rss_kb};
        my $max = (sort { $b <=> $a } map { $_->{rss_kb} } @s[1 .. $#s])[0];
        my $flat = $max <= $first * 1.10 + 1024;
        my $ok = $stored >= $total && $stored <= $total + $conns * $chunks
            && !$other && !$dup;
        my %r = (bench => "ingest-million", date => scalar(gmtime) . " UTC",
            webhooks => 0 + $total, worker_rss_kb => { before => 0 + $rss0,
            after_first_chunk => 0 + $first, max => 0 + $max, after => 0 + $rss1 },
            series => \@s, rss_flat => $flat ? JSON::PP::true : JSON::PP::false,
            gifts => { accepted => 0 + $total, stored => 0 + $stored,
                other => 0 + $other, duplicates => 0 + $dup,
                ok => $ok ? JSON::PP::true : JSON::PP::false });
        open(my $o, ">", $out) or die;
        print $o JSON::PP->new->canonical->pretty->encode(\%r);
        printf "\nworker RSS: %d kB before, %d kB after the first chunk, "
            . "%d kB at most, %d kB after %d webhooks: %s\n", $rss0, $first,
            $max, $rss1, $total, $flat ? "flat" : "GROWING";
        printf "GIFTS: %d stored for %d answered 202: %s\n", $stored, $total,
            $ok ? "every 202 is stored" : "MISMATCH";
        exit($flat && $ok ? 0 : 1);
    ' "$WORK/series.txt" "$OUT/ingest-million.json" "$rss0" "$rss1" "$stored" \
        "$CONNS" "$chunk" || rc=$?
    echo "ingest: wrote $OUT/ingest-million.json"
    return $rc
}

rc=0
if [[ $MODE == all || $MODE == rates ]]; then
    bench_rates || rc=1
fi
if [[ $MODE == all || $MODE == million ]]; then
    [[ $MODE == all ]] && echo
    bench_million || rc=1
fi
exit $rc
