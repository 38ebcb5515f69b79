/*
 * dispbench: the pieces of bench/dispatcher.sh that a shell cannot do fast.
 *
 *   dispbench -s URL setup [--max-ack-pending N]
 *       create the streams, consumer and KV buckets (gift_provision)
 *   dispbench -s URL fill --count N [--devices 8] [--tag T]
 *       store N GiftEvents in GIFTS as nginx would (gift.events.tiktok,
 *       Nats-Msg-Id = event id), asynchronously; gift "G<k>" for device k
 *       (1..devices), diamond 1..9, quantity 1..3.  Prints
 *       "stored N in S s (R/s); rounds: motor_01=X ..." (the expected totals)
 *   dispbench -s URL pull --count N
 *       the JetStream pull-and-ack ceiling: a temporary durable consumer on
 *       GIFTS, fetch 256 at a time, ack each asynchronously, N messages;
 *       prints "pulled N in S s (R/s)", then deletes the consumer
 *   dispbench -s URL watch --count N [--timeout S]
 *       wait until GIFT_ACKS holds N messages; prints the time of the first
 *       and of the N-th (polling stream info every 10 ms) as
 *       "first F s, all A s, steady R/s" from its own start
 *   dispbench rtt --host H --port P --count N --window W
 *       the Mosquitto round-trip ceiling: RPCs in tbsim's shape, QoS 1,
 *       W in flight, against tbsim; prints "rtt N in S s (R/s), p50 X us,
 *       p99 Y us"
 *
 * Every figure is measured on loopback with everything on the same cores.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <mosquitto.h>
#include <nats/nats.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gift.pb-c.h"
#include "gift_provision.h"
#include "gift_util.h"

static const char *url = "nats://127.0.0.1:4222";
static long        count = 200000, devices = 8, window = 8, max_ack = -1;
static long        batch = 256;
static const char *tag = "b";
static const char *host = "127.0.0.1";
static int         port = 1883;
static double      timeout_s = 170;

static double
now_s(void)
{
    return (double) gift_mono_us() / 1e6;
}

static int
die_nats(const char *what, natsStatus s)
{
    fprintf(stderr, "dispbench: %s: %s (%s)\n", what, natsStatus_GetText(s),
            nats_GetLastError(NULL));
    return 1;
}

static natsStatus
nconnect(natsConnection **nc, jsCtx **js, int64_t max_pending)
{
    natsOptions *o = NULL;
    jsOptions    jo;
    natsStatus   s;

    s = natsOptions_Create(&o);
    if (s == NATS_OK) {
        s = natsOptions_SetURL(o, url);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetSendAsap(o, false);
    }
    if (s == NATS_OK) {
        s = natsConnection_Connect(nc, o);
    }
    natsOptions_Destroy(o);
    if (s == NATS_OK) {
        jsOptions_Init(&jo);
        jo.PublishAsync.MaxPending = max_pending;
        jo.PublishAsync.StallWait = 60000;
        s = natsConnection_JetStream(js, *nc, &jo);
    }
    return s;
}

/* ------------------------------------------------------------ setup, fill */

static int
cmd_setup(void)
{
    natsConnection        *nc = NULL;
    jsCtx                 *js = NULL;
    gift_provision_opts_t  o;
    natsStatus             s;
    int                    rc;

    if ((s = nconnect(&nc, &js, 1024)) != NATS_OK) {
        return die_nats(url, s);
    }
    gift_provision_defaults(&o);
    o.quiet = 1;
    o.max_ack_pending = (int) max_ack;
    rc = gift_provision(nc, js, &o) == 0 ? 0 : 1;
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return rc;
}

