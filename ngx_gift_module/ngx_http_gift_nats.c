/*
 * The bridge between a worker's event loop and cnats, for tls:// URLs in
 * gift_nats_url: it publishes webhooks and follows GIFT_ACKS.  (With
 * nats:// URLs, ngx_http_gift_publisher.c does both on the event loop
 * itself, and this file only lends it ngx_http_gift_frame_create() and
 * ngx_http_gift_puback_parse().)
 *
 * cnats keeps threads of its own, and its reconnect thread holds the
 * connection lock while it dials: any cnats call that takes that lock can
 * wait for seconds.  So no cnats call that touches the connection is made on
 * the event loop.  Layout, per worker:
 *
 *   event loop --(jobs: natsMsg*, mutex + condvar)--> bridge thread
 *                                                      natsConnection_PublishMsg
 *   cnats reply thread --(results, mutex + eventfd)--> event loop
 *
 * The loop builds each message itself (natsMsg_Create and header calls only
 * allocate; they take no connection lock), and the bridge thread publishes it
 * as a JetStream request whose reply subject is "<inbox>.<id>".  The PubAck
 * comes back on this worker's one wildcard subscription "<inbox>.*", which
 * maps it to its request by id: no per-request subscription, no lookup on a
 * cnats thread.  Results are handed to the loop through an eventfd that is an
 * nginx read event (not ngx_notify(), whose one slot belongs to thread pools).
 * Both queues are vectors swapped whole under a mutex that is held only for
 * an append or a swap.
 *
 * When a location streams acknowledgements, the bridge thread also follows
 * GIFT_ACKS with an ordered consumer (js_Subscribe, Ordered): its delivery
 * thread decodes each GiftAck and frames it once (JSON, SSE, WebSocket) into
 * one allocation, which travels to the loop through the same eventfd.
 *
 * No cnats thread ever touches an nginx structure, and log lines from cnats
 * callbacks travel through the result queue (id 0) to be written by the loop.
 */

#include "ngx_http_gift_module.h"

#include <pthread.h>
#include <stdatomic.h>
#include <sys/eventfd.h>

#include <nats/nats.h>
#include <jansson.h>

#include "gift.pb-c.h"
#include "gift_json.h"


typedef struct {
    void                  **items;
    size_t                  n;
    size_t                  cap;
} ngx_http_gift_vec_t;


typedef struct {
    ngx_http_gift_pub_result_t *items;
    size_t                      n;
    size_t                      cap;
} ngx_http_gift_results_t;


typedef struct {
    ngx_cycle_t                *cycle;
    ngx_log_t                  *log;

    /* loop -> bridge */
    pthread_mutex_t             jobs_lock;
    pthread_cond_t              jobs_cond;
    ngx_http_gift_vec_t         jobs;
    ngx_uint_t                  jobs_max;
    unsigned                    bridge_waiting:1;
    unsigned                    stop:1;

    /* cnats threads -> loop */
    pthread_mutex_t             res_lock;
    ngx_http_gift_results_t     results;
    ngx_http_gift_results_t     spare;          /* loop only */
    ngx_http_gift_vec_t         acks;           /* of ngx_http_gift_frame_t* */
    ngx_http_gift_vec_t         acks_spare;     /* loop only */
    int                         efd;
    ngx_connection_t           *efd_conn;

    pthread_t                   thread;
    unsigned                    thread_started:1;

    atomic_int                  connected;
    _Atomic uint64_t            acks_origin;
    ngx_uint_t                  was_connected;  /* cnats threads only */

    /* bridge thread only (set before it starts) */
    const char                **urls;
    int                         nurls;
    ngx_msec_t                  reconnect_wait;
    natsConnection             *nc;
    natsSubscription           *sub;
    ngx_uint_t                  follow_acks;
    ngx_uint_t                  publish;        /* tls://: webhooks too */
    ngx_uint_t                  replay_max;
    jsCtx                      *js;
    natsSubscription           *acks_sub;
    ngx_uint_t                  acks_warned;

    /* loop only */
    ngx_event_t                 wake_ev;        /* posted: wake the bridge */
    char                        inbox[64];
    size_t                      inbox_len;
    uint64_t                    next_id;
    ngx_rbtree_t                pending;
    ngx_rbtree_node_t           sentinel;
} ngx_http_gift_bridge_t;


static void *ngx_http_gift_bridge_thread(void *arg);
static void ngx_http_gift_nats_results_handler(ngx_event_t *ev);
static void ngx_http_gift_wake_bridge(ngx_event_t *ev);
static void ngx_http_gift_on_reply(natsConnection *nc, natsSubscription *sub,
    natsMsg *msg, void *closure);
static void ngx_http_gift_post_result(ngx_http_gift_bridge_t *b,
    ngx_http_gift_pub_result_t *res);
