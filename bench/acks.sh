#!/usr/bin/env bash
# What following GIFT_ACKS costs per acknowledgement (issue 18): nats-server
# and the nginx workers' CPU at a steady rate, with nothing but a publisher,
# then `make run`'s shape (2 workers, 1 SSE client) with every worker
# following (gift_sse_idle_follow 0, as before) and with the idle worker
# letting go (gift_sse_idle_follow 1s), alternately, ROUNDS times.
#
#   bench/acks.sh            (make bench; GIFT_BENCHES=acks selects it alone)
#
# build/fanbench publishes GiftAcks to JetStream (async, Nats-Msg-Id) at
# RATE/s for SECONDS; `fanbench clients` is the SSE client.  CPU from
# /proc/<pid>/stat (utime + stime, 10 ms ticks: about 2 us per ack at the
# defaults); context switches of nats-server's threads from
# /proc/<pid>/task/*/status.  No delivery check here: t/35-acks-idle.t and
# bench/fanout.sh check what clients get.
#
# Environment: GIFT_ACKS_RATE (500), GIFT_ACKS_SECONDS (8),
# GIFT_ACKS_ROUNDS (3), GIFT_BENCH_OUT (build/bench), GIFT_BENCH_KEEP=1
# keeps build/bench/acks.  Loopback only; everything it starts is stopped
# by PID.  Writes build/bench/acks.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

RATE=${GIFT_ACKS_RATE:-500}
SECS=${GIFT_ACKS_SECONDS:-8}
ROUNDS=${GIFT_ACKS_ROUNDS:-3}
OUT=${GIFT_BENCH_OUT:-$ROOT/build/bench}
WORK=$OUT/acks
MODULE=$ROOT/build/ngx_http_gift_module.so
GIFTCTL=$ROOT/build/giftctl
FANBENCH=$ROOT/build/fanbench

say() { echo "acks: $*" >&2; }

if [[ ! -x $FANBENCH || ! -e $MODULE || ! -x $GIFTCTL ]]; then
    make -s build/ngx_http_gift_module.so build/giftctl build/fanbench >&2 ||
        { say "build failed"; exit 1; }
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)

rm -rf "$WORK"
mkdir -p "$WORK"/{nats,ngx/tmp,runs}

# free_port, wait_port: shared with the other benches
. "$ROOT/bench/lib.sh"

free_port NATS_PORT
free_port HTTP_PORT
NATS_URL=nats://127.0.0.1:$NATS_PORT

