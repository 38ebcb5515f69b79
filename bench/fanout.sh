#!/usr/bin/env bash
# The fan-out benchmark (issue 8): acknowledgements streamed over SSE to
# 1,000 and 10,000 concurrent clients by our module (one worker following
# GIFT_ACKS), side by side with nchan (Debian's libnginx-mod-nchan, one
# worker, memory store) serving the same JSON to the same client counts, in
# the same run, with the same client (build/fanbench, C, epoll).
#
#   bench/fanout.sh
#
# For each client count and each server, fanbench connects the clients,
# waits until they are idle and samples the worker's RSS (memory per idle
# client = delta RSS / clients), then runs two phases:
#   max  publish as fast as the fan-out goes: at most WINDOW messages not yet
#        delivered to every client (self-clocking); deliveries/s
#   lat  a fixed rate, the same for both servers: LAT_DPS deliveries/s
#        (LAT_DPS / clients messages/s); publish->client latency p50/p99,
#        timed from each message's scheduled send time (a publisher held up
#        by the server does not hide the wait)
# ROUNDS rounds, ours and nchan alternating; the table shows medians.  Then
# a burst check, ours only (nchan's publisher answers once it has fanned a
# message out, so it cannot be sent a burst): BURST messages at once to
# 1,000 clients, every one of which must arrive.
# Ours: fanbench publishes GiftAcks to JetStream (async, Nats-Msg-Id), so our
# latency includes nats-server and the worker's ordered consumer; nchan:
# fanbench POSTs the same JSON to nchan_publisher over keep-alive HTTP.
# Lost = messages x clients - deliveries (each client checks order, gaps and
# duplicates by the message index in the event id).
#
# Environment: GIFT_FANOUT_CLIENTS ("1000 10000"), GIFT_FANOUT_DURATION (s of
# the max phase, 4), GIFT_FANOUT_LAT_DURATION (5), GIFT_FANOUT_LAT_DPS
# (20000: well below both servers' ceilings, so that latency is the fan-out's
# own, not a queue's), GIFT_FANOUT_WINDOW (64), GIFT_FANOUT_SIZE (JSON bytes, 360),
# GIFT_FANOUT_ROUNDS (3), GIFT_FANOUT_BURST (3000; 0: no burst check),
# GIFT_FANOUT_THREADS (client threads, 1), GIFT_FANOUT_MODULE (another build
# of the module to measure, e.g. a patched one),
# GIFT_FANOUT_BATCH_US (1000), GIFT_FANOUT_NICE (0; e.g. -10 runs servers and
# client before other work on a shared machine; root only), GIFT_BENCH_OUT
# (build/bench),
# GIFT_BENCH_KEEP=1 keeps build/bench/fanout.  Loopback only; everything it
# starts is stopped by PID.  Client and servers share the machine's cores:
# compare ratios measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CLIENTS=${GIFT_FANOUT_CLIENTS:-1000 10000}
DURATION=${GIFT_FANOUT_DURATION:-4}
LAT_DURATION=${GIFT_FANOUT_LAT_DURATION:-5}
LAT_DPS=${GIFT_FANOUT_LAT_DPS:-20000}
WINDOW=${GIFT_FANOUT_WINDOW:-64}
SIZE=${GIFT_FANOUT_SIZE:-360}
ROUNDS=${GIFT_FANOUT_ROUNDS:-3}
BURST=${GIFT_FANOUT_BURST:-3000}
THREADS=${GIFT_FANOUT_THREADS:-1}
BATCH_US=${GIFT_FANOUT_BATCH_US:-1000}
NICE=${GIFT_FANOUT_NICE:-0}
PRIO=()
(( NICE != 0 )) && PRIO=(nice -n "$NICE")
OUT=${GIFT_BENCH_OUT:-$ROOT/build/bench}
WORK=$OUT/fanout
MODULE=${GIFT_FANOUT_MODULE:-$ROOT/build/ngx_http_gift_module.so}
GIFTCTL=$ROOT/build/giftctl
FANBENCH=$ROOT/build/fanbench
T_START=$(date +%s)

