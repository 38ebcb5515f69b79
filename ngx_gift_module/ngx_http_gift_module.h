/*
 * ngx_http_gift_module: livestream gift webhooks into NATS JetStream, and
 * their acknowledgements back out to browsers.
 *
 * Files, one concern each:
 *   ngx_http_gift_module.c   directives, configuration, init hooks
 *   ngx_http_gift_nats_*.c   a NATS client on the worker's event loop
 *                            (nats:// and tls://): webhook publishes,
 *                            GIFT_ACKS followed (files listed below)
 *   ngx_http_gift_frame.c    a GiftAck framed once for every client
 *   ngx_http_gift_webhook.c  POST handler: read, check, publish, answer
 *   ngx_http_gift_fanout.c   acknowledgements to clients: ring, filters,
 *                            shared frames, backlog, heartbeats
 *   ngx_http_gift_sse.c      GET handler: Server-Sent Events
 *   ngx_http_gift_websocket.c  GET handler: WebSocket (RFC 6455)
 *   ngx_http_gift_status.c   counters in shared memory, Prometheus text
 */

#ifndef _NGX_HTTP_GIFT_MODULE_H_INCLUDED_
#define _NGX_HTTP_GIFT_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "gift_normalize.h"
#include "gift_signature.h"
#include "gift_nkey.h"


#define NGX_HTTP_GIFT_SUBJECT_PREFIX  "gift.events."
#define NGX_HTTP_GIFT_VERSION         "0.1.0"


/* One server of gift_nats_url (or learned from a cluster), parsed at
 * configuration. */
typedef struct {
    ngx_str_t                  url;             /* as given */
    ngx_str_t                  name;            /* host:port, for logs */
    ngx_str_t                  host;            /* NUL-terminated */
    in_port_t                  port;
    ngx_addr_t                *addrs;           /* the last resolution */
    ngx_uint_t                 naddrs;
    ngx_str_t                  user;            /* nats://user:pass@... */
    ngx_str_t                  pass;
    ngx_str_t                  token;           /* nats://token@... */
    unsigned                   tls:1;           /* tls:// */
    unsigned                   is_name:1;       /* host is not an address */
    unsigned                   resolved:1;      /* addrs: ours (malloc) */
} ngx_http_gift_nats_server_t;


/* TLS and credentials for NATS: gift_nats_ssl_*, _token, _nkey, ... */
typedef struct {
#if (NGX_SSL)
    ngx_ssl_t                 *ssl;             /* NULL: no TLS */
#endif
    ngx_flag_t                 ssl_verify;
    ngx_str_t                  ssl_name;
    ngx_str_t                  ssl_trusted_certificate;
    ngx_str_t                  ssl_certificate;
    ngx_str_t                  ssl_certificate_key;
    ngx_str_t                  token;
    ngx_str_t                  jwt;             /* from gift_nats_credentials */
    gift_nkey_t               *nkey;            /* _nkey or _credentials */
} ngx_http_gift_nats_conf_t;


typedef struct {
    ngx_array_t               *nats_urls;       /* of ngx_str_t */
    ngx_array_t               *nats_servers;    /* of ..._nats_server_t */
    ngx_flag_t                 nats_tls;        /* a tls:// URL */
    ngx_http_gift_nats_conf_t  nats;
    ngx_uint_t                 queue_size;
    ngx_msec_t                 reconnect_wait;
    ngx_flag_t                 used;            /* a location needs NATS */
    ngx_flag_t                 follow_acks;     /* a location streams acks */
    ngx_uint_t                 replay_max;
    ngx_msec_t                 heartbeat;
    ngx_msec_t                 idle_follow;     /* 0: always follow */
    ngx_uint_t                 max_clients;
    ngx_uint_t                 max_backlog;
    time_t                     signature_span;  /* largest window + skew of
                                                   a signed webhook */
} ngx_http_gift_main_conf_t;


