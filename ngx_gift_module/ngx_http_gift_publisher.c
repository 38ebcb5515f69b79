/*
 * The publisher: a NATS client on the worker's event loop, for webhooks.
 *
 * A webhook's publish is a JetStream request: HPUB to gift.events.<platform>
 * with a Nats-Msg-Id header and the reply subject "<inbox>.<id>"; the
 * PubAck comes back as a MSG on this connection's one subscription
 * "<inbox>.*" and finds its request by id in an rbtree.  Everything happens
 * on the event loop: the socket is an nginx connection, the publishes of
 * one pass of the loop leave in one send() (a posted event), and the reply
 * is parsed where it is read.  No thread, no lock, no wakeup between the
 * request and its PubAck: on a small machine the thread hand-offs of a
 * library client cost more CPU than the rest of the webhook together.
 *
 * The protocol subset: INFO, CONNECT (headers, no_responders; user and
 * password or token from the URL), SUB, HPUB/PUB, MSG/HMSG, PING/PONG,
 * +OK, -ERR.  The connection is kept alive with a PING every 5 s (two
 * unanswered: dead), and re-established forever, going round the servers
 * of gift_nats_url, with gift_nats_reconnect_wait between rounds.  While it
 * is down, publishes are refused at once (503 unavailable); requests in
 * flight when it drops wait for their gift_publish_timeout.
 *
 * tls:// URLs are served by the cnats bridge (ngx_http_gift_nats.c), which
 * then publishes too; the functions below hand over to it.
 */

#include "ngx_http_gift_module.h"

#include <netinet/tcp.h>

#include <jansson.h>


#define NGX_HTTP_GIFT_PUB_PING_INTERVAL  5000
#define NGX_HTTP_GIFT_PUB_PINGS_MAX      2
#define NGX_HTTP_GIFT_PUB_HANDSHAKE_MS   2000
#define NGX_HTTP_GIFT_PUB_LINE_MAX       65536
#define NGX_HTTP_GIFT_PUB_IN_MAX         (1024 * 1024 + 65536)
#define NGX_HTTP_GIFT_PUB_DISCOVER_MAX   16


typedef enum {
    NGX_HTTP_GIFT_PUB_IDLE = 0,
    NGX_HTTP_GIFT_PUB_CONNECTING,       /* TCP, then waiting for INFO */
    NGX_HTTP_GIFT_PUB_HANDSHAKE,        /* CONNECT sent, waiting for PONG */
    NGX_HTTP_GIFT_PUB_CONNECTED
} ngx_http_gift_pub_state_e;


typedef enum {
    NGX_HTTP_GIFT_FOLLOW_IDLE = 0,
    NGX_HTTP_GIFT_FOLLOW_INFO,          /* STREAM.INFO sent */
    NGX_HTTP_GIFT_FOLLOW_CREATE,        /* CONSUMER.CREATE sent */
    NGX_HTTP_GIFT_FOLLOW_ACTIVE
} ngx_http_gift_follow_state_e;


typedef struct {
    ngx_log_t                     *log;
    ngx_log_t                      quiet_log;   /* retries: not each one */
    ngx_pool_t                    *pool;        /* the cycle's */
    ngx_http_gift_nats_server_t   *servers;     /* configured, learned */
    ngx_uint_t                     nservers;
    ngx_uint_t                     nconf;       /* the configured ones */
    ngx_uint_t                     server;      /* the one tried or in use */
    ngx_uint_t                     addr;
    ngx_msec_t                     reconnect_wait;
    ngx_uint_t                     queue_max;

    ngx_peer_connection_t          pc;
    ngx_connection_t              *c;
    ngx_http_gift_pub_state_e      state;
    ngx_uint_t                     was_connected;
    ngx_uint_t                     warned;
    ngx_uint_t                     tried;       /* servers tried this round */
    ngx_uint_t                     pings_out;
    size_t                         max_payload;

    ngx_event_t                    retry_ev;
    ngx_event_t                    ping_ev;
    ngx_event_t                    flush_ev;    /* posted once per pass */

    u_char                        *in;
    size_t                         in_size;
    size_t                         in_len;

    u_char                        *out;
    size_t                         out_size;
    size_t                         out_pos;     /* written up to here */
    size_t                         out_len;
    ngx_uint_t                     out_msgs;    /* publishes not yet sent */

    u_char                         inbox[40];
    size_t                         inbox_len;
    uint64_t                       next_id;
    ngx_rbtree_t                   pending;
    ngx_rbtree_node_t              sentinel;

    /* GIFT_ACKS, followed when a location streams acknowledgements */
    ngx_uint_t                     follow;
    ngx_uint_t                     replay_max;
    ngx_http_gift_follow_state_e   fstate;
    uint64_t                       fctl;        /* JetStream API request */
    uint64_t                       fgen;        /* deliver subject */
    uint64_t                       fsub;        /* the one subscribed */
    u_char                         consumer[128];
    size_t                         consumer_len;
    ngx_uint_t                     started;     /* origin is set */
    uint64_t                       origin;
    uint64_t                       last_sseq;
    uint64_t                       next_cseq;
    ngx_uint_t                     followed;    /* "following" logged */
    ngx_uint_t                     fwarned;
    ngx_msec_t                     fseen;       /* last message, heartbeat */
    ngx_event_t                    follow_ev;
    ngx_http_gift_frame_t        **frames;      /* read, not yet delivered */
    size_t                         nframes;
    size_t                         frames_cap;
} ngx_http_gift_pub_t;


static void ngx_http_gift_pub_connect(ngx_http_gift_pub_t *p);
static void ngx_http_gift_pub_fail(ngx_http_gift_pub_t *p, const char *why,
    ngx_err_t err);
static void ngx_http_gift_pub_discover(ngx_http_gift_pub_t *p, json_t *urls);
static void ngx_http_gift_pub_read_handler(ngx_event_t *rev);
static void ngx_http_gift_pub_read(ngx_http_gift_pub_t *p, ngx_event_t *rev);
static void ngx_http_gift_pub_write_handler(ngx_event_t *wev);
static void ngx_http_gift_pub_retry_handler(ngx_event_t *ev);
static void ngx_http_gift_pub_ping_handler(ngx_event_t *ev);
static void ngx_http_gift_pub_flush_handler(ngx_event_t *ev);
static void ngx_http_gift_pub_flush(ngx_http_gift_pub_t *p);
static ngx_int_t ngx_http_gift_pub_parse(ngx_http_gift_pub_t *p);
static ngx_int_t ngx_http_gift_pub_reserve(ngx_http_gift_pub_t *p,
    size_t n);
static void ngx_http_gift_follow_start(ngx_http_gift_pub_t *p,
    const char *why);
static void ngx_http_gift_follow_handler(ngx_event_t *ev);
static void ngx_http_gift_follow_control(ngx_http_gift_pub_t *p,
    u_char *subj, size_t slen, u_char *data, size_t len);
static void ngx_http_gift_follow_deliver(ngx_http_gift_pub_t *p,
    uint64_t gen, u_char *reply, size_t rlen, u_char *hdr, size_t hlen,
    u_char *data, size_t len);
static uint64_t ngx_http_gift_follow_num(u_char *s, size_t len);
static void ngx_http_gift_follow_flush_frames(ngx_http_gift_pub_t *p);


static ngx_http_gift_pub_t  *ngx_http_gift_pub;
static ngx_uint_t            ngx_http_gift_pub_bridged;


