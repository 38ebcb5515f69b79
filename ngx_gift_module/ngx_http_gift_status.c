/*
 * gift_status: counters in shared memory, totals across all workers, and
 * the location that shows them in Prometheus text format.
 *
 * Every counter is an ngx_atomic_t bumped with one atomic add: no lock on
 * the hot path.  The zone survives reloads (counters keep counting).  The
 * NATS state is kept per worker slot (ngx_worker), written by the worker's
 * own NATS client with atomic stores, read by any worker's status page.
 */

#include "ngx_http_gift_module.h"


#define NGX_HTTP_GIFT_MAX_WORKERS  64
#define NGX_HTTP_GIFT_HIST_N       14


typedef struct {
    ngx_atomic_t       pid;
    ngx_atomic_t       connected;
    ngx_atomic_t       reconnects;
} ngx_http_gift_worker_stat_t;


typedef struct {
    ngx_atomic_t       webhooks[NGX_HTTP_GIFT_OUTCOME_N];
    ngx_atomic_t       publish_bucket[NGX_HTTP_GIFT_HIST_N + 1];
    ngx_atomic_t       publish_sum_us;
    ngx_atomic_t       publish_count;
    ngx_atomic_t       counters[NGX_HTTP_GIFT_STAT_N];
    ngx_http_gift_worker_stat_t  workers[NGX_HTTP_GIFT_MAX_WORKERS];
} ngx_http_gift_stats_t;


static ngx_int_t ngx_http_gift_status_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);


static ngx_http_gift_stats_t  *ngx_http_gift_stats;


/* upper bounds of the publish latency buckets, microseconds */
static ngx_uint_t  ngx_http_gift_hist_us[NGX_HTTP_GIFT_HIST_N] = {
    250, 500, 1000, 2000, 5000, 10000, 25000, 50000, 100000, 250000,
    500000, 1000000, 2500000, 5000000
};


static struct {
    const char  *status;
    const char  *code;
} ngx_http_gift_outcomes[NGX_HTTP_GIFT_OUTCOME_N] = {
    { "202", "accepted" },
    { "202", "duplicate" },
    { "400", "invalid_json" },
    { "401", "signature_missing" },
    { "401", "signature_invalid" },
    { "401", "signature_expired" },
    { "405", "method_not_allowed" },
    { "413", "body_too_large" },
    { "415", "unsupported_media_type" },
    { "422", "invalid_field" },
    { "503", "unavailable" },
    { "503", "publish_timeout" },
    { "503", "stream_full" },
    { "500", "internal_error" },
};


static struct {
    const char  *name;
    const char  *type;
    const char  *help;
    const char  *labels;
} ngx_http_gift_counters[NGX_HTTP_GIFT_STAT_N] = {
    { "gift_stream_clients", "gauge",
      "Open acknowledgement streams.", "protocol=\"sse\"" },
    { "gift_stream_clients", "gauge",
      NULL, "protocol=\"websocket\"" },
    { "gift_stream_deliveries_total", "counter",
      "Acknowledgements written to stream clients.", NULL },
    { "gift_stream_resumes_total", "counter",
      "Streams resumed with Last-Event-ID or lastEventId.", NULL },
    { "gift_stream_gaps_total", "counter",
      "Resumes that missed more than gift_sse_replay_max.", NULL },
    { "gift_stream_slow_drops_total", "counter",
      "Stream clients cut off at gift_sse_max_backlog.", NULL },
    { "gift_acks_received_total", "counter",
      "Acknowledgements received from GIFT_ACKS by the workers.", NULL },
};


ngx_int_t
ngx_http_gift_status_add_zone(ngx_conf_t *cf)
{
    ngx_str_t        name = ngx_string("gift_status");
    ngx_shm_zone_t  *zone;

    zone = ngx_shared_memory_add(cf, &name,
                                 ngx_align(sizeof(ngx_http_gift_stats_t)
                                           + 8 * ngx_pagesize, ngx_pagesize),
                                 &ngx_http_gift_module);
    if (zone == NULL) {
        return NGX_ERROR;
    }

    zone->init = ngx_http_gift_status_init_zone;

    return NGX_OK;
}


static ngx_int_t
ngx_http_gift_status_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_slab_pool_t  *shpool;

    if (data) {
        /* a reload: keep counting in the same zone */
        shm_zone->data = data;
        ngx_http_gift_stats = data;
        return NGX_OK;
    }

    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        shm_zone->data = shpool->data;
        ngx_http_gift_stats = shpool->data;
        return NGX_OK;
    }

    ngx_http_gift_stats = ngx_slab_calloc(shpool,
                                          sizeof(ngx_http_gift_stats_t));
    if (ngx_http_gift_stats == NULL) {
        return NGX_ERROR;
    }

    shpool->data = ngx_http_gift_stats;
    shm_zone->data = ngx_http_gift_stats;

    return NGX_OK;
}


void
ngx_http_gift_stat_webhook(ngx_http_gift_outcome_e outcome)
{
    if (ngx_http_gift_stats) {
        (void) ngx_atomic_fetch_add(&ngx_http_gift_stats->webhooks[outcome],
                                    1);
    }
}


void
ngx_http_gift_stat_publish(uint64_t us)
{
    ngx_uint_t  i;

    if (ngx_http_gift_stats == NULL) {
        return;
    }

    for (i = 0; i < NGX_HTTP_GIFT_HIST_N; i++) {
        if (us <= ngx_http_gift_hist_us[i]) {
            break;
        }
    }

    (void) ngx_atomic_fetch_add(&ngx_http_gift_stats->publish_bucket[i], 1);
    (void) ngx_atomic_fetch_add(&ngx_http_gift_stats->publish_sum_us, us);
    (void) ngx_atomic_fetch_add(&ngx_http_gift_stats->publish_count, 1);
}