static void ngx_http_gift_post_log(ngx_http_gift_bridge_t *b,
    ngx_http_gift_pub_status_e level, const char *fmt, ...);


static ngx_http_gift_bridge_t  *ngx_http_gift_bridge;


ngx_int_t
ngx_http_gift_nats_init_process(ngx_cycle_t *cycle,
    ngx_http_gift_main_conf_t *gmcf)
{
    int                      err;
    ngx_str_t               *url;
    ngx_uint_t               i;
    natsInbox               *inbox;
    natsStatus               s;
    ngx_event_t             *rev;
    ngx_connection_t        *c;
    ngx_http_gift_bridge_t  *b;

    if (!gmcf->nats_tls) {
        return NGX_OK;              /* the publisher does all there is */
    }

    b = ngx_pcalloc(cycle->pool, sizeof(ngx_http_gift_bridge_t));
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->cycle = cycle;
    b->log = cycle->log;
    b->efd = -1;
    b->jobs_max = gmcf->queue_size;
    b->reconnect_wait = gmcf->reconnect_wait;
    b->follow_acks = gmcf->follow_acks;
    b->publish = gmcf->nats_tls;
    b->replay_max = gmcf->replay_max;
    b->next_id = 1;
    ngx_rbtree_init(&b->pending, &b->sentinel, ngx_rbtree_insert_value);

    b->wake_ev.handler = ngx_http_gift_wake_bridge;
    b->wake_ev.data = b;
    b->wake_ev.log = cycle->log;

    url = gmcf->nats_urls->elts;
    b->nurls = (int) gmcf->nats_urls->nelts;
    b->urls = ngx_palloc(cycle->pool, b->nurls * sizeof(char *));
    if (b->urls == NULL) {
        return NGX_ERROR;
    }
    for (i = 0; i < gmcf->nats_urls->nelts; i++) {
        b->urls[i] = (const char *) url[i].data;
    }

    s = nats_Open(-1);
    if (s != NATS_OK) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, 0,
                      "gift: cannot initialize the NATS library: %s",
                      natsStatus_GetText(s));
        return NGX_ERROR;
    }

    /* pure allocation: no connection involved */
    if (natsInbox_Create(&inbox) != NATS_OK) {
        return NGX_ERROR;
    }
    b->inbox_len = ngx_cpystrn((u_char *) b->inbox, (u_char *) inbox,
                               sizeof(b->inbox) - 24)
                   - (u_char *) b->inbox;
    natsInbox_Destroy(inbox);

    pthread_mutex_init(&b->jobs_lock, NULL);
    pthread_cond_init(&b->jobs_cond, NULL);
    pthread_mutex_init(&b->res_lock, NULL);

    b->efd = eventfd(0, EFD_NONBLOCK|EFD_CLOEXEC);
    if (b->efd == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "gift: eventfd() failed");
        return NGX_ERROR;
    }

    c = ngx_get_connection(b->efd, cycle->log);
    if (c == NULL) {
        close(b->efd);
        b->efd = -1;
        return NGX_ERROR;
    }

    c->data = b;
    rev = c->read;
    rev->handler = ngx_http_gift_nats_results_handler;
    rev->log = cycle->log;
    b->efd_conn = c;

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        return NGX_ERROR;
    }

    ngx_http_gift_bridge = b;

    err = pthread_create(&b->thread, NULL, ngx_http_gift_bridge_thread, b);
    if (err != 0) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, err,
                      "gift: pthread_create() failed");
        ngx_http_gift_bridge = NULL;
        return NGX_ERROR;
    }
    b->thread_started = 1;

    return NGX_OK;
}


void
ngx_http_gift_nats_exit_process(ngx_cycle_t *cycle)
{
    size_t                   i;
    ngx_http_gift_bridge_t  *b;

    b = ngx_http_gift_bridge;
    if (b == NULL) {
        return;
    }

    ngx_http_gift_bridge = NULL;

    if (b->wake_ev.posted) {
        ngx_delete_posted_event(&b->wake_ev);
    }

    if (b->thread_started) {
        pthread_mutex_lock(&b->jobs_lock);
        b->stop = 1;
        pthread_cond_signal(&b->jobs_cond);
        pthread_mutex_unlock(&b->jobs_lock);

        pthread_join(b->thread, NULL);
    }

    for (i = 0; i < b->jobs.n; i++) {
        natsMsg_Destroy(b->jobs.items[i]);
    }
    free(b->jobs.items);
    b->jobs.items = NULL;
    b->jobs.n = 0;

    /*
     * Wait for cnats's own threads: a callback still running could post a
     * result, so the queue and the eventfd go only after they are gone.
     */
    if (nats_CloseAndWait(2000) != NATS_OK) {
        ngx_log_error(NGX_LOG_WARN, cycle->log, 0,
                      "gift: NATS library threads did not stop in time");

        /* leave the eventfd to the exiting process; free the slot only */
        if (b->efd_conn) {
            if (b->efd_conn->read->active) {
                ngx_del_event(b->efd_conn->read, NGX_READ_EVENT,
                              NGX_CLOSE_EVENT);
            }
            b->efd_conn->fd = (ngx_socket_t) -1;
            ngx_free_connection(b->efd_conn);
        }
        return;
    }

    free(b->results.items);
    free(b->spare.items);

    for (i = 0; i < b->acks.n; i++) {
        ngx_free(b->acks.items[i]);
    }
    free(b->acks.items);
    free(b->acks_spare.items);

    if (b->efd_conn) {
        ngx_close_connection(b->efd_conn);   /* closes b->efd */
        b->efd_conn = NULL;

    } else if (b->efd != -1) {
        close(b->efd);
    }

    pthread_mutex_destroy(&b->jobs_lock);
    pthread_cond_destroy(&b->jobs_cond);
    pthread_mutex_destroy(&b->res_lock);
}