static int
cmd_fill(void)
{
    natsConnection      *nc = NULL;
    jsCtx               *js = NULL;
    jsPubOptions         po;
    natsMsg             *m = NULL;
    natsStatus           s;
    Gift__V1__GiftEvent  ev = GIFT__V1__GIFT_EVENT__INIT;
    uint8_t              buf[512];
    char                 id[64], gift[16], user[32];
    uint64_t            *rounds;
    uint32_t             seed = 12345;
    double               t0, t1;
    long                 i, k;
    size_t               len;

    rounds = calloc((size_t) devices + 1, sizeof(uint64_t));
    if (rounds == NULL || (s = nconnect(&nc, &js, 4096)) != NATS_OK) {
        return die_nats(url, NATS_NO_MEMORY);
    }
    ev.platform = "tiktok";
    ev.room_id = "bench-room";
    ev.user_name = "Bench Viewer";
    ev.gift_id = "";
    ev.streak_id = "";
    ev.streak_end = 1;
    t0 = now_s();
    for (i = 0; i < count; i++) {
        seed = seed * 1103515245u + 12345u;
        k = 1 + (long) ((seed >> 16) % (uint32_t) devices);
        snprintf(id, sizeof(id), "%s-%ld", tag, i);
        snprintf(gift, sizeof(gift), "G%ld", k);
        snprintf(user, sizeof(user), "viewer_%ld", i % 5000);
        ev.event_id = id;
        ev.user_id = user;
        ev.gift_name = gift;
        ev.diamond = 1 + (seed >> 8) % 9;
        ev.quantity = 1 + (seed >> 4) % 3;
        ev.streak_count = ev.quantity;
        ev.occurred_at_ms = gift_now_ms();
        ev.received_at_ms = ev.occurred_at_ms;
        rounds[k] += (uint64_t) ev.diamond * ev.quantity;
        len = gift__v1__gift_event__pack(&ev, buf);

        s = natsMsg_Create(&m, "gift.events.tiktok", NULL, (const char *) buf,
                           (int) len);
        if (s == NATS_OK) {
            s = natsMsgHeader_Set(m, "Nats-Msg-Id", id);
        }
        if (s == NATS_OK) {
            jsPubOptions_Init(&po);
            po.MsgId = id;
            po.MaxWait = 30000;
            s = js_PublishMsgAsync(js, &m, &po);
        }
        if (s != NATS_OK) {
            natsMsg_Destroy(m);
            return die_nats("publish", s);
        }
    }
    jsPubOptions_Init(&po);
    po.MaxWait = 60000;
    s = js_PublishAsyncComplete(js, &po);
    t1 = now_s();
    if (s != NATS_OK) {
        return die_nats("waiting for PubAcks", s);
    }
    printf("stored %ld in %.3f s (%.0f/s); rounds:", count, t1 - t0,
           (double) count / (t1 - t0));
    for (k = 1; k <= devices; k++) {
        printf(" motor_%02ld=%" PRIu64, k, rounds[k]);
    }
    printf("\n");
    free(rounds);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return 0;
}

/* ------------------------------------------------------------ pull ceiling */

static int
cmd_pull(void)
{
    natsConnection   *nc = NULL;
    jsCtx            *js = NULL;
    jsConsumerConfig  cc;
    jsConsumerInfo   *ci = NULL;
    jsSubOptions      so;
    jsFetchRequest    req;
    natsSubscription *sub = NULL;
    natsMsgList       list;
    jsErrCode         jerr = 0;
    natsStatus        s;
    long              got = 0;
    int               i;
    double            t0, t1;

    if ((s = nconnect(&nc, &js, 1024)) != NATS_OK) {
        return die_nats(url, s);
    }
    jsConsumerConfig_Init(&cc);
    cc.Durable = "bench_ceiling";
    cc.AckPolicy = js_AckExplicit;
    cc.DeliverPolicy = js_DeliverAll;
    cc.MaxAckPending = 20000;
    s = js_AddConsumer(&ci, js, GIFT_STREAM_EVENTS, &cc, NULL, &jerr);
    jsConsumerInfo_Destroy(ci);
    if (s != NATS_OK) {
        return die_nats("consumer bench_ceiling", s);
    }
    jsSubOptions_Init(&so);
    so.Stream = GIFT_STREAM_EVENTS;
    so.Consumer = "bench_ceiling";
    s = js_PullSubscribe(&sub, js, NULL, NULL, NULL, &so, &jerr);
    if (s != NATS_OK) {
        return die_nats("pull subscribe", s);
    }
    t0 = now_s();
    while (got < count && now_s() - t0 < timeout_s) {
        jsFetchRequest_Init(&req);
        req.Batch = (int) batch;
        req.Expires = 2000000000LL;
        memset(&list, 0, sizeof(list));
        s = natsSubscription_FetchRequest(&list, sub, &req);
        if (s != NATS_OK && s != NATS_TIMEOUT) {
            return die_nats("fetch", s);
        }
        for (i = 0; i < list.Count; i++) {
            natsMsg_Ack(list.Msgs[i], NULL);
        }
        got += list.Count;
        natsMsgList_Destroy(&list);
    }
    natsConnection_Flush(nc);
    t1 = now_s();
    printf("pulled %ld in %.3f s (%.0f/s)\n", got, t1 - t0,
           (double) got / (t1 - t0));
    natsSubscription_Unsubscribe(sub);
    natsSubscription_Destroy(sub);
    js_DeleteConsumer(js, GIFT_STREAM_EVENTS, "bench_ceiling", NULL, &jerr);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return got == count ? 0 : 1;
}

/* ------------------------------------------------------------ corepub */

