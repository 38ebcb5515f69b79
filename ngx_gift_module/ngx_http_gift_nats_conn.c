/*
 * The worker's NATS connection, on its event loop: an nginx peer
 * connection, TLS by nginx's own SSL, the handshake (INFO, CONNECT with the
 * credentials, PING/PONG), keep-alive PINGs (two unanswered: dead), and
 * reconnects forever, going round the servers of gift_nats_url and those a
 * cluster announces, with gift_nats_reconnect_wait between rounds.
 *
 * NATS sends INFO in clear; when it says tls_required, the client upgrades
 * the same socket (ngx_ssl_handshake, as nginx's upstream SSL does), checks
 * the server's certificate and name, and only then sends CONNECT.
 *
 * The publishes of one pass of the loop leave in one send() (a posted
 * event); what the server sends is parsed where it is read (the parser's
 * callbacks, the handshake and TLS are in ngx_http_gift_nats_handshake.c).
 */

#include "ngx_http_gift_nats_conn.h"

#include <netinet/tcp.h>


static void ngx_http_gift_nats_connect(ngx_http_gift_nats_t *p);
static void ngx_http_gift_nats_retry_handler(ngx_event_t *ev);
static void ngx_http_gift_nats_ping_handler(ngx_event_t *ev);
static void ngx_http_gift_nats_flush_handler(ngx_event_t *ev);


ngx_http_gift_nats_t              *ngx_http_gift_nats;
static ngx_http_gift_nats_user_t  *ngx_http_gift_nats_pending_users[
                                       NGX_HTTP_GIFT_NATS_USERS_MAX];
static ngx_uint_t                  ngx_http_gift_nats_npending;


ngx_int_t
ngx_http_gift_nats_add_user(ngx_http_gift_nats_user_t *u)
{
    if (ngx_http_gift_nats_npending == NGX_HTTP_GIFT_NATS_USERS_MAX) {
        return NGX_ERROR;
    }

    ngx_http_gift_nats_pending_users[ngx_http_gift_nats_npending++] = u;

    return NGX_OK;
}


ngx_int_t
ngx_http_gift_nats_init_process(ngx_cycle_t *cycle,
    ngx_http_gift_main_conf_t *gmcf)
{
    u_char                *q;
    ngx_uint_t             i;
    ngx_http_gift_nats_t  *p;

    p = ngx_pcalloc(cycle->pool, sizeof(ngx_http_gift_nats_t));
    if (p == NULL) {
        return NGX_ERROR;
    }

    p->log = cycle->log;
    p->quiet_log = *cycle->log;
    p->quiet_log.log_level = NGX_LOG_CRIT;
    p->quiet_log.next = NULL;
    p->conf = &gmcf->nats;

    /* the configured servers, and room for those a cluster announces */
    p->nservers = gmcf->nats_servers->nelts;
    p->servers = ngx_palloc(cycle->pool, (p->nservers
                                          + NGX_HTTP_GIFT_NATS_DISCOVER_MAX)
                                         * sizeof(ngx_http_gift_nats_server_t));
    if (p->servers == NULL) {
        return NGX_ERROR;
    }
    ngx_memcpy(p->servers, gmcf->nats_servers->elts,
               p->nservers * sizeof(ngx_http_gift_nats_server_t));
    p->nconf = p->nservers;
    p->pool = cycle->pool;
    p->reconnect_wait = gmcf->reconnect_wait;
    p->max_payload = 1024 * 1024;

    for (i = 0; i < ngx_http_gift_nats_npending; i++) {
        p->users[i] = ngx_http_gift_nats_pending_users[i];
    }
    p->nusers = ngx_http_gift_nats_npending;

    /* a unique inbox: "_INBOX." and 22 random base-62 characters */
    q = ngx_cpymem(p->inbox_buf, "_INBOX.", 7);
    for (i = 0; i < 22; i++) {
        *q++ = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
               [ngx_random() % 62];
    }
    p->inbox.data = p->inbox_buf;
    p->inbox.len = q - p->inbox_buf;

    ngx_http_gift_nats_handshake_init(p);

    p->retry_ev.handler = ngx_http_gift_nats_retry_handler;
    p->retry_ev.data = p;
    p->retry_ev.log = cycle->log;
    p->retry_ev.cancelable = 1;

    p->ping_ev.handler = ngx_http_gift_nats_ping_handler;
    p->ping_ev.data = p;
    p->ping_ev.log = cycle->log;
    p->ping_ev.cancelable = 1;

    p->flush_ev.handler = ngx_http_gift_nats_flush_handler;
    p->flush_ev.data = p;
    p->flush_ev.log = cycle->log;

    /* start with a random server, so that workers spread over a cluster */
    p->server = p->nservers > 1 ? (ngx_uint_t) ngx_random() % p->nservers : 0;

    ngx_http_gift_nats = p;

    ngx_http_gift_nats_connect(p);

    return NGX_OK;
}