ngx_uint_t
ngx_http_gift_bridge_connected(void)
{
    return ngx_http_gift_bridge != NULL
           && atomic_load_explicit(&ngx_http_gift_bridge->connected,
                                   memory_order_relaxed);
}


uint64_t
ngx_http_gift_bridge_acks_origin(void)
{
    return ngx_http_gift_bridge == NULL
           ? 0 : atomic_load(&ngx_http_gift_bridge->acks_origin);
}


ngx_int_t
ngx_http_gift_bridge_publish(ngx_http_gift_pending_t *p, const char *subject,
    const char *msg_id, const u_char *data, size_t len, ngx_log_t *log)
{
    void                   **items;
    char                     reply[96];
    size_t                   cap;
    natsMsg                 *msg;
    natsStatus               s;
    ngx_uint_t               wake;
    ngx_http_gift_bridge_t  *b;

    b = ngx_http_gift_bridge;

    if (b == NULL || !atomic_load_explicit(&b->connected, memory_order_relaxed))
    {
        return NGX_DECLINED;
    }

    ngx_sprintf((u_char *) reply, "%s.%uL%Z", b->inbox, b->next_id);

    msg = NULL;
    s = natsMsg_Create(&msg, subject, reply, (const char *) data, (int) len);
    if (s == NATS_OK && msg_id != NULL) {
        s = natsMsgHeader_Set(msg, "Nats-Msg-Id", msg_id);
    }
    if (s != NATS_OK) {
        ngx_log_error(NGX_LOG_ERR, log, 0, "gift: cannot build message: %s",
                      natsStatus_GetText(s));
        natsMsg_Destroy(msg);
        return NGX_ERROR;
    }

    pthread_mutex_lock(&b->jobs_lock);

    if (b->jobs.n >= b->jobs_max) {
        pthread_mutex_unlock(&b->jobs_lock);
        natsMsg_Destroy(msg);
        return NGX_BUSY;
    }

    if (b->jobs.n == b->jobs.cap) {
        cap = b->jobs.cap ? b->jobs.cap * 2 : 256;
        items = realloc(b->jobs.items, cap * sizeof(void *));
        if (items == NULL) {
            pthread_mutex_unlock(&b->jobs_lock);
            natsMsg_Destroy(msg);
            return NGX_ERROR;
        }
        b->jobs.items = items;
        b->jobs.cap = cap;
    }

    b->jobs.items[b->jobs.n++] = msg;
    wake = b->bridge_waiting;

    pthread_mutex_unlock(&b->jobs_lock);

    /*
     * Waking a thread costs more than the rest of a publish: wake the bridge
     * once per pass of the event loop, after every request of the pass has
     * queued its message (posted events run at the end of the pass).
     */
    if (wake && !b->wake_ev.posted) {
        ngx_post_event(&b->wake_ev, &ngx_posted_events);
    }

    p->node.key = b->next_id++;
    p->queued = 1;
    ngx_rbtree_insert(&b->pending, &p->node);

    return NGX_OK;
}


static void
ngx_http_gift_wake_bridge(ngx_event_t *ev)
{
    ngx_http_gift_bridge_t *b = ev->data;

    ngx_uint_t  wake;

    pthread_mutex_lock(&b->jobs_lock);
    wake = b->bridge_waiting;
    b->bridge_waiting = 0;
    pthread_mutex_unlock(&b->jobs_lock);

    if (wake) {
        pthread_cond_signal(&b->jobs_cond);
    }
}


void
ngx_http_gift_bridge_cancel(ngx_http_gift_pending_t *p)
{
    if (p->queued && ngx_http_gift_bridge != NULL) {
        ngx_rbtree_delete(&ngx_http_gift_bridge->pending, &p->node);
    }

    p->queued = 0;
}