ngx_int_t
ngx_http_gift_publisher_init_process(ngx_cycle_t *cycle,
    ngx_http_gift_main_conf_t *gmcf)
{
    u_char               *q;
    ngx_uint_t            i;
    ngx_http_gift_pub_t  *p;

    if (gmcf->nats_tls) {
        ngx_http_gift_pub_bridged = 1;
        return NGX_OK;
    }

    p = ngx_pcalloc(cycle->pool, sizeof(ngx_http_gift_pub_t));
    if (p == NULL) {
        return NGX_ERROR;
    }

    p->log = cycle->log;
    p->quiet_log = *cycle->log;
    p->quiet_log.log_level = NGX_LOG_CRIT;
    p->quiet_log.next = NULL;
    /* the configured servers, and room for those a cluster announces */
    p->nservers = gmcf->nats_servers->nelts;
    p->servers = ngx_palloc(cycle->pool, (p->nservers
                                          + NGX_HTTP_GIFT_PUB_DISCOVER_MAX)
                                         * sizeof(ngx_http_gift_nats_server_t));
    if (p->servers == NULL) {
        return NGX_ERROR;
    }
    ngx_memcpy(p->servers, gmcf->nats_servers->elts,
               p->nservers * sizeof(ngx_http_gift_nats_server_t));
    p->nconf = p->nservers;
    p->pool = cycle->pool;
    p->reconnect_wait = gmcf->reconnect_wait;
    p->queue_max = gmcf->queue_size;
    p->max_payload = 1024 * 1024;
    p->next_id = 1;
    ngx_rbtree_init(&p->pending, &p->sentinel, ngx_rbtree_insert_value);

    /* a unique inbox: "_INBOX." and 22 random base-62 characters */
    q = ngx_cpymem(p->inbox, "_INBOX.", 7);
    for (i = 0; i < 22; i++) {
        *q++ = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
               [ngx_random() % 62];
    }
    p->inbox_len = q - p->inbox;

    p->retry_ev.handler = ngx_http_gift_pub_retry_handler;
    p->retry_ev.data = p;
    p->retry_ev.log = cycle->log;
    p->retry_ev.cancelable = 1;

    p->ping_ev.handler = ngx_http_gift_pub_ping_handler;
    p->ping_ev.data = p;
    p->ping_ev.log = cycle->log;
    p->ping_ev.cancelable = 1;

    p->flush_ev.handler = ngx_http_gift_pub_flush_handler;
    p->flush_ev.data = p;
    p->flush_ev.log = cycle->log;

    p->follow = gmcf->follow_acks;
    p->replay_max = gmcf->replay_max;
    p->follow_ev.handler = ngx_http_gift_follow_handler;
    p->follow_ev.data = p;
    p->follow_ev.log = cycle->log;
    p->follow_ev.cancelable = 1;

    /* start with a random server, so that workers spread over a cluster */
    p->server = p->nservers > 1 ? (ngx_uint_t) ngx_random() % p->nservers : 0;

    ngx_http_gift_pub = p;

    ngx_http_gift_pub_connect(p);

    return NGX_OK;
}


void
ngx_http_gift_publisher_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_gift_pub_t  *p;

    p = ngx_http_gift_pub;
    if (p == NULL) {
        return;
    }

    ngx_http_gift_pub = NULL;

    if (p->c != NULL) {
        ngx_close_connection(p->c);
        p->c = NULL;
    }

    if (p->retry_ev.timer_set) {
        ngx_del_timer(&p->retry_ev);
    }
    if (p->ping_ev.timer_set) {
        ngx_del_timer(&p->ping_ev);
    }
    if (p->flush_ev.posted) {
        ngx_delete_posted_event(&p->flush_ev);
    }
    if (p->follow_ev.timer_set) {
        ngx_del_timer(&p->follow_ev);
    }

    while (p->nframes) {
        ngx_free(p->frames[--p->nframes]);
    }
    ngx_free(p->frames);

    ngx_free(p->in);
    ngx_free(p->out);
    p->in = p->out = NULL;
}


ngx_uint_t
ngx_http_gift_nats_connected(void)
{
    if (ngx_http_gift_pub_bridged) {
        return ngx_http_gift_bridge_connected();
    }

    return ngx_http_gift_pub != NULL
           && ngx_http_gift_pub->state == NGX_HTTP_GIFT_PUB_CONNECTED;
}


ngx_int_t
ngx_http_gift_nats_publish(ngx_http_gift_pending_t *pd, const char *subject,
    const char *msg_id, const u_char *data, size_t len, ngx_log_t *log)
{
    u_char               *o;
    size_t                slen, ilen, hlen, need;
    ngx_http_gift_pub_t  *p;

    if (ngx_http_gift_pub_bridged) {
        return ngx_http_gift_bridge_publish(pd, subject, msg_id, data, len,
                                            log);
    }

    p = ngx_http_gift_pub;

    if (p == NULL || p->state != NGX_HTTP_GIFT_PUB_CONNECTED) {
        return NGX_DECLINED;
    }

    if (p->out_msgs >= p->queue_max) {
        return NGX_BUSY;
    }

    slen = ngx_strlen(subject);
    ilen = msg_id ? ngx_strlen(msg_id) : 0;

    /* "NATS/1.0\r\nNats-Msg-Id: <id>\r\n\r\n" */
    hlen = msg_id ? sizeof("NATS/1.0\r\nNats-Msg-Id: \r\n\r\n") - 1 + ilen : 0;

    /* the server counts the headers in: over it, it closes the connection */
    if (hlen + len > p->max_payload) {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "gift: message of %uz bytes over the server's "
                      "max_payload of %uz", hlen + len, p->max_payload);
        return NGX_ERROR;
    }
    need = sizeof("HPUB  . 18446744073709551615 4294967295 4294967295\r\n")
           + slen + p->inbox_len + hlen + len + 2;

    if (ngx_http_gift_pub_reserve(p, need) != NGX_OK) {
        return NGX_ERROR;
    }

    o = p->out + p->out_len;

    if (msg_id) {
        o = ngx_sprintf(o, "HPUB %s %*s.%uL %uz %uz\r\n"
                        "NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n",
                        subject, p->inbox_len, p->inbox, p->next_id,
                        hlen, hlen + len, msg_id);
    } else {
        o = ngx_sprintf(o, "PUB %s %*s.%uL %uz\r\n", subject, p->inbox_len,
                        p->inbox, p->next_id, len);
    }

    o = ngx_cpymem(o, data, len);
    *o++ = '\r';
    *o++ = '\n';

    p->out_len = o - p->out;
    p->out_msgs++;

    /* every publish of this pass of the loop leaves in one send() */
    if (!p->flush_ev.posted) {
        ngx_post_event(&p->flush_ev, &ngx_posted_events);
    }

    pd->node.key = p->next_id++;
    pd->queued = 1;
    ngx_rbtree_insert(&p->pending, &pd->node);

    return NGX_OK;
}


void
ngx_http_gift_nats_cancel(ngx_http_gift_pending_t *pd)
{
    if (ngx_http_gift_pub_bridged) {
        ngx_http_gift_bridge_cancel(pd);
        return;
    }

    if (pd->queued && ngx_http_gift_pub != NULL) {
        ngx_rbtree_delete(&ngx_http_gift_pub->pending, &pd->node);
    }

    pd->queued = 0;
}


/* ------------------------------------------------------------ connection */


