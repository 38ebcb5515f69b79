/*
 * Fan-out of acknowledgements to the worker's streaming clients.
 *
 * Every acknowledgement reaches the worker once (its ordered consumer on
 * GIFT_ACKS), already framed for SSE and WebSocket.  Here it is kept in a
 * replay ring of the last gift_sse_replay_max frames and written to every
 * matching client from that one copy: each client gets a small buffer that
 * points into the shared frame, and holds a reference until the buffer is
 * written.  A batch of frames goes to a client as one chain (one writev).
 *
 * The ring is filled at worker start with the stream's newest
 * gift_sse_replay_max acknowledgements (the ordered consumer starts that far
 * back), so a client that resumes after a reload is served from memory too.
 *
 * A client that does not read is cut off once gift_sse_max_backlog frames
 * wait for it; it may resume.  One heartbeat timer per worker.
 */

#include "ngx_http_gift_module.h"

#include <sys/eventfd.h>

#include "gift_ssereq.h"


typedef struct {
    ngx_http_gift_frame_t    **ring;
    ngx_uint_t                 size;
    ngx_uint_t                 head;            /* oldest */
    ngx_uint_t                 n;
    uint64_t                   last_seq;        /* newest seen */
    uint64_t                   live_seq;        /* see fanout_unpark() */
    ngx_queue_t                clients;
    ngx_uint_t                 nclients;
    ngx_uint_t                 max_clients;
    ngx_uint_t                 max_backlog;
    ngx_msec_t                 heartbeat;
    ngx_event_t                heartbeat_ev;
    ngx_log_t                 *log;
    ngx_http_gift_out_t       *out_free;        /* written, reusable */
    ngx_uint_t                 nfree;
    ngx_connection_t          *sentinel;        /* see init_process */
} ngx_http_gift_fanout_t;


/*
 * Output records come from the heap and go back to one free list per
 * worker once written, so memory follows what is in flight across the
 * worker, not each client's worst moment (a request pool never shrinks).
 */
#define NGX_HTTP_GIFT_OUT_FREE_MAX  4096

/* server pings a WebSocket client may leave unanswered, one a heartbeat */
#define NGX_HTTP_GIFT_WS_MAX_PINGS  3


static ngx_int_t ngx_http_gift_client_push(ngx_http_gift_client_t *c,
    ngx_http_gift_frame_t *f, u_char *data, size_t len, ngx_chain_t ***last);
static ngx_int_t ngx_http_gift_client_write(ngx_http_gift_client_t *c,
    ngx_chain_t *out);
static void ngx_http_gift_client_reclaim(ngx_http_gift_client_t *c);
static void ngx_http_gift_out_free(ngx_http_gift_out_t *o);
static ngx_int_t ngx_http_gift_client_push_raw(ngx_http_gift_client_t *c,
    u_char *data, size_t len, ngx_chain_t ***last);
static ngx_uint_t ngx_http_gift_client_due(ngx_http_gift_client_t *c,
    ngx_http_gift_frame_t *f);
static ngx_uint_t ngx_http_gift_client_matches(ngx_http_gift_client_t *c,
    ngx_http_gift_frame_t *f);
static ngx_int_t ngx_http_gift_fanout_replay(ngx_http_gift_client_t *c,
    uint64_t after, uint64_t upto, ngx_chain_t **out, ngx_chain_t ***last);
static void ngx_http_gift_client_write_handler(ngx_http_request_t *r);
static void ngx_http_gift_heartbeat_handler(ngx_event_t *ev);
static void ngx_http_gift_client_end(ngx_http_gift_client_t *c,
    ngx_int_t rc, const char *why);
static void ngx_http_gift_fanout_shutdown(ngx_event_t *ev);
static void ngx_http_gift_sse_end(ngx_http_gift_client_t *c);


static ngx_http_gift_fanout_t  *ngx_http_gift_fanout;

static u_char  ngx_http_gift_sse_heartbeat[] = ":\n\n";
static u_char  ngx_http_gift_sse_heartbeat_chunk[] = "3\r\n:\n\n\r\n";
/* the end of a chunked body */
static u_char  ngx_http_gift_last_chunk[] = "0\r\n\r\n";
/* a WebSocket ping with no payload */
static u_char  ngx_http_gift_ws_ping[] = { 0x89, 0x00 };