static void
ngx_http_gift_nats_close(ngx_http_gift_nats_t *p)
{
    ngx_pool_t        *pool;
    ngx_connection_t  *c;

    c = p->c;
    if (c == NULL) {
        return;
    }

    p->c = NULL;

#if (NGX_SSL)
    if (c->ssl) {
        c->ssl->no_wait_shutdown = 1;
        (void) ngx_ssl_shutdown(c);
    }
#endif

    pool = c->pool;
    ngx_close_connection(c);

    if (pool) {
        ngx_destroy_pool(pool);
    }
}


void
ngx_http_gift_nats_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_gift_nats_t  *p;

    p = ngx_http_gift_nats;
    if (p == NULL) {
        return;
    }

    ngx_http_gift_nats = NULL;
    ngx_http_gift_nats_close(p);
    ngx_http_gift_nats_resolve_exit();

    if (p->retry_ev.timer_set) {
        ngx_del_timer(&p->retry_ev);
    }
    if (p->ping_ev.timer_set) {
        ngx_del_timer(&p->ping_ev);
    }
    if (p->flush_ev.posted) {
        ngx_delete_posted_event(&p->flush_ev);
    }

    ngx_free(p->in);
    ngx_free(p->out);
    p->in = p->out = NULL;
}


/* ------------------------------------------------------------ for users */


ngx_uint_t
ngx_http_gift_nats_up(void)
{
    return ngx_http_gift_nats != NULL
           && ngx_http_gift_nats->state == NGX_HTTP_GIFT_NATS_CONNECTED;
}


ngx_str_t *
ngx_http_gift_nats_inbox(void)
{
    return &ngx_http_gift_nats->inbox;
}


size_t
ngx_http_gift_nats_max_payload(void)
{
    return ngx_http_gift_nats->max_payload;
}


ngx_log_t *
ngx_http_gift_nats_log(void)
{
    return ngx_http_gift_nats->log;
}


ngx_uint_t
ngx_http_gift_nats_unsent(void)
{
    return ngx_http_gift_nats->out_msgs;
}


void
ngx_http_gift_nats_count_msg(void)
{
    ngx_http_gift_nats->out_msgs++;
}


u_char *
ngx_http_gift_nats_out(size_t n)
{
    u_char                *b;
    size_t                 size;
    ngx_http_gift_nats_t  *p;

    p = ngx_http_gift_nats;

    if (p->out_pos > 0 && p->out_size - p->out_len < n) {
        /* drop what was written already */
        ngx_memmove(p->out, p->out + p->out_pos, p->out_len - p->out_pos);
        p->out_len -= p->out_pos;
        p->out_base += p->out_pos;
        p->out_pos = 0;
    }

    if (p->out_size - p->out_len >= n) {
        return p->out + p->out_len;
    }

    size = p->out_size ? p->out_size : 65536;
    while (size - p->out_len < n) {
        size *= 2;
    }

    b = ngx_alloc(size, p->log);
    if (b == NULL) {
        ngx_http_gift_nats_fail(p, "out of memory", 0);
        return NULL;
    }

    if (p->out_len) {
        ngx_memcpy(b, p->out, p->out_len);
    }
    ngx_free(p->out);

    p->out = b;
    p->out_size = size;

    return p->out + p->out_len;
}


uint64_t
ngx_http_gift_nats_queue(u_char *end)
{
    ngx_http_gift_nats_t  *p;

    p = ngx_http_gift_nats;
    p->out_len = end - p->out;

    /* everything of this pass of the loop leaves in one send() */
    if (!p->flush_ev.posted) {
        ngx_post_event(&p->flush_ev, &ngx_posted_events);
    }

    return p->out_base + p->out_len;
}


/* ------------------------------------------------------------ connection */