static void
ngx_http_gift_pub_connect(ngx_http_gift_pub_t *p)
{
    int                           on;
    ngx_int_t                     rc;
    ngx_connection_t             *c;
    ngx_http_gift_nats_server_t  *srv;

    srv = &p->servers[p->server];

    ngx_memzero(&p->pc, sizeof(ngx_peer_connection_t));
    p->pc.sockaddr = srv->addrs[p->addr].sockaddr;
    p->pc.socklen = srv->addrs[p->addr].socklen;
    p->pc.name = &srv->name;
    p->pc.get = ngx_event_get_peer;
    /* nginx logs a refused connect() itself: once, not every retry */
    p->pc.log = p->warned ? &p->quiet_log : p->log;
    p->pc.log_error = NGX_ERROR_INFO;

    rc = ngx_event_connect_peer(&p->pc);

    if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
        if (p->pc.connection) {
            ngx_close_connection(p->pc.connection);
        }
        ngx_http_gift_pub_fail(p, "connect() failed", ngx_socket_errno);
        return;
    }

    c = p->pc.connection;
    c->data = p;
    c->read->handler = ngx_http_gift_pub_read_handler;
    c->write->handler = ngx_http_gift_pub_write_handler;
    c->read->cancelable = 1;
    c->write->cancelable = 1;

    on = 1;
    (void) setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));

    p->c = c;
    p->state = NGX_HTTP_GIFT_PUB_CONNECTING;
    p->in_len = 0;
    p->out_pos = p->out_len = 0;
    p->out_msgs = 0;
    p->pings_out = 0;

    /* the whole handshake (TCP, INFO, CONNECT, PONG) within 2 s */
    ngx_add_timer(c->read, NGX_HTTP_GIFT_PUB_HANDSHAKE_MS);
}


static void
ngx_http_gift_pub_fail(ngx_http_gift_pub_t *p, const char *why, ngx_err_t err)
{
    ngx_msec_t                    delay;
    ngx_uint_t                    was;
    ngx_http_gift_nats_server_t  *srv;

    srv = &p->servers[p->server];
    was = (p->state == NGX_HTTP_GIFT_PUB_CONNECTED);

    if (p->c != NULL) {
        ngx_close_connection(p->c);
        p->c = NULL;
    }

    p->state = NGX_HTTP_GIFT_PUB_IDLE;
    p->in_len = 0;
    p->out_pos = p->out_len = 0;
    p->out_msgs = 0;
    p->pings_out = 0;

    if (p->ping_ev.timer_set) {
        ngx_del_timer(&p->ping_ev);
    }

    /* the server drops the consumer with the connection; a new one later */
    p->fstate = NGX_HTTP_GIFT_FOLLOW_IDLE;
    p->consumer_len = 0;
    p->fsub = 0;
    p->fgen++;
    if (p->follow_ev.timer_set) {
        ngx_del_timer(&p->follow_ev);
    }

    if (was) {
        ngx_http_gift_stat_nats(0, 0);
        ngx_log_error(NGX_LOG_WARN, p->log, err,
                      "gift: disconnected from NATS %V (%s); reconnecting",
                      &srv->name, why);
        p->warned = 0;

    } else if (!p->warned) {
        ngx_log_error(NGX_LOG_WARN, p->log, err,
                      "gift: NATS not reachable yet at %V (%s); retrying",
                      &srv->name, why);
        p->warned = 1;

    } else {
        ngx_log_error(NGX_LOG_INFO, p->log, err,
                      "gift: NATS at %V: %s", &srv->name, why);
    }

    /*
     * After a loss, the same address first.  Otherwise the next address of
     * this server, or the next server: straight on, and a pause of
     * gift_nats_reconnect_wait (plus up to 100 ms, so that the workers do
     * not come back in step) once every server of the list failed.
     */
    delay = 1;

    if (was) {
        p->tried = 0;

    } else if (++p->addr >= srv->naddrs) {
        p->addr = 0;
        p->server = (p->server + 1) % p->nservers;

        if (++p->tried >= p->nservers) {
            p->tried = 0;
            delay = p->reconnect_wait + ngx_random() % 100;
        }
    }

    ngx_add_timer(&p->retry_ev, delay);
}


static void
ngx_http_gift_pub_retry_handler(ngx_event_t *ev)
{
    ngx_http_gift_pub_connect(ev->data);
}


static void
ngx_http_gift_pub_ping_handler(ngx_event_t *ev)
{
    ngx_http_gift_pub_t *p = ev->data;

    if (p->state != NGX_HTTP_GIFT_PUB_CONNECTED) {
        return;
    }

    if (p->pings_out >= NGX_HTTP_GIFT_PUB_PINGS_MAX) {
        ngx_http_gift_pub_fail(p, "no PONG to two PINGs", 0);
        return;
    }

    if (ngx_http_gift_pub_reserve(p, 6) != NGX_OK) {
        ngx_http_gift_pub_fail(p, "out of memory", 0);
        return;
    }

    p->out_len = ngx_cpymem(p->out + p->out_len, "PING\r\n", 6) - p->out;
    p->pings_out++;

    ngx_http_gift_pub_flush(p);

    if (p->state == NGX_HTTP_GIFT_PUB_CONNECTED) {
        ngx_add_timer(&p->ping_ev, NGX_HTTP_GIFT_PUB_PING_INTERVAL);
    }
}


static void
ngx_http_gift_pub_write_handler(ngx_event_t *wev)
{
    int                   err;
    socklen_t             len;
    ngx_connection_t     *c;
    ngx_http_gift_pub_t  *p;

    c = wev->data;
    p = c->data;

    if (p->state == NGX_HTTP_GIFT_PUB_CONNECTING) {
        /* the TCP connect finished; INFO comes next, on the read side */
        err = 0;
        len = sizeof(int);
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len) == -1)
        {
            err = ngx_socket_errno;
        }
        if (err) {
            ngx_http_gift_pub_fail(p, "connect() failed", err);
            return;
        }

    } else {
        ngx_http_gift_pub_flush(p);
        if (p->c == NULL) {
            return;
        }
    }

    /* off again with level-triggered methods (poll, select) */
    if (ngx_handle_write_event(wev, 0) != NGX_OK) {
        ngx_http_gift_pub_fail(p, "cannot wait for the socket", 0);
    }
}


static void
ngx_http_gift_pub_flush_handler(ngx_event_t *ev)
{
    ngx_http_gift_pub_flush(ev->data);
}


static void
ngx_http_gift_pub_flush(ngx_http_gift_pub_t *p)
{
    ssize_t            n;
    ngx_connection_t  *c;

    c = p->c;

    if (c == NULL || p->state == NGX_HTTP_GIFT_PUB_CONNECTING) {
        return;
    }

    while (p->out_pos < p->out_len) {
        n = c->send(c, p->out + p->out_pos, p->out_len - p->out_pos);

        if (n == NGX_AGAIN) {
            if (ngx_handle_write_event(c->write, 0) != NGX_OK) {
                ngx_http_gift_pub_fail(p, "cannot wait for the socket", 0);
            }
            return;
        }

        if (n == NGX_ERROR) {
            ngx_http_gift_pub_fail(p, "send() failed", 0);
            return;
        }

        p->out_pos += n;
    }

    p->out_pos = p->out_len = 0;
    p->out_msgs = 0;

    /* a burst's buffer goes back once it is written */
    if (p->out_size > 1024 * 1024) {
        ngx_free(p->out);
        p->out = NULL;
        p->out_size = 0;
    }
}


/* Room for n more bytes at the end of the output buffer. */
static ngx_int_t
ngx_http_gift_pub_reserve(ngx_http_gift_pub_t *p, size_t n)
{
    u_char  *b;
    size_t   size;

    if (p->out_pos > 0 && p->out_size - p->out_len < n) {
        /* drop what was written already */
        ngx_memmove(p->out, p->out + p->out_pos, p->out_len - p->out_pos);
        p->out_len -= p->out_pos;
        p->out_pos = 0;
    }

    if (p->out_size - p->out_len >= n) {
        return NGX_OK;
    }

    size = p->out_size ? p->out_size : 65536;
    while (size - p->out_len < n) {
        size *= 2;
    }

    b = ngx_alloc(size, p->log);
    if (b == NULL) {
        return NGX_ERROR;
    }

    if (p->out_len) {
        ngx_memcpy(b, p->out, p->out_len);
    }
    ngx_free(p->out);

    p->out = b;
    p->out_size = size;

    return NGX_OK;
}


