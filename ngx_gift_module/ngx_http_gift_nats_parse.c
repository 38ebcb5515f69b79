/*
 * The NATS protocol parser: INFO, MSG, HMSG, PING, PONG, +OK, -ERR.
 *
 *   MSG  <subject> <sid> [reply] <#bytes>\r\n<payload>\r\n
 *   HMSG <subject> <sid> [reply] <#header bytes> <#total bytes>\r\n
 *        <headers><payload>\r\n
 *
 * Sizes are decimal digits and nothing else, checked for overflow and
 * against the server's max_payload; the CRLF after a payload must be
 * there.  Whoever feeds it keeps an incomplete line or message and calls
 * again with more bytes.
 */

#include "ngx_http_gift_nats_parse.h"

#include <string.h>


int
ngx_http_gift_nats_number(const unsigned char *s, size_t len, uint64_t *n)
{
    uint64_t  v;

    if (len == 0 || len > 20) {
        return -1;
    }

    for (v = 0; len; s++, len--) {
        if (*s < '0' || *s > '9') {
            return -1;
        }
        if (v > (UINT64_MAX - (uint64_t) (*s - '0')) / 10) {
            return -1;
        }
        v = v * 10 + (uint64_t) (*s - '0');
    }

    *n = v;

    return 0;
}


/* The arguments of a line, split at spaces and tabs; how many (max n). */
static size_t
ngx_http_gift_nats_args(const unsigned char *s, const unsigned char *e,
    const unsigned char **arg, size_t *alen, size_t n)
{
    size_t  na;

    for (na = 0; ; na++) {
        while (s < e && (*s == ' ' || *s == '\t')) {
            s++;
        }
        if (s == e) {
            return na;
        }
        if (na == n) {
            return n + 1;           /* too many */
        }
        arg[na] = s;
        while (s < e && *s != ' ' && *s != '\t') {
            s++;
        }
        alen[na] = (size_t) (s - arg[na]);
    }
}


static int
ngx_http_gift_nats_op(const unsigned char *s, size_t len, const char *op)
{
    size_t  n;

    n = strlen(op);

    return len >= n && memcmp(s, op, n) == 0
           && (len == n || s[n] == ' ' || s[n] == '\t');
}


long
ngx_http_gift_nats_parse(ngx_http_gift_nats_parser_t *p,
    const unsigned char *buf, size_t len, const char **why)
{
    size_t                     na, alen[5], llen, rest;
    uint64_t                   hdr, total;
    ngx_http_gift_nats_msg_t   m;
    const unsigned char       *pos, *end, *lf, *le, *arg[5], *body, *line;

    pos = buf;
    end = buf + len;

    while (pos < end) {
        lf = memchr(pos, '\n', (size_t) (end - pos));

        if (lf == NULL) {
            if ((size_t) (end - pos) > NGX_HTTP_GIFT_NATS_LINE_MAX) {
                *why = "protocol line too long";
                return NGX_HTTP_GIFT_NATS_PARSE_ERROR;
            }
            break;
        }

        le = (lf > pos && lf[-1] == '\r') ? lf - 1 : lf;
        llen = (size_t) (le - pos);

        if (llen > NGX_HTTP_GIFT_NATS_LINE_MAX) {
            *why = "protocol line too long";
            return NGX_HTTP_GIFT_NATS_PARSE_ERROR;
        }

        if (ngx_http_gift_nats_op(pos, llen, "MSG")
            || ngx_http_gift_nats_op(pos, llen, "HMSG"))
        {
            memset(&m, 0, sizeof(m));
            hdr = 0;

            na = ngx_http_gift_nats_args(pos + (pos[0] == 'H' ? 4 : 3), le,
                                         arg, alen, 5);

            if (pos[0] == 'H') {
                if (na != 4 && na != 5) {
                    *why = "unreadable HMSG line";
                    return NGX_HTTP_GIFT_NATS_PARSE_ERROR;
                }
                if (ngx_http_gift_nats_number(arg[na - 2], alen[na - 2], &hdr)
                    != 0)
                {
                    *why = "HMSG header size is not a number";
                    return NGX_HTTP_GIFT_NATS_PARSE_ERROR;
                }
                if (na == 5) {
                    m.reply = arg[2];
                    m.reply_len = alen[2];
                }

            } else {
                if (na != 3 && na != 4) {
                    *why = "unreadable MSG line";
                    return NGX_HTTP_GIFT_NATS_PARSE_ERROR;
                }
                if (na == 4) {
                    m.reply = arg[2];
                    m.reply_len = alen[2];
                }
            }

            if (ngx_http_gift_nats_number(arg[na - 1], alen[na - 1], &total)
                != 0)
            {
                *why = "message size is not a number";
                return NGX_HTTP_GIFT_NATS_PARSE_ERROR;
            }

            if (hdr > total || total > p->max_payload) {
                *why = "message of an impossible size";
                return NGX_HTTP_GIFT_NATS_PARSE_ERROR;
            }

            body = lf + 1;
            rest = (size_t) (end - body);

            if (rest < total + 2) {
                break;              /* the rest of the message is to come */
            }

            if (body[total] != '\r' || body[total + 1] != '\n') {
                *why = "no CRLF after a message";
                return NGX_HTTP_GIFT_NATS_PARSE_ERROR;
            }

            m.subject = arg[0];
            m.subject_len = alen[0];
            m.sid = arg[1];
            m.sid_len = alen[1];
            m.hdr = hdr ? body : NULL;
            m.hdr_len = (size_t) hdr;
            m.data = body + hdr;
            m.len = (size_t) (total - hdr);

            pos = body + total + 2;

            if (p->msg(p->ctx, &m) != 0) {
                return NGX_HTTP_GIFT_NATS_PARSE_STOP;
            }

            continue;
        }

        line = pos;
        pos = lf + 1;

        if (ngx_http_gift_nats_op(line, llen, "PING"))
        {
            if (p->ping(p->ctx) != 0) {
                return NGX_HTTP_GIFT_NATS_PARSE_STOP;
            }

        } else if (ngx_http_gift_nats_op(line, llen, "PONG")) {
            if (p->pong(p->ctx) != 0) {
                return NGX_HTTP_GIFT_NATS_PARSE_STOP;
            }

        } else if (ngx_http_gift_nats_op(line, llen, "INFO")) {
            if (p->info(p->ctx, llen > 5 ? line + 5 : le,
                        llen > 5 ? llen - 5 : 0)
                != 0)
            {
                return NGX_HTTP_GIFT_NATS_PARSE_STOP;
            }

        } else if (ngx_http_gift_nats_op(line, llen, "-ERR")) {
            if (p->err(p->ctx, line, llen) != 0) {
                return NGX_HTTP_GIFT_NATS_PARSE_STOP;
            }

        } else if (!ngx_http_gift_nats_op(line, llen, "+OK")
                   && llen > 0)
        {
            *why = "unknown protocol line";
            return NGX_HTTP_GIFT_NATS_PARSE_ERROR;
        }
    }

    return (long) (pos - buf);
}
