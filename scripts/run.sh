#!/usr/bin/env bash
# make run: the whole stack on loopback, in the foreground; Ctrl-C stops it.
# Ports (each overridable): GIFT_HTTP_PORT 8080, GIFT_NATS_PORT 14222,
# GIFT_NATS_HTTP_PORT 18222, GIFT_MQTT_PORT 11883, GIFT_METRICS_PORT 19464.
# GIFT_RUN_DIR: where the state and logs go (build/run; t/62 uses its own).
# GIFT_NATS_GOMAXPROCS: nats-server's GOMAXPROCS (1; "" for Go's default).
# GIFT_RUN_SCHED: the scheduling policy of nginx, nats-server and the
# dispatcher: batch (SCHED_BATCH, the default) or "" (the system's default).
# Every part runs in the foreground of this script, in its process group:
# nothing daemonizes, so Ctrl-C, or a signal to the group, stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=${GIFT_RUN_DIR:-$ROOT/build/run}
HTTP_PORT=${GIFT_HTTP_PORT:-8080}
NATS_PORT=${GIFT_NATS_PORT:-14222}
NATS_HTTP_PORT=${GIFT_NATS_HTTP_PORT:-18222}
MQTT_PORT=${GIFT_MQTT_PORT:-11883}
METRICS_PORT=${GIFT_METRICS_PORT:-19464}

taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for spec in "nginx:$HTTP_PORT:GIFT_HTTP_PORT" "NATS:$NATS_PORT:GIFT_NATS_PORT" \
            "NATS monitoring:$NATS_HTTP_PORT:GIFT_NATS_HTTP_PORT" \
            "MQTT:$MQTT_PORT:GIFT_MQTT_PORT" \
            "dispatcher metrics:$METRICS_PORT:GIFT_METRICS_PORT"; do
    IFS=: read -r what port var <<<"$spec"
    if taken "$port"; then
        echo "make run: port $port ($what) is taken by another program;" \
             "stop it or choose another port with $var=..." >&2
        exit 1
    fi
done

# SCHED_BATCH: woken up, nginx, nats-server and the dispatcher do not
# preempt the program on the CPU (ours or another); each gift wakes them
# some ten times, and each preemption was a context switch more.  At the
# reference load it takes about a sixth of their CPU away, p99 unchanged
# (docs/benchmarks.md); on a machine whose cores are all busy a wake-up
# waits for the running program's slice instead (a few ms).  Nothing
# real-time: chrt needs no privilege for it.
sched=()
case ${GIFT_RUN_SCHED-batch} in
    batch) sched=(chrt --batch 0)
           if ! chrt --batch 0 true 2>/dev/null; then
               echo "make run: chrt --batch is unavailable here; running" \
                    "with the default scheduling policy" >&2
               sched=()
           fi ;;
    "") ;;
    *) echo "make run: GIFT_RUN_SCHED=$GIFT_RUN_SCHED: batch, or empty for" \
            "the system's default" >&2; exit 1 ;;
esac

