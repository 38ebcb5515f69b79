/*
 * gift_wsframe: parse and check one client WebSocket frame header.
 */
#include "gift_wsframe.h"

#include <ctype.h>
#include <string.h>
#include <strings.h>

int
gift_ws_parse(const uint8_t *buf, size_t len, uint64_t max_payload,
    gift_ws_frame_t *f)
{
    uint64_t  plen;
    size_t    hlen, i;
    unsigned  op;

    if (len < 2) {
        return GIFT_WS_MORE;
    }

    op = buf[0] & 0x0f;

    if (buf[0] & 0x70) {
        return 1002;                    /* RSV bits: no extension agreed */
    }

    if (!(buf[1] & 0x80)) {
        return 1002;                    /* clients must mask */
    }

    if (op != 0x0 && op != 0x1 && op != 0x2 && op != 0x8 && op != 0x9
        && op != 0xa)
    {
        return 1002;
    }

    plen = buf[1] & 0x7f;
    hlen = 2;

    if (plen == 126) {
        if (len < 4) {
            return GIFT_WS_MORE;
        }
        plen = ((uint64_t) buf[2] << 8) | buf[3];
        hlen = 4;

    } else if (plen == 127) {
        if (len < 10) {
            return GIFT_WS_MORE;
        }
        plen = 0;
        for (i = 2; i < 10; i++) {
            plen = (plen << 8) | buf[i];
        }
        if (plen >> 63) {
            return 1002;                /* the most significant bit is 0 */
        }
        hlen = 10;
    }

    if (op >= 0x8 && (!(buf[0] & 0x80) || plen > 125)) {
        return 1002;                    /* control frames: final, small */
    }

    if (plen > max_payload) {
        return 1009;
    }

    if (len - hlen < 4 || len - hlen - 4 < plen) {
        return GIFT_WS_MORE;
    }

    f->fin = (buf[0] & 0x80) != 0;
    f->opcode = op;
    f->payload_len = plen;
    f->mask = buf + hlen;
    f->header_len = hlen + 4;
    f->payload = buf + hlen + 4;

    return GIFT_WS_OK;
}

void
gift_ws_unmask(uint8_t *payload, uint64_t len, const uint8_t *mask)
{
    uint64_t  i;

    for (i = 0; i < len; i++) {
        payload[i] ^= mask[i & 3];
    }
}

int
gift_ws_utf8_valid(const uint8_t *p, size_t len)
{
    size_t    i, n, k;
    uint32_t  cp, min;

    for (i = 0; i < len; /* void */) {
        if (p[i] < 0x80) {
            i++;
            continue;
        }

        if ((p[i] & 0xe0) == 0xc0) {
            n = 1; cp = p[i] & 0x1f; min = 0x80;
        } else if ((p[i] & 0xf0) == 0xe0) {
            n = 2; cp = p[i] & 0x0f; min = 0x800;
        } else if ((p[i] & 0xf8) == 0xf0) {
            n = 3; cp = p[i] & 0x07; min = 0x10000;
        } else {
            return 0;
        }

        if (len - i <= n) {
            return 0;
        }

        for (k = 1; k <= n; k++) {
            if ((p[i + k] & 0xc0) != 0x80) {
                return 0;
            }
            cp = (cp << 6) | (p[i + k] & 0x3f);
        }

        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
            return 0;
        }

        i += n + 1;
    }

    return 1;
}

int
gift_ws_close_code_valid(unsigned code)
{
    return (code >= 1000 && code <= 1003)
           || (code >= 1007 && code <= 1014)
           || (code >= 3000 && code <= 4999);
}

unsigned
gift_ws_close_check(const uint8_t *payload, size_t len, unsigned *code)
{
    if (len == 0) {
        *code = 1000;
        return 0;
    }

    if (len == 1) {
        return 1002;
    }

    *code = ((unsigned) payload[0] << 8) | payload[1];

    if (!gift_ws_close_code_valid(*code)) {
        return 1002;
    }

    if (!gift_ws_utf8_valid(payload + 2, len - 2)) {
        return 1007;
    }

    return 0;
}

/* host[:port] at p[0..len): the host's extent and the port (0: none). */
static int
gift_ws_hostport(const char *p, size_t len, size_t *hlen, unsigned *port)
{
    size_t  i, h;

    if (len == 0) {
        return -1;
    }

    if (p[0] == '[') {
        for (h = 1; h < len && p[h] != ']'; h++) {
            if (!(isxdigit((unsigned char) p[h]) || p[h] == ':'
                  || p[h] == '.'))
            {
                return -1;
            }
        }
        if (h == len) {
            return -1;
        }
        h++;

    } else {
        for (h = 0; h < len && p[h] != ':'; h++) {
            if (!(isalnum((unsigned char) p[h]) || p[h] == '-'
                  || p[h] == '.' || p[h] == '_'))
            {
                return -1;
            }
        }
        if (h == 0) {
            return -1;
        }
    }

    *hlen = h;
    *port = 0;

    if (h == len) {
        return 0;
    }

    if (p[h] != ':' || h + 1 == len || len - h - 1 > 5) {
        return -1;
    }

    for (i = h + 1; i < len; i++) {
        if (p[i] < '0' || p[i] > '9') {
            return -1;
        }
        *port = *port * 10 + (unsigned) (p[i] - '0');
    }

    return (*port == 0 || *port > 65535) ? -1 : 0;
}