/* The publish waiting for reply `id` in `pending`, or NULL. */
ngx_http_gift_pending_t *
ngx_http_gift_pending_find(ngx_rbtree_t *pending, uint64_t id)
{
    ngx_rbtree_node_t  *node, *sentinel;

    node = pending->root;
    sentinel = pending->sentinel;

    while (node != sentinel && node->key != id) {
        node = id < node->key ? node->left : node->right;
    }

    return node == sentinel ? NULL : (ngx_http_gift_pending_t *) node;
}


/* The eventfd's read event: results from cnats threads, on the loop. */
static void
ngx_http_gift_nats_results_handler(ngx_event_t *ev)
{
    size_t                       i;
    uint64_t                     count;
    ngx_uint_t                   level;
    ngx_connection_t            *c;
    ngx_http_gift_bridge_t      *b;
    ngx_http_gift_vec_t          acks;
    ngx_http_gift_results_t      batch;
    ngx_http_gift_pub_result_t  *res;
    ngx_http_gift_pending_t     *p;

    c = ev->data;
    b = c->data;

    while (read(b->efd, &count, sizeof(count)) == sizeof(count)) {
        /* drained: eventfd resets to zero on read */
    }

    pthread_mutex_lock(&b->res_lock);
    batch = b->results;
    b->results = b->spare;
    acks = b->acks;
    b->acks = b->acks_spare;
    pthread_mutex_unlock(&b->res_lock);

    for (i = 0; i < batch.n; i++) {
        res = &batch.items[i];

        if (res->id == 0) {
            /* a log line from a cnats callback */
            level = (res->status == NGX_HTTP_GIFT_PUB_OK) ? NGX_LOG_NOTICE
                                                           : NGX_LOG_WARN;
            ngx_log_error(level, b->log, 0, "gift: %s", res->error);
            continue;
        }

        p = ngx_http_gift_pending_find(&b->pending, res->id);
        if (p == NULL) {
            /* the request timed out or went away; its PubAck is late */
            continue;
        }

        ngx_rbtree_delete(&b->pending, &p->node);
        p->queued = 0;
        p->handler(p, res);
    }

    batch.n = 0;
    b->spare = batch;

    if (acks.n) {
        ngx_http_gift_fanout_deliver((ngx_http_gift_frame_t **) acks.items,
                                     acks.n);
    }

    acks.n = 0;
    b->acks_spare = acks;

    if (ngx_handle_read_event(ev, 0) != NGX_OK) {
        ngx_log_error(NGX_LOG_ALERT, b->log, 0,
                      "gift: cannot re-arm the NATS result event");
    }
}


/* ---------------------------------------------------------- cnats threads */


static void
ngx_http_gift_post_result(ngx_http_gift_bridge_t *b,
    ngx_http_gift_pub_result_t *res)
{
    size_t                       cap;
    uint64_t                     one = 1;
    ngx_uint_t                   was_empty;
    ngx_http_gift_pub_result_t  *items;

    pthread_mutex_lock(&b->res_lock);

    if (b->results.n == b->results.cap) {
        cap = b->results.cap ? b->results.cap * 2 : 256;
        items = realloc(b->results.items, cap * sizeof(*items));
        if (items == NULL) {
            /* the request will time out with 503 publish_timeout */
            pthread_mutex_unlock(&b->res_lock);
            return;
        }
        b->results.items = items;
        b->results.cap = cap;
    }

    b->results.items[b->results.n++] = *res;
    was_empty = (b->results.n + b->acks.n == 1);

    pthread_mutex_unlock(&b->res_lock);

    if (was_empty) {
        /* EAGAIN means the counter is already non-zero: a wakeup is due */
        (void) !write(b->efd, &one, sizeof(one));
    }
}


static void
ngx_http_gift_post_log(ngx_http_gift_bridge_t *b,
    ngx_http_gift_pub_status_e level, const char *fmt, ...)
{
    va_list                     args;
    ngx_http_gift_pub_result_t  res;

    ngx_memzero(&res, sizeof(res));
    res.status = level;

    va_start(args, fmt);
    vsnprintf(res.error, sizeof(res.error), fmt, args);
    va_end(args);

    ngx_http_gift_post_result(b, &res);
}


/*
 * A JetStream publish reply: the PubAck or an error.  Any thread.
 *
 *   {"stream":"GIFTS","seq":5,"duplicate":true}
 *   {"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}
 */