mkdir -p "$RUN"/{nats,logs,tmp}
pids=()
cleanup() {
    trap - INT TERM EXIT
    echo; echo "make run: stopping"
    for ((i=${#pids[@]}-1; i>=0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    exit 0
}
trap cleanup INT TERM EXIT

wait_port() {  # port, name, pid
    for _ in $(seq 100); do
        taken "$1" && return 0
        kill -0 "$3" 2>/dev/null || { echo "make run: $2 exited; see $RUN/logs" >&2; exit 1; }
        sleep 0.1
    done
    echo "make run: $2 did not open port $1; see $RUN/logs" >&2; exit 1
}

# One Go thread running at a time (GIFT_NATS_GOMAXPROCS, 1; "" for Go's
# default, one per core): at the reference load nats-server's CPU goes
# mostly to waking its threads, which one thread does not (docs/benchmarks.md)
nats_env=()
if [[ -n ${GIFT_NATS_GOMAXPROCS-1} ]]; then
    nats_env=(env "GOMAXPROCS=${GIFT_NATS_GOMAXPROCS-1}")
fi
"${sched[@]}" "${nats_env[@]}" nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_HTTP_PORT" \
    -sd "$RUN/nats" >"$RUN/logs/nats.log" 2>&1 &
pids+=($!)
wait_port "$NATS_PORT" nats-server $!
NATS_URL=nats://127.0.0.1:$NATS_PORT
build/giftctl -s "$NATS_URL" setup

# ThingsBoard: the stand-in (tools/tbstandin: ThingsBoard's MQTT transport
# and the Gift RPC router rule chain, 4 dispatcher devices, 8 motors) and
# its motors, as two node processes in this process group.  GIFT_TB=tbsim:
# tbsim on mosquitto instead (devices on a plain broker).
if [[ ${GIFT_TB:-} != tbsim && -x build/gift-dispatcher \
      && -d tools/tbstandin/node_modules/aedes ]] && command -v node >/dev/null; then
    node tools/tbstandin/tb.mjs --host 127.0.0.1 --port "$MQTT_PORT" \
        --motors 8 --dispatchers 4 --out "$RUN/tb.json" \
        >"$RUN/logs/tbstandin.log" 2>&1 &
    pids+=($!)
    wait_port "$MQTT_PORT" gift-tbstandin $!
    node tools/tbstandin/motors.mjs --host 127.0.0.1 --port "$MQTT_PORT" \
        --motors 8 --speed "${GIFT_MOTOR_SPEED:-0}" --out "$RUN/motors.json" \
        --control "$RUN/motors.control" >"$RUN/logs/motors.log" 2>&1 &
    pids+=($!)
    # the example with simulated motors' limits (as below)
    sed -e "s#127.0.0.1:14222#127.0.0.1:$NATS_PORT#g" \
        -e "s#11883#$MQTT_PORT#g" -e "s#19464#$METRICS_PORT#g" \
        -e 's#^\( *max_rounds = \)[0-9]*;#\1100000;  \# make run: simulated motors#' \
        -e 's#^\( *coalesce_max_rounds = \)[0-9]*;#\1100000;  \# make run: simulated motors#' \
        -e 's#^\( *rounds_per_minute = \)[0-9]*;#\1"unlimited";  \# make run: simulated motors#' \
        dispatcher/gift-dispatcher.conf.example >"$RUN/gift-dispatcher.conf"
    "${sched[@]}" build/gift-dispatcher -c "$RUN/gift-dispatcher.conf" \
        >"$RUN/logs/dispatcher.log" 2>&1 &
    pids+=($!)
elif [[ -x build/tbsim && -x build/gift-dispatcher ]]; then
    cat >"$RUN/mosquitto.conf" <<MQ
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
# QoS 1 messages beyond the default queue of 1000 would be dropped
max_queued_messages 0
persistence false
log_dest stderr
MQ
    /usr/sbin/mosquitto -c "$RUN/mosquitto.conf" >"$RUN/logs/mosquitto.log" 2>&1 &
    pids+=($!)
    wait_port "$MQTT_PORT" mosquitto $!
    build/tbsim --host 127.0.0.1 --port "$MQTT_PORT" --out "$RUN/tbsim.json" \
        >"$RUN/logs/tbsim.log" 2>&1 &
    pids+=($!)
    # the example with simulated motors' limits: per gift and per command
    # 100,000 rounds, and no rate limit (benchmarks measure the pipeline,
    # not a motor's pace); everything else as users run it
    sed -e "s#127.0.0.1:14222#127.0.0.1:$NATS_PORT#g" \
        -e "s#11883#$MQTT_PORT#g" -e "s#19464#$METRICS_PORT#g" \
        -e 's#^\( *max_rounds = \)[0-9]*;#\1100000;  \# make run: simulated motors#' \
        -e 's#^\( *coalesce_max_rounds = \)[0-9]*;#\1100000;  \# make run: simulated motors#' \
        -e 's#^\( *rounds_per_minute = \)[0-9]*;#\1"unlimited";  \# make run: simulated motors#' \
        dispatcher/gift-dispatcher.conf.example >"$RUN/gift-dispatcher.conf"
    "${sched[@]}" build/gift-dispatcher -c "$RUN/gift-dispatcher.conf" \
        >"$RUN/logs/dispatcher.log" 2>&1 &
    pids+=($!)
fi

# nginx.conf.example itself, with the build tree's paths and the ports above
sed -e "s#/usr/lib/nginx/modules/ngx_http_gift_module.so#$ROOT/build/ngx_http_gift_module.so#" \
    -e "s#/var/log/nginx/gift-error.log#$RUN/logs/nginx-error.log#" \
    -e "s#/run/nginx-gift.pid#$RUN/nginx.pid#" \
    -e "s#/usr/share/gift/web#$ROOT/web#" \
    -e "s#127.0.0.1:8080#127.0.0.1:$HTTP_PORT#" \
    -e "s#nats://127.0.0.1:14222#$NATS_URL#" \
    -e "s#^http {#http {\n    client_body_temp_path $RUN/tmp/body;\n    proxy_temp_path $RUN/tmp/proxy;\n    fastcgi_temp_path $RUN/tmp/fastcgi;\n    uwsgi_temp_path $RUN/tmp/uwsgi;\n    scgi_temp_path $RUN/tmp/scgi;#" \
    nginx.conf.example >"$RUN/nginx.conf"
"${sched[@]}" nginx -p "$RUN/" -c "$RUN/nginx.conf" -e "$RUN/logs/nginx-error.log" -g 'daemon off;' &
pids+=($!)
wait_port "$HTTP_PORT" nginx $!

cat <<MSG

  The gift pipeline is running (logs in $RUN/logs). Try:

    curl -i -H 'Content-Type: application/json' \\
      -d '{"event":"gift","platform":"tiktok","userId":"user_123","giftName":"Motor","diamond":10,"quantity":1,"timestamp":1700000000000}' \\
      http://127.0.0.1:$HTTP_PORT/gift
    build/giftctl -s $NATS_URL get GIFTS 1
    build/giftctl -s $NATS_URL info

  What the motors did: kill -USR1 <gift-motors pid>; cat $RUN/motors.json
  Every RPC a motor receives (the stand-in's read-only tap), e.g.:
    mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -t 'v1/devices/+/rpc/request/+' -v

  Ctrl-C stops everything.
MSG
wait -n "${pids[@]}" || true
echo "make run: a component exited; see $RUN/logs" >&2