void
ngx_http_gift_stat_add(ngx_http_gift_stat_e which, ngx_atomic_int_t delta)
{
    if (ngx_http_gift_stats) {
        (void) ngx_atomic_fetch_add(&ngx_http_gift_stats->counters[which],
                                    delta);
    }
}


/* The worker's NATS client: atomic stores, read by other workers. */
void
ngx_http_gift_stat_nats(ngx_uint_t connected, ngx_uint_t reconnected)
{
    ngx_http_gift_worker_stat_t  *w;

    if (ngx_http_gift_stats == NULL
        || ngx_worker >= NGX_HTTP_GIFT_MAX_WORKERS)
    {
        return;
    }

    w = &ngx_http_gift_stats->workers[ngx_worker];

    w->pid = (ngx_atomic_uint_t) ngx_pid;
    w->connected = connected;

    if (reconnected) {
        (void) ngx_atomic_fetch_add(&w->reconnects, 1);
    }
}


ngx_int_t
ngx_http_gift_status_handler(ngx_http_request_t *r)
{
    size_t                  len;
    u_char                 *p, *start;
    uint64_t                cum;
    ngx_int_t               rc;
    ngx_uint_t              i, nworkers;
    ngx_core_conf_t        *ccf;
    ngx_http_gift_stats_t  *st;

    static ngx_str_t  type =
        ngx_string("text/plain; version=0.0.4; charset=utf-8");

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    st = ngx_http_gift_stats;
    if (st == NULL) {
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    ccf = (ngx_core_conf_t *) ngx_get_conf(ngx_cycle->conf_ctx,
                                           ngx_core_module);
    nworkers = ngx_min((ngx_uint_t) ccf->worker_processes,
                       NGX_HTTP_GIFT_MAX_WORKERS);

    len = 8192 + NGX_HTTP_GIFT_OUTCOME_N * 128 + NGX_HTTP_GIFT_HIST_N * 96
          + NGX_HTTP_GIFT_STAT_N * 256 + nworkers * 256;

    start = ngx_pnalloc(r->pool, len);
    if (start == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = start;

    p = ngx_sprintf(p,
            "# HELP gift_webhooks_total Webhook answers by HTTP status and "
            "code.\n# TYPE gift_webhooks_total counter\n");
    for (i = 0; i < NGX_HTTP_GIFT_OUTCOME_N; i++) {
        p = ngx_sprintf(p, "gift_webhooks_total{status=\"%s\",code=\"%s\"} "
                        "%uA\n", ngx_http_gift_outcomes[i].status,
                        ngx_http_gift_outcomes[i].code, st->webhooks[i]);
    }

    p = ngx_sprintf(p,
            "# HELP gift_publish_seconds Webhook received to JetStream "
            "PubAck.\n# TYPE gift_publish_seconds histogram\n");
    cum = 0;
    for (i = 0; i < NGX_HTTP_GIFT_HIST_N; i++) {
        cum += st->publish_bucket[i];
        p = ngx_sprintf(p, "gift_publish_seconds_bucket{le=\"%ui.%06ui\"} "
                        "%uL\n", ngx_http_gift_hist_us[i] / 1000000,
                        ngx_http_gift_hist_us[i] % 1000000, cum);
    }
    cum += st->publish_bucket[NGX_HTTP_GIFT_HIST_N];
    p = ngx_sprintf(p, "gift_publish_seconds_bucket{le=\"+Inf\"} %uL\n"
                    "gift_publish_seconds_sum %uA.%06uA\n"
                    "gift_publish_seconds_count %uL\n", cum,
                    st->publish_sum_us / 1000000, st->publish_sum_us % 1000000,
                    cum);

    for (i = 0; i < NGX_HTTP_GIFT_STAT_N; i++) {
        if (ngx_http_gift_counters[i].help) {
            p = ngx_sprintf(p, "# HELP %s %s\n# TYPE %s %s\n",
                            ngx_http_gift_counters[i].name,
                            ngx_http_gift_counters[i].help,
                            ngx_http_gift_counters[i].name,
                            ngx_http_gift_counters[i].type);
        }

        if (ngx_http_gift_counters[i].labels) {
            p = ngx_sprintf(p, "%s{%s} %uA\n", ngx_http_gift_counters[i].name,
                            ngx_http_gift_counters[i].labels,
                            st->counters[i]);
        } else {
            p = ngx_sprintf(p, "%s %uA\n", ngx_http_gift_counters[i].name,
                            st->counters[i]);
        }
    }

    p = ngx_sprintf(p,
            "# HELP gift_nats_connected Whether the worker's NATS "
            "connection is up.\n# TYPE gift_nats_connected gauge\n");
    for (i = 0; i < nworkers; i++) {
        p = ngx_sprintf(p, "gift_nats_connected{worker=\"%ui\"} %uA\n", i,
                        st->workers[i].connected);
    }

    p = ngx_sprintf(p,
            "# HELP gift_nats_reconnects_total NATS reconnections per "
            "worker slot.\n# TYPE gift_nats_reconnects_total counter\n");
    for (i = 0; i < nworkers; i++) {
        p = ngx_sprintf(p, "gift_nats_reconnects_total{worker=\"%ui\"} %uA\n",
                        i, st->workers[i].reconnects);
    }

    return ngx_http_gift_send_body(r, NGX_HTTP_OK, &type, start, p - start);
}