typedef struct {
    ngx_flag_t                 webhook;
    ngx_msec_t                 publish_timeout;
    size_t                     max_body;
    ngx_array_t               *secrets;         /* of gift_secret_t */
    time_t                     signature_window;
    time_t                     retry_after;
    ngx_flag_t                 sse;
    ngx_str_t                  allow_origin;
    ngx_msec_t                 sse_retry;
    ngx_flag_t                 websocket;
    ngx_array_t               *ws_origins;      /* of ngx_str_t */
    time_t                     signature_skew;  /* into the future */
    ngx_uint_t                 ws_frame_rate;   /* client frames a second */
} ngx_http_gift_loc_conf_t;


/*
 * One acknowledgement from GIFT_ACKS, decoded and framed once per worker
 * (where the follower reads it) and shared by every client that
 * gets it.  Counted references, touched by the event loop only: the replay
 * ring holds one, and every client buffer not yet written holds one.
 */
typedef struct {
    ngx_uint_t                 refs;
    uint64_t                   seq;
    const char                *device;
    const char                *room;
    const char                *status;          /* "ok", "dead_letter" */
    u_char                    *json;
    size_t                     json_len;
    u_char                    *sse;             /* id:, event:, data: */
    size_t                     sse_len;
    u_char                    *sse_chunk;       /* the same as one HTTP */
    size_t                     sse_chunk_len;   /* chunk: "<hex>\r\n...\r\n" */
    u_char                    *ws;              /* a WebSocket text frame */
    size_t                     ws_len;
} ngx_http_gift_frame_t;


/* How a publish ended. */
typedef enum {
    NGX_HTTP_GIFT_PUB_OK = 0,
    NGX_HTTP_GIFT_PUB_UNAVAILABLE,      /* not connected, no responders */
    NGX_HTTP_GIFT_PUB_STREAM_FULL,      /* discard new: the stream is full */
    NGX_HTTP_GIFT_PUB_ERROR             /* any other JetStream error */
} ngx_http_gift_pub_status_e;


typedef struct {
    uint64_t                   id;
    ngx_http_gift_pub_status_e status;
    uint64_t                   seq;
    unsigned                   duplicate:1;
    char                       error[128];
} ngx_http_gift_pub_result_t;


/*
 * A publish waiting for its PubAck.  It lives in the request's pool; the
 * NATS client keeps it in an rbtree keyed by id and calls `handler` when
 * the PubAck (or an error) arrives.  The request cleanup must call
 * ngx_http_gift_nats_cancel() so that a late PubAck finds nothing.
 */
typedef struct ngx_http_gift_pending_s  ngx_http_gift_pending_t;

typedef void (*ngx_http_gift_pub_handler_pt)(ngx_http_gift_pending_t *p,
    ngx_http_gift_pub_result_t *res);

struct ngx_http_gift_pending_s {
    ngx_rbtree_node_t              node;        /* key: publish id */
    ngx_http_gift_pub_handler_pt   handler;
    void                          *data;
    uint64_t                       out_end;     /* its last byte's offset */
    unsigned                       queued:1;
};


/* Webhook answers, as counted by gift_status. */
typedef enum {
    NGX_HTTP_GIFT_OUT_ACCEPTED = 0,
    NGX_HTTP_GIFT_OUT_DUPLICATE,
    NGX_HTTP_GIFT_OUT_INVALID_JSON,
    NGX_HTTP_GIFT_OUT_SIG_MISSING,
    NGX_HTTP_GIFT_OUT_SIG_INVALID,
    NGX_HTTP_GIFT_OUT_SIG_EXPIRED,
    NGX_HTTP_GIFT_OUT_METHOD,
    NGX_HTTP_GIFT_OUT_TOO_LARGE,
    NGX_HTTP_GIFT_OUT_MEDIA_TYPE,
    NGX_HTTP_GIFT_OUT_INVALID_FIELD,
    NGX_HTTP_GIFT_OUT_UNAVAILABLE,
    NGX_HTTP_GIFT_OUT_PUBLISH_TIMEOUT,
    NGX_HTTP_GIFT_OUT_STREAM_FULL,
    NGX_HTTP_GIFT_OUT_INTERNAL,
    NGX_HTTP_GIFT_OUTCOME_N
} ngx_http_gift_outcome_e;