static void
ngx_http_gift_pub_read_handler(ngx_event_t *rev)
{
    ngx_connection_t     *c;
    ngx_http_gift_pub_t  *p;

    c = rev->data;
    p = c->data;

    if (rev->timedout) {
        ngx_http_gift_pub_fail(p, "no answer within 2 s", NGX_ETIMEDOUT);
        return;
    }

    ngx_http_gift_pub_read(p, rev);

    /* the acknowledgements of this read, to the clients in one go */
    ngx_http_gift_follow_flush_frames(p);
}


static void
ngx_http_gift_pub_read(ngx_http_gift_pub_t *p, ngx_event_t *rev)
{
    u_char            *b;
    size_t             size;
    ssize_t            n;
    ngx_connection_t  *c;

    c = p->c;

    do {
        if (p->in_size - p->in_len < 4096) {
            size = p->in_size ? p->in_size * 2 : 16384;
            if (size > NGX_HTTP_GIFT_PUB_IN_MAX) {
                ngx_http_gift_pub_fail(p, "protocol line or message too "
                                       "long", 0);
                return;
            }

            b = ngx_alloc(size, p->log);
            if (b == NULL) {
                ngx_http_gift_pub_fail(p, "out of memory", 0);
                return;
            }
            if (p->in_len) {
                ngx_memcpy(b, p->in, p->in_len);
            }
            ngx_free(p->in);
            p->in = b;
            p->in_size = size;
        }

        n = c->recv(c, p->in + p->in_len, p->in_size - p->in_len);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == 0) {
            ngx_http_gift_pub_fail(p, "the server closed the connection", 0);
            return;
        }

        if (n == NGX_ERROR) {
            ngx_http_gift_pub_fail(p, "recv() failed", 0);
            return;
        }

        p->in_len += n;

        if (ngx_http_gift_pub_parse(p) != NGX_OK) {
            return;                 /* the connection is gone */
        }

    } while (rev->ready);

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_http_gift_pub_fail(p, "cannot wait for the socket", 0);
    }
}


/* ------------------------------------------------------------ protocol */


/* The next space-separated argument of a protocol line. */
static u_char *
ngx_http_gift_pub_arg(u_char **pos, u_char *end, size_t *len)
{
    u_char  *s;

    while (*pos < end && (**pos == ' ' || **pos == '\t')) {
        (*pos)++;
    }

    s = *pos;

    while (*pos < end && **pos != ' ' && **pos != '\t') {
        (*pos)++;
    }

    *len = *pos - s;

    return *len ? s : NULL;
}


/*
 * Where the value of a top-level key starts in a flat JSON object, as
 * nats-server writes its PubAck: {"stream":"GIFTS", "seq":5,"duplicate": true}
 */
static u_char *
ngx_http_gift_pub_value(u_char *data, size_t len, char *key)
{
    u_char  *s, *e;

    s = ngx_strnstr(data, key, len);
    if (s == NULL) {
        return NULL;
    }

    e = data + len;
    s += ngx_strlen(key);

    while (s < e && (*s == ' ' || *s == '\t')) {
        s++;
    }
    if (s == e || *s++ != ':') {
        return NULL;
    }
    while (s < e && (*s == ' ' || *s == '\t')) {
        s++;
    }

    return s;
}


/*
 * A PubAck, a JetStream error, or (with headers) a status:
 *   {"stream":"GIFTS","seq":5,"duplicate":true}
 *   {"error":{"code":503,"err_code":10077,"description":"maximum ..."}}
 *   NATS/1.0 503  (no responders: no stream holds the subject)
 */
static void
ngx_http_gift_pub_reply(ngx_http_gift_pub_t *p, u_char *subj, size_t slen,
    u_char *hdr, size_t hlen, u_char *data, size_t len)
{
    u_char                      *s, *e;
    uint64_t                     id;
    ngx_http_gift_pending_t     *pd;
    ngx_http_gift_pub_result_t   res;

    if (slen <= p->inbox_len + 1
        || ngx_strncmp(subj, p->inbox, p->inbox_len) != 0
        || subj[p->inbox_len] != '.')
    {
        return;
    }

    id = 0;
    for (s = subj + p->inbox_len + 1; s < subj + slen; s++) {
        if (*s < '0' || *s > '9') {
            return;
        }
        id = id * 10 + (*s - '0');
    }

    pd = ngx_http_gift_pending_find(&p->pending, id);
    if (pd == NULL) {
        return;             /* the request timed out or went away */
    }

    ngx_memzero(&res, sizeof(res));
    res.id = id;

    if (hlen >= sizeof("NATS/1.0 503") - 1
        && ngx_strncmp(hdr, "NATS/1.0 503", sizeof("NATS/1.0 503") - 1) == 0)
    {
        res.status = NGX_HTTP_GIFT_PUB_UNAVAILABLE;
        ngx_cpystrn((u_char *) res.error,
                    (u_char *) "no stream for the subject (no responders)",
                    sizeof(res.error));

    } else if (len > 0 && ngx_strnstr(data, "\"error\"", len) == NULL
               && (s = ngx_http_gift_pub_value(data, len, "\"seq\"")) != NULL)
    {
        /* the common case, without a JSON parser */
        e = data + len;
        for ( /* void */ ; s < e && *s >= '0' && *s <= '9'; s++) {
            res.seq = res.seq * 10 + (*s - '0');
        }
        s = ngx_http_gift_pub_value(data, len, "\"duplicate\"");
        res.duplicate = s != NULL && e - s >= 4 && ngx_strncmp(s, "true", 4)
                                                   == 0;
        res.status = res.seq ? NGX_HTTP_GIFT_PUB_OK : NGX_HTTP_GIFT_PUB_ERROR;
        if (res.seq == 0) {
            ngx_cpystrn((u_char *) res.error, (u_char *) "PubAck without a "
                        "sequence", sizeof(res.error));
        }

    } else {
        ngx_http_gift_puback_parse((const char *) data, len, &res);
    }

    ngx_rbtree_delete(&p->pending, &pd->node);
    pd->queued = 0;
    pd->handler(pd, &res);
}


/*
 * The servers of the cluster, as INFO announces them ("connect_urls", at
 * connect and whenever the cluster changes): added to the list the worker
 * goes round when a connection is lost, as the NATS clients do, with the
 * credentials of the server that announced them.  Addresses only: a name
 * would have to be resolved, and the event loop does not wait for DNS.
 */
