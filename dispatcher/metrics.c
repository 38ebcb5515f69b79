/*
 * metrics.c: GET /metrics in Prometheus text format, served by
 * libmicrohttpd from its own thread (MHD_USE_INTERNAL_POLLING_THREAD).
 *
 * The main loop never waits for it:
 *   - counters and simple gauges are dstats_t fields that only the main
 *     thread writes, each write a relaxed atomic store (STAT_ADD), read
 *     here with relaxed atomic loads;
 *   - per-device state (a table main may grow) is rendered by the main
 *     thread once a second into its own buffer, then swapped into the
 *     one served here under a mutex that main only ever *tries*: when a
 *     scrape holds it, main keeps its text and tries again next second;
 *   - consumer lag, ack-pending and DLQ depth come from JetStream info
 *     requests made here, on this thread, at most once a second (cached);
 *   - connection states: natsConnection_Status() (thread-safe) and a
 *     gauge main keeps for MQTT.
 *
 * The same counters as one log line (SIGUSR1, and at exit) are
 * dispatch_log_stats(), at the end: main thread.
 */
#include <arpa/inet.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "dispatcher.h"
#include "gift_util.h"

struct dmetrics {
    struct MHD_Daemon  *mhd;
    dsp_t              *d;
    pthread_mutex_t     mu;          /* the device text below */
    char               *dev, *mine;  /* served; main's, being written */
    size_t              devlen, devcap, minecap;
    int64_t             next_us;     /* main: next render */

    /* metrics thread only */
    int64_t             info_at_us;
    int                 info_ok;
    uint64_t            num_pending, ack_pending, redelivered, dlq_msgs,
                        waiting;
};

typedef struct {
    char   *p;
    size_t  len, cap;
} sbuf_t;

