/*
 * gift_wsframe: parse and check one client WebSocket frame header.
 */
#include "gift_wsframe.h"

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