/* Other counters and gauges of gift_status. */
typedef enum {
    NGX_HTTP_GIFT_STAT_SSE_CLIENTS = 0,
    NGX_HTTP_GIFT_STAT_WS_CLIENTS,
    NGX_HTTP_GIFT_STAT_DELIVERIES,
    NGX_HTTP_GIFT_STAT_RESUMES,
    NGX_HTTP_GIFT_STAT_GAPS,
    NGX_HTTP_GIFT_STAT_SLOW_DROPS,
    NGX_HTTP_GIFT_STAT_ACKS_IN,
    NGX_HTTP_GIFT_STAT_N
} ngx_http_gift_stat_e;


extern ngx_module_t  ngx_http_gift_module;


/*
 * The NATS client, on the worker's event loop (one connection per worker):
 *   ngx_http_gift_nats_conf.c    gift_nats_* directives, TLS, credentials
 *   ngx_http_gift_nats_conn.c    the connection: connect, TLS, CONNECT,
 *                                read, write, PING, reconnect
 *   ngx_http_gift_nats_parse.c   the protocol parser (no nginx in it)
 *   ngx_http_gift_nats_js.c      JetStream publishes and their PubAcks
 *   ngx_http_gift_nats_follow.c  GIFT_ACKS, followed by an ordered consumer
 *   ngx_http_gift_frame.c        a GiftAck framed for the clients
 */