void
ngx_http_gift_puback_parse(const char *data, size_t len,
    ngx_http_gift_pub_result_t *res)
{
    const char    *desc;
    json_t        *root, *err, *v;
    json_error_t   jerr;

    root = json_loadb(data, len, 0, &jerr);
    if (root == NULL) {
        res->status = NGX_HTTP_GIFT_PUB_ERROR;
        ngx_cpystrn((u_char *) res->error, (u_char *) "unreadable PubAck",
                    sizeof(res->error));
        return;
    }

    err = json_object_get(root, "error");
    if (err != NULL) {
        v = json_object_get(err, "description");
        desc = json_is_string(v) ? json_string_value(v) : "JetStream error";
        ngx_cpystrn((u_char *) res->error, (u_char *) desc,
                    sizeof(res->error));

        /* discard new: "maximum messages exceeded", "... bytes ..." */
        res->status = (ngx_strstr(desc, "maximum") != NULL
                       && ngx_strstr(desc, "exceeded") != NULL)
                      ? NGX_HTTP_GIFT_PUB_STREAM_FULL
                      : NGX_HTTP_GIFT_PUB_ERROR;

        v = json_object_get(err, "code");
        if (res->status == NGX_HTTP_GIFT_PUB_ERROR
            && json_is_integer(v) && json_integer_value(v) == 503)
        {
            res->status = NGX_HTTP_GIFT_PUB_UNAVAILABLE;
        }

    } else {
        v = json_object_get(root, "seq");
        res->seq = json_is_integer(v) ? (uint64_t) json_integer_value(v) : 0;
        res->duplicate = json_is_true(json_object_get(root, "duplicate"));
        res->status = res->seq ? NGX_HTTP_GIFT_PUB_OK : NGX_HTTP_GIFT_PUB_ERROR;
    }

    json_decref(root);
}


/*
 * A reply on "<inbox>.<id>": JetStream's PubAck, a JetStream error, or the
 * server's "no responders" status when no stream holds the subject.
 *
 *   {"stream":"GIFTS","seq":5,"duplicate":true}
 *   {"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}
 */
static void
ngx_http_gift_on_reply(natsConnection *nc, natsSubscription *sub,
    natsMsg *msg, void *closure)
{
    ngx_http_gift_bridge_t *b = closure;

    const char                  *subj, *dot;
    ngx_http_gift_pub_result_t   res;

    ngx_memzero(&res, sizeof(res));

    subj = natsMsg_GetSubject(msg);
    dot = strrchr(subj, '.');
    if (dot == NULL) {
        goto done;
    }
    res.id = strtoull(dot + 1, NULL, 10);
    if (res.id == 0) {
        goto done;
    }

    if (natsMsg_IsNoResponders(msg)) {
        res.status = NGX_HTTP_GIFT_PUB_UNAVAILABLE;
        ngx_cpystrn((u_char *) res.error,
                    (u_char *) "no stream for the subject (no responders)",
                    sizeof(res.error));
        ngx_http_gift_post_result(b, &res);
        goto done;
    }

    ngx_http_gift_puback_parse(natsMsg_GetData(msg),
                               (size_t) natsMsg_GetDataLength(msg), &res);
    ngx_http_gift_post_result(b, &res);

done:

    natsMsg_Destroy(msg);
}


/*
 * One GiftAck, stream sequence `seq`, decoded and framed once for every
 * protocol (JSON, SSE, SSE as an HTTP chunk, WebSocket) into one malloc'ed
 * block with refs = 1.  NULL if the bytes are not a GiftAck (or no memory).
 * Any thread: it touches nothing but its arguments.
 */