static void
ngx_http_gift_pub_discover(ngx_http_gift_pub_t *p, json_t *urls)
{
    u_char                       *d;
    size_t                        i, len;
    json_t                       *v;
    ngx_url_t                     u;
    ngx_addr_t                   *addr;
    ngx_uint_t                    k, a, known;
    ngx_pool_t                   *tmp;
    const char                   *str;
    ngx_http_gift_nats_server_t  *srv, *from;

    if (!json_is_array(urls) || json_array_size(urls) == 0) {
        return;
    }

    /* parsed in a pool of its own: only what is new is kept */
    tmp = ngx_create_pool(1024, p->log);
    if (tmp == NULL) {
        return;
    }

    from = &p->servers[p->server];

    json_array_foreach(urls, i, v) {
        if (!json_is_string(v)
            || p->nservers >= p->nconf + NGX_HTTP_GIFT_PUB_DISCOVER_MAX)
        {
            continue;
        }

        str = json_string_value(v);
        len = ngx_strlen(str);

        if (len == 0 || !(str[0] == '[' || (str[0] >= '0' && str[0] <= '9')))
        {
            continue;               /* a name, not an address */
        }

        ngx_memzero(&u, sizeof(ngx_url_t));
        u.url.data = (u_char *) str;
        u.url.len = len;
        u.default_port = 4222;

        if (ngx_parse_url(tmp, &u) != NGX_OK || u.naddrs == 0) {
            continue;
        }

        known = 0;
        for (k = 0; k < p->nservers && !known; k++) {
            for (a = 0; a < p->servers[k].naddrs; a++) {
                if (ngx_cmp_sockaddr(p->servers[k].addrs[a].sockaddr,
                                     p->servers[k].addrs[a].socklen,
                                     u.addrs[0].sockaddr, u.addrs[0].socklen,
                                     1)
                    == NGX_OK)
                {
                    known = 1;
                    break;
                }
            }
        }

        if (known) {
            continue;
        }

        d = ngx_pnalloc(p->pool, len);
        addr = ngx_palloc(p->pool, sizeof(ngx_addr_t));
        if (d == NULL || addr == NULL) {
            break;
        }
        addr->sockaddr = ngx_palloc(p->pool, u.addrs[0].socklen);
        if (addr->sockaddr == NULL) {
            break;
        }
        ngx_memcpy(d, str, len);
        ngx_memcpy(addr->sockaddr, u.addrs[0].sockaddr, u.addrs[0].socklen);
        addr->socklen = u.addrs[0].socklen;
        addr->name.data = d;
        addr->name.len = len;

        srv = &p->servers[p->nservers++];
        ngx_memzero(srv, sizeof(ngx_http_gift_nats_server_t));
        srv->url.data = d;
        srv->url.len = len;
        srv->name = srv->url;
        srv->addrs = addr;
        srv->naddrs = 1;
        srv->user = from->user;
        srv->pass = from->pass;
        srv->token = from->token;

        ngx_log_error(NGX_LOG_INFO, p->log, 0,
                      "gift: NATS server %V learned from the cluster",
                      &srv->name);
    }

    ngx_destroy_pool(tmp);
}


static ngx_int_t
ngx_http_gift_pub_info(ngx_http_gift_pub_t *p, u_char *json, size_t len)
{
    char                         *connect;
    u_char                        name[64];
    json_t                       *info, *v, *co;
    json_error_t                  jerr;
    size_t                        need, clen;
    u_char                       *o;
    ngx_http_gift_nats_server_t  *srv;

    info = json_loadb((const char *) json, len, 0, &jerr);
    if (info == NULL) {
        ngx_http_gift_pub_fail(p, "unreadable INFO", 0);
        return NGX_ERROR;
    }

    v = json_object_get(info, "max_payload");
    if (json_is_integer(v) && json_integer_value(v) > 0) {
        p->max_payload = (size_t) json_integer_value(v);
    }

    if (json_is_true(json_object_get(info, "tls_required"))) {
        json_decref(info);
        ngx_http_gift_pub_fail(p, "the server requires TLS: use a tls:// URL",
                               0);
        return NGX_ERROR;
    }

    ngx_http_gift_pub_discover(p, json_object_get(info, "connect_urls"));

    v = json_object_get(info, "headers");
    if (v != NULL && !json_is_true(v)) {
        json_decref(info);
        ngx_http_gift_pub_fail(p, "the server does not support headers "
                               "(nats-server 2.2 or newer is needed)", 0);
        return NGX_ERROR;
    }

    json_decref(info);

    if (p->state != NGX_HTTP_GIFT_PUB_CONNECTING) {
        return NGX_OK;          /* an update from a cluster: nothing to do */
    }

    srv = &p->servers[p->server];

    /* the name nats-server shows (connz): the worker's PID in it */
    ngx_sprintf(name, "nginx-gift worker %P%Z", ngx_pid);

    co = json_pack("{s:b, s:b, s:b, s:s, s:s, s:s, s:i, s:b, s:b}",
                   "verbose", 0, "pedantic", 0, "tls_required", 0,
                   "name", (char *) name, "lang", "C",
                   "version", NGX_HTTP_GIFT_VERSION, "protocol", 1,
                   "headers", 1, "no_responders", 1);
    if (co == NULL) {
        ngx_http_gift_pub_fail(p, "out of memory", 0);
        return NGX_ERROR;
    }

    if (srv->user.len || srv->pass.len) {
        json_object_set_new(co, "user", json_stringn((char *) srv->user.data,
                                                     srv->user.len));
        json_object_set_new(co, "pass", json_stringn((char *) srv->pass.data,
                                                     srv->pass.len));
    }
    if (srv->token.len) {
        json_object_set_new(co, "auth_token",
                            json_stringn((char *) srv->token.data,
                                         srv->token.len));
    }

    connect = json_dumps(co, JSON_COMPACT);
    json_decref(co);

    if (connect == NULL) {
        ngx_http_gift_pub_fail(p, "out of memory", 0);
        return NGX_ERROR;
    }

    clen = ngx_strlen(connect);
    need = sizeof("CONNECT \r\nSUB .* 1\r\nSUB .c.* 2\r\nPING\r\n") + clen
           + 2 * p->inbox_len;

    if (ngx_http_gift_pub_reserve(p, need) != NGX_OK) {
        free(connect);
        ngx_http_gift_pub_fail(p, "out of memory", 0);
        return NGX_ERROR;
    }

    o = p->out + p->out_len;
    o = ngx_sprintf(o, "CONNECT %*s\r\nSUB %*s.* 1\r\n", clen, connect,
                    p->inbox_len, p->inbox);
    if (p->follow) {
        /* JetStream API answers */
        o = ngx_sprintf(o, "SUB %*s.c.* 2\r\n", p->inbox_len, p->inbox);
    }
    o = ngx_cpymem(o, "PING\r\n", 6);
    p->out_len = o - p->out;
    free(connect);

    p->state = NGX_HTTP_GIFT_PUB_HANDSHAKE;

    ngx_http_gift_pub_flush(p);

    return p->c ? NGX_OK : NGX_ERROR;
}


static void
ngx_http_gift_pub_connected(ngx_http_gift_pub_t *p)
{
    ngx_http_gift_nats_server_t  *srv;

    srv = &p->servers[p->server];

    p->state = NGX_HTTP_GIFT_PUB_CONNECTED;
    p->tried = 0;
    p->warned = 0;

    if (p->c->read->timer_set) {
        ngx_del_timer(p->c->read);
    }

    p->c->log = p->log;
    p->c->read->log = p->log;
    p->c->write->log = p->log;

    ngx_http_gift_stat_nats(1, p->was_connected);
    p->was_connected = 1;

    ngx_add_timer(&p->ping_ev, NGX_HTTP_GIFT_PUB_PING_INTERVAL);

    ngx_log_error(NGX_LOG_NOTICE, p->log, 0, "gift: connected to NATS %V",
                  &srv->name);

    ngx_http_gift_follow_start(p, "connected");
}


/*
 * Everything complete in the input buffer; what is left (a partial line or
 * message) moves to its start.  NGX_ERROR when the connection was closed.
 */