static void sb_printf(sbuf_t *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
sb_printf(sbuf_t *b, const char *fmt, ...)
{
    va_list ap;
    int     w;

    for (;;) {
        if (b->p == NULL) {
            return;
        }
        va_start(ap, fmt);
        w = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (w < 0) {
            return;
        }
        if ((size_t) w < b->cap - b->len) {
            b->len += (size_t) w;
            return;
        }
        b->cap = b->cap * 2 + (size_t) w;
        {
            char *np = realloc(b->p, b->cap);

            if (np == NULL) {
                free(b->p);
                b->p = NULL;
                return;
            }
            b->p = np;
        }
    }
}

static void
counter(sbuf_t *b, const char *name, const char *help, uint64_t v)
{
    sb_printf(b, "# HELP %s %s\n# TYPE %s counter\n%s %" PRIu64 "\n", name,
              help, name, name, v);
}

static void
gauge(sbuf_t *b, const char *name, const char *help, uint64_t v)
{
    sb_printf(b, "# HELP %s %s\n# TYPE %s gauge\n%s %" PRIu64 "\n", name,
              help, name, name, v);
}

/* JetStream's view, at most once a second (this thread only). */
static void
refresh_info(dmetrics_t *m)
{
    dsp_t          *d = m->d;
    jsConsumerInfo *ci = NULL;
    jsStreamInfo   *si = NULL;
    jsOptions       o;
    jsErrCode       jerr = 0;
    int64_t         now = gift_mono_us();

    if (m->info_at_us != 0 && now - m->info_at_us < 1000000) {
        return;
    }
    m->info_at_us = now;
    m->info_ok = 0;
    if (d->nats.js == NULL) {
        return;
    }
    jsOptions_Init(&o);
    o.Wait = 500;
    if (js_GetConsumerInfo(&ci, d->nats.js, GIFT_STREAM_EVENTS, GIFT_CONSUMER,
                           &o, &jerr) == NATS_OK)
    {
        m->num_pending = ci->NumPending;
        m->ack_pending = (uint64_t) ci->NumAckPending;
        m->redelivered = (uint64_t) ci->NumRedelivered;
        m->waiting = (uint64_t) ci->NumWaiting;
        jsConsumerInfo_Destroy(ci);
        m->info_ok = 1;
    }
    if (js_GetStreamInfo(&si, d->nats.js, GIFT_STREAM_DLQ, &o, &jerr)
        == NATS_OK)
    {
        m->dlq_msgs = si->State.Msgs;
        jsStreamInfo_Destroy(si);
    } else {
        m->info_ok = 0;
    }
}

static char *
render(dmetrics_t *m, size_t *len)
{
    static const int64_t le[DSP_NLAT_BUCKETS] = DSP_LAT_BUCKETS;
    dsp_t   *d = m->d;
    sbuf_t   b;
    int      i, nats_up;
    natsConnection  *hnc;

    b.cap = 16384;
    b.len = 0;
    b.p = malloc(b.cap);

    counter(&b, "gift_dispatcher_gifts_pulled_total",
            "Deliveries taken from the consumer (redeliveries included).",
            STAT_GET(d, received));
    counter(&b, "gift_dispatcher_gifts_redelivered_while_held_total",
            "Deliveries of a gift this dispatcher already held.",
            STAT_GET(d, duplicates));
    sb_printf(&b, "# HELP gift_dispatcher_gifts_acked_total Gifts whose "
              "outcome was stored and acked, by status.\n"
              "# TYPE gift_dispatcher_gifts_acked_total counter\n"
              "gift_dispatcher_gifts_acked_total{status=\"ok\"} %" PRIu64 "\n"
              "gift_dispatcher_gifts_acked_total{status=\"dead_letter\"} %"
              PRIu64 "\n", STAT_GET(d, acked_ok), STAT_GET(d, dead_letters));
    counter(&b, "gift_dispatcher_gifts_dead_lettered_total",
            "Gifts sent to GIFTS_DLQ.", STAT_GET(d, dead_letters));
    counter(&b, "gift_dispatcher_gifts_naked_total",
            "Naks sent (retries after a failure, releases at stop).",
            STAT_GET(d, naks));
    counter(&b, "gift_dispatcher_gifts_retried_total",
            "Gifts naked with a delay after a device error or timeout.",
            STAT_GET(d, retried));
    counter(&b, "gift_dispatcher_gifts_released_total",
            "Gifts given back unfinished (stop, KV unavailable).",
            STAT_GET(d, released));
    counter(&b, "gift_dispatcher_gifts_coalesced_total",
            "Gifts that shared an RPC with other gifts.",
            STAT_GET(d, coalesced));
    counter(&b, "gift_dispatcher_gifts_zero_rounds_total",
            "Gifts acknowledged with 0 rounds and no command.",
            STAT_GET(d, zero_rounds));
    counter(&b, "gift_dispatcher_rounds_total",
            "Rounds the devices confirmed.", STAT_GET(d, rounds_ok));
    counter(&b, "gift_dispatcher_in_progress_total",
            "InProgress sent for gifts held long.", STAT_GET(d, in_progress));
    counter(&b, "gift_dispatcher_done_checks_total",
            "Redeliveries looked up in GIFT_DONE.", STAT_GET(d, done_checks));
    counter(&b, "gift_dispatcher_done_hits_total",
            "Redeliveries found done: acked again without a command.",
            STAT_GET(d, done_hits));
    sb_printf(&b, "# HELP gift_dispatcher_streak_updates_total Streak frames"
              " by what they added: new (a CAS in GIFT_STREAKS), known (a "
              "repeat of a claimed frame), stale (nothing).\n"
              "# TYPE gift_dispatcher_streak_updates_total counter\n"
              "gift_dispatcher_streak_updates_total{outcome=\"new\"} %" PRIu64
              "\ngift_dispatcher_streak_updates_total{outcome=\"known\"} %"
              PRIu64 "\ngift_dispatcher_streak_updates_total{outcome=\"stale\"}"
              " %" PRIu64 "\n", STAT_GET(d, streak_new),
              STAT_GET(d, streak_known), STAT_GET(d, streak_stale));
    counter(&b, "gift_dispatcher_streak_conflicts_total",
            "Compare-and-set attempts lost to another writer.",
            STAT_GET(d, streak_conflicts));
    counter(&b, "gift_dispatcher_gifts_expired_total",
            "Gifts dead-lettered past nats.max_gift_age.",
            STAT_GET(d, expired));
    counter(&b, "gift_dispatcher_gifts_capped_total",
            "Gifts clamped to rules.max_rounds.", STAT_GET(d, capped));
    counter(&b, "gift_dispatcher_gifts_busy_released_total",
            "Gifts released for later: their device held its share "
            "(devices.max_held).", STAT_GET(d, busy_released));
    counter(&b, "gift_dispatcher_gifts_offline_requeued_total",
            "Gifts put back in their queue: the device did not answer "
            "(no attempt spent).", STAT_GET(d, offline_requeued));
    counter(&b, "gift_dispatcher_rate_waits_total",
            "Times a device waited for its rounds-per-minute limit.",
            STAT_GET(d, rate_waits));
    counter(&b, "gift_dispatcher_publish_errors_total",
            "GiftAck, marker or DLQ publishes that failed (retried).",
            STAT_GET(d, pub_errors));
    sb_printf(&b, "# HELP gift_dispatcher_rpcs_total RPCs by outcome.\n"
              "# TYPE gift_dispatcher_rpcs_total counter\n"
              "gift_dispatcher_rpcs_total{outcome=\"sent\"} %" PRIu64 "\n"
              "gift_dispatcher_rpcs_total{outcome=\"ok\"} %" PRIu64 "\n"
              "gift_dispatcher_rpcs_total{outcome=\"error\"} %" PRIu64 "\n"
              "gift_dispatcher_rpcs_total{outcome=\"timeout\"} %" PRIu64 "\n",
              STAT_GET(d, rpcs_sent), STAT_GET(d, rpc_ok),
              STAT_GET(d, rpc_errors), STAT_GET(d, rpc_timeouts));
    counter(&b, "gift_dispatcher_replies_unknown_total",
            "Replies for RPCs not in flight here (another instance's, late).",
            STAT_GET(d, replies_unknown));

    sb_printf(&b, "# HELP gift_dispatcher_rpc_latency_seconds RPC round "
              "trip, request to the device's answer.\n"
              "# TYPE gift_dispatcher_rpc_latency_seconds histogram\n");
    for (i = 0; i < DSP_NLAT_BUCKETS; i++) {
        sb_printf(&b, "gift_dispatcher_rpc_latency_seconds_bucket{le=\"%g\"}"
                  " %" PRIu64 "\n", (double) le[i] / 1000.0,
                  STAT_GET(d, rpc_lat_le[i]));
    }
    sb_printf(&b, "gift_dispatcher_rpc_latency_seconds_bucket{le=\"+Inf\"} %"
              PRIu64 "\ngift_dispatcher_rpc_latency_seconds_sum %.6f\n"
              "gift_dispatcher_rpc_latency_seconds_count %" PRIu64 "\n",
              STAT_GET(d, rpc_lat_count),
              (double) STAT_GET(d, rpc_lat_sum_us) / 1e6,
              STAT_GET(d, rpc_lat_count));

    gauge(&b, "gift_dispatcher_gifts_held",
          "Gifts held now (queued, in RPCs, in KV lookups, publishing).",
          STAT_GET(d, held));
    gauge(&b, "gift_dispatcher_consumer_pending_seen",
          "The consumer's pending count carried by the last delivery.",
          STAT_GET(d, consumer_pending));

    refresh_info(m);
    if (m->info_ok) {
        gauge(&b, "gift_dispatcher_consumer_lag",
              "Messages in GIFTS not yet delivered to the consumer "
              "(consumer info num_pending).", m->num_pending);
        gauge(&b, "gift_dispatcher_consumer_ack_pending",
              "Deliveries not yet acked, all dispatchers together.",
              m->ack_pending);
        gauge(&b, "gift_dispatcher_consumer_redelivered",
              "Messages delivered more than once and not yet acked.",
              m->redelivered);
        gauge(&b, "gift_dispatcher_dlq_messages", "Messages in GIFTS_DLQ.",
              m->dlq_msgs);
    }
    gauge(&b, "gift_dispatcher_jetstream_info_ok",
          "1 when the last consumer and DLQ info requests answered.",
          (uint64_t) m->info_ok);
    hnc = __atomic_load_n(&d->nats.hnc, __ATOMIC_ACQUIRE);
    nats_up = d->nats.nc != NULL && hnc != NULL
              && natsConnection_Status(d->nats.nc) == NATS_CONN_STATUS_CONNECTED
              && natsConnection_Status(hnc) == NATS_CONN_STATUS_CONNECTED;
    gauge(&b, "gift_dispatcher_nats_connected",
          "1 when connected to NATS (both connections: control and hot).", (uint64_t) nats_up);
    gauge(&b, "gift_dispatcher_mqtt_connected",
          "1 when connected to the broker and subscribed to replies.",
          STAT_GET(d, mqtt_up));
    gauge(&b, "gift_dispatcher_active",
          "1 when this dispatcher holds the lease (pulls gifts and sends "
          "commands); 0: a standby.", (uint64_t) lease_active(d));
    counter(&b, "gift_dispatcher_takeovers_total",
            "Leases this dispatcher took from another owner (released or "
            "expired).", __atomic_load_n(&d->lease.takeovers,
                                         __ATOMIC_RELAXED));
    {
        int64_t tk = __atomic_load_n(&d->lease.takeover_us, __ATOMIC_RELAXED);

        if (tk >= 0 && __atomic_load_n(&d->lease.takeovers,
                                       __ATOMIC_RELAXED) > 0)
        {
            sb_printf(&b, "# HELP gift_dispatcher_takeover_seconds Time "
                      "without an owner before this dispatcher's last "
                      "takeover (from the old owner's last sign of life seen "
                      "to the lease taken).\n# TYPE "
                      "gift_dispatcher_takeover_seconds gauge\n"
                      "gift_dispatcher_takeover_seconds %" PRId64 ".%06"
                      PRId64 "\n", tk / 1000000, tk % 1000000);
        }
    }

    pthread_mutex_lock(&m->mu);
    if (m->dev != NULL) {
        sb_printf(&b, "%.*s", (int) m->devlen, m->dev);
    }
    pthread_mutex_unlock(&m->mu);

    if (b.p == NULL) {
        return NULL;
    }
    *len = b.len;
    return b.p;
}

static enum MHD_Result
on_request(void *cls, struct MHD_Connection *c, const char *url,
    const char *method, const char *version, const char *upload_data,
    size_t *upload_data_size, void **con_cls)
{
    dmetrics_t          *m = cls;
    struct MHD_Response *r;
    enum MHD_Result      ret;
    char                *text;
    size_t               len = 0;
    static const char    nf[] = "not found: try /metrics\n";

    (void) version;
    (void) upload_data;
    (void) upload_data_size;
    (void) con_cls;
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        r = MHD_create_response_from_buffer(0, (void *) "",
                                            MHD_RESPMEM_PERSISTENT);
        ret = MHD_queue_response(c, MHD_HTTP_METHOD_NOT_ALLOWED, r);
        MHD_destroy_response(r);
        return ret;
    }
    if (strcmp(url, "/metrics") != 0) {
        r = MHD_create_response_from_buffer(sizeof(nf) - 1, (void *) nf,
                                            MHD_RESPMEM_PERSISTENT);
        ret = MHD_queue_response(c, MHD_HTTP_NOT_FOUND, r);
        MHD_destroy_response(r);
        return ret;
    }
    text = render(m, &len);
    if (text == NULL) {
        return MHD_NO;
    }
    r = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(r, "Content-Type",
                            "text/plain; version=0.0.4; charset=utf-8");
    ret = MHD_queue_response(c, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}

void
metrics_tick(dsp_t *d, int64_t now)
{
    dmetrics_t *m = d->metrics;
    size_t      len;
    char       *t;

    if (m == NULL || now < m->next_us) {
        return;
    }
    m->next_us = now + 1000000;
    if (m->mine == NULL) {
        m->minecap = 65536;
        m->mine = malloc(m->minecap);
        if (m->mine == NULL) {
            return;
        }
    }
    len = dispatch_device_metrics(d, m->mine, m->minecap);
    if (len + 1024 > m->minecap && m->minecap < (1u << 24)) {
        char *nb = realloc(m->mine, m->minecap * 2);

        if (nb != NULL) {
            m->mine = nb;
            m->minecap *= 2;
            len = dispatch_device_metrics(d, m->mine, m->minecap);
        }
    }
    if (pthread_mutex_trylock(&m->mu) != 0) {
        return;                     /* a scrape is reading: next second */
    }
    t = m->dev;
    m->dev = m->mine;
    m->devlen = len;
    len = m->devcap;
    m->devcap = m->minecap;
    m->mine = t;
    m->minecap = len;
    pthread_mutex_unlock(&m->mu);
}

int
metrics_start(dsp_t *d)
{
    dmetrics_t         *m;
    struct sockaddr_in  sin;
    char                host[128];
    const char         *listen = d->conf->metrics_listen, *colon;
    sigset_t            all, old;

    if (listen == NULL) {
        return 0;
    }
    colon = strrchr(listen, ':');
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t) atoi(colon + 1));
    snprintf(host, sizeof(host), "%.*s", (int) (colon - listen), listen);
    if (strcmp(host, "*") == 0 || strcmp(host, "0.0.0.0") == 0) {
        sin.sin_addr.s_addr = htonl(INADDR_ANY);
    } else if (strcmp(host, "localhost") == 0) {
        sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
        gift_log(GIFT_LOG_ERR, "metrics.listen: \"%s\" is not an IPv4 "
                 "address", host);
        return -1;
    }

    m = calloc(1, sizeof(*m));
    if (m == NULL || pthread_mutex_init(&m->mu, NULL) != 0) {
        free(m);
        return -1;
    }
    m->d = d;
    d->metrics = m;
    metrics_tick(d, gift_mono_us());          /* something to show at once */
    m->next_us = 0;

    /* MHD's thread must never take our signals */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    m->mhd = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD
                              | MHD_USE_ERROR_LOG,
                              0, NULL, NULL, on_request, m,
                              MHD_OPTION_SOCK_ADDR, (struct sockaddr *) &sin,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned) 10,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned) 64,
                              MHD_OPTION_END);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (m->mhd == NULL) {
        gift_log(GIFT_LOG_ERR, "metrics: cannot listen on %s (taken?)",
                 listen);
        metrics_stop(d);
        return -1;
    }
    gift_log(GIFT_LOG_INFO, "metrics on http://%s/metrics", listen);
    return 0;
}