ngx_int_t
ngx_http_gift_fanout_init_process(ngx_cycle_t *cycle,
    ngx_http_gift_main_conf_t *gmcf)
{
    int                      fd;
    ngx_http_gift_fanout_t  *fo;

    fo = ngx_pcalloc(cycle->pool, sizeof(ngx_http_gift_fanout_t));
    if (fo == NULL) {
        return NGX_ERROR;
    }

    fo->size = gmcf->replay_max;
    fo->ring = ngx_pcalloc(cycle->pool,
                           fo->size * sizeof(ngx_http_gift_frame_t *));
    if (fo->ring == NULL) {
        return NGX_ERROR;
    }

    ngx_queue_init(&fo->clients);
    fo->max_clients = gmcf->max_clients;
    fo->max_backlog = gmcf->max_backlog;
    fo->heartbeat = gmcf->heartbeat;
    fo->log = cycle->log;

    /* cancelable: an exiting worker does not wait for it */
    fo->heartbeat_ev.handler = ngx_http_gift_heartbeat_handler;
    fo->heartbeat_ev.data = fo;
    fo->heartbeat_ev.log = cycle->log;
    fo->heartbeat_ev.cancelable = 1;
    ngx_add_timer(&fo->heartbeat_ev, fo->heartbeat);

    /*
     * Graceful shutdown and reload must end every stream cleanly, HTTP/2
     * streams included.  nginx tells idle connections (c->idle) when it
     * starts to shut down, but an HTTP/2 connection with a stream open is
     * not idle, and its streams are no connections of the cycle: it would
     * leave them open ("open socket left") and cut them without END_STREAM.
     * So the worker keeps one idle connection of its own, on an eventfd
     * that is never polled, whose read handler nginx calls at that moment:
     * it ends SSE streams (last chunk, END_STREAM) and closes WebSockets
     * with 1001.
     */
    fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd == -1) {
        ngx_log_error(NGX_LOG_EMERG, cycle->log, ngx_errno,
                      "gift: eventfd() failed");
        return NGX_ERROR;
    }

    fo->sentinel = ngx_get_connection(fd, cycle->log);
    if (fo->sentinel == NULL) {
        close(fd);
        return NGX_ERROR;
    }

    fo->sentinel->idle = 1;
    fo->sentinel->read->handler = ngx_http_gift_fanout_shutdown;
    fo->sentinel->read->log = cycle->log;
    fo->sentinel->data = fo;

    ngx_http_gift_fanout = fo;

    return NGX_OK;
}


void
ngx_http_gift_fanout_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t               i;
    ngx_http_gift_out_t     *o;
    ngx_http_gift_fanout_t  *fo;

    fo = ngx_http_gift_fanout;
    if (fo == NULL) {
        return;
    }

    if (fo->heartbeat_ev.timer_set) {
        ngx_del_timer(&fo->heartbeat_ev);
    }

    if (fo->sentinel != NULL) {
        ngx_close_connection(fo->sentinel);
        fo->sentinel = NULL;
    }

    for (i = 0; i < fo->n; i++) {
        ngx_http_gift_frame_release(fo->ring[(fo->head + i) % fo->size]);
    }

    fo->n = 0;

    while (fo->out_free) {
        o = fo->out_free;
        fo->out_free = o->next;
        ngx_free(o);
    }

    ngx_http_gift_fanout = NULL;
}


void
ngx_http_gift_frame_release(ngx_http_gift_frame_t *f)
{
    if (--f->refs == 0) {
        ngx_free(f);
    }
}


ngx_uint_t
ngx_http_gift_fanout_clients(void)
{
    return ngx_http_gift_fanout ? ngx_http_gift_fanout->nclients : 0;
}


/*
 * The acknowledgement follower says where GIFT_ACKS was when it started:
 * acknowledgements up to it are history, newer ones are live.
 */
static uint64_t  ngx_http_gift_fanout_origin_seq;


void
ngx_http_gift_fanout_origin(uint64_t seq)
{
    ngx_http_gift_fanout_origin_seq = seq;
}


void
ngx_http_gift_fanout_deliver(ngx_http_gift_frame_t **frames, size_t n)
{
    size_t                   i, first;
    ngx_int_t                rc;
    ngx_chain_t             *out, **last;
    ngx_queue_t             *q, *next;
    ngx_connection_t        *conn;
    ngx_http_gift_frame_t   *f;
    ngx_http_gift_client_t  *c;
    ngx_http_gift_fanout_t  *fo;

    fo = ngx_http_gift_fanout;

    if (fo == NULL) {
        for (i = 0; i < n; i++) {
            ngx_http_gift_frame_release(frames[i]);
        }
        return;
    }

    ngx_http_gift_stat_add(NGX_HTTP_GIFT_STAT_ACKS_IN, n);

    first = n;

    for (i = 0; i < n; i++) {
        f = frames[i];

        if (f->seq <= fo->last_seq) {
            /* an ordered consumer restarted: already seen */
            ngx_http_gift_frame_release(f);
            frames[i] = NULL;
            continue;
        }

        if (first == n) {
            first = i;
        }

        fo->last_seq = f->seq;
    }

    if (fo->live_seq <= fo->last_seq) {
        fo->live_seq = 0;                   /* caught up */
    }

    for (q = ngx_queue_head(&fo->clients);
         q != ngx_queue_sentinel(&fo->clients);
         q = next)
    {
        next = ngx_queue_next(q);
        c = ngx_queue_data(q, ngx_http_gift_client_t, queue);

        if (c->closing || c->parked) {
            continue;
        }

        rc = NGX_OK;
        i = first;

        while (rc == NGX_OK && i < n) {
            out = NULL;
            last = &out;

            /*
             * No more than the backlog has room for, then write: a batch
             * larger than gift_sse_max_backlog is no reason to cut off a
             * client whose socket takes it.
             */
            for ( /* void */ ; i < n && c->out_n < fo->max_backlog; i++) {
                f = frames[i];

                if (f == NULL || !ngx_http_gift_client_due(c, f)) {
                    continue;
                }

                rc = ngx_http_gift_client_push(c, f, NULL, 0, &last);
                if (rc != NGX_OK) {
                    break;
                }
            }

            if (rc == NGX_OK && out != NULL) {
                rc = ngx_http_gift_client_write(c, out);
            }

            if (rc == NGX_OK && i < n && c->out_n >= fo->max_backlog) {
                rc = NGX_DECLINED;          /* its socket is full: too slow */
            }
        }

        if (rc == NGX_DECLINED) {
            ngx_http_gift_stat_add(NGX_HTTP_GIFT_STAT_SLOW_DROPS, 1);
        }

        if (rc != NGX_OK) {
            conn = c->request->connection;
            ngx_http_gift_client_end(c, rc, rc == NGX_DECLINED
                                            ? "backlog full" : "write error");
            ngx_http_run_posted_requests(conn);
        }
    }

    /*
     * Only now does the ring take over the batch's references: a batch
     * larger than the ring evicts (frees) frames of this same batch, which
     * the loop above still used.
     */
    for (i = first; i < n; i++) {
        f = frames[i];

        if (f == NULL) {
            continue;
        }

        if (fo->n == fo->size) {
            ngx_http_gift_frame_release(fo->ring[fo->head]);
            fo->head = (fo->head + 1) % fo->size;
            fo->n--;
        }

        fo->ring[(fo->head + fo->n) % fo->size] = f;
        fo->n++;
    }
}