/* Plain publishes of N 150-byte messages to PREFIX<i> (server cost of
 * per-gift writes such as GIFT_DONE markers), then a flush. */
static int
cmd_corepub(const char *prefix)
{
    natsConnection *nc = NULL;
    jsCtx          *js = NULL;
    natsStatus      s;
    char            subj[256], data[150];
    long            i;
    double          t0, t1;

    if ((s = nconnect(&nc, &js, 1024)) != NATS_OK) {
        return die_nats(url, s);
    }
    memset(data, 'x', sizeof(data));
    t0 = now_s();
    for (i = 0; i < count; i++) {
        snprintf(subj, sizeof(subj), "%s%ld", prefix, i);
        s = natsConnection_Publish(nc, subj, data, (int) sizeof(data));
        if (s != NATS_OK) {
            return die_nats("publish", s);
        }
    }
    natsConnection_FlushTimeout(nc, 60000);
    t1 = now_s();
    printf("published %ld in %.3f s\n", count, t1 - t0);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return 0;
}

/* ------------------------------------------------------------ watch */

static int
cmd_watch(void)
{
    natsConnection *nc = NULL;
    jsCtx          *js = NULL;
    jsStreamInfo   *si = NULL;
    jsErrCode       jerr = 0;
    natsStatus      s;
    double          t0 = now_s(), first = -1, t;
    uint64_t        n = 0, n_first = 0;
    struct timespec ts = { 0, 10000000L };

    if ((s = nconnect(&nc, &js, 1024)) != NATS_OK) {
        return die_nats(url, s);
    }
    for (;;) {
        t = now_s();
        if (t - t0 > timeout_s) {
            printf("timeout: %" PRIu64 " of %ld after %.1f s\n", n, count,
                   t - t0);
            return 1;
        }
        s = js_GetStreamInfo(&si, js, GIFT_STREAM_ACKS, NULL, &jerr);
        if (s == NATS_OK) {
            n = si->State.Msgs;
            jsStreamInfo_Destroy(si);
            if (n > 0 && first < 0) {
                first = t - t0;
                n_first = n;
            }
            if (n >= (uint64_t) count) {
                break;
            }
        }
        nanosleep(&ts, NULL);
    }
    t = now_s() - t0;
    printf("first %.3f s, all %.3f s, steady %.0f/s\n", first, t,
           (double) (n - n_first) / (t - first > 0 ? t - first : 1e-9));
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    return 0;
}

/* ------------------------------------------------------------ rtt */

static struct {
    long      sent, done, nfree;
    int64_t  *sent_at;            /* by RPC id */
    int64_t  *lat;
    int       ready;
} R;

static void
rtt_send(struct mosquitto *m)
{
    char topic[64], payload[256];
    int  n;

    while (R.sent < count && R.sent - R.done < window) {
        snprintf(topic, sizeof(topic), "v1/devices/me/rpc/request/%ld",
                 R.sent);
        n = snprintf(payload, sizeof(payload), "{\"method\":\"rotate\","
                     "\"params\":{\"deviceId\":\"motor_%02ld\",\"rounds\":1,"
                     "\"events\":[{\"id\":\"rtt-%ld-%ld\",\"rounds\":1}]}}",
                     1 + R.sent % 8, (long) getpid(), R.sent);
        R.sent_at[R.sent] = gift_mono_us();
        if (mosquitto_publish(m, NULL, topic, n, payload, 1, false)
            != MOSQ_ERR_SUCCESS)
        {
            return;
        }
        R.sent++;
    }
}

static void
rtt_on_message(struct mosquitto *m, void *obj,
    const struct mosquitto_message *msg)
{
    const char *p = strrchr(msg->topic, '/');
    long        id;

    (void) obj;
    id = p ? strtol(p + 1, NULL, 10) : -1;
    if (id < 0 || id >= count || R.sent_at[id] == 0) {
        return;
    }
    R.lat[R.done++] = gift_mono_us() - R.sent_at[id];
    R.sent_at[id] = 0;
    rtt_send(m);
}

static void
rtt_on_subscribe(struct mosquitto *m, void *obj, int mid, int n,
    const int *q)
{
    (void) m;
    (void) obj;
    (void) mid;
    (void) n;
    (void) q;
    R.ready = 1;
}

static int
cmp64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *) a, y = *(const int64_t *) b;

    return x < y ? -1 : x > y;
}