static void
ngx_http_gift_nats_connect(ngx_http_gift_nats_t *p)
{
    int                           on;
    ngx_int_t                     rc;
    ngx_connection_t             *c;
    ngx_http_gift_nats_server_t  *srv;

    srv = &p->servers[p->server];

    /* a name again, off the loop, when coming round to it after a failure */
    if (srv->is_name && p->addr == 0 && !p->just_resolved
        && (p->resolve_due || srv->naddrs == 0))
    {
        p->resolve_due = 0;
        if (ngx_http_gift_nats_resolve(p, p->server) == NGX_OK) {
            return;             /* ngx_http_gift_nats_resolved() goes on */
        }
    }

    p->just_resolved = 0;

    if (srv->naddrs == 0) {
        ngx_http_gift_nats_fail(p, "its name cannot be resolved", 0);
        return;
    }

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
        ngx_http_gift_nats_fail(p, "connect() failed", ngx_socket_errno);
        return;
    }

    c = p->pc.connection;
    c->data = p;
    c->read->handler = ngx_http_gift_nats_read_handler;
    c->write->handler = ngx_http_gift_nats_write_handler;
    c->read->cancelable = 1;
    c->write->cancelable = 1;

    on = 1;
    (void) setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));

    p->c = c;
    p->state = NGX_HTTP_GIFT_NATS_CONNECTING;
    p->in_len = 0;
    p->out_base += p->out_len;
    p->out_pos = p->out_len = 0;
    p->out_msgs = 0;
    p->pings_out = 0;

    /* the whole handshake (TCP, INFO, TLS, CONNECT, PONG) within 2 s */
    ngx_add_timer(c->read, NGX_HTTP_GIFT_NATS_HANDSHAKE_MS);
}


void
ngx_http_gift_nats_fail(ngx_http_gift_nats_t *p, const char *why,
    ngx_err_t err)
{
    uint64_t                      written;
    ngx_msec_t                    delay;
    ngx_uint_t                    was, i;
    ngx_http_gift_nats_server_t  *srv;

    srv = &p->servers[p->server];
    was = (p->state == NGX_HTTP_GIFT_NATS_CONNECTED);
    written = p->out_base + p->out_pos;

    ngx_http_gift_nats_close(p);

    p->state = NGX_HTTP_GIFT_NATS_IDLE;
    p->in_len = 0;
    p->out_base += p->out_len;
    p->out_pos = p->out_len = 0;
    p->out_msgs = 0;
    p->pings_out = 0;

    if (p->ping_ev.timer_set) {
        ngx_del_timer(&p->ping_ev);
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
        p->resolve_due = 1;

        if (++p->tried >= p->nservers) {
            p->tried = 0;
            delay = p->reconnect_wait + ngx_random() % 100;
        }
    }

    if (!p->retry_ev.timer_set) {
        ngx_add_timer(&p->retry_ev, delay);
    }

    /* the users last: what they do (answer requests) cannot touch us */
    for (i = 0; i < p->nusers; i++) {
        p->users[i]->disconnected(p->users[i]->data, written);
    }
}


void
ngx_http_gift_nats_resolved(ngx_http_gift_nats_t *p)
{
    if (ngx_http_gift_nats != p || p->c != NULL) {
        return;
    }

    p->just_resolved = 1;
    ngx_http_gift_nats_connect(p);
}


static void
ngx_http_gift_nats_retry_handler(ngx_event_t *ev)
{
    ngx_http_gift_nats_t *p = ev->data;

    if (p->c == NULL && p->resolving == 0) {
        ngx_http_gift_nats_connect(p);
    }
}


static void
ngx_http_gift_nats_ping_handler(ngx_event_t *ev)
{
    u_char                *o;
    ngx_http_gift_nats_t  *p = ev->data;

    if (p->state != NGX_HTTP_GIFT_NATS_CONNECTED) {
        return;
    }

    if (p->pings_out >= NGX_HTTP_GIFT_NATS_PINGS_MAX) {
        ngx_http_gift_nats_fail(p, "no PONG to two PINGs", 0);
        return;
    }

    o = ngx_http_gift_nats_out(6);
    if (o == NULL) {
        return;
    }

    (void) ngx_http_gift_nats_queue(ngx_cpymem(o, "PING\r\n", 6));
    p->pings_out++;

    ngx_add_timer(&p->ping_ev, NGX_HTTP_GIFT_NATS_PING_INTERVAL);
}


void
ngx_http_gift_nats_write_handler(ngx_event_t *wev)
{
    int                    err;
    socklen_t              len;
    ngx_connection_t      *c;
    ngx_http_gift_nats_t  *p;

    c = wev->data;
    p = c->data;

    if (p->state == NGX_HTTP_GIFT_NATS_CONNECTING) {
        /* the TCP connect finished; INFO comes next, on the read side */
        err = 0;
        len = sizeof(int);
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, (void *) &err, &len) == -1)
        {
            err = ngx_socket_errno;
        }
        if (err) {
            ngx_http_gift_nats_fail(p, "connect() failed", err);
            return;
        }

    } else {
        ngx_http_gift_nats_flush(p);
        if (p->c == NULL) {
            return;
        }
    }

    /* off again with level-triggered methods (poll, select) */
    if (ngx_handle_write_event(wev, 0) != NGX_OK) {
        ngx_http_gift_nats_fail(p, "cannot wait for the socket", 0);
    }
}