int
gift_ws_origin_same(const char *origin, size_t olen, const char *host,
    size_t hlen, int https)
{
    size_t       skip, ohl, hhl, i;
    unsigned     oport, hport, dflt;
    const char  *scheme;

    scheme = https ? "https://" : "http://";
    skip = strlen(scheme);
    dflt = https ? 443 : 80;

    if (olen <= skip || strncasecmp(origin, scheme, skip) != 0) {
        return 0;
    }

    origin += skip;
    olen -= skip;

    if (gift_ws_hostport(origin, olen, &ohl, &oport) != 0
        || gift_ws_hostport(host, hlen, &hhl, &hport) != 0
        || ohl != hhl)
    {
        return 0;
    }

    for (i = 0; i < ohl; i++) {
        if (tolower((unsigned char) origin[i])
            != tolower((unsigned char) host[i]))
        {
            return 0;
        }
    }

    return (oport ? oport : dflt) == (hport ? hport : dflt);
}

static void
gift_ws_fail(gift_ws_event_t *ev, unsigned code, const char *reason)
{
    ev->type = GIFT_WS_EV_FAIL;
    ev->code = code;
    ev->reason = reason;
}

void
gift_ws_read(gift_ws_reader_t *rd, uint8_t *buf, size_t len,
    gift_ws_event_t *ev)
{
    int              rc;
    uint8_t         *payload;
    unsigned         code, fail;
    gift_ws_frame_t  f;

    memset(ev, 0, sizeof(*ev));

    rc = gift_ws_parse(buf, len, rd->max_message, &f);

    if (rc == GIFT_WS_MORE) {
        ev->type = GIFT_WS_EV_MORE;
        return;
    }

    if (rc != GIFT_WS_OK) {
        gift_ws_fail(ev, (unsigned) rc, rc == 1009 ? "message too large"
                                                   : "protocol error");
        return;
    }

    payload = buf + f.header_len;
    gift_ws_unmask(payload, f.payload_len, f.mask);
    ev->consumed = f.header_len + (size_t) f.payload_len;

    switch (f.opcode) {

    case 0x1:   /* text */
        if (rd->fragmented) {
            gift_ws_fail(ev, 1002, "expected a continuation frame");
            return;
        }

        if (f.fin) {
            if (!gift_ws_utf8_valid(payload, f.payload_len)) {
                gift_ws_fail(ev, 1007, "text is not UTF-8");
                return;
            }
            ev->type = GIFT_WS_EV_TEXT;
            ev->data = payload;
            ev->len = f.payload_len;
            return;
        }

        memcpy(rd->msg, payload, f.payload_len);
        rd->msg_len = f.payload_len;
        rd->fragmented = 1;
        ev->type = GIFT_WS_EV_NONE;
        return;

    case 0x0:   /* continuation */
        if (!rd->fragmented) {
            gift_ws_fail(ev, 1002, "unexpected continuation frame");
            return;
        }

        if (f.payload_len > rd->max_message - rd->msg_len) {
            gift_ws_fail(ev, 1009, "message too large");
            return;
        }

        memcpy(rd->msg + rd->msg_len, payload, f.payload_len);
        rd->msg_len += f.payload_len;

        if (!f.fin) {
            ev->type = GIFT_WS_EV_NONE;
            return;
        }

        rd->fragmented = 0;

        if (!gift_ws_utf8_valid(rd->msg, rd->msg_len)) {
            gift_ws_fail(ev, 1007, "text is not UTF-8");
            return;
        }

        ev->type = GIFT_WS_EV_TEXT;
        ev->data = rd->msg;
        ev->len = rd->msg_len;
        rd->msg_len = 0;
        return;

    case 0x2:   /* binary */
        gift_ws_fail(ev, 1003, "binary messages are not accepted");
        return;

    case 0x8:   /* close */
        fail = gift_ws_close_check(payload, f.payload_len, &code);
        if (fail) {
            gift_ws_fail(ev, fail, fail == 1007 ? "close reason is not UTF-8"
                                                : "invalid close frame");
            return;
        }
        ev->type = GIFT_WS_EV_CLOSE;
        ev->code = code;
        return;

    case 0x9:   /* ping */
        ev->type = GIFT_WS_EV_PING;
        ev->data = payload;
        ev->len = f.payload_len;
        return;

    default:    /* pong */
        ev->type = GIFT_WS_EV_PONG;
        return;
    }
}