ngx_http_gift_frame_t *
ngx_http_gift_frame_create(uint64_t seq, const u_char *data, size_t len)
{
    u_char                 *p;
    char                    json[GIFT_JSON_MAX];
    size_t                  jlen, dlen, rlen, slen, wlen, hlen, clen;
    u_char                  sid[64], chunk[24];
    Gift__V1__GiftAck      *ack;
    ngx_http_gift_frame_t  *f;

    ack = gift__v1__gift_ack__unpack(NULL, len, data);
    if (ack == NULL) {
        return NULL;
    }

    jlen = gift_ack_json(ack, seq, json, sizeof(json));
    if (jlen == 0) {
        gift__v1__gift_ack__free_unpacked(ack, NULL);
        return NULL;
    }

    dlen = strlen(ack->device_id);
    rlen = strlen(ack->room_id);
    slen = ngx_sprintf(sid, "id: %uL\nevent: ack\ndata: ", seq) - sid;
    slen += jlen + 2;
    clen = ngx_sprintf(chunk, "%xz\r\n", slen) - chunk;
    hlen = jlen < 126 ? 2 : (jlen < 65536 ? 4 : 10);
    wlen = hlen + jlen;

    f = malloc(sizeof(ngx_http_gift_frame_t) + jlen + clen + slen + 2 + wlen
               + dlen + rlen + 2);
    if (f == NULL) {
        gift__v1__gift_ack__free_unpacked(ack, NULL);
        return NULL;
    }

    f->refs = 1;
    f->seq = seq;
    f->status = gift_ack_status_name(ack->status);

    p = (u_char *) (f + 1);

    f->json = p;
    f->json_len = jlen;
    p = ngx_cpymem(p, json, jlen);

    /*
     * SSE clients over HTTP/1.1 get the frame as one HTTP chunk that we
     * frame here, once: nginx's chunked filter would keep references to
     * each client's buffers (see ngx_http_gift_sse.c).
     */
    f->sse_chunk = p;
    p = ngx_cpymem(p, chunk, clen);
    f->sse = p;
    p = ngx_sprintf(p, "id: %uL\nevent: ack\ndata: ", seq);
    p = ngx_cpymem(p, json, jlen);
    *p++ = '\n';
    *p++ = '\n';
    f->sse_len = p - f->sse;
    *p++ = '\r';
    *p++ = '\n';
    f->sse_chunk_len = p - f->sse_chunk;

    /* RFC 6455: FIN + text, unmasked, 7/16/64-bit payload length */
    f->ws = p;
    *p++ = 0x81;
    if (jlen < 126) {
        *p++ = (u_char) jlen;
    } else if (jlen < 65536) {
        *p++ = 126;
        *p++ = (u_char) (jlen >> 8);
        *p++ = (u_char) jlen;
    } else {
        *p++ = 127;
        *p++ = 0; *p++ = 0; *p++ = 0; *p++ = 0;
        *p++ = (u_char) (jlen >> 24);
        *p++ = (u_char) (jlen >> 16);
        *p++ = (u_char) (jlen >> 8);
        *p++ = (u_char) jlen;
    }
    p = ngx_cpymem(p, json, jlen);
    f->ws_len = p - f->ws;

    f->device = (const char *) p;
    p = ngx_cpymem(p, ack->device_id, dlen + 1);
    f->room = (const char *) p;
    ngx_memcpy(p, ack->room_id, rlen + 1);

    gift__v1__gift_ack__free_unpacked(ack, NULL);

    return f;
}


/*
 * One message of GIFT_ACKS from the ordered consumer (tls:// URLs): framed
 * on the subscription's cnats thread and handed to the loop.
 */
static void
ngx_http_gift_on_ack(natsConnection *nc, natsSubscription *sub, natsMsg *msg,
    void *closure)
{
    ngx_http_gift_bridge_t *b = closure;

    size_t                  cap;
    void                  **items;
    uint64_t                seq, one = 1;
    ngx_uint_t              was_empty;
    jsMsgMetaData          *meta;
    ngx_http_gift_frame_t  *f;

    meta = NULL;
    if (natsMsg_GetMetaData(&meta, msg) != NATS_OK) {
        natsMsg_Destroy(msg);
        return;
    }
    seq = meta->Sequence.Stream;
    jsMsgMetaData_Destroy(meta);

    f = ngx_http_gift_frame_create(seq,
                                   (const u_char *) natsMsg_GetData(msg),
                                   (size_t) natsMsg_GetDataLength(msg));
    natsMsg_Destroy(msg);

    if (f == NULL) {
        ngx_http_gift_post_log(b, NGX_HTTP_GIFT_PUB_ERROR,
                               "GIFT_ACKS #%llu is not a GiftAck; skipped",
                               (unsigned long long) seq);
        return;
    }

    pthread_mutex_lock(&b->res_lock);

    if (b->acks.n == b->acks.cap) {
        cap = b->acks.cap ? b->acks.cap * 2 : 256;
        items = realloc(b->acks.items, cap * sizeof(void *));
        if (items == NULL) {
            pthread_mutex_unlock(&b->res_lock);
            free(f);
            return;
        }
        b->acks.items = items;
        b->acks.cap = cap;
    }

    b->acks.items[b->acks.n++] = f;
    was_empty = (b->results.n + b->acks.n == 1);

    pthread_mutex_unlock(&b->res_lock);

    if (was_empty) {
        (void) !write(b->efd, &one, sizeof(one));
    }
}


/*
 * Follow GIFT_ACKS with an ordered consumer that starts gift_sse_replay_max
 * messages back, so that the replay ring is full from the start.  Bridge
 * thread; NATS_OK once subscribed.
 */