NATS_PID= NGX_PID= CL_PID=
stop_nginx() {
    [[ -n $CL_PID ]] && { kill "$CL_PID" 2>/dev/null || true;
                          wait "$CL_PID" 2>/dev/null || true; CL_PID=; }
    if [[ -n $NGX_PID ]]; then
        kill -QUIT "$NGX_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$NGX_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$NGX_PID" 2>/dev/null || true
        wait "$NGX_PID" 2>/dev/null || true
        NGX_PID=
    fi
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_nginx
    if [[ -n $NATS_PID ]]; then
        kill -TERM "$NATS_PID" 2>/dev/null || true
        wait "$NATS_PID" 2>/dev/null || true
    fi
    [[ ${GIFT_BENCH_KEEP:-0} == 1 ]] || rm -rf "$WORK/nats" "$WORK/ngx/tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$NATS" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/nats" \
    >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
wait_port "$NATS_PORT" nats-server "$NATS_PID" "$WORK/nats.log"
"$GIFTCTL" -s "$NATS_URL" setup >"$WORK/setup.log" 2>&1 ||
    { cat "$WORK/setup.log" >&2; exit 1; }

cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
csw() { cat /proc/"$1"/task/*/status 2>/dev/null |
        awk '/ctxt_switches/ { s += $2 } END { print s + 0 }'; }
workers() { [[ -n $NGX_PID ]] && pgrep -P "$NGX_PID" -f 'nginx: worker' || true; }

# phase NAME: publish RATE/s for SECS; one JSON line in runs/NAME.<round>
phase() {
    local name=$1 round=$2 a b ca cb na=0 nb=0 w n
    a=$(cpu "$NATS_PID"); ca=$(csw "$NATS_PID")
    for w in $(workers); do na=$((na + $(cpu "$w"))); done
    "$FANBENCH" publish --nats "$NATS_URL" -r "$RATE" -d "$SECS" \
        >"$WORK/runs/$name.$round.pub" 2>&1 ||
        { say "publish failed"; cat "$WORK/runs/$name.$round.pub" >&2; exit 1; }
    b=$(cpu "$NATS_PID"); cb=$(csw "$NATS_PID")
    for w in $(workers); do nb=$((nb + $(cpu "$w"))); done
    n=$((RATE * SECS))
    # ticks of 10 ms -> us per ack
    printf '{"phase":"%s","round":%d,"acks":%d,"nats_us":%.1f,"nginx_us":%.1f,"nats_csw":%.2f,"load":"%s"}\n' \
        "$name" "$round" "$n" "$(echo "($b - $a) * 10000 / $n" | bc -l)" \
        "$(echo "($nb - $na) * 10000 / $n" | bc -l)" \
        "$(echo "($cb - $ca) / $n" | bc -l)" "$(cut -d' ' -f1-3 /proc/loadavg)" \
        | tee "$WORK/runs/$name.$round.json" >&2
}

start_nginx() {  # idle_follow
    cat >"$WORK/ngx/nginx.conf" <<EOF
load_module $MODULE;
worker_processes 2;
error_log $WORK/ngx/error.log info;
pid $WORK/ngx/nginx.pid;
daemon off;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/ngx/tmp/body;
    proxy_temp_path $WORK/ngx/tmp/proxy;
    fastcgi_temp_path $WORK/ngx/tmp/fastcgi;
    uwsgi_temp_path $WORK/ngx/tmp/uwsgi;
    scgi_temp_path $WORK/ngx/tmp/scgi;
    gift_nats_url $NATS_URL;
    gift_sse_idle_follow $1;
    server {
        listen 127.0.0.1:$HTTP_PORT;
        location = /gift/events { gift_sse; }
    }
}
EOF
    "$NGINX" -c "$WORK/ngx/nginx.conf" -p "$WORK/ngx" &
    NGX_PID=$!
    wait_port "$HTTP_PORT" nginx "$NGX_PID" "$WORK/ngx/error.log"
    sleep 1
    "$FANBENCH" clients -u "http://127.0.0.1:$HTTP_PORT/gift/events" -c 1 \
        -d $((SECS + 6)) >"$WORK/runs/clients.$1.log" 2>&1 &
    CL_PID=$!
    sleep 3                         # the idle worker lets go after 1 s
}

for r in $(seq "$ROUNDS"); do
    phase publisher-only "$r"
    for idle in 0 1s; do
        start_nginx "$idle"
        phase "idle_follow_$idle" "$r"
        stop_nginx
    done
done

perl -MJSON::PP -e '
    my ($dir, $out) = @ARGV;
    my (%by, @runs);
    for my $f (glob "$dir/runs/*.json") {
        open my $h, "<", $f or die; local $/; my $j = decode_json(<$h>);
        push @runs, $j; push @{$by{$j->{phase}}}, $j;
    }
    sub med { my @v = sort { $a <=> $b } @_; $v[int(@v / 2)] }
    my %sum;
    for my $p (sort keys %by) {
        $sum{$p} = { map { my $k = $_; ($k => med(map { $_->{$k} } @{$by{$p}})) }
                     qw(nats_us nginx_us nats_csw) };
        printf STDERR "acks: %-18s median nats-server %6.1f us/ack, nginx workers %6.1f us/ack, nats-server %.2f context switches/ack\n",
            $p, @{$sum{$p}}{qw(nats_us nginx_us nats_csw)};
    }
    open my $o, ">", $out or die;
    print $o JSON::PP->new->canonical->pretty->encode({ medians => \%sum, runs => \@runs });
' "$WORK" "$OUT/acks.json"
say "wrote $OUT/acks.json"