/* Whether live frame f is new to client c (and mark it seen), and wanted. */
static ngx_uint_t
ngx_http_gift_client_due(ngx_http_gift_client_t *c, ngx_http_gift_frame_t *f)
{
    if (f->seq <= c->last_seq) {
        return 0;
    }

    if (c->from_now && f->seq <= ngx_http_gift_fanout_origin_seq) {
        return 0;
    }

    c->last_seq = f->seq;

    return ngx_http_gift_client_matches(c, f);
}


/* Whether frame f passes client c's filters. */
static ngx_uint_t
ngx_http_gift_client_matches(ngx_http_gift_client_t *c,
    ngx_http_gift_frame_t *f)
{
    size_t       len;
    ngx_str_t   *v;
    ngx_uint_t   i, found;

#define ngx_http_gift_filter(arr, value)                                     \
    if (arr != NULL) {                                                        \
        len = ngx_strlen(value);                                              \
        v = arr->elts;                                                        \
        found = 0;                                                            \
        for (i = 0; i < arr->nelts; i++) {                                    \
            if (v[i].len == len                                               \
                && ngx_strncmp(v[i].data, value, len) == 0)                   \
            {                                                                 \
                found = 1;                                                    \
                break;                                                        \
            }                                                                 \
        }                                                                     \
        if (!found) {                                                         \
            return 0;                                                         \
        }                                                                     \
    }

    ngx_http_gift_filter(c->devices, f->device);
    ngx_http_gift_filter(c->rooms, f->room);
    ngx_http_gift_filter(c->statuses, f->status);

#undef ngx_http_gift_filter

    return 1;
}


ngx_int_t
ngx_http_gift_fanout_refuse(ngx_http_request_t *r)
{
    const char              *why;
    ngx_http_gift_fanout_t  *fo = ngx_http_gift_fanout;

    if (ngx_exiting || ngx_terminate || ngx_quit) {
        /*
         * a request read by a worker that shuts down (nginx -s reload or
         * quit came while its headers were on their way): a stream taken
         * now would hold the worker; the client reconnects to a new one
         */
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "gift: stream refused: the worker is shutting down");
        why = "the server is restarting; reconnect";

    } else if (fo == NULL) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "gift: stream refused: no stream in this worker");
        why = "streaming unavailable";

    } else if (fo->nclients >= fo->max_clients) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "gift: gift_sse_max_clients reached");
        why = "too many streaming clients";

    } else {
        return NGX_DECLINED;
    }

    return ngx_http_gift_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                    "unavailable", why, NULL);
}