static natsStatus
ngx_http_gift_follow_acks(ngx_http_gift_bridge_t *b)
{
    uint64_t       last, first, start;
    jsErrCode      jerr;
    natsStatus     s;
    jsSubOptions   so;
    jsStreamInfo  *si;

    if (b->js == NULL) {
        s = natsConnection_JetStream(&b->js, b->nc, NULL);
        if (s != NATS_OK) {
            return s;
        }
    }

    si = NULL;
    jerr = 0;
    s = js_GetStreamInfo(&si, b->js, "GIFT_ACKS", NULL, &jerr);
    if (s != NATS_OK) {
        if (!b->acks_warned) {
            ngx_http_gift_post_log(b, NGX_HTTP_GIFT_PUB_ERROR,
                                   "cannot follow GIFT_ACKS (%s%s); retrying",
                                   natsStatus_GetText(s),
                                   s == NATS_NOT_FOUND
                                   ? ": run giftctl setup" : "");
            b->acks_warned = 1;
        }
        return s;
    }

    last = si->State.LastSeq;
    first = si->State.FirstSeq;
    jsStreamInfo_Destroy(si);

    start = last >= b->replay_max ? last - b->replay_max + 1 : 1;
    if (start < first) {
        start = first;
    }

    jsSubOptions_Init(&so);
    so.Stream = "GIFT_ACKS";
    so.Ordered = true;

    if (last > 0) {
        so.Config.DeliverPolicy = js_DeliverByStartSequence;
        so.Config.OptStartSeq = start;
    } else {
        so.Config.DeliverPolicy = js_DeliverAll;
    }

    s = js_Subscribe(&b->acks_sub, b->js, "gift.acks.>", ngx_http_gift_on_ack,
                     b, NULL, &so, &jerr);
    if (s != NATS_OK) {
        b->acks_sub = NULL;
        if (!b->acks_warned) {
            ngx_http_gift_post_log(b, NGX_HTTP_GIFT_PUB_ERROR,
                                   "cannot follow GIFT_ACKS: %s; retrying",
                                   natsStatus_GetText(s));
            b->acks_warned = 1;
        }
        return s;
    }

    atomic_store(&b->acks_origin, last);
    b->acks_warned = 0;
    ngx_http_gift_post_log(b, NGX_HTTP_GIFT_PUB_OK,
                           "following GIFT_ACKS after #%llu",
                           (unsigned long long) last);

    return NATS_OK;
}


static void
ngx_http_gift_on_connected(natsConnection *nc, void *closure)
{
    ngx_http_gift_bridge_t *b = closure;

    char  url[256];

    if (natsConnection_GetConnectedUrl(nc, url, sizeof(url)) != NATS_OK) {
        url[0] = '\0';
    }

    if (!b->publish) {
        /* the publisher's connection is the one that counts and logs */
        atomic_store(&b->connected, 1);
        ngx_http_gift_post_log(b, NGX_HTTP_GIFT_PUB_OK,
                               "GIFT_ACKS link up (NATS %s)", url);
        return;
    }

    ngx_http_gift_stat_nats(1, atomic_exchange(&b->connected, 1) == 0
                               && b->was_connected);
    b->was_connected = 1;

    ngx_http_gift_post_log(b, NGX_HTTP_GIFT_PUB_OK, "connected to NATS %s",
                           url);
}


static void
ngx_http_gift_on_disconnected(natsConnection *nc, void *closure)
{
    ngx_http_gift_bridge_t *b = closure;

    atomic_store(&b->connected, 0);

    if (!b->publish) {
        ngx_http_gift_post_log(b, NGX_HTTP_GIFT_PUB_ERROR,
                               "GIFT_ACKS link down; reconnecting");
        return;
    }

    ngx_http_gift_stat_nats(0, 0);
    ngx_http_gift_post_log(b, NGX_HTTP_GIFT_PUB_ERROR,
                           "disconnected from NATS; reconnecting");
}


static void
ngx_http_gift_on_error(natsConnection *nc, natsSubscription *sub,
    natsStatus err, void *closure)
{
    ngx_http_gift_post_log(closure, NGX_HTTP_GIFT_PUB_ERROR,
                           "NATS asynchronous error: %s",
                           natsStatus_GetText(err));
}