static ngx_int_t
ngx_http_gift_pub_parse(ngx_http_gift_pub_t *p)
{
    u_char   *pos, *end, *lf, *le, *a, *subj, *arg[4];
    size_t    alen[4], slen, n, hdr, total;
    ngx_uint_t  i, na, hmsg;

    pos = p->in;
    end = p->in + p->in_len;

    while (pos < end) {
        lf = ngx_strlchr(pos, end, '\n');

        if (lf == NULL) {
            if ((size_t) (end - pos) > NGX_HTTP_GIFT_PUB_LINE_MAX) {
                ngx_http_gift_pub_fail(p, "protocol line too long", 0);
                return NGX_ERROR;
            }
            break;
        }

        le = (lf > pos && lf[-1] == '\r') ? lf - 1 : lf;

        if (le - pos >= 4 && (ngx_strncmp(pos, "MSG ", 4) == 0
                              || ngx_strncmp(pos, "HMSG", 4) == 0))
        {
            hmsg = (pos[0] == 'H');
            a = pos + (hmsg ? 5 : 4);

            subj = ngx_http_gift_pub_arg(&a, le, &slen);
            for (na = 0; na < 4; na++) {
                arg[na] = ngx_http_gift_pub_arg(&a, le, &alen[na]);
                if (arg[na] == NULL) {
                    break;
                }
            }

            /* MSG subj sid [reply] size; HMSG subj sid [reply] hdr total */
            if (subj == NULL || na < (hmsg ? 3 : 2)) {
                ngx_http_gift_pub_fail(p, "unreadable MSG line", 0);
                return NGX_ERROR;
            }

            total = 0;
            hdr = 0;
            for (i = 0; i < alen[na - 1]; i++) {
                total = total * 10 + (arg[na - 1][i] - '0');
            }
            if (hmsg) {
                for (i = 0; i < alen[na - 2]; i++) {
                    hdr = hdr * 10 + (arg[na - 2][i] - '0');
                }
            }

            if (hdr > total || total > NGX_HTTP_GIFT_PUB_IN_MAX - 8192) {
                ngx_http_gift_pub_fail(p, "MSG of an impossible size", 0);
                return NGX_ERROR;
            }

            n = (lf + 1 - pos) + total + 2;
            if ((size_t) (end - pos) < n) {
                break;              /* the rest of the message is to come */
            }

            /*
             * sid 1: PubAcks; 2: JetStream API answers; d<gen>: GIFT_ACKS
             * from the consumer of that generation
             */
            if (alen[0] == 1 && arg[0][0] == '1') {
                ngx_http_gift_pub_reply(p, subj, slen, lf + 1, hdr,
                                        lf + 1 + hdr, total - hdr);

            } else if (alen[0] == 1 && arg[0][0] == '2') {
                ngx_http_gift_follow_control(p, subj, slen, lf + 1 + hdr,
                                             total - hdr);

            } else if (alen[0] > 1 && arg[0][0] == 'd') {
                ngx_http_gift_follow_deliver(p,
                                     ngx_http_gift_follow_num(arg[0] + 1,
                                                              alen[0] - 1),
                                     na == (hmsg ? 4u : 3u) ? arg[1] : NULL,
                                     na == (hmsg ? 4u : 3u) ? alen[1] : 0,
                                     lf + 1, hdr, lf + 1 + hdr, total - hdr);
            }

            if (p->c == NULL) {
                return NGX_ERROR;   /* a reply to the server failed */
            }

            pos += n;
            continue;
        }

        if (le - pos >= 4 && ngx_strncmp(pos, "PING", 4) == 0) {
            if (ngx_http_gift_pub_reserve(p, 6) == NGX_OK) {
                p->out_len = ngx_cpymem(p->out + p->out_len, "PONG\r\n", 6)
                             - p->out;
                if (!p->flush_ev.posted) {
                    ngx_post_event(&p->flush_ev, &ngx_posted_events);
                }
            }

        } else if (le - pos >= 4 && ngx_strncmp(pos, "PONG", 4) == 0) {
            p->pings_out = 0;
            if (p->state == NGX_HTTP_GIFT_PUB_HANDSHAKE) {
                ngx_http_gift_pub_connected(p);
                if (p->c == NULL) {
                    return NGX_ERROR;
                }
            }

        } else if (le - pos >= 5 && ngx_strncmp(pos, "INFO ", 5) == 0) {
            if (ngx_http_gift_pub_info(p, pos + 5, le - pos - 5) != NGX_OK) {
                return NGX_ERROR;
            }

        } else if (le - pos >= 4 && ngx_strncmp(pos, "-ERR", 4) == 0) {
            ngx_log_error(NGX_LOG_ERR, p->log, 0, "gift: NATS %V: %*s",
                          &p->servers[p->server].name, le - pos, pos);
            if (p->state != NGX_HTTP_GIFT_PUB_CONNECTED) {
                ngx_http_gift_pub_fail(p, "refused by the server", 0);
                return NGX_ERROR;
            }
            /* a fatal one is followed by the server closing */

        } else if (!(le - pos >= 3 && ngx_strncmp(pos, "+OK", 3) == 0)
                   && le > pos)
        {
            ngx_http_gift_pub_fail(p, "unknown protocol line", 0);
            return NGX_ERROR;
        }

        pos = lf + 1;
    }

    if (pos > p->in) {
        p->in_len = end - pos;
        if (p->in_len) {
            ngx_memmove(p->in, pos, p->in_len);
        }
    }

    return NGX_OK;
}


/* ------------------------------------------------------------ GIFT_ACKS */

/*
 * An ordered consumer, as the NATS clients build it: an ephemeral push
 * consumer (no acks, flow control, idle heartbeats every 5 s, in memory)
 * delivering to "<inbox>.d.<gen>".  Each delivery's reply subject carries
 * its stream and consumer sequences; a consumer sequence out of order, a
 * heartbeat that reports more than we got, or 15 s without a message or a
 * heartbeat, and the consumer is replaced by a new one that starts after
 * the last stream sequence we have (a new <gen>: late deliveries of the
 * old one are dropped).  The first one starts gift_sse_replay_max messages
 * back, so that the replay ring is full from the start.
 */

#define NGX_HTTP_GIFT_FOLLOW_HB        5000
#define NGX_HTTP_GIFT_FOLLOW_RETRY     1000


/* Append one protocol line and its payload to the output. */
static ngx_int_t
ngx_http_gift_follow_pub(ngx_http_gift_pub_t *p, const char *subject,
    size_t slen, ngx_uint_t reply, u_char *data, size_t len)
{
    u_char  *o;

    if (ngx_http_gift_pub_reserve(p, sizeof("PUB   .c.18446744073709551615 "
                                            "4294967295\r\n\r\n")
                                     + slen + p->inbox_len + len) != NGX_OK)
    {
        ngx_http_gift_pub_fail(p, "out of memory", 0);
        return NGX_ERROR;
    }

    o = p->out + p->out_len;
    if (reply) {
        o = ngx_sprintf(o, "PUB %*s %*s.c.%uL %uz\r\n", slen, subject,
                        p->inbox_len, p->inbox, p->fctl, len);
    } else {
        o = ngx_sprintf(o, "PUB %*s %uz\r\n", slen, subject, len);
    }
    if (len) {                  /* an empty message may come as NULL */
        o = ngx_cpymem(o, data, len);
    }
    *o++ = '\r';
    *o++ = '\n';
    p->out_len = o - p->out;

    if (!p->flush_ev.posted) {
        ngx_post_event(&p->flush_ev, &ngx_posted_events);
    }

    return NGX_OK;
}