say() { echo "fanout: $*" >&2; }

# ---------------------------------------------------------------- what we need
if [[ ! -x $FANBENCH || ! -e $MODULE || ! -x $GIFTCTL ]]; then
    make -s build/ngx_http_gift_module.so build/giftctl build/fanbench >&2 ||
        { say "build failed"; exit 1; }
fi
if ! dpkg-query -W -f='${Status}' libnginx-mod-nchan 2>/dev/null |
        grep -q 'ok installed'; then
    say "installing libnginx-mod-nchan"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libnginx-mod-nchan \
        >/dev/null || { say "cannot install libnginx-mod-nchan"; exit 1; }
fi
NCHAN_SO=$(dpkg -L libnginx-mod-nchan | grep '/ngx_nchan_module\.so$' | head -1)
[[ -e $NCHAN_SO ]] || { say "ngx_nchan_module.so not found"; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)

# descriptors: 10,000 clients on each side (plus nginx's own)
HARD=$(ulimit -Hn)
NOFILE=65536
[[ $HARD != unlimited ]] && (( HARD < NOFILE )) && NOFILE=$HARD
ulimit -n "$NOFILE" || { say "cannot raise ulimit -n to $NOFILE"; exit 1; }
MAXC=0
for n in $CLIENTS; do (( n > MAXC )) && MAXC=$n; done
if (( NOFILE < MAXC + 1000 )); then
    say "ulimit -n is $NOFILE: too few for $MAXC clients"; exit 1
fi
WCONN=$(( MAXC + 1000 ))

rm -rf "$WORK"
mkdir -p "$WORK"/{nats,gift/tmp,nchan/tmp,runs}

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
GIFT_PORT=$(free_port "$NATS_PORT")
NCHAN_PORT=$(free_port "$NATS_PORT" "$GIFT_PORT")

NATS_PID= GIFT_PID= NCHAN_PID=
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in $GIFT_PID $NCHAN_PID; do
        kill -QUIT "$pid" 2>/dev/null || true
    done
    for pid in $GIFT_PID $NCHAN_PID; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n $NATS_PID ]]; then
        kill -TERM "$NATS_PID" 2>/dev/null || true
        wait "$NATS_PID" 2>/dev/null || true
    fi
    if [[ ${GIFT_BENCH_KEEP:-0} != 1 ]]; then
        rm -rf "$WORK/nats" "$WORK/gift/tmp" "$WORK/nchan/tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {  # port, name, pid, log
    for _ in $(seq 100); do
        taken "$1" && return 0
        kill -0 "$3" 2>/dev/null ||
            { say "$2 exited:"; tail -20 "$4" >&2; exit 1; }
        sleep 0.1
    done
    say "$2 did not open port $1"; exit 1
}

# ---------------------------------------------------------------- servers
"${PRIO[@]}" "$NATS" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/nats" \
    >"$WORK/nats.log" 2>&1 &
NATS_PID=$!
wait_port "$NATS_PORT" nats-server "$NATS_PID" "$WORK/nats.log"
NATS_URL=nats://127.0.0.1:$NATS_PORT
"$GIFTCTL" -s "$NATS_URL" setup >"$WORK/setup.log" 2>&1 ||
    { cat "$WORK/setup.log" >&2; exit 1; }

common_http() {  # dir
    cat <<EOF
    access_log off;
    client_body_temp_path $1/tmp/body;
    proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi;
    uwsgi_temp_path $1/tmp/uwsgi;
    scgi_temp_path $1/tmp/scgi;
    keepalive_requests 100000000;
EOF
}