/* ngx_http_gift_nats_conf.c: directive handlers and their checks */
char *ngx_http_gift_nats_url(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_gift_nats_key_file(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
char *ngx_http_gift_nats_init_conf(ngx_conf_t *cf,
    ngx_http_gift_main_conf_t *gmcf);

/* ngx_http_gift_nats_conn.c: connects once the users are registered */
ngx_int_t ngx_http_gift_nats_init_process(ngx_cycle_t *cycle,
    ngx_http_gift_main_conf_t *gmcf);
void ngx_http_gift_nats_exit_process(ngx_cycle_t *cycle);

/* ngx_http_gift_nats_js.c, ngx_http_gift_nats_follow.c: register users */
ngx_int_t ngx_http_gift_js_init_process(ngx_cycle_t *cycle,
    ngx_http_gift_main_conf_t *gmcf);
ngx_int_t ngx_http_gift_follow_init_process(ngx_cycle_t *cycle,
    ngx_http_gift_main_conf_t *gmcf);
void ngx_http_gift_follow_exit_process(ngx_cycle_t *cycle);
/*
 * The worker's streaming clients are now n (the fan-out says so on each
 * attach and detach): with none for gift_sse_idle_follow, GIFT_ACKS is no
 * longer followed; the first client starts it again.
 */
void ngx_http_gift_follow_clients(ngx_uint_t n);
/* Whether a new live-only client must wait for the live position. */
ngx_uint_t ngx_http_gift_follow_parking(void);

/* ngx_http_gift_frame.c: one GiftAck framed for every protocol (refs 1,
 * malloc'ed), or NULL when it is not a GiftAck */
ngx_http_gift_frame_t *ngx_http_gift_frame_create(uint64_t seq,
    const u_char *data, size_t len);

/* ngx_http_gift_nats_js.c */

/* A JetStream publish reply (PubAck or error) into res (its id kept). */
void ngx_http_gift_puback_parse(const char *data, size_t len,
    ngx_http_gift_pub_result_t *res);

/* Whether this worker's connection to NATS is up right now. */
ngx_uint_t ngx_http_gift_nats_connected(void);

/*
 * Publish one message as a JetStream request.  Returns NGX_OK (p is
 * registered and its handler will be called exactly once, unless
 * cancelled), NGX_DECLINED (NATS is not connected) or NGX_BUSY (the queue
 * of publishes not yet written is full).  Never blocks.  A publish not yet
 * written when the connection drops ends at once, unavailable.
 */
ngx_int_t ngx_http_gift_nats_publish(ngx_http_gift_pending_t *p,
    const char *subject, const char *msg_id, const u_char *data, size_t len,
    ngx_log_t *log);
void ngx_http_gift_nats_cancel(ngx_http_gift_pending_t *p);

/* A client's output not yet written: one buffer over a shared frame. */
typedef struct ngx_http_gift_out_s  ngx_http_gift_out_t;

struct ngx_http_gift_out_s {
    ngx_buf_t                  buf;
    ngx_chain_t                cl;
    ngx_http_gift_frame_t     *frame;           /* NULL: not counted */
    ngx_http_gift_out_t       *next;
};


typedef enum {
    NGX_HTTP_GIFT_CLIENT_SSE = 0,
    NGX_HTTP_GIFT_CLIENT_WS
} ngx_http_gift_client_kind_e;


/* One streaming client (SSE or WebSocket), in its request's pool. */
typedef struct {
    ngx_queue_t                queue;           /* the worker's clients */
    ngx_http_request_t        *request;
    ngx_http_gift_client_kind_e kind;
    uint64_t                   last_seq;        /* sent or skipped */
    ngx_array_t               *devices;         /* filters, of ngx_str_t; */
    ngx_array_t               *rooms;           /* NULL: any */
    ngx_array_t               *statuses;
    ngx_http_gift_out_t       *out_head;        /* written in this order */
    ngx_http_gift_out_t      **out_tail;
    ngx_uint_t                 out_n;
    uint64_t                   connect_seq;     /* live position at attach */
    unsigned                   from_now:1;      /* no history: live only */
    unsigned                   attached:1;
    unsigned                   closing:1;       /* close once written */
    unsigned                   chunked:1;       /* we frame HTTP chunks */
    unsigned                   ending:1;        /* shutdown: end cleanly */
    unsigned                   parked:1;        /* waits for "now" */
    u_char                    *preamble;        /* written once unparked */
    size_t                     plen;
    ngx_uint_t                 pings_out;       /* WebSocket: unanswered */
    u_char                     gap[128];        /* an `event: gap` */
} ngx_http_gift_client_t;


/* ngx_http_gift_fanout.c */
ngx_int_t ngx_http_gift_fanout_init_process(ngx_cycle_t *cycle,
    ngx_http_gift_main_conf_t *gmcf);
void ngx_http_gift_fanout_exit_process(ngx_cycle_t *cycle);
/* A batch of new frames, in sequence order (takes one reference each). */
void ngx_http_gift_fanout_deliver(ngx_http_gift_frame_t **frames, size_t n);
/* The GIFT_ACKS sequence the follower started after: up to it, history. */
void ngx_http_gift_fanout_origin(uint64_t seq);
/*
 * The follower starts again after acknowledgement `last` (it was not
 * followed while the worker had no client, and more than the ring holds
 * went by): the ring is emptied, and each attached client that is behind
 * gets an `event: gap` up to `last`.
 */
void ngx_http_gift_fanout_reset(uint64_t last);
/*
 * The live position is known again (`now`, the stream's last sequence):
 * parked clients (no Last-Event-ID, attached while the worker was not
 * following) start after it; their response goes out only now.
 */
void ngx_http_gift_fanout_unpark(uint64_t now);
void ngx_http_gift_frame_release(ngx_http_gift_frame_t *f);

/*
 * Start streaming to a client whose response header is sent: first the
 * `preamble` bytes (request pool memory), then, with `resume`, first the acknowledgements after `last_seq` (from the worker's
 * replay ring, after an `event: gap` if more than gift_sse_replay_max were
 * missed), then live ones, with no gap and no duplicate at the seam.
 * Returns NGX_OK, NGX_DECLINED (gift_sse_max_clients reached) or NGX_ERROR.
 * The request's cleanup must call ngx_http_gift_fanout_detach().
 */
ngx_int_t ngx_http_gift_fanout_attach(ngx_http_gift_client_t *c,
    ngx_uint_t resume, uint64_t last_seq, u_char *preamble, size_t plen);
/*
 * NGX_DECLINED when this worker takes one more stream; otherwise it
 * answers r 503 unavailable, saying why (gift_sse_max_clients streams
 * already; the worker is shutting down; or, after a failed start, it has
 * no stream state: "streaming unavailable"), and returns what
 * ngx_http_gift_send_error() did.
 */
ngx_int_t ngx_http_gift_fanout_refuse(ngx_http_request_t *r);
void ngx_http_gift_fanout_detach(ngx_http_gift_client_t *c);
/*
 * Replay, to an attached client, what it missed after `last_seq` up to
 * its connection (what came later went to it live already).
 */
ngx_int_t ngx_http_gift_fanout_resume(ngx_http_gift_client_t *c,
    uint64_t last_seq);
/* Detach and end the request (logged at info with `why`). */
void ngx_http_gift_client_close(ngx_http_gift_client_t *c, const char *why);
/* Queue bytes (request pool memory, not a frame) and write. */
ngx_int_t ngx_http_gift_fanout_send_raw(ngx_http_gift_client_t *c,
    u_char *data, size_t len);
/* ?device=a,b&room=..&status=.. (repeatable) into the client's filters. */
ngx_int_t ngx_http_gift_fanout_parse_filters(ngx_http_request_t *r,
    ngx_http_gift_client_t *c);
ngx_uint_t ngx_http_gift_fanout_clients(void);

/* ngx_http_gift_sse.c */
ngx_int_t ngx_http_gift_sse_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_gift_last_event_id(ngx_http_request_t *r, uint64_t *seq);
ngx_int_t ngx_http_gift_add_header(ngx_http_request_t *r, const char *key,
    size_t klen, u_char *value, size_t vlen);
ngx_table_elt_t *ngx_http_gift_find_header(ngx_http_request_t *r,
    const char *name, size_t len);

/* ngx_http_gift_status.c */
ngx_int_t ngx_http_gift_status_add_zone(ngx_conf_t *cf);
ngx_int_t ngx_http_gift_status_handler(ngx_http_request_t *r);
void ngx_http_gift_stat_webhook(ngx_http_gift_outcome_e outcome);
void ngx_http_gift_stat_publish(uint64_t us);
void ngx_http_gift_stat_add(ngx_http_gift_stat_e which,
    ngx_atomic_int_t delta);
void ngx_http_gift_stat_nats(ngx_uint_t connected, ngx_uint_t reconnected);

/* ngx_http_gift_websocket.c */
ngx_int_t ngx_http_gift_websocket_handler(ngx_http_request_t *r);
/* The client's output is all written: a held-back pong may go now. */
ngx_int_t ngx_http_gift_ws_drained(ngx_http_gift_client_t *c);
/*
 * Our close frame is written: end the connection if the peer's close came
 * first, else wait (bounded) for it.
 */
void ngx_http_gift_ws_close_written(ngx_http_gift_client_t *c);
/* Graceful shutdown or reload: close 1001, then wait for the peer's close. */
void ngx_http_gift_ws_going_away(ngx_http_gift_client_t *c);

/* ngx_http_gift_webhook.c */
ngx_int_t ngx_http_gift_webhook_handler(ngx_http_request_t *r);
/*
 * A JSON error answer {"error":code,"message":...,"field":...}, with
 * Retry-After (gift_retry_after) on a 503.  It counts nothing: the
 * webhook counts its own refusals in gift_webhooks_total.
 */
ngx_int_t ngx_http_gift_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message, const char *field);
/* A whole answer from one buffer of the request's pool. */
ngx_int_t ngx_http_gift_send_body(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, u_char *body, size_t len);
/* data 0: $gift_event_id, 1: $gift_publish_ms */
ngx_int_t ngx_http_gift_webhook_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);


#endif /* _NGX_HTTP_GIFT_MODULE_H_INCLUDED_ */