ngx_int_t
ngx_http_gift_fanout_attach(ngx_http_gift_client_t *c, ngx_uint_t resume,
    uint64_t last_seq, u_char *preamble, size_t plen)
{
    uint64_t                   now;
    ngx_chain_t               *out, **last;
    ngx_http_gift_fanout_t    *fo;
    ngx_http_core_loc_conf_t  *clcf;

    fo = ngx_http_gift_fanout;

    if (fo == NULL) {
        return NGX_ERROR;
    }

    if (fo->nclients >= fo->max_clients) {
        return NGX_DECLINED;
    }

    c->out_tail = &c->out_head;

    ngx_queue_insert_tail(&fo->clients, &c->queue);
    fo->nclients++;
    c->attached = 1;
    ngx_http_gift_stat_add(c->kind == NGX_HTTP_GIFT_CLIENT_SSE
                           ? NGX_HTTP_GIFT_STAT_SSE_CLIENTS
                           : NGX_HTTP_GIFT_STAT_WS_CLIENTS, 1);

    /* a worker that stopped following GIFT_ACKS starts again */
    ngx_http_gift_follow_clients(fo->nclients);

    /*
     * Events are small writes: without TCP_NODELAY, one written while the
     * previous is unacknowledged waits for the client's (delayed) ACK,
     * 40 ms on Linux, 200 ms on Windows.  nginx sets it only on keepalive.
     */
    clcf = ngx_http_get_module_loc_conf(c->request, ngx_http_core_module);

    if (clcf->tcp_nodelay && ngx_tcp_nodelay(c->request->connection) != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (!resume && ngx_http_gift_follow_parking()) {
        /*
         * "From now" is not known here: the ring stopped where the worker
         * stopped following.  The client waits, its response unsent, until
         * the stream says where it is (ngx_http_gift_fanout_unpark()), so
         * that whatever is stored after the client sees its response
         * reaches it.
         */
        c->parked = 1;
        c->preamble = preamble;
        c->plen = plen;
        return NGX_OK;
    }

    out = NULL;
    last = &out;

    if (plen && ngx_http_gift_client_push_raw(c, preamble, plen, &last)
                != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* "now": past a catch-up still on its way (fanout_unpark()) */
    now = ngx_max(fo->last_seq, fo->live_seq);
    c->connect_seq = resume ? fo->last_seq : now;

    if (!resume || last_seq >= fo->last_seq) {
        c->from_now = !resume;
        c->last_seq = resume ? last_seq : now;
        return out ? ngx_http_gift_client_write(c, out) : NGX_OK;
    }

    ngx_http_gift_stat_add(NGX_HTTP_GIFT_STAT_RESUMES, 1);

    if (ngx_http_gift_fanout_replay(c, last_seq, fo->last_seq, &out, &last)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    c->last_seq = fo->last_seq;

    return out ? ngx_http_gift_client_write(c, out) : NGX_OK;
}


void
ngx_http_gift_fanout_reset(uint64_t last)
{
    ngx_int_t                rc;
    ngx_chain_t             *out, **lastp;
    ngx_queue_t             *q, *next;
    ngx_connection_t        *conn;
    ngx_http_gift_client_t  *c;
    ngx_http_gift_fanout_t  *fo;

    fo = ngx_http_gift_fanout;

    if (fo == NULL || last <= fo->last_seq) {
        return;
    }

    while (fo->n) {
        ngx_http_gift_frame_release(fo->ring[fo->head]);
        fo->head = (fo->head + 1) % fo->size;
        fo->n--;
    }

    fo->head = 0;
    fo->last_seq = last;

    for (q = ngx_queue_head(&fo->clients);
         q != ngx_queue_sentinel(&fo->clients);
         q = next)
    {
        next = ngx_queue_next(q);
        c = ngx_queue_data(q, ngx_http_gift_client_t, queue);

        if (c->closing || c->parked || c->last_seq >= last) {
            continue;
        }

        if (c->from_now) {
            c->last_seq = last;         /* wants no history */
            continue;
        }

        /* the empty ring: just the `event: gap` up to `last` */
        out = NULL;
        lastp = &out;

        rc = ngx_http_gift_fanout_replay(c, c->last_seq, last, &out, &lastp);
        c->last_seq = last;

        if (rc == NGX_OK && out != NULL) {
            rc = ngx_http_gift_client_write(c, out);
        }

        if (rc != NGX_OK) {
            conn = c->request->connection;
            ngx_http_gift_client_end(c, rc, "write error");
            ngx_http_run_posted_requests(conn);
        }
    }
}


void
ngx_http_gift_fanout_unpark(uint64_t now)
{
    ngx_int_t                rc;
    ngx_chain_t             *out, **last;
    ngx_queue_t             *q, *next;
    ngx_connection_t        *conn;
    ngx_http_gift_client_t  *c;
    ngx_http_gift_fanout_t  *fo;

    fo = ngx_http_gift_fanout;

    if (fo == NULL) {
        return;
    }

    /*
     * `now` is where the stream is when following resumes; the catch-up up
     * to it is still on its way.  A client without Last-Event-ID that
     * comes before it arrived starts at `now` too, not at the ring's end
     * (it would get acks stored before its response).
     */
    if (now > fo->last_seq) {
        fo->live_seq = now;
    }

    for (q = ngx_queue_head(&fo->clients);
         q != ngx_queue_sentinel(&fo->clients);
         q = next)
    {
        next = ngx_queue_next(q);
        c = ngx_queue_data(q, ngx_http_gift_client_t, queue);

        if (!c->parked) {
            continue;
        }

        c->parked = 0;
        c->last_seq = now;
        c->connect_seq = now;

        conn = c->request->connection;

        if (c->closing) {
            continue;
        }

        out = NULL;
        last = &out;

        if (c->plen) {
            rc = ngx_http_gift_client_push_raw(c, c->preamble, c->plen,
                                               &last);
            if (rc == NGX_OK) {
                rc = ngx_http_gift_client_write(c, out);
            }

        } else {
            /* a WebSocket's 101, held by nginx's write filter until now */
            rc = ngx_http_send_special(c->request, NGX_HTTP_FLUSH)
                 == NGX_ERROR ? NGX_ERROR : NGX_OK;
        }

        if (rc != NGX_OK) {
            ngx_http_gift_client_end(c, rc, "write error");
        }

        ngx_http_run_posted_requests(conn);
    }
}


ngx_int_t
ngx_http_gift_fanout_resume(ngx_http_gift_client_t *c, uint64_t last_seq)
{
    ngx_chain_t  *out, **last;

    out = NULL;
    last = &out;

    ngx_http_gift_stat_add(NGX_HTTP_GIFT_STAT_RESUMES, 1);

    /* live frames after connect_seq went out already */
    if (last_seq < c->connect_seq
        && ngx_http_gift_fanout_replay(c, last_seq, c->connect_seq, &out,
                                       &last)
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    c->from_now = 0;

    return out ? ngx_http_gift_client_write(c, out) : NGX_OK;
}


/*
 * Queue the frames with after < seq <= upto that pass the client's
 * filters, from the replay ring; first an `event: gap` naming what the ring
 * no longer holds, if anything.
 */
static ngx_int_t
ngx_http_gift_fanout_replay(ngx_http_gift_client_t *c, uint64_t after,
    uint64_t upto, ngx_chain_t **out, ngx_chain_t ***last)
{
    u_char                  *p;
    size_t                   len;
    uint64_t                 oldest;
    ngx_uint_t               i;
    ngx_http_gift_frame_t   *f;
    ngx_http_gift_fanout_t  *fo;

    fo = ngx_http_gift_fanout;

    oldest = fo->n ? fo->ring[fo->head]->seq : fo->last_seq + 1;

    if (after + 1 < oldest) {
        ngx_http_gift_stat_add(NGX_HTTP_GIFT_STAT_GAPS, 1);

        len = sizeof("{\"event\":\"gap\",\"from\":,\"to\":}") - 1
              + 2 * NGX_INT64_LEN + sizeof("event: gap\ndata: \n\n");
        /*
         * A WebSocket client may resume again and again (by message): its
         * gap notice goes in the client's own buffer when nothing is
         * queued (so the previous one is written), else in the pool.
         */
        if (c->out_head == NULL && *out == NULL && len <= sizeof(c->gap)) {
            p = c->gap;

        } else {
            p = ngx_pnalloc(c->request->pool, len);
            if (p == NULL) {
                return NGX_ERROR;
            }
        }

        if (c->kind == NGX_HTTP_GIFT_CLIENT_SSE) {
            len = ngx_sprintf(p, "event: gap\ndata: {\"from\":%uL,\"to\":%uL}"
                              "\n\n", after + 1, oldest - 1) - p;
        } else {
            len = ngx_sprintf(p + 2, "{\"event\":\"gap\",\"from\":%uL,"
                              "\"to\":%uL}", after + 1, oldest - 1)
                  - (p + 2);
            p[0] = 0x81;
            p[1] = (u_char) len;            /* < 126 bytes */
            len += 2;
        }

        if (ngx_http_gift_client_push_raw(c, p, len, last) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    for (i = 0; i < fo->n; i++) {
        f = fo->ring[(fo->head + i) % fo->size];

        if (f->seq <= after || f->seq > upto
            || !ngx_http_gift_client_matches(c, f))
        {
            continue;
        }

        /*
         * A replay may be longer than the backlog: write what is queued
         * and go on while the socket takes it (a new connection's buffer
         * is large); only a client whose socket stays full is cut.
         */
        if (c->out_n >= ngx_http_gift_fanout->max_backlog) {
            if (ngx_http_gift_client_write(c, *out) != NGX_OK) {
                return NGX_ERROR;
            }

            *out = NULL;
            *last = out;

            if (c->out_n >= ngx_http_gift_fanout->max_backlog) {
                return NGX_ERROR;
            }
        }

        if (ngx_http_gift_client_push(c, f, NULL, 0, last) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


void
ngx_http_gift_fanout_detach(ngx_http_gift_client_t *c)
{
    ngx_http_gift_out_t  *o;

    if (!c->attached) {
        return;
    }

    c->attached = 0;
    ngx_queue_remove(&c->queue);
    ngx_http_gift_stat_add(c->kind == NGX_HTTP_GIFT_CLIENT_SSE
                           ? NGX_HTTP_GIFT_STAT_SSE_CLIENTS
                           : NGX_HTTP_GIFT_STAT_WS_CLIENTS, -1);

    if (ngx_http_gift_fanout) {
        ngx_http_gift_fanout->nclients--;
        ngx_http_gift_follow_clients(ngx_http_gift_fanout->nclients);
    }

    /*
     * The request ends: its unwritten buffers are never written.  They are
     * freed, not reused, since the request's chains still point at them
     * until it is closed.
     */
    while (c->out_head != NULL) {
        o = c->out_head;
        c->out_head = o->next;

        if (o->frame) {
            ngx_http_gift_frame_release(o->frame);
        }

        ngx_free(o);
    }

    c->out_head = NULL;
    c->out_tail = &c->out_head;
    c->out_n = 0;
}


ngx_int_t
ngx_http_gift_fanout_send_raw(ngx_http_gift_client_t *c, u_char *data,
    size_t len)
{
    ngx_chain_t  *out, **last;

    out = NULL;
    last = &out;

    if (ngx_http_gift_client_push_raw(c, data, len, &last) != NGX_OK) {
        return NGX_ERROR;
    }

    return ngx_http_gift_client_write(c, out);
}


/*
 * Queue bytes that are not a shared frame: as they are, or, for an SSE
 * client whose HTTP chunks we frame ourselves, as one chunk (a copy in the
 * request's pool: used for one-off texts, not per acknowledgement).
 */
static ngx_int_t
ngx_http_gift_client_push_raw(ngx_http_gift_client_t *c, u_char *data,
    size_t len, ngx_chain_t ***last)
{
    u_char  *p, *start;

    if (!c->chunked) {
        return ngx_http_gift_client_push(c, NULL, data, len, last);
    }

    if (data == ngx_http_gift_sse_heartbeat) {
        return ngx_http_gift_client_push(c, NULL,
                                         ngx_http_gift_sse_heartbeat_chunk,
                                         sizeof(ngx_http_gift_sse_heartbeat_chunk)
                                         - 1, last);
    }

    start = ngx_pnalloc(c->request->pool, len + NGX_SIZE_T_LEN + 4);
    if (start == NULL) {
        return NGX_ERROR;
    }

    p = ngx_sprintf(start, "%xz\r\n", len);
    p = ngx_cpymem(p, data, len);
    *p++ = '\r';
    *p++ = '\n';

    return ngx_http_gift_client_push(c, NULL, start, p - start, last);
}


/*
 * Append one buffer to the client's pending output and to the chain being
 * built at **last.  With a frame, the buffer points into it and holds a
 * reference.  NGX_DECLINED when the backlog is full.
 */
static ngx_int_t
ngx_http_gift_client_push(ngx_http_gift_client_t *c, ngx_http_gift_frame_t *f,
    u_char *data, size_t len, ngx_chain_t ***last)
{
    ngx_http_gift_out_t  *o;

    if (c->out_n >= ngx_http_gift_fanout->max_backlog) {
        return NGX_DECLINED;
    }

    o = ngx_http_gift_fanout->out_free;

    if (o != NULL) {
        ngx_http_gift_fanout->out_free = o->next;
        ngx_http_gift_fanout->nfree--;

    } else {
        o = ngx_alloc(sizeof(ngx_http_gift_out_t), c->request->connection->log);
        if (o == NULL) {
            return NGX_ERROR;
        }
    }

    ngx_memzero(&o->buf, sizeof(ngx_buf_t));

    if (f != NULL) {
        ngx_http_gift_stat_add(NGX_HTTP_GIFT_STAT_DELIVERIES, 1);

        if (c->kind == NGX_HTTP_GIFT_CLIENT_SSE && c->chunked) {
            data = f->sse_chunk;
            len = f->sse_chunk_len;
        } else if (c->kind == NGX_HTTP_GIFT_CLIENT_SSE) {
            data = f->sse;
            len = f->sse_len;
        } else {
            data = f->ws;
            len = f->ws_len;
        }
        f->refs++;
    }

    o->frame = f;
    o->next = NULL;
    o->buf.pos = data;
    o->buf.last = data + len;
    o->buf.start = data;
    o->buf.end = data + len;
    o->buf.memory = 1;
    o->buf.flush = 1;
    o->buf.tag = (ngx_buf_tag_t) &ngx_http_gift_module;

    o->cl.buf = &o->buf;
    o->cl.next = NULL;

    *c->out_tail = o;
    c->out_tail = &o->next;
    c->out_n++;

    **last = &o->cl;
    *last = &o->cl.next;

    return NGX_OK;
}


static void
ngx_http_gift_out_free(ngx_http_gift_out_t *o)
{
    ngx_http_gift_fanout_t  *fo = ngx_http_gift_fanout;

    if (fo == NULL || fo->nfree >= NGX_HTTP_GIFT_OUT_FREE_MAX) {
        ngx_free(o);
        return;
    }

    o->next = fo->out_free;
    fo->out_free = o;
    fo->nfree++;
}


static ngx_int_t
ngx_http_gift_client_write(ngx_http_gift_client_t *c, ngx_chain_t *out)
{
    ngx_int_t                  rc;
    ngx_event_t               *wev;
    ngx_http_request_t        *r;
    ngx_http_core_loc_conf_t  *clcf;

    r = c->request;

    rc = ngx_http_output_filter(r, out);

    ngx_http_gift_client_reclaim(c);

    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    if (c->closing && c->out_head == NULL) {
        /* the last frame (a WebSocket close) is written */
        return NGX_DONE;
    }

    if (c->out_head == NULL && c->kind == NGX_HTTP_GIFT_CLIENT_WS) {
        /* a pong held back while the output was busy */
        rc = ngx_http_gift_ws_drained(c);
        if (rc != NGX_OK) {
            return rc;
        }
    }

    wev = r->connection->write;

    if (c->out_head != NULL) {
        /* the socket is full: wait for it, within send_timeout */
        r->write_event_handler = ngx_http_gift_client_write_handler;

        clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

        if (!wev->timer_set) {
            ngx_add_timer(wev, clcf->send_timeout);
        }

        if (ngx_handle_write_event(wev, clcf->send_lowat) != NGX_OK) {
            return NGX_ERROR;
        }

    } else if (wev->timer_set) {
        ngx_del_timer(wev);
    }

    return NGX_OK;
}


/* Give back the buffers the socket has taken, in order. */
static void
ngx_http_gift_client_reclaim(ngx_http_gift_client_t *c)
{
    ngx_http_gift_out_t  *o;

    while (c->out_head != NULL && ngx_buf_size(&c->out_head->buf) == 0) {
        o = c->out_head;
        c->out_head = o->next;
        c->out_n--;

        if (o->frame) {
            ngx_http_gift_frame_release(o->frame);
            o->frame = NULL;
        }

        ngx_http_gift_out_free(o);
    }

    if (c->out_head == NULL) {
        c->out_tail = &c->out_head;
    }
}


static void
ngx_http_gift_client_write_handler(ngx_http_request_t *r)
{
    ngx_int_t                rc;
    ngx_event_t             *wev;
    ngx_connection_t        *conn;
    ngx_http_gift_client_t  *c;

    c = ngx_http_get_module_ctx(r, ngx_http_gift_module);
    conn = r->connection;
    wev = conn->write;

    if (c == NULL || !c->attached) {
        return;
    }

    if (wev->timedout) {
        wev->timedout = 0;
        conn->timedout = 1;
        ngx_http_gift_client_close(c, "send timed out");
        return;
    }

    rc = ngx_http_gift_client_write(c, NULL);

    if (rc != NGX_OK) {
        ngx_http_gift_client_end(c, rc, "write error");
    }
}


/*
 * After a write that did not return NGX_OK: NGX_DONE is a last frame
 * written (a WebSocket close: wait for the peer's; an SSE stream's end:
 * finalize), anything else closes with `why`.
 */
static void
ngx_http_gift_client_end(ngx_http_gift_client_t *c, ngx_int_t rc,
    const char *why)
{
    if (rc == NGX_DONE && c->kind == NGX_HTTP_GIFT_CLIENT_WS) {
        ngx_http_gift_ws_close_written(c);
        return;
    }

    if (rc == NGX_DONE && c->ending) {
        /* the stream's end is out: a clean end (END_STREAM over HTTP/2) */
        ngx_http_finalize_request(c->request, NGX_OK);
        return;
    }

    ngx_http_gift_client_close(c, rc == NGX_DONE ? "closed" : why);
}


void
ngx_http_gift_client_close(ngx_http_gift_client_t *c, const char *why)
{
    ngx_http_request_t  *r;

    r = c->request;

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "gift: closing stream: %s", why);

    ngx_http_gift_fanout_detach(c);
    ngx_http_finalize_request(r, NGX_ERROR);
}


static void
ngx_http_gift_heartbeat_handler(ngx_event_t *ev)
{
    ngx_http_gift_fanout_t *fo = ev->data;

    ngx_int_t                rc;
    ngx_queue_t             *q, *next;
    ngx_connection_t        *conn;
    ngx_http_gift_client_t  *c;

    if (ngx_exiting || ngx_terminate || ngx_quit) {
        return;
    }

    for (q = ngx_queue_head(&fo->clients);
         q != ngx_queue_sentinel(&fo->clients);
         q = next)
    {
        next = ngx_queue_next(q);
        c = ngx_queue_data(q, ngx_http_gift_client_t, queue);

        if (c->out_head != NULL || c->closing || c->parked) {
            continue;       /* output is pending: the stream is not idle */
        }

        conn = c->request->connection;

        if (c->kind == NGX_HTTP_GIFT_CLIENT_SSE) {
            rc = ngx_http_gift_fanout_send_raw(c, ngx_http_gift_sse_heartbeat,
                                          sizeof(ngx_http_gift_sse_heartbeat)
                                          - 1);

        } else if (c->pings_out >= NGX_HTTP_GIFT_WS_MAX_PINGS) {
            /* a client that answers no ping is gone, or pretends to be */
            ngx_http_gift_client_close(c, "no pong to the last pings");
            ngx_http_run_posted_requests(conn);
            continue;

        } else {
            c->pings_out++;
            rc = ngx_http_gift_fanout_send_raw(c, ngx_http_gift_ws_ping,
                                          sizeof(ngx_http_gift_ws_ping));
        }

        if (rc != NGX_OK) {
            ngx_http_gift_client_end(c, rc, "write error");
            ngx_http_run_posted_requests(conn);
        }
    }

    ngx_add_timer(ev, fo->heartbeat);
}


/*
 * nginx starts a graceful shutdown (quit, reload): it calls idle
 * connections' read handlers with c->close set; this is ours.
 */
static void
ngx_http_gift_fanout_shutdown(ngx_event_t *ev)
{
    ngx_connection_t        *sentinel = ev->data;

    ngx_queue_t             *q, *next;
    ngx_connection_t        *conn;
    ngx_http_gift_client_t  *c;
    ngx_http_gift_fanout_t  *fo;

    fo = sentinel->data;

    if (!sentinel->close) {
        return;
    }

    ngx_close_connection(sentinel);
    fo->sentinel = NULL;

    ngx_log_error(NGX_LOG_INFO, fo->log, 0,
                  "gift: shutting down: ending %ui streams", fo->nclients);

    for (q = ngx_queue_head(&fo->clients);
         q != ngx_queue_sentinel(&fo->clients);
         q = next)
    {
        next = ngx_queue_next(q);
        c = ngx_queue_data(q, ngx_http_gift_client_t, queue);
        conn = c->request->connection;

        if (c->kind == NGX_HTTP_GIFT_CLIENT_WS) {
            ngx_http_gift_ws_going_away(c);
            continue;
        }

        ngx_http_gift_sse_end(c);
        ngx_http_run_posted_requests(conn);
    }
}


/*
 * End an SSE stream the way a finished response ends: the last chunk over
 * HTTP/1.1, END_STREAM over HTTP/2; EventSource then reconnects (to a new
 * worker) after the retry: hint, with Last-Event-ID.
 */
static void
ngx_http_gift_sse_end(ngx_http_gift_client_t *c)
{
    ngx_int_t            rc;
    ngx_chain_t         *out, **last;
    ngx_http_request_t  *r;
#if (NGX_HTTP_V2)
    ngx_connection_t    *hc;
#endif

    if (c->closing) {
        return;
    }

    r = c->request;
    r->keepalive = 0;
    c->closing = 1;
    c->ending = 1;

    out = NULL;
    last = &out;

    if (c->chunked
        && ngx_http_gift_client_push(c, NULL, ngx_http_gift_last_chunk,
                                     sizeof(ngx_http_gift_last_chunk) - 1,
                                     &last) != NGX_OK)
    {
        ngx_http_gift_client_close(c, "shutting down");
        return;
    }

    if (out != NULL) {
        rc = ngx_http_gift_client_write(c, out);

    } else {
        rc = (c->out_head == NULL) ? NGX_DONE : NGX_OK;
    }

#if (NGX_HTTP_V2)
    if (r->stream != NULL) {
        /*
         * HTTP/2: the last (empty) DATA frame carries END_STREAM; then the
         * connection is told to close, which sends GOAWAY and closes it
         * once no stream is left (it is not idle, so nginx did not).
         */
        if (ngx_http_send_special(r, NGX_HTTP_LAST) == NGX_ERROR) {
            ngx_http_gift_client_close(c, "shutting down");
            return;
        }

        hc = r->stream->connection->connection;
        hc->close = 1;
        ngx_post_event(hc->read, &ngx_posted_events);
    }
#endif

    if (rc == NGX_DONE) {
        ngx_http_finalize_request(r, NGX_OK);

    } else if (rc != NGX_OK) {
        ngx_http_gift_client_close(c, "write error");
    }

    /* else: the rest goes out within send_timeout, then it is finalized */
}


/* Add the comma-separated, URL-escaped values in v to *arr. */
static ngx_int_t
ngx_http_gift_filter_add(ngx_http_request_t *r, ngx_array_t **arr,
    ngx_str_t *v)
{
    size_t       n;
    u_char      *buf;
    ngx_str_t   *s;
    const char  *p, *end;

    if (*arr == NULL) {
        *arr = ngx_array_create(r->pool, 2, sizeof(ngx_str_t));
        if (*arr == NULL) {
            return NGX_ERROR;
        }
    }

    p = (const char *) v->data;
    end = p + v->len;

    for ( ;; ) {
        /* values only shrink when unescaped: the rest of v is room enough */
        buf = ngx_pnalloc(r->pool, end - p + 1);
        if (buf == NULL) {
            return NGX_ERROR;
        }

        n = gift_filter_next(&p, end, (char *) buf);
        if (n == (size_t) -1) {
            return NGX_OK;
        }

        s = ngx_array_push(*arr);
        if (s == NULL) {
            return NGX_ERROR;
        }

        s->data = buf;
        s->len = n;
    }
}


ngx_int_t
ngx_http_gift_fanout_parse_filters(ngx_http_request_t *r,
    ngx_http_gift_client_t *c)
{
    size_t        klen, vlen;
    ngx_str_t     value;
    const char   *p, *end, *key, *val;
    ngx_array_t **arr;

    p = (const char *) r->args.data;
    end = p + r->args.len;

    while (gift_query_next(&p, end, &key, &klen, &val, &vlen)) {

        if (klen == 6 && ngx_strncmp(key, "device", 6) == 0) {
            arr = &c->devices;

        } else if (klen == 4 && ngx_strncmp(key, "room", 4) == 0) {
            arr = &c->rooms;

        } else if (klen == 6 && ngx_strncmp(key, "status", 6) == 0) {
            arr = &c->statuses;

        } else {
            continue;
        }

        value.data = (u_char *) val;
        value.len = vlen;

        if (ngx_http_gift_filter_add(r, arr, &value) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}
