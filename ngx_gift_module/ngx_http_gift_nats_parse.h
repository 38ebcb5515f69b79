/*
 * The NATS protocol as a server writes it, parsed from a buffer: no
 * socket, no nginx, no knowledge of who reads the messages (a callback
 * per kind of line), so that it can be fuzzed alone.
 */

#ifndef _NGX_HTTP_GIFT_NATS_PARSE_H_INCLUDED_
#define _NGX_HTTP_GIFT_NATS_PARSE_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


/* the longest protocol line (INFO with a cluster's connect_urls) */
#define NGX_HTTP_GIFT_NATS_LINE_MAX  65536


typedef struct {
    const unsigned char       *subject;
    size_t                     subject_len;
    const unsigned char       *sid;
    size_t                     sid_len;
    const unsigned char       *reply;           /* NULL: none */
    size_t                     reply_len;
    const unsigned char       *hdr;             /* "NATS/1.0..." (HMSG) */
    size_t                     hdr_len;
    const unsigned char       *data;
    size_t                     len;
} ngx_http_gift_nats_msg_t;


/*
 * Each callback returns 0 to go on; anything else stops the parse (the
 * connection was closed by it).
 */
typedef struct {
    int   (*msg)(void *ctx, ngx_http_gift_nats_msg_t *m);
    int   (*info)(void *ctx, const unsigned char *json, size_t len);
    int   (*ping)(void *ctx);
    int   (*pong)(void *ctx);
    int   (*err)(void *ctx, const unsigned char *text, size_t len);
    void  *ctx;
    size_t max_payload;         /* larger messages are a protocol error */
} ngx_http_gift_nats_parser_t;


#define NGX_HTTP_GIFT_NATS_PARSE_ERROR  -1      /* *why says what */
#define NGX_HTTP_GIFT_NATS_PARSE_STOP   -2      /* a callback stopped */

/*
 * Every complete line and message of buf; returns how many bytes were
 * consumed (the rest is an incomplete line or message: call again with it
 * and more), or one of the two negative codes above.  Reads nothing
 * outside buf[0 .. len - 1].
 */
long ngx_http_gift_nats_parse(ngx_http_gift_nats_parser_t *p,
    const unsigned char *buf, size_t len, const char **why);

/* Decimal digits only, no overflow: 0 and *n, or -1. */
int ngx_http_gift_nats_number(const unsigned char *s, size_t len,
    uint64_t *n);


#endif /* _NGX_HTTP_GIFT_NATS_PARSE_H_INCLUDED_ */