static void
ngx_http_gift_nats_flush_handler(ngx_event_t *ev)
{
    ngx_http_gift_nats_flush(ev->data);
}


void
ngx_http_gift_nats_flush(ngx_http_gift_nats_t *p)
{
    ssize_t            n;
    ngx_connection_t  *c;

    c = p->c;

    if (c == NULL || p->state == NGX_HTTP_GIFT_NATS_CONNECTING
        || p->state == NGX_HTTP_GIFT_NATS_TLS)
    {
        return;
    }

    while (p->out_pos < p->out_len) {
        n = c->send(c, p->out + p->out_pos, p->out_len - p->out_pos);

        if (n == NGX_AGAIN) {
            if (ngx_handle_write_event(c->write, 0) != NGX_OK) {
                ngx_http_gift_nats_fail(p, "cannot wait for the socket", 0);
            }
            return;
        }

        if (n == NGX_ERROR) {
            ngx_http_gift_nats_fail(p, "send() failed", 0);
            return;
        }

        p->out_pos += n;
    }

    p->out_base += p->out_len;
    p->out_pos = p->out_len = 0;
    p->out_msgs = 0;

    /* a burst's buffer goes back once it is written */
    if (p->out_size > 1024 * 1024) {
        ngx_free(p->out);
        p->out = NULL;
        p->out_size = 0;
    }
}


void
ngx_http_gift_nats_read_handler(ngx_event_t *rev)
{
    u_char                *b;
    long                   rc;
    size_t                 size, cap;
    ssize_t                n;
    ngx_uint_t             i;
    const char            *why;
    ngx_connection_t      *c;
    ngx_http_gift_nats_t  *p;

    c = rev->data;
    p = c->data;

    if (rev->timedout) {
        ngx_http_gift_nats_fail(p, "no answer within 2 s", NGX_ETIMEDOUT);
        return;
    }

    /* room for the largest message the server may send, and its line */
    cap = p->max_payload + NGX_HTTP_GIFT_NATS_LINE_MAX + 64;

    do {
        if (p->in_size - p->in_len < 4096 && p->in_size < cap) {
            size = p->in_size ? p->in_size * 2 : 16384;
            if (size > cap) {
                size = cap;
            }

            b = ngx_alloc(size, p->log);
            if (b == NULL) {
                ngx_http_gift_nats_fail(p, "out of memory", 0);
                return;
            }
            if (p->in_len) {
                ngx_memcpy(b, p->in, p->in_len);
            }
            ngx_free(p->in);
            p->in = b;
            p->in_size = size;
        }

        if (p->in_len == p->in_size) {
            /* cannot happen: the parser refuses what would not fit */
            ngx_http_gift_nats_fail(p, "protocol line or message too long",
                                    0);
            return;
        }

        n = c->recv(c, p->in + p->in_len, p->in_size - p->in_len);

        if (n == NGX_AGAIN) {
            break;
        }

        if (n == 0) {
            ngx_http_gift_nats_fail(p, "the server closed the connection", 0);
            return;
        }

        if (n == NGX_ERROR) {
            ngx_http_gift_nats_fail(p, "recv() failed", 0);
            return;
        }

        p->in_len += n;

        rc = ngx_http_gift_nats_parse(&p->parser, p->in, p->in_len, &why);

        if (rc == NGX_HTTP_GIFT_NATS_PARSE_ERROR) {
            ngx_http_gift_nats_fail(p, why, 0);
            return;
        }

        if (rc == NGX_HTTP_GIFT_NATS_PARSE_STOP) {
            if (p->c != c) {
                return;             /* the connection is gone */
            }
            /* the TLS handshake took the socket over */
            p->in_len = 0;
            return;
        }

        if (rc > 0) {
            p->in_len -= rc;
            if (p->in_len) {
                ngx_memmove(p->in, p->in + rc, p->in_len);
            }
        }

    } while (rev->ready);

    /* what this read gathered goes on in one batch */
    for (i = 0; i < p->nusers; i++) {
        if (p->users[i]->read_done) {
            p->users[i]->read_done(p->users[i]->data);
        }
    }

    if (p->c != c) {
        return;
    }

    /* a very large message's buffer goes back once it is parsed */
    if (p->in_len == 0 && p->in_size > 1024 * 1024) {
        ngx_free(p->in);
        p->in = NULL;
        p->in_size = 0;
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_http_gift_nats_fail(p, "cannot wait for the socket", 0);
    }
}


