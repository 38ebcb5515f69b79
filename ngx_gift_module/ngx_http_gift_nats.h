/*
 * The worker's NATS connection as its users see it (the JetStream
 * publisher, the GIFT_ACKS follower).  The connection knows them only
 * through this table of callbacks: it calls none of them by name.
 */

#ifndef _NGX_HTTP_GIFT_NATS_H_INCLUDED_
#define _NGX_HTTP_GIFT_NATS_H_INCLUDED_


#include "ngx_http_gift_module.h"
#include "ngx_http_gift_nats_parse.h"


typedef struct {
    /* the first character of its subscriptions' sids: messages go by it */
    u_char      sid;
    /* CONNECT is written: write its SUB lines (they precede the PING) */
    ngx_int_t (*handshake)(void *data);
    /* the server answered the handshake's PING: up */
    void      (*connected)(void *data);
    /* the connection is gone; bytes up to offset `written` were sent */
    void      (*disconnected)(void *data, uint64_t written);
    void      (*message)(void *data, ngx_http_gift_nats_msg_t *m);
    /* after each read, what it gathered can go on in one batch */
    void      (*read_done)(void *data);
    void       *data;
} ngx_http_gift_nats_user_t;


ngx_int_t ngx_http_gift_nats_add_user(ngx_http_gift_nats_user_t *u);

/*
 * Room for n bytes at the end of the output; NULL when there is no memory
 * (the connection is then dropped and reconnects).
 */
u_char *ngx_http_gift_nats_out(size_t n);

/*
 * What was written into ngx_http_gift_nats_out() up to `end` is queued;
 * it leaves with the rest of this pass of the event loop in one send().
 * Returns the offset of `end` in the connection's byte stream.
 */
uint64_t ngx_http_gift_nats_queue(u_char *end);

/* Publishes queued and not yet written (for gift_nats_queue_size). */
ngx_uint_t ngx_http_gift_nats_unsent(void);
void ngx_http_gift_nats_count_msg(void);

ngx_uint_t ngx_http_gift_nats_up(void);
ngx_str_t *ngx_http_gift_nats_inbox(void);
size_t ngx_http_gift_nats_max_payload(void);
ngx_log_t *ngx_http_gift_nats_log(void);


#endif /* _NGX_HTTP_GIFT_NATS_H_INCLUDED_ */