void
metrics_stop(dsp_t *d)
{
    dmetrics_t *m = d->metrics;

    if (m == NULL) {
        return;
    }
    if (m->mhd != NULL) {
        MHD_stop_daemon(m->mhd);
    }
    pthread_mutex_destroy(&m->mu);
    free(m->dev);
    free(m->mine);
    free(m);
    d->metrics = NULL;
}

/* ------------------------------------------------------------ the log line */

void
dispatch_log_stats(const dsp_t *d)
{
    const dstats_t *s = &d->st;

    gift_log(GIFT_LOG_INFO, "stats: received %" PRIu64 " redelivered-held %"
             PRIu64 " ok %" PRIu64 " dead %" PRIu64 " retried %" PRIu64
             " released %" PRIu64 "; rpcs %" PRIu64 " ok %" PRIu64 " errors %"
             PRIu64 " timeouts %" PRIu64 " unknown-replies %" PRIu64
             "; publish errors %" PRIu64 "; held %zu, devices %zu",
             s->received, s->duplicates, s->acked_ok, s->dead_letters,
             s->retried, s->released, s->rpcs_sent, s->rpc_ok, s->rpc_errors,
             s->rpc_timeouts, s->replies_unknown, s->pub_errors, d->nheld,
             d->ndev);
}
