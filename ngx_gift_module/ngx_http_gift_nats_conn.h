/*
 * The worker's NATS connection, inside: shared by the connection's files
 * (ngx_http_gift_nats_conn.c: socket, buffers, reconnects;
 * ngx_http_gift_nats_handshake.c: what the server says, TLS, CONNECT;
 * ngx_http_gift_nats_resolve.c: host names, off the event loop).
 */

#ifndef _NGX_HTTP_GIFT_NATS_CONN_H_INCLUDED_
#define _NGX_HTTP_GIFT_NATS_CONN_H_INCLUDED_


#include "ngx_http_gift_nats.h"


#define NGX_HTTP_GIFT_NATS_PING_INTERVAL  5000
#define NGX_HTTP_GIFT_NATS_PINGS_MAX      2
#define NGX_HTTP_GIFT_NATS_HANDSHAKE_MS   2000
#define NGX_HTTP_GIFT_NATS_DISCOVER_MAX   16
#define NGX_HTTP_GIFT_NATS_USERS_MAX      4


typedef enum {
    NGX_HTTP_GIFT_NATS_IDLE = 0,
    NGX_HTTP_GIFT_NATS_CONNECTING,      /* TCP, then waiting for INFO */
    NGX_HTTP_GIFT_NATS_TLS,             /* TLS handshake */
    NGX_HTTP_GIFT_NATS_HANDSHAKE,       /* CONNECT sent, waiting for PONG */
    NGX_HTTP_GIFT_NATS_CONNECTED
} ngx_http_gift_nats_state_e;


typedef struct {
    ngx_log_t                     *log;
    ngx_log_t                      quiet_log;   /* retries: not each one */
    ngx_pool_t                    *pool;        /* the cycle's */
    ngx_http_gift_nats_conf_t     *conf;
    ngx_http_gift_nats_server_t   *servers;     /* configured, learned */
    ngx_uint_t                     nservers;
    ngx_uint_t                     nconf;       /* the configured ones */
    ngx_uint_t                     server;      /* the one tried or in use */
    ngx_uint_t                     addr;
    ngx_msec_t                     reconnect_wait;

    ngx_peer_connection_t          pc;
    ngx_connection_t              *c;
    ngx_http_gift_nats_state_e     state;
    ngx_uint_t                     was_connected;
    ngx_uint_t                     warned;
    ngx_uint_t                     tried;       /* servers tried this round */
    ngx_uint_t                     pings_out;
    ngx_uint_t                     resolving;   /* the look-up awaited */
    ngx_uint_t                     resolve_due; /* names again: a new try */
    ngx_uint_t                     just_resolved;
    size_t                         max_payload;
    ngx_str_t                      nonce;       /* of the last INFO */
    u_char                         nonce_buf[128];

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
    uint64_t                       out_base;    /* stream offset of out[0] */
    ngx_uint_t                     out_msgs;    /* publishes not yet sent */

    u_char                         inbox_buf[40];
    ngx_str_t                      inbox;

    ngx_http_gift_nats_parser_t    parser;
    ngx_http_gift_nats_user_t     *users[NGX_HTTP_GIFT_NATS_USERS_MAX];
    ngx_uint_t                     nusers;
} ngx_http_gift_nats_t;


extern ngx_http_gift_nats_t  *ngx_http_gift_nats;


/* ngx_http_gift_nats_conn.c */
void ngx_http_gift_nats_fail(ngx_http_gift_nats_t *p, const char *why,
    ngx_err_t err);
void ngx_http_gift_nats_flush(ngx_http_gift_nats_t *p);
void ngx_http_gift_nats_read_handler(ngx_event_t *rev);
void ngx_http_gift_nats_write_handler(ngx_event_t *wev);

/* A look-up of server s's host ended (addresses updated, or not). */
void ngx_http_gift_nats_resolved(ngx_http_gift_nats_t *p);

/* ngx_http_gift_nats_resolve.c: getaddrinfo() on a thread */
ngx_int_t ngx_http_gift_nats_resolve(ngx_http_gift_nats_t *p, ngx_uint_t s);
void ngx_http_gift_nats_resolve_exit(void);

/* ngx_http_gift_nats_handshake.c: the parser's callbacks into p */
void ngx_http_gift_nats_handshake_init(ngx_http_gift_nats_t *p);

/* ngx_http_gift_nats_conf.c: connect_urls of an INFO (a json_t array) */
void ngx_http_gift_nats_discover(ngx_pool_t *pool,
    ngx_http_gift_nats_server_t *servers, ngx_uint_t *nservers,
    ngx_uint_t max, ngx_uint_t from, void *urls, ngx_log_t *log);


#endif /* _NGX_HTTP_GIFT_NATS_CONN_H_INCLUDED_ */