static void
ngx_http_gift_follow_start(ngx_http_gift_pub_t *p, const char *why)
{
    u_char  subj[192], json[512], *e;

    if (!p->follow || p->state != NGX_HTTP_GIFT_PUB_CONNECTED) {
        return;
    }

    if (p->consumer_len) {
        /* the old consumer goes now, not at its inactivity threshold */
        e = ngx_snprintf(subj, sizeof(subj),
                         "$JS.API.CONSUMER.DELETE.GIFT_ACKS.%*s",
                         p->consumer_len, p->consumer);
        if (ngx_http_gift_follow_pub(p, (char *) subj, e - subj, 0, NULL, 0)
            != NGX_OK)
        {
            return;
        }
        p->consumer_len = 0;

        ngx_log_error(NGX_LOG_INFO, p->log, 0,
                      "gift: GIFT_ACKS consumer replaced (%s)", why);
    }

    p->fgen++;
    p->fctl++;

    if (!p->started) {
        /* where the stream is: the start of the replay */
        p->fstate = NGX_HTTP_GIFT_FOLLOW_INFO;
        if (ngx_http_gift_follow_pub(p,
                          "$JS.API.STREAM.INFO.GIFT_ACKS",
                          sizeof("$JS.API.STREAM.INFO.GIFT_ACKS") - 1, 1,
                          NULL, 0)
            != NGX_OK)
        {
            return;
        }

    } else {
        p->fstate = NGX_HTTP_GIFT_FOLLOW_CREATE;
        p->next_cseq = 1;
        p->fseen = 0;                   /* its own messages will say */

        /*
         * The deliver subject, subscribed exactly (nats-server 2.9 sees no
         * interest in a wildcard) under a sid of its own, so that what the
         * old consumer still sends is told apart and dropped.
         */
        if (ngx_http_gift_pub_reserve(p, 2 * sizeof("UNSUB d18446744073709551615\r\n")
                                         + p->inbox_len + 32)
            != NGX_OK)
        {
            ngx_http_gift_pub_fail(p, "out of memory", 0);
            return;
        }
        e = p->out + p->out_len;
        if (p->fsub) {
            e = ngx_sprintf(e, "UNSUB d%uL\r\n", p->fsub);
        }
        e = ngx_sprintf(e, "SUB %*s.d.%uL d%uL\r\n", p->inbox_len, p->inbox,
                        p->fgen, p->fgen);
        p->out_len = e - p->out;
        p->fsub = p->fgen;

        if (p->last_sseq > 0) {
            e = ngx_snprintf(json, sizeof(json),
                "{\"stream_name\":\"GIFT_ACKS\",\"config\":{"
                "\"deliver_subject\":\"%*s.d.%uL\","
                "\"deliver_policy\":\"by_start_sequence\","
                "\"opt_start_seq\":%uL,", p->inbox_len, p->inbox, p->fgen,
                p->last_sseq + 1);
        } else {
            e = ngx_snprintf(json, sizeof(json),
                "{\"stream_name\":\"GIFT_ACKS\",\"config\":{"
                "\"deliver_subject\":\"%*s.d.%uL\","
                "\"deliver_policy\":\"all\",", p->inbox_len, p->inbox,
                p->fgen);
        }

        e = ngx_snprintf(e, json + sizeof(json) - e,
                "\"ack_policy\":\"none\",\"max_deliver\":1,"
                "\"replay_policy\":\"instant\",\"flow_control\":true,"
                "\"idle_heartbeat\":%uL,\"mem_storage\":true,"
                "\"num_replicas\":1}}",
                (uint64_t) NGX_HTTP_GIFT_FOLLOW_HB * 1000000);

        if (ngx_http_gift_follow_pub(p, "$JS.API.CONSUMER.CREATE.GIFT_ACKS",
                          sizeof("$JS.API.CONSUMER.CREATE.GIFT_ACKS") - 1, 1,
                          json, e - json)
            != NGX_OK)
        {
            return;
        }
    }

    /* an answer within 5 s, or again */
    if (p->follow_ev.timer_set) {
        ngx_del_timer(&p->follow_ev);
    }
    ngx_add_timer(&p->follow_ev, NGX_HTTP_GIFT_FOLLOW_HB);
}


/* Timer: retry, a request without an answer, or the heartbeat watchdog. */
static void
ngx_http_gift_follow_handler(ngx_event_t *ev)
{
    ngx_http_gift_pub_t *p = ev->data;

    if (p->state != NGX_HTTP_GIFT_PUB_CONNECTED) {
        return;                     /* started again once connected */
    }

    switch (p->fstate) {

    case NGX_HTTP_GIFT_FOLLOW_ACTIVE:
        if (ngx_current_msec - p->fseen < 3 * NGX_HTTP_GIFT_FOLLOW_HB) {
            ngx_add_timer(&p->follow_ev, NGX_HTTP_GIFT_FOLLOW_HB);
            return;
        }
        ngx_http_gift_follow_start(p, "no heartbeat for 15 s");
        return;

    case NGX_HTTP_GIFT_FOLLOW_IDLE:
        ngx_http_gift_follow_start(p, "retry");
        return;

    case NGX_HTTP_GIFT_FOLLOW_CREATE:
        if (ngx_current_msec - p->fseen < NGX_HTTP_GIFT_FOLLOW_HB) {
            /* no answer yet, but its messages are coming: wait on */
            ngx_add_timer(&p->follow_ev, NGX_HTTP_GIFT_FOLLOW_HB);
            return;
        }
        /* fall through */

    default:
        if (!p->fwarned) {
            ngx_log_error(NGX_LOG_WARN, p->log, 0,
                          "gift: no answer from JetStream in 5 s while "
                          "setting up the GIFT_ACKS consumer; retrying");
            p->fwarned = 1;
        }
        ngx_http_gift_follow_start(p, "no answer from JetStream");
        return;
    }
}


static void
ngx_http_gift_follow_retry(ngx_http_gift_pub_t *p, const char *what,
    const char *desc)
{
    if (!p->fwarned) {
        ngx_log_error(NGX_LOG_WARN, p->log, 0,
                      "gift: cannot follow GIFT_ACKS (%s: %s)%s; retrying",
                      what, desc, ngx_strstr(desc, "not found")
                                  ? ": run giftctl setup" : "");
        p->fwarned = 1;
    }

    p->fstate = NGX_HTTP_GIFT_FOLLOW_IDLE;

    if (p->follow_ev.timer_set) {
        ngx_del_timer(&p->follow_ev);
    }
    ngx_add_timer(&p->follow_ev, NGX_HTTP_GIFT_FOLLOW_RETRY);
}


/* An answer of the JetStream API on "<inbox>.c.<n>". */
static void
ngx_http_gift_follow_control(ngx_http_gift_pub_t *p, u_char *subj,
    size_t slen, u_char *data, size_t len)
{
    u_char        *s;
    size_t         plen;
    uint64_t       n, last, first, start;
    json_t        *root, *err, *v, *st;
    const char    *desc, *name;
    json_error_t   jerr;

    plen = p->inbox_len + 3;
    if (slen <= plen || ngx_strncmp(subj + p->inbox_len, ".c.", 3) != 0) {
        return;
    }

    n = 0;
    for (s = subj + plen; s < subj + slen; s++) {
        n = n * 10 + (*s - '0');
    }

    if (n != p->fctl || (p->fstate != NGX_HTTP_GIFT_FOLLOW_INFO
                         && p->fstate != NGX_HTTP_GIFT_FOLLOW_CREATE))
    {
        return;                     /* an answer to an older request */
    }

    root = json_loadb((const char *) data, len, 0, &jerr);
    if (root == NULL) {
        ngx_http_gift_follow_retry(p, "JetStream API", "unreadable answer");
        return;
    }

    err = json_object_get(root, "error");
    if (err != NULL) {
        v = json_object_get(err, "description");
        desc = json_is_string(v) ? json_string_value(v) : "error";
        ngx_http_gift_follow_retry(p, p->fstate == NGX_HTTP_GIFT_FOLLOW_INFO
                                      ? "stream info" : "consumer",
                                   desc);
        json_decref(root);
        return;
    }

    if (p->fstate == NGX_HTTP_GIFT_FOLLOW_INFO) {
        st = json_object_get(root, "state");
        v = json_object_get(st, "last_seq");
        last = json_is_integer(v) ? (uint64_t) json_integer_value(v) : 0;
        v = json_object_get(st, "first_seq");
        first = json_is_integer(v) ? (uint64_t) json_integer_value(v) : 0;
        json_decref(root);

        start = last >= p->replay_max ? last - p->replay_max + 1 : 1;
        if (start < first) {
            start = first;
        }

        p->started = 1;
        p->origin = last;
        p->last_sseq = start - 1;
        p->fwarned = 0;

        ngx_http_gift_follow_start(p, "stream info");
        return;
    }

    v = json_object_get(root, "name");
    name = json_is_string(v) ? json_string_value(v) : "";
    p->consumer_len = ngx_cpystrn(p->consumer, (u_char *) name,
                                  sizeof(p->consumer)) - p->consumer;
    json_decref(root);

    p->fstate = NGX_HTTP_GIFT_FOLLOW_ACTIVE;
    p->fseen = ngx_current_msec;
    p->fwarned = 0;

    if (!p->followed) {
        ngx_log_error(NGX_LOG_NOTICE, p->log, 0,
                      "gift: following GIFT_ACKS after #%uL", p->origin);
        p->followed = 1;

    } else {
        ngx_log_error(NGX_LOG_INFO, p->log, 0,
                      "gift: GIFT_ACKS followed again from #%uL",
                      p->last_sseq + 1);
    }

    if (p->follow_ev.timer_set) {
        ngx_del_timer(&p->follow_ev);
    }
    ngx_add_timer(&p->follow_ev, NGX_HTTP_GIFT_FOLLOW_HB);
}