cat >"$WORK/gift/nginx.conf" <<EOF
load_module $MODULE;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
# info: a stream cut off as too slow is logged ("backlog full")
error_log $WORK/gift/error.log info;
pid $WORK/gift/nginx.pid;
daemon off;
events {
    worker_connections $WCONN;
}
http {
$(common_http "$WORK/gift")
    gift_nats_url $NATS_URL;
    gift_sse_max_clients $WCONN;
    server {
        listen 127.0.0.1:$GIFT_PORT backlog=4096;
        location = /gift/events {
            gift_sse;
        }
        # not measured by default (fanbench --ws)
        location = /gift/ws {
            gift_websocket;
        }
    }
}
EOF

cat >"$WORK/nchan/nginx.conf" <<EOF
load_module $NCHAN_SO;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
error_log $WORK/nchan/error.log notice;
pid $WORK/nchan/nginx.pid;
daemon off;
events {
    worker_connections $WCONN;
}
http {
$(common_http "$WORK/nchan")
    server {
        listen 127.0.0.1:$NCHAN_PORT backlog=4096;
        # memory store (no nchan_redis_*); the same replay depth as ours
        location = /pub {
            nchan_publisher;
            nchan_channel_id fanbench;
            nchan_message_buffer_length 1000;
            nchan_message_timeout 10m;
        }
        location = /sub {
            nchan_subscriber eventsource;
            nchan_channel_id fanbench;
            nchan_subscriber_first_message newest;
        }
    }
}
EOF

"${PRIO[@]}" "$NGINX" -p "$WORK/gift/" -c "$WORK/gift/nginx.conf" -e "$WORK/gift/error.log" \
    >"$WORK/gift/nginx.out" 2>&1 &
GIFT_PID=$!
"${PRIO[@]}" "$NGINX" -p "$WORK/nchan/" -c "$WORK/nchan/nginx.conf" \
    -e "$WORK/nchan/error.log" >"$WORK/nchan/nginx.out" 2>&1 &
NCHAN_PID=$!
wait_port "$GIFT_PORT" "nginx (gift)" "$GIFT_PID" "$WORK/gift/nginx.out"
wait_port "$NCHAN_PORT" "nginx (nchan)" "$NCHAN_PID" "$WORK/nchan/nginx.out"

for _ in $(seq 100); do
    grep -q 'following GIFT_ACKS' "$WORK/gift/error.log" 2>/dev/null && break
    sleep 0.1
done
grep -q 'following GIFT_ACKS' "$WORK/gift/error.log" ||
    { say "the worker does not follow GIFT_ACKS"; tail "$WORK/gift/error.log" >&2; exit 1; }

worker_of() { pgrep -P "$1" -f 'nginx: worker' | head -1; }
GIFT_WORKER=$(worker_of "$GIFT_PID")
NCHAN_WORKER=$(worker_of "$NCHAN_PID")
[[ -n $GIFT_WORKER && -n $NCHAN_WORKER ]] || { say "no worker"; exit 1; }

