/*
 * libFuzzer target: the module's NATS protocol parser
 * (ngx_gift_module/ngx_http_gift_nats_parse.c) on arbitrary server bytes.
 * The input is fed as the connection feeds it: in pieces (sizes taken from
 * the first byte), the unconsumed rest kept and more appended, in a buffer
 * exactly as large as what it holds, so that a read past it is caught.
 * Every message handed out must lie inside the buffer; what is consumed
 * never exceeds what was given; no hang (the parse of a buffer is one pass).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ngx_http_gift_nats_parse.h"

static const unsigned char  *lo, *hi;
static volatile unsigned     sink;

static void
touch(const unsigned char *p, size_t len)
{
    size_t  i;

    if (len == 0) {
        return;
    }
    if (p == NULL || p < lo || p + len > hi) {
        abort();
    }
    for (i = 0; i < len; i++) {
        sink += p[i];
    }
}

static int
on_msg(void *ctx, ngx_http_gift_nats_msg_t *m)
{
    (void) ctx;
    touch(m->subject, m->subject_len);
    touch(m->sid, m->sid_len);
    touch(m->reply, m->reply_len);
    touch(m->hdr, m->hdr_len);
    touch(m->data, m->len);
    if (m->subject_len == 0 || m->sid_len == 0) {
        abort();
    }
    /* a callback may stop the parse, as a dropped connection does */
    return m->len == 7;
}

static int
on_info(void *ctx, const unsigned char *json, size_t len)
{
    (void) ctx;
    touch(json, len);
    return 0;
}

static int on_ping(void *ctx) { (void) ctx; return 0; }
static int on_pong(void *ctx) { (void) ctx; return 0; }

static int
on_err(void *ctx, const unsigned char *text, size_t len)
{
    (void) ctx;
    touch(text, len);
    return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    long                          rc;
    size_t                        step, off, have, n;
    unsigned char                *buf, *nb;
    const char                   *why;
    ngx_http_gift_nats_parser_t   p;

    if (size < 1) {
        return 0;
    }

    memset(&p, 0, sizeof(p));
    p.msg = on_msg;
    p.info = on_info;
    p.ping = on_ping;
    p.pong = on_pong;
    p.err = on_err;
    p.max_payload = 4096;

    step = (size_t) data[0] % 64 + 1;
    data++;
    size--;

    buf = NULL;
    have = 0;

    for (off = 0; off < size; off += n) {
        n = size - off < step ? size - off : step;

        nb = malloc(have + n);
        if (nb == NULL) {
            break;
        }
        if (have) {
            memcpy(nb, buf, have);
        }
        memcpy(nb + have, data + off, n);
        free(buf);
        buf = nb;
        have += n;

        lo = buf;
        hi = buf + have;
        why = NULL;

        rc = ngx_http_gift_nats_parse(&p, buf, have, &why);

        if (rc == NGX_HTTP_GIFT_NATS_PARSE_ERROR) {
            if (why == NULL) {
                abort();
            }
            break;
        }
        if (rc == NGX_HTTP_GIFT_NATS_PARSE_STOP) {
            break;
        }
        if (rc < 0 || (size_t) rc > have) {
            abort();
        }

        memmove(buf, buf + rc, have - (size_t) rc);
        have -= (size_t) rc;

        /* what the connection keeps is bounded, as its input buffer is */
        if (have > p.max_payload + NGX_HTTP_GIFT_NATS_LINE_MAX + 64) {
            abort();
        }
    }

    free(buf);

    return 0;
}