/* The value of header `name` in a NATS header block, or NULL. */
static u_char *
ngx_http_gift_follow_header(u_char *hdr, size_t hlen, const char *name,
    size_t *len)
{
    u_char  *s, *e, *v;
    size_t   nlen;

    nlen = ngx_strlen(name);
    e = hdr + hlen;

    for (s = hdr; s < e; ) {
        v = ngx_strlchr(s, e, '\n');
        if (v == NULL) {
            break;
        }
        if ((size_t) (v - s) > nlen + 1 && ngx_strncasecmp(s, (u_char *) name,
                                                           nlen) == 0
            && s[nlen] == ':')
        {
            s += nlen + 1;
            while (s < v && *s == ' ') {
                s++;
            }
            *len = (v > s && v[-1] == '\r') ? (size_t) (v - 1 - s)
                                            : (size_t) (v - s);
            return s;
        }
        s = v + 1;
    }

    return NULL;
}


static uint64_t
ngx_http_gift_follow_num(u_char *s, size_t len)
{
    uint64_t  n;

    for (n = 0; len && *s >= '0' && *s <= '9'; s++, len--) {
        n = n * 10 + (*s - '0');
    }

    return n;
}


/*
 * A message of the consumer of generation `gen` (its subscription's sid is
 * "d<gen>"): a GiftAck under its own subject, or a status on the deliver
 * subject (heartbeat, flow control).
 */
static void
ngx_http_gift_follow_deliver(ngx_http_gift_pub_t *p, uint64_t gen,
    u_char *reply, size_t rlen, u_char *hdr, size_t hlen, u_char *data,
    size_t len)
{
    u_char                  *s, *e, *tok[16];
    size_t                   vlen;
    uint64_t                 sseq, cseq;
    ngx_uint_t               ntok;
    ngx_http_gift_frame_t   *f, **frames;

    /*
     * The consumer starts sending as soon as it exists: its first messages
     * may come before the answer to CONSUMER.CREATE.
     */
    if (gen != p->fgen || (p->fstate != NGX_HTTP_GIFT_FOLLOW_ACTIVE
                           && p->fstate != NGX_HTTP_GIFT_FOLLOW_CREATE))
    {
        return;                     /* the consumer we replaced */
    }

    p->fseen = ngx_current_msec;

    if (hlen >= sizeof("NATS/1.0 100") - 1
        && ngx_strncmp(hdr, "NATS/1.0 100", sizeof("NATS/1.0 100") - 1) == 0)
    {
        /* flow control: answer, or the server stops sending */
        if (reply != NULL) {
            ngx_log_debug0(NGX_LOG_DEBUG_HTTP, p->log, 0,
                           "gift: GIFT_ACKS flow control");
            (void) ngx_http_gift_follow_pub(p, (char *) reply, rlen, 0,
                                            NULL, 0);
            return;
        }

        s = ngx_http_gift_follow_header(hdr, hlen, "Nats-Consumer-Stalled",
                                        &vlen);
        if (s != NULL && vlen > 0) {
            if (ngx_http_gift_follow_pub(p, (char *) s, vlen, 0, NULL, 0)
                != NGX_OK)
            {
                return;
            }
        }

        /* a heartbeat says what the consumer sent last */
        s = ngx_http_gift_follow_header(hdr, hlen, "Nats-Last-Consumer",
                                        &vlen);
        if (s != NULL
            && ngx_http_gift_follow_num(s, vlen) != p->next_cseq - 1)
        {
            ngx_http_gift_follow_start(p, "a heartbeat reports messages "
                                          "we did not get");
        }
        return;
    }

    if (hlen > 0 && !(hlen >= 12 && ngx_strncmp(hdr, "NATS/1.0\r\n", 10) == 0))
    {
        /* another status (the consumer was deleted, ...): a new one */
        ngx_http_gift_follow_start(p, "status from the consumer");
        return;
    }

    /*
     * $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
     * or, newer, with <domain>.<account hash> after ACK and a token at the
     * end: the sequences are 4th and 3rd from the end of the first form.
     */
    ntok = 0;
    if (reply != NULL) {
        e = reply + rlen;
        tok[ntok++] = reply;
        for (s = reply; s < e && ntok < 16; s++) {
            if (*s == '.') {
                tok[ntok++] = s + 1;
            }
        }
    }

    if (ntok == 9) {
        sseq = ngx_http_gift_follow_num(tok[5], rlen);
        cseq = ngx_http_gift_follow_num(tok[6], rlen);

    } else if (ntok >= 11) {
        sseq = ngx_http_gift_follow_num(tok[7], rlen);
        cseq = ngx_http_gift_follow_num(tok[8], rlen);

    } else {
        ngx_http_gift_follow_start(p, "a message without JetStream metadata");
        return;
    }

    if (cseq != p->next_cseq) {
        ngx_http_gift_follow_start(p, "a gap in the consumer's sequence");
        return;
    }

    p->next_cseq++;

    if (sseq <= p->last_sseq) {
        return;                     /* had it already */
    }

    p->last_sseq = sseq;

    f = ngx_http_gift_frame_create(sseq, data, len);
    if (f == NULL) {
        ngx_log_error(NGX_LOG_WARN, p->log, 0,
                      "gift: GIFT_ACKS #%uL is not a GiftAck; skipped", sseq);
        return;
    }

    if (p->nframes == p->frames_cap) {
        frames = ngx_alloc((p->frames_cap ? p->frames_cap * 2 : 256)
                           * sizeof(ngx_http_gift_frame_t *), p->log);
        if (frames == NULL) {
            ngx_free(f);
            return;
        }
        if (p->nframes) {
            ngx_memcpy(frames, p->frames,
                       p->nframes * sizeof(ngx_http_gift_frame_t *));
        }
        ngx_free(p->frames);
        p->frames = frames;
        p->frames_cap = p->frames_cap ? p->frames_cap * 2 : 256;
    }

    p->frames[p->nframes++] = f;
}


static void
ngx_http_gift_follow_flush_frames(ngx_http_gift_pub_t *p)
{
    size_t  n;

    if (p->nframes == 0) {
        return;
    }

    n = p->nframes;
    p->nframes = 0;

    ngx_http_gift_fanout_deliver(p->frames, n);
}


uint64_t
ngx_http_gift_nats_acks_origin(void)
{
    if (ngx_http_gift_pub_bridged) {
        return ngx_http_gift_bridge_acks_origin();
    }

    return ngx_http_gift_pub != NULL && ngx_http_gift_pub->started
           ? ngx_http_gift_pub->origin : 0;
}