# A fresh worker for each run (SIGHUP): memory freed by an earlier run stays
# in the old process's heap (nchan: its shared memory) and would hide the
# next run's growth.  Sets WORKER.
fresh_worker() {  # master pid, error log, old worker
    local master=$1 log=$2 old=$3 w following
    following=$(grep -c 'following GIFT_ACKS' "$log" || true)
    kill -HUP "$master"
    for _ in $(seq 100); do
        w=$(pgrep -P "$master" -f 'nginx: worker' | grep -vx "$old" | head -1)
        if [[ -n $w ]] && ! kill -0 "$old" 2>/dev/null; then
            # ours: the new worker follows GIFT_ACKS before clients come
            if [[ $log != */gift/* ]] ||
                (( $(grep -c 'following GIFT_ACKS' "$log" || true) > following ))
            then
                WORKER=$w
                return 0
            fi
        fi
        sleep 0.1
    done
    say "no fresh worker after SIGHUP ($log)"; return 1
}

say "ours :$GIFT_PORT (worker $GIFT_WORKER), nchan :$NCHAN_PORT (worker" \
    "$NCHAN_WORKER), nats-server :$NATS_PORT; clients: $CLIENTS;" \
    "${DURATION}s max + ${LAT_DURATION}s at $LAT_DPS deliveries/s; ulimit -n $NOFILE"

# ---------------------------------------------------------------- client check
# The client alone against a trivial in-process SSE server: its own ceiling.
timeout 60 "${PRIO[@]}" "$FANBENCH" selftest -c 1000 -d 3 -T "$THREADS" --batch-us "$BATCH_US" \
    --label selftest >"$WORK/runs/selftest.json" 2>"$WORK/runs/selftest.log" ||
    { cat "$WORK/runs/selftest.log" >&2; exit 1; }
sed 's/^/  /' "$WORK/runs/selftest.log" >&2

# ---------------------------------------------------------------- runs
rc=0
DONE_ROUNDS=0
for round in $(seq "$ROUNDS"); do
    # bounded: no new round after 3 minutes (the whole script < 5)
    if (( round > 1 && $(date +%s) - T_START > 180 )); then
        say "time is up after $DONE_ROUNDS round(s)"
        break
    fi
    DONE_ROUNDS=$round
    # ours first in odd rounds, nchan first in even ones
    order="gift nchan"
    (( round % 2 == 0 )) && order="nchan gift"
    for n in $CLIENTS; do
        for server in $order; do
            if [[ $server == gift ]]; then
                fresh_worker "$GIFT_PID" "$WORK/gift/error.log" \
                    "$GIFT_WORKER" || exit 1
                GIFT_WORKER=$WORKER
                args=(-u "http://127.0.0.1:$GIFT_PORT/gift/events"
                      --nats "$NATS_URL" --rss-pid "$GIFT_WORKER")
            else
                fresh_worker "$NCHAN_PID" "$WORK/nchan/error.log" \
                    "$NCHAN_WORKER" || exit 1
                NCHAN_WORKER=$WORKER
                args=(-u "http://127.0.0.1:$NCHAN_PORT/sub"
                      --http-pub "http://127.0.0.1:$NCHAN_PORT/pub"
                      --rss-pid "$NCHAN_WORKER")
            fi
            tag=$server-$n-$round
            timeout 120 "${PRIO[@]}" "$FANBENCH" run "${args[@]}" -c "$n" -T "$THREADS" \
                --batch-us "$BATCH_US" -d "$DURATION" -w "$WINDOW" \
                --lat-dps "$LAT_DPS" --lat-duration "$LAT_DURATION" \
                -s "$SIZE" --settle-ms 1500 --label "$tag" \
                >"$WORK/runs/$tag.json" 2>"$WORK/runs/$tag.log" || {
                    say "$tag failed"; cat "$WORK/runs/$tag.log" >&2; rc=1
                    continue
                }
            sed 's/^/  /' "$WORK/runs/$tag.log" >&2
            # the worker must have survived
            if [[ $server == gift ]]; then
                [[ $(worker_of "$GIFT_PID") == "$GIFT_WORKER" ]] ||
                    { say "our worker died during $tag"; rc=1; }
            else
                [[ $(worker_of "$NCHAN_PID") == "$NCHAN_WORKER" ]] ||
                    { say "nchan's worker died during $tag"; rc=1; }
            fi
        done
    done
done

# ---------------------------------------------------------------- burst check
# BURST acknowledgements at once (as fast as JetStream takes them) to 1,000
# clients: the worker gets them in batches larger than its replay ring
# (gift_sse_replay_max, 1000) and than a client's backlog
# (gift_sse_max_backlog, 1024); clients that read must get every one.
BURST_OK=skipped
if (( BURST > 0 )); then
    tag=burst-1000
    fresh_worker "$GIFT_PID" "$WORK/gift/error.log" "$GIFT_WORKER" || exit 1
    GIFT_WORKER=$WORKER
    timeout 60 "${PRIO[@]}" "$FANBENCH" run -u "http://127.0.0.1:$GIFT_PORT/gift/events" \
        --nats "$NATS_URL" --rss-pid "$GIFT_WORKER" -c 1000 -T "$THREADS" \
        --batch-us "$BATCH_US" -d 0 --lat-duration 0 --burst "$BURST" \
        -s "$SIZE" --settle-ms 500 --label "$tag" \
        >"$WORK/runs/$tag.json" 2>"$WORK/runs/$tag.log" || true
    sed 's/^/  /' "$WORK/runs/$tag.log" >&2
    BURST_OK=pass
    if [[ $(worker_of "$GIFT_PID") != "$GIFT_WORKER" ]]; then
        BURST_OK="FAIL: the worker died ($(grep -E 'exited on signal|corrupt|free\(\)' \
            "$WORK/gift/error.log" | tail -2 | sed 's/.*\] //' | tr '\n' ' '))"
    elif ! perl -MJSON::PP -e '
            local $/; my $d = decode_json(<STDIN>);
            exit($d->{burst}{lost} == 0 && $d->{burst}{closed} == 0 ? 0 : 1)' \
            <"$WORK/runs/$tag.json" 2>/dev/null; then
        BURST_OK="FAIL: $(perl -MJSON::PP -e 'local $/;
            my $b = decode_json(<STDIN>)->{burst};
            printf "%d of %d acknowledgements lost, %d streams closed",
                $b->{lost}, $b->{expected}, $b->{closed}' \
            <"$WORK/runs/$tag.json" 2>/dev/null || echo "no result")"
        BURST_OK+=" ($(grep -c 'backlog full' "$WORK/gift/error.log" || true)"
        BURST_OK+=" cut off as \"backlog full\" by the worker)"
    fi
    [[ $BURST_OK == pass ]] || rc=1
    say "burst check: $BURST_OK"
fi

# ---------------------------------------------------------------- report
GIFT_FANOUT_NICE_USED=$NICE perl -MJSON::PP -e '
    my ($dir, $out, $secs, $lat_dps, $window, $size, $batch, $threads,
        $burst_ok, $rounds, @files) = @ARGV;
    my $json = JSON::PP->new->canonical;
    my (%runs, $self, $burst);
    for my $f (@files) {
        open(my $fh, "<", $f) or next;
        local $/;
        my $d = eval { $json->decode(<$fh>) } or next;
        if ($d->{mode} eq "selftest") { $self = $d; next }
        if ($d->{label} =~ /^burst/) { $burst = $d; next }
        my ($server, $n) = $d->{label} =~ /^(\w+)-(\d+)-/ or next;
        push @{$runs{$n}{$server}}, $d;
    }
    sub med { my @v = sort { $a <=> $b } @_; @v ? $v[$#v / 2] : 0 }
    my (%res, $ok);
    $ok = 1;
    for my $n (sort { $a <=> $b } keys %runs) {
        for my $s (qw(gift nchan)) {
            my @r = @{$runs{$n}{$s} // []} or next;
            my %x = (
                clients => 0 + $n,
                connected => 0 + med(map { $_->{connected} } @r),
                deliveries_per_s => 0 + med(map { $_->{max}{deliveries_per_s} } @r),
                max_p50_us => 0 + med(map { $_->{max}{latency_us}{p50} } @r),
                max_p99_us => 0 + med(map { $_->{max}{latency_us}{p99} } @r),
                lat_rate_msg_s => 0 + $r[0]{lat}{rate},
                lat_deliveries_per_s => 0 + med(map { $_->{lat}{deliveries_per_s} } @r),
                lat_publish_behind_schedule_max_ms => 0 + med(map { $_->{lat}{publish_behind_schedule_max_ms} } @r),
                p50_us => 0 + med(map { $_->{lat}{latency_us}{p50} } @r),
                p90_us => 0 + med(map { $_->{lat}{latency_us}{p90} } @r),
                p99_us => 0 + med(map { $_->{lat}{latency_us}{p99} } @r),
                max_us => 0 + med(map { $_->{lat}{latency_us}{max} } @r),
                lost => 0 + eval { my $t = 0; $t += $_->{max}{lost} + $_->{lat}{lost} for @r; $t },
                expected => 0 + eval { my $t = 0; $t += $_->{max}{expected} + $_->{lat}{expected} for @r; $t },
                closed => 0 + eval { my $t = 0; $t += $_->{max}{closed} + $_->{lat}{closed} for @r; $t },
                kib_per_idle_client => 0 + sprintf("%.2f", med(map { $_->{kib_per_idle_client} } @r)),
                kib_per_client_after => 0 + sprintf("%.2f", med(map { $_->{kib_per_client_after} } @r)),
                worker_cpu_pct_max_phase => 0 + sprintf("%.0f", med(map { $_->{max}{server_worker_cpu_pct} } @r)),
                worker_us_per_delivery_max_phase => 0 + sprintf("%.2f", med(map { $_->{max}{worker_us_per_delivery} } @r)),
                worker_us_per_delivery_lat_phase => 0 + sprintf("%.2f", med(map { $_->{lat}{worker_us_per_delivery} } @r)),
                others_cpu_pct => 0 + sprintf("%.0f", med(map { ($_->{max}{others_cpu_pct} + $_->{lat}{others_cpu_pct}) / 2 } @r)),
                client_cpu_pct_max_phase => 0 + sprintf("%.0f", med(map { $_->{max}{client_cpu_pct} } @r)),
                events_per_read_max_phase => 0 + sprintf("%.1f", med(map { $_->{max}{events_per_read} } @r)),
                runs => \@r,
            );
            $ok = 0 if $x{lost} || $x{connected} < $n;
            $res{$n}{$s} = \%x;
        }
        # the same round'"'"'s runs, side by side: ratios are steadier than
        # ratios of medians on a machine shared with other work
        my ($g, $c) = @{$runs{$n}}{qw(gift nchan)};
        if ($g && $c) {
            my %byround;
            $byround{$_->{label} =~ /-(\d+)$/ ? $1 : 0}{g} = $_ for @$g;
            $byround{$_->{label} =~ /-(\d+)$/ ? $1 : 0}{c} = $_ for @$c;
            my @pairs;
            for my $r (sort { $a <=> $b } keys %byround) {
                my ($ga, $nc) = @{$byround{$r}}{qw(g c)};
                next unless $ga && $nc;
                push @pairs, {
                    round => 0 + $r,
                    deliveries_ratio => 0 + sprintf("%.2f", $ga->{max}{deliveries_per_s} / ($nc->{max}{deliveries_per_s} || 1)),
                    p50_ratio => 0 + sprintf("%.2f", $ga->{lat}{latency_us}{p50} / ($nc->{lat}{latency_us}{p50} || 1)),
                    p99_ratio => 0 + sprintf("%.2f", $ga->{lat}{latency_us}{p99} / ($nc->{lat}{latency_us}{p99} || 1)),
                    others_cpu_pct => [ map { 0 + sprintf("%.0f", ($_->{max}{others_cpu_pct} + $_->{lat}{others_cpu_pct}) / 2) } $ga, $nc ],
                };
            }
            $res{$n}{rounds} = \@pairs;
        }
    }
    my %doc = (
        bench => "fanout", date => scalar(gmtime) . " UTC",
        cpus => 0 + `nproc`, nginx_workers => 1, seconds => 0 + $secs,
        settings => { nice => 0 + $ENV{GIFT_FANOUT_NICE_USED}, rounds => 0 + $rounds, window => 0 + $window, lat_deliveries_per_s => 0 + $lat_dps,
            json_size => 0 + $size, client_batch_us => 0 + $batch,
            client_threads => 0 + $threads },
        client_selftest => $self,
        burst_check => { result => $burst_ok, run => $burst },
        results => \%res,
        ok => $ok && $burst_ok =~ /^(pass|skipped)/ ? JSON::PP::true : JSON::PP::false,
    );
    open(my $o, ">", $out) or die "$out: $!";
    print $o JSON::PP->new->canonical->pretty->encode(\%doc);
    close $o;

    printf "\n%-7s %-5s %9s %6s %7s %7s %7s %8s %6s %7s %6s %6s\n", "clients",
        "", "deliv/s", "us/del", "lat p50", "lat p99", "lat max", "lost",
        "KiB/", "KiB/cl", "worker", "client";
    printf "%-7s %-5s %9s %6s %7s %7s %7s %8s %6s %7s %6s %6s\n", "", "",
        "(max)", "(lat)", "ms", "ms", "ms", "", "idle", "after", "CPU%", "CPU%";
    for my $n (sort { $a <=> $b } keys %res) {
        for my $s (qw(gift nchan)) {
            my $x = $res{$n}{$s} or next;
            printf "%-7d %-5s %9.0f %6.2f %7.2f %7.2f %7.2f %8d %6.2f %7.2f %6.0f %6.0f\n",
                $n, $s eq "gift" ? "ours" : "nchan", $x->{deliveries_per_s},
                $x->{worker_us_per_delivery_lat_phase},
                $x->{p50_us} / 1000, $x->{p99_us} / 1000, $x->{max_us} / 1000,
                $x->{lost}, $x->{kib_per_idle_client},
                $x->{kib_per_client_after}, $x->{worker_cpu_pct_max_phase},
                $x->{client_cpu_pct_max_phase};
        }
        my ($g, $c) = @{$res{$n}}{qw(gift nchan)};
        my @p = @{$res{$n}{rounds} // []};
        printf "%-7d ours/nchan, median of per-round ratios: deliveries/s "
            . "%.2fx, lat p50 %.2fx, p99 %.2fx  (rounds, p99: %s)\n", $n,
            med(map { $_->{deliveries_ratio} } @p), med(map { $_->{p50_ratio} } @p),
            med(map { $_->{p99_ratio} } @p),
            join(" ", map { sprintf "%.2f [others %d/%d%%]", $_->{p99_ratio},
                @{$_->{others_cpu_pct}} } @p) if @p;
    }
    printf "\nmedians of %d round(s); deliv/s: max phase (window %d messages); "
        . "lat: %d deliveries/s (%s msg/s);\nus/del: worker CPU per delivery "
        . "in the lat phase; worker/client CPU%%: max phase; client: C epoll, "
        . "%d thread(s), reads at most every %d us\n",
        $rounds, $window, $lat_dps,
        join(", ", map { "$_ clients: " . $lat_dps / $_ } sort { $a <=> $b } keys %res),
        $threads, $batch;
    printf "CPU used by other processes on this machine meanwhile: %s%% of %d%%\n",
        join("/", map { my $n = $_; map { $res{$n}{$_} ? $res{$n}{$_}{others_cpu_pct} : () } qw(gift nchan) }
            sort { $a <=> $b } keys %res), 100 * `nproc`;
    if ($self) {
        printf "client selftest (trivial server, 1000 clients): %.0f deliveries/s "
            . "at %.0f%% of one core for the client\n", $self->{max}{deliveries_per_s},
            $self->{max}{client_cpu_pct};
    }
    printf "burst check (ours, 1000 clients, %s at once): %s\n",
        $burst ? $burst->{burst}{published} . " acknowledgements" : "-", $burst_ok;
    exit($ok ? 0 : 1);
' "$WORK" "$OUT/fanout.json" "$(( $(date +%s) - T_START ))" "$LAT_DPS" \
    "$WINDOW" "$SIZE" "$BATCH_US" "$THREADS" "$BURST_OK" "$DONE_ROUNDS" "$WORK"/runs/*.json || rc=1
say "wrote $OUT/fanout.json ($(( $(date +%s) - T_START )) s)"
exit $rc
