/*
 * gift_json: JSON text for acknowledgements and events, written into the
 * caller's buffer.  Strings come from protobuf (validated UTF-8 at ingest);
 * they are escaped per RFC 8259, control characters as \u00XX.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "gift_json.h"

static const char hex[] = "0123456789abcdef";

int
gift_json_str(char *out, size_t cap, size_t *len, const char *s)
{
    size_t               n = *len;
    const unsigned char *p = (const unsigned char *) (s ? s : "");

    if (n + 2 > cap) {
        return -1;
    }
    out[n++] = '"';
    for (; *p; p++) {
        if (n + 7 > cap) {
            return -1;
        }
        switch (*p) {
        case '"':  out[n++] = '\\'; out[n++] = '"'; break;
        case '\\': out[n++] = '\\'; out[n++] = '\\'; break;
        case '\n': out[n++] = '\\'; out[n++] = 'n'; break;
        case '\r': out[n++] = '\\'; out[n++] = 'r'; break;
        case '\t': out[n++] = '\\'; out[n++] = 't'; break;
        default:
            if (*p < 0x20) {
                out[n++] = '\\'; out[n++] = 'u'; out[n++] = '0';
                out[n++] = '0'; out[n++] = hex[*p >> 4];
                out[n++] = hex[*p & 0xf];
            } else {
                out[n++] = (char) *p;
            }
        }
    }
    if (n + 1 > cap) {
        return -1;
    }
    out[n++] = '"';
    *len = n;
    return 0;
}

/* printf-style append; -1 when the buffer is full */
static int
app(char *out, size_t cap, size_t *len, const char *fmt, ...)
{
    va_list ap;
    int     w;

    if (*len >= cap) {
        return -1;
    }
    va_start(ap, fmt);
    w = vsnprintf(out + *len, cap - *len, fmt, ap);
    va_end(ap);
    if (w < 0 || (size_t) w >= cap - *len) {
        return -1;
    }
    *len += (size_t) w;
    return 0;
}

static int
key_str(char *out, size_t cap, size_t *len, const char *key, const char *v)
{
    if (app(out, cap, len, ",\"%s\":", key) != 0) {
        return -1;
    }
    return gift_json_str(out, cap, len, v);
}

const char *
gift_ack_status_name(Gift__V1__AckStatus s)
{
    switch (s) {
    case GIFT__V1__ACK_STATUS__ACK_STATUS_OK:
        return "ok";
    case GIFT__V1__ACK_STATUS__ACK_STATUS_DEAD_LETTER:
        return "dead_letter";
    default:
        return "unspecified";
    }
}

size_t
gift_ack_json(const Gift__V1__GiftAck *a, uint64_t seq, char *out, size_t cap)
{
    size_t  n = 0;
    int64_t lat_ms;

    if (app(out, cap, &n, "{\"seq\":%" PRIu64, seq) != 0
        || key_str(out, cap, &n, "eventId", a->event_id) != 0
        || key_str(out, cap, &n, "deviceId", a->device_id) != 0
        || app(out, cap, &n, ",\"rounds\":%" PRIu64, a->rounds) != 0
        || key_str(out, cap, &n, "status", gift_ack_status_name(a->status))
           != 0)
    {
        return 0;
    }
    if (a->status == GIFT__V1__ACK_STATUS__ACK_STATUS_DEAD_LETTER
        && key_str(out, cap, &n, "reason", a->reason) != 0)
    {
        return 0;
    }

    /* only when they say something, so that plain acks keep their shape:
     * a gift above the per-gift limit (rounds is what was executed) and a
     * gift split into several commands */
    if (a->capped
        && app(out, cap, &n, ",\"roundsRequested\":%" PRIu64
               ",\"capped\":true", a->rounds_requested) != 0)
    {
        return 0;
    }
    if (a->parts > 0
        && app(out, cap, &n, ",\"parts\":%" PRIu32, a->parts) != 0)
    {
        return 0;
    }

    /* webhook received (nginx's clock) -> device answered, in ms */
    lat_ms = 0;
    if (a->received_at_ms > 0 && a->completed_at_ms >= a->received_at_ms) {
        lat_ms = a->completed_at_ms - a->received_at_ms;
    }

    if (app(out, cap, &n, ",\"attempts\":%" PRIu32, a->attempts) != 0
        || key_str(out, cap, &n, "platform", a->platform) != 0
        || key_str(out, cap, &n, "roomId", a->room_id) != 0
        || key_str(out, cap, &n, "userId", a->user_id) != 0
        || key_str(out, cap, &n, "userName", a->user_name) != 0
        || key_str(out, cap, &n, "giftName", a->gift_name) != 0
        || app(out, cap, &n, ",\"diamond\":%" PRIu32 ",\"quantity\":%" PRIu32
               ",\"latencyMs\":%" PRId64 ",\"ts\":%" PRId64 "}",
               a->diamond, a->quantity, lat_ms, a->completed_at_ms) != 0)
    {
        return 0;
    }
    return n;
}

size_t
gift_event_json(const Gift__V1__GiftEvent *e, char *out, size_t cap)
{
    size_t n = 0;

    if (app(out, cap, &n, "{\"eventId\":") != 0
        || gift_json_str(out, cap, &n, e->event_id) != 0
        || key_str(out, cap, &n, "platform", e->platform) != 0
        || key_str(out, cap, &n, "roomId", e->room_id) != 0
        || key_str(out, cap, &n, "userId", e->user_id) != 0
        || key_str(out, cap, &n, "userName", e->user_name) != 0
        || key_str(out, cap, &n, "giftId", e->gift_id) != 0
        || key_str(out, cap, &n, "giftName", e->gift_name) != 0
        || app(out, cap, &n, ",\"diamond\":%" PRIu32 ",\"quantity\":%" PRIu32
               ",\"occurredAtMs\":%" PRId64 ",\"receivedAtMs\":%" PRId64,
               e->diamond, e->quantity, e->occurred_at_ms, e->received_at_ms)
           != 0
        || key_str(out, cap, &n, "streakId", e->streak_id) != 0
        || app(out, cap, &n, ",\"streakCount\":%" PRIu32 ",\"streakEnd\":%s}",
               e->streak_count, e->streak_end ? "true" : "false") != 0)
    {
        return 0;
    }
    return n;
}