static int
cmd_rtt(void)
{
    struct mosquitto *m;
    struct pollfd     pfd;
    double            t0 = 0, t1;
    char              cid[64];

    R.sent_at = calloc((size_t) count, sizeof(int64_t));
    R.lat = calloc((size_t) count, sizeof(int64_t));
    mosquitto_lib_init();
    snprintf(cid, sizeof(cid), "dispbench-%ld", (long) getpid());
    m = mosquitto_new(cid, true, NULL);
    if (m == NULL || R.sent_at == NULL || R.lat == NULL) {
        return 1;
    }
    mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
    mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_int_option(m, MOSQ_OPT_SEND_MAXIMUM, 65535);
    mosquitto_message_callback_set(m, rtt_on_message);
    mosquitto_subscribe_callback_set(m, rtt_on_subscribe);
    if (mosquitto_connect(m, host, port, 30) != MOSQ_ERR_SUCCESS
        || mosquitto_subscribe(m, NULL, "v1/devices/me/rpc/response/+", 1)
           != MOSQ_ERR_SUCCESS)
    {
        fprintf(stderr, "dispbench: cannot reach %s:%d\n", host, port);
        return 1;
    }
    while (R.done < count) {
        if (R.ready && t0 == 0) {
            t0 = now_s();
            rtt_send(m);
        }
        if (t0 > 0 && now_s() - t0 > timeout_s) {
            break;
        }
        pfd.fd = mosquitto_socket(m);
        pfd.events = POLLIN | (mosquitto_want_write(m) ? POLLOUT : 0);
        if (poll(&pfd, 1, 100) > 0) {
            if (pfd.revents & POLLIN) {
                mosquitto_loop_read(m, 1);
            }
            if (pfd.revents & POLLOUT) {
                mosquitto_loop_write(m, 1);
            }
        }
        if (mosquitto_want_write(m)) {
            mosquitto_loop_write(m, 1);
        }
        mosquitto_loop_misc(m);
    }
    t1 = now_s();
    qsort(R.lat, (size_t) R.done, sizeof(int64_t), cmp64);
    printf("rtt %ld in %.3f s (%.0f/s), p50 %" PRId64 " us, p99 %" PRId64
           " us\n", R.done, t1 - t0, (double) R.done / (t1 - t0),
           R.done ? R.lat[R.done / 2] : 0,
           R.done ? R.lat[R.done * 99 / 100] : 0);
    mosquitto_disconnect(m);
    mosquitto_destroy(m);
    mosquitto_lib_cleanup();
    free(R.sent_at);
    free(R.lat);
    return R.done == count ? 0 : 1;
}

int
main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "count", required_argument, NULL, 'n' },
        { "devices", required_argument, NULL, 'd' },
        { "window", required_argument, NULL, 'w' },
        { "tag", required_argument, NULL, 'T' },
        { "host", required_argument, NULL, 'H' },
        { "port", required_argument, NULL, 'p' },
        { "timeout", required_argument, NULL, 't' },
        { "max-ack-pending", required_argument, NULL, 'a' },
        { "batch", required_argument, NULL, 'b' },
        { NULL, 0, NULL, 0 }
    };
    const char *cmd;
    int         c, rc;

    gift_log_set_program("dispbench");
    while ((c = getopt_long(argc, argv, "+s:", lo, NULL)) != -1) {
        switch (c) {
        case 's': url = optarg; break;
        default: break;
        }
    }
    if (optind >= argc) {
        fprintf(stderr, "usage: dispbench [-s URL] setup|fill|pull|watch|rtt "
                "[--count N] [--devices N] [--window N] [--tag T] "
                "[--host H --port P] [--timeout S] [--max-ack-pending N]\n");
        return 2;
    }
    cmd = argv[optind];
    optind++;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'n': count = atol(optarg); break;
        case 'd': devices = atol(optarg); break;
        case 'w': window = atol(optarg); break;
        case 'T': tag = optarg; break;
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 't': timeout_s = atof(optarg); break;
        case 'a': max_ack = atol(optarg); break;
        case 'b': batch = atol(optarg); break;
        default: return 2;
        }
    }
    if (count <= 0 || devices <= 0 || devices > 99 || window <= 0) {
        fprintf(stderr, "dispbench: bad numbers\n");
        return 2;
    }
    if (strcmp(cmd, "setup") == 0) {
        rc = cmd_setup();
    } else if (strcmp(cmd, "fill") == 0) {
        rc = cmd_fill();
    } else if (strcmp(cmd, "pull") == 0) {
        rc = cmd_pull();
    } else if (strcmp(cmd, "watch") == 0) {
        rc = cmd_watch();
    } else if (strcmp(cmd, "corepub") == 0) {
        rc = cmd_corepub(tag);
    } else if (strcmp(cmd, "rtt") == 0) {
        rc = cmd_rtt();
    } else {
        fprintf(stderr, "dispbench: unknown command %s\n", cmd);
        rc = 2;
    }
    nats_Close();
    return rc;
}