static natsStatus
ngx_http_gift_bridge_connect(ngx_http_gift_bridge_t *b)
{
    char          name[64], subject[96];
    natsStatus    s;
    natsOptions  *opts;

    opts = NULL;
    snprintf(name, sizeof(name), "nginx-gift worker %d", (int) getpid());

    s = natsOptions_Create(&opts);
    if (s == NATS_OK) {
        s = natsOptions_SetServers(opts, b->urls, b->nurls);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetName(opts, name);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetMaxReconnect(opts, -1);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetReconnectWait(opts, (int64_t) b->reconnect_wait);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetReconnectJitter(opts, 100, 1000);
    }
    /*
     * No SendAsap: the bridge writes a whole batch and then flushes it (see
     * ngx_http_gift_bridge_thread), one write for many publishes.  cnats's
     * own flusher would wait a millisecond first.
     */
    if (s == NATS_OK) {
        s = natsOptions_SetPingInterval(opts, 5000);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetMaxPingsOut(opts, 2);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetTimeout(opts, 2000);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetRetryOnFailedConnect(opts, true,
                                                ngx_http_gift_on_connected, b);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetDisconnectedCB(opts, ngx_http_gift_on_disconnected,
                                          b);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetReconnectedCB(opts, ngx_http_gift_on_connected, b);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetErrorHandler(opts, ngx_http_gift_on_error, b);
    }
    if (s == NATS_OK) {
        s = natsConnection_Connect(&b->nc, opts);
        if (s == NATS_OK) {
            ngx_http_gift_on_connected(b->nc, b);

        } else if (s == NATS_NOT_YET_CONNECTED) {
            ngx_http_gift_post_log(b, NGX_HTTP_GIFT_PUB_ERROR,
                                   "%sNATS not reachable yet at %s; retrying",
                                   b->publish ? "" : "GIFT_ACKS link: ",
                                   b->urls[0]);
            s = NATS_OK;
        }
    }

    natsOptions_Destroy(opts);

    if (s != NATS_OK) {
        return s;
    }

    if (!b->publish) {
        return NATS_OK;             /* acknowledgements only */
    }

    snprintf(subject, sizeof(subject), "%s.*", b->inbox);

    return natsConnection_Subscribe(&b->sub, b->nc, subject,
                                    ngx_http_gift_on_reply, b);
}


static void *
ngx_http_gift_bridge_thread(void *arg)
{
    ngx_http_gift_bridge_t *b = arg;

    size_t                      i;
    natsMsg                    *msg;
    natsStatus                  s;
    struct timespec             ts;
    ngx_http_gift_vec_t         batch, spare;
    ngx_http_gift_pub_result_t  res;

    ngx_memzero(&spare, sizeof(spare));

    s = ngx_http_gift_bridge_connect(b);
    if (s != NATS_OK) {
        ngx_http_gift_post_log(b, NGX_HTTP_GIFT_PUB_ERROR,
                               "cannot set up the NATS connection: %s (%s)",
                               natsStatus_GetText(s), nats_GetLastError(NULL));
    }

    for ( ;; ) {
        if (b->follow_acks && b->acks_sub == NULL && b->nc != NULL
            && atomic_load(&b->connected))
        {
            (void) ngx_http_gift_follow_acks(b);
        }

        pthread_mutex_lock(&b->jobs_lock);

        while (b->jobs.n == 0 && !b->stop) {
            b->bridge_waiting = 1;

            if (b->follow_acks && b->acks_sub == NULL) {
                /* retry the ack consumer once a second */
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_sec += 1;
                if (pthread_cond_timedwait(&b->jobs_cond, &b->jobs_lock, &ts)
                    == ETIMEDOUT)
                {
                    b->bridge_waiting = 0;
                    break;
                }
                continue;
            }

            pthread_cond_wait(&b->jobs_cond, &b->jobs_lock);
        }

        b->bridge_waiting = 0;

        if (b->stop) {
            pthread_mutex_unlock(&b->jobs_lock);
            break;
        }

        batch = b->jobs;
        b->jobs = spare;

        pthread_mutex_unlock(&b->jobs_lock);

        for (i = 0; i < batch.n; i++) {
            msg = batch.items[i];

            if (b->nc != NULL && atomic_load(&b->connected)) {
                s = natsConnection_PublishMsg(b->nc, msg);
            } else {
                s = NATS_CONNECTION_DISCONNECTED;
            }

            if (s != NATS_OK) {
                ngx_memzero(&res, sizeof(res));
                res.id = strtoull(strrchr(natsMsg_GetReply(msg), '.') + 1,
                                  NULL, 10);
                res.status = NGX_HTTP_GIFT_PUB_UNAVAILABLE;
                ngx_cpystrn((u_char *) res.error,
                            (u_char *) natsStatus_GetText(s),
                            sizeof(res.error));
                ngx_http_gift_post_result(b, &res);
            }

            natsMsg_Destroy(msg);
        }

        /*
         * One write and one PING/PONG for the batch: while the bridge waits
         * for the PONG, the next requests gather into the next batch.  A
         * failure needs nothing here: unanswered requests time out.
         */
        if (batch.n && b->nc != NULL && atomic_load(&b->connected)) {
            (void) natsConnection_FlushTimeout(b->nc, 1000);
        }

        batch.n = 0;
        spare = batch;
    }

    free(spare.items);

    if (b->acks_sub != NULL) {
        natsSubscription_Destroy(b->acks_sub);
        b->acks_sub = NULL;
    }

    if (b->js != NULL) {
        jsCtx_Destroy(b->js);
        b->js = NULL;
    }

    if (b->sub != NULL) {
        natsSubscription_Destroy(b->sub);
        b->sub = NULL;
    }

    if (b->nc != NULL) {
        natsConnection_Close(b->nc);
        natsConnection_Destroy(b->nc);
        b->nc = NULL;
    }

    return NULL;
}
