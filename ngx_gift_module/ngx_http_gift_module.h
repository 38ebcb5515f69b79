/*
 * ngx_http_gift_module: livestream gift webhooks into NATS JetStream, and
 * their acknowledgements back out to browsers.
 *
 * Files, one concern each:
 *   ngx_http_gift_module.c   directives, configuration, init hooks
 *   ngx_http_gift_nats.c     the per-worker bridge to NATS (its own thread)
 *   ngx_http_gift_webhook.c  POST handler: read, check, publish, answer
 */

#ifndef _NGX_HTTP_GIFT_MODULE_H_INCLUDED_
#define _NGX_HTTP_GIFT_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "gift_normalize.h"
#include "gift_signature.h"


#define NGX_HTTP_GIFT_SUBJECT_PREFIX  "gift.events."


typedef struct {
    ngx_array_t               *nats_urls;       /* of ngx_str_t */
    ngx_uint_t                 queue_size;
    ngx_msec_t                 reconnect_wait;
    ngx_flag_t                 used;            /* a location needs NATS */
} ngx_http_gift_main_conf_t;


typedef struct {
    ngx_flag_t                 webhook;
    ngx_msec_t                 publish_timeout;
    size_t                     max_body;
    ngx_array_t               *secrets;         /* of gift_secret_t */
    time_t                     signature_window;
    time_t                     retry_after;
} ngx_http_gift_loc_conf_t;


/* How a publish ended, as the bridge reports it to the event loop. */
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
 * bridge keeps it in an rbtree keyed by id and calls `handler` from the
 * event loop when the PubAck (or an error) arrives.  The request cleanup
 * must call ngx_http_gift_nats_cancel() so that a late PubAck finds nothing.
 */
typedef struct ngx_http_gift_pending_s  ngx_http_gift_pending_t;

typedef void (*ngx_http_gift_pub_handler_pt)(ngx_http_gift_pending_t *p,
    ngx_http_gift_pub_result_t *res);

struct ngx_http_gift_pending_s {
    ngx_rbtree_node_t              node;        /* key: publish id */
    ngx_http_gift_pub_handler_pt   handler;
    void                          *data;
    unsigned                       queued:1;
};


extern ngx_module_t  ngx_http_gift_module;


/* ngx_http_gift_nats.c */
ngx_int_t ngx_http_gift_nats_init_process(ngx_cycle_t *cycle,
    ngx_http_gift_main_conf_t *gmcf);
void ngx_http_gift_nats_exit_process(ngx_cycle_t *cycle);

/* Whether this worker's connection to NATS is up right now. */
ngx_uint_t ngx_http_gift_nats_connected(void);

/*
 * Hand one message to the bridge.  Returns NGX_OK (p is registered and its
 * handler will be called exactly once, unless cancelled), NGX_DECLINED
 * (NATS is not connected) or NGX_BUSY (the bridge's queue is full).
 * Never blocks.
 */
ngx_int_t ngx_http_gift_nats_publish(ngx_http_gift_pending_t *p,
    const char *subject, const char *msg_id, const u_char *data, size_t len,
    ngx_log_t *log);
void ngx_http_gift_nats_cancel(ngx_http_gift_pending_t *p);

/* ngx_http_gift_webhook.c */
ngx_int_t ngx_http_gift_webhook_handler(ngx_http_request_t *r);
ngx_int_t ngx_http_gift_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message, const char *field);


#endif /* _NGX_HTTP_GIFT_MODULE_H_INCLUDED_ */
