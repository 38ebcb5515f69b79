/*
 * gift_normalize: one webhook body (JSON) -> one validated gift_event_t.
 *
 * Three shapes are accepted, told apart by their fields (docs/input.md):
 *
 *   canonical   {"event":"gift","platform":..,"userId":..,"giftName":..,
 *                "diamond":..,"quantity":..,"timestamp":..}
 *   TikTok 1.x  TikTok-Live-Connector's flat gift event (1.x, and 2.x's
 *               legacy WebcastPushConnection): userId, giftName,
 *               diamondCount, repeatCount, repeatEnd, giftType, msgId, ...
 *   TikTok 2.x  the decoded WebcastGiftMessage that 2.x emits: user{},
 *               gift{} (2.3+) or giftDetails{} (2.0-2.2), common{} (2.1+)
 *               or event{} (2.0), repeatCount, repeatEnd 0/1, groupId
 *
 * The body is parsed once by jansson (duplicate keys refused, no \u0000);
 * the tree is read in place, and the only copies are the few strings that
 * end up in the event.  No global state: safe in any thread.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>
#include <openssl/sha.h>

#include "gift_normalize.h"
#include "gift.pb-c.h"

#define GN_OK       0
#define GN_ABSENT   1
#define GN_ERR     (-1)

/* 3000-01-01T00:00:00Z in milliseconds: later timestamps are refused. */
#define GN_TS_LIMIT    INT64_C(32503680000000)
/* Key levels gn_locate() follows to name a member jansson refused. */
#define GN_KEY_DEPTH   16
/* "tt:" + msgId must fit in an event id. */
#define GN_TT_PREFIX   "tt:"
#define GN_MSGID_MAX   (GIFT_ID_MAX - (sizeof(GN_TT_PREFIX) - 1))

typedef enum {
    GN_CANONICAL = 0,
    GN_TIKTOK_FLAT,
    GN_TIKTOK_V2
} gn_shape_t;


/* ------------------------------------------------------------ errors */

/* Keep only printable ASCII, so that the module can put the text in a JSON
 * answer or a log line without surprises (jansson quotes the body). */
static void
gn_ascii(char *s)
{
    for ( /* void */ ; *s; s++) {
        if ((unsigned char) *s < 0x20 || (unsigned char) *s > 0x7e) {
            *s = '?';
        }
    }
}

static int
gn_vfail(gift_norm_error_t *err, int status, const char *prefix,
    const char *name, const char *fmt, va_list ap)
{
    int  n;

    err->status = status;
    err->code = (status == 400) ? "invalid_json" : "invalid_field";

    if (name == NULL) {
        err->field[0] = '\0';
    } else if (prefix != NULL) {
        snprintf(err->field, sizeof(err->field), "%s.%s", prefix, name);
    } else {
        snprintf(err->field, sizeof(err->field), "%s", name);
    }

    /* "diamond must be ...": the message reads on its own */
    n = 0;
    if (err->field[0] != '\0') {
        n = snprintf(err->message, sizeof(err->message), "%s ", err->field);
        if (n < 0 || (size_t) n >= sizeof(err->message)) {
            n = 0;
        }
    }
    vsnprintf(err->message + n, sizeof(err->message) - n, fmt, ap);
    gn_ascii(err->field);
    gn_ascii(err->message);

    return GN_ERR;
}

static int
gn_bad_json(gift_norm_error_t *err, const char *fmt, ...)
{
    int      rc;
    va_list  ap;

    va_start(ap, fmt);
    rc = gn_vfail(err, 400, NULL, NULL, fmt, ap);
    va_end(ap);
    return rc;
}

/* A 422 naming the field `prefix.name` (or `name` when prefix is NULL). */
static int
gn_bad(gift_norm_error_t *err, const char *prefix, const char *name,
    const char *fmt, ...)
{
    int      rc;
    va_list  ap;

    va_start(ap, fmt);
    rc = gn_vfail(err, 422, prefix, name, fmt, ap);
    va_end(ap);
    return rc;
}

/*
 * Name the member whose value (or key) jansson refused.  jansson accepted
 * body[0..end), so a plain scan of that prefix can follow strings, nesting
 * and keys.  With `in_string` the scan must stop inside a string value (a
 * UTF-8 error); otherwise outside any string (a duplicate key has just been
 * read; a number has just overflowed).  Writes "a.b.c" (object keys from the
 * root; arrays add nothing) into field and returns 0, or returns -1 when the
 * fault lies in a key, at the root, or deeper than GN_KEY_DEPTH.
 */
static int
gn_locate(const char *p, size_t end, int in_string, char *field, size_t cap)
{
    struct {
        unsigned char  obj;
        unsigned char  want_key;
        unsigned char  has_key;
        size_t         ks, kl;
    }               lv[GN_KEY_DEPTH];
    size_t          depth, i, j, n, s;
    unsigned char   c;
    int             in_str, esc, is_key;

    depth = 0;
    s = 0;
    in_str = 0;
    esc = 0;
    is_key = 0;

    for (i = 0; i < end; i++) {
        c = (unsigned char) p[i];

        if (in_str) {
            if (esc) {
                esc = 0;
            } else if (c == '\\') {
                esc = 1;
            } else if (c == '"') {
                in_str = 0;
                if (is_key) {
                    lv[depth - 1].ks = s;
                    lv[depth - 1].kl = i - s;
                    lv[depth - 1].has_key = 1;
                    lv[depth - 1].want_key = 0;
                }
            }
            continue;
        }

        switch (c) {
        case '"':
            in_str = 1;
            s = i + 1;
            is_key = depth > 0 && depth <= GN_KEY_DEPTH
                     && lv[depth - 1].obj && lv[depth - 1].want_key;
            break;
        case '{':
        case '[':
            if (depth < GN_KEY_DEPTH) {
                lv[depth].obj = (c == '{');
                lv[depth].want_key = (c == '{');
                lv[depth].has_key = 0;
            }
            depth++;
            break;
        case '}':
        case ']':
            if (depth > 0) {
                depth--;
            }
            break;
        case ',':
            if (depth > 0 && depth <= GN_KEY_DEPTH && lv[depth - 1].obj) {
                lv[depth - 1].want_key = 1;
                lv[depth - 1].has_key = 0;
            }
            break;
        default:
            break;
        }
    }

    if (depth == 0 || depth > GN_KEY_DEPTH) {
        return -1;
    }
    if (in_string ? (!in_str || is_key) : in_str) {
        return -1;
    }

    n = 0;
    for (i = 0; i < depth; i++) {
        if (!lv[i].obj || !lv[i].has_key) {
            continue;
        }
        if (n > 0 && n + 1 < cap) {
            field[n++] = '.';
        }
        for (j = 0; j < lv[i].kl && n + 1 < cap; j++) {
            c = (unsigned char) p[lv[i].ks + j];
            field[n++] = ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
                          || (c >= '0' && c <= '9') || c == '_' || c == '-')
                         ? (char) c : '?';
        }
    }
    if (cap > 0) {
        field[n < cap ? n : cap - 1] = '\0';
    }

    return n > 0 ? 0 : -1;
}

/*
 * jansson refused the body.  Most refusals are malformed JSON (400); three
 * name a member and are field errors (422): a duplicate key, a number too
 * large for a 64-bit integer or a double (jansson cannot represent it, so it
 * cannot hand it to us to range-check), and invalid UTF-8 inside a string
 * value.
 */
static int
gn_parse_error(const char *body, size_t len, const json_error_t *je,
    gift_norm_error_t *err)
{
    size_t       pos;
    const char  *what;
    int          in_string;

    pos = je->position < 0 ? 0 : (size_t) je->position;
    if (pos > len) {
        pos = len;
    }

    switch (json_error_code(je)) {
    case json_error_duplicate_key:
        what = "is a duplicate key";
        in_string = 0;
        break;
    case json_error_numeric_overflow:
        what = "holds a number out of range";
        in_string = 0;
        break;
    case json_error_invalid_utf8:
        what = "holds invalid UTF-8";
        in_string = 1;
        break;
    case json_error_null_character:
        return gn_bad_json(err, "malformed JSON at byte %d: \\u0000 is not "
                           "allowed in a string", je->position);
    default:
        return gn_bad_json(err, "malformed JSON at byte %d: %s",
                           je->position, je->text);
    }

    if (gn_locate(body, pos, in_string, err->field, sizeof(err->field)) != 0)
    {
        return gn_bad_json(err, "malformed JSON at byte %d: %s",
                           je->position, je->text);
    }

    err->status = 422;
    err->code = "invalid_field";
    snprintf(err->message, sizeof(err->message), "%s %s", err->field, what);
    gn_ascii(err->field);
    gn_ascii(err->message);

    return GN_ERR;
}


/* ------------------------------------------------------------ fields */

/* A member, or NULL when `obj` is not an object, lacks it, or holds null. */
static json_t *
gn_get(const json_t *obj, const char *name)
{
    json_t  *v;

    if (obj == NULL || !json_is_object(obj)) {
        return NULL;
    }
    v = json_object_get(obj, name);
    return json_is_null(v) ? NULL : v;
}

static int
gn_is_id_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
           || (c >= '0' && c <= '9')
           || c == '.' || c == '_' || c == ':' || c == '-';
}

/* [A-Za-z0-9._:-]{1,max}: safe in a NATS header and a KV key position. */
static int
gn_is_id(const char *s, size_t len, size_t max)
{
    size_t  i;

    if (len == 0 || len > max) {
        return 0;
    }
    for (i = 0; i < len; i++) {
        if (!gn_is_id_char((unsigned char) s[i])) {
            return 0;
        }
    }
    return 1;
}

/*
 * A text (a name): a JSON string of at most GIFT_STR_MAX bytes.  jansson has
 * already refused invalid UTF-8 and NUL.  "" counts as absent, as it does in
 * TikTok-Live-Connector's events (protobuf's default).
 */
static int
gn_text(const json_t *obj, const char *prefix, const char *name, char *dst,
    gift_norm_error_t *err)
{
    json_t  *v;
    size_t   len;

    v = gn_get(obj, name);
    if (v == NULL) {
        return GN_ABSENT;
    }
    if (!json_is_string(v)) {
        return gn_bad(err, prefix, name, "must be a string");
    }

    len = json_string_length(v);
    if (len == 0) {
        return GN_ABSENT;
    }
    if (len > GIFT_STR_MAX) {
        return gn_bad(err, prefix, name, "must be 1-%d bytes of UTF-8",
                      GIFT_STR_MAX);
    }

    memcpy(dst, json_string_value(v), len);
    dst[len] = '\0';
    return GN_OK;
}

/*
 * An id: a string of 1..max bytes, or a non-negative JSON integer written
 * out in decimal (64-bit ids arrive both ways).  With `zero_absent`, "0" and
 * 0 count as absent: protobuf's default for an unset TikTok id.
 */
static int
gn_id(const json_t *obj, const char *prefix, const char *name,
    int zero_absent, size_t max, char *dst, gift_norm_error_t *err)
{
    json_t      *v;
    size_t       len;
    json_int_t   n;

    v = gn_get(obj, name);
    if (v == NULL) {
        return GN_ABSENT;
    }

    if (json_is_integer(v)) {
        n = json_integer_value(v);
        if (n < 0) {
            return gn_bad(err, prefix, name, "must not be negative");
        }
        if (n == 0 && zero_absent) {
            return GN_ABSENT;
        }
        snprintf(dst, max + 1, "%" JSON_INTEGER_FORMAT, n);
        return GN_OK;
    }

    if (!json_is_string(v)) {
        return gn_bad(err, prefix, name, "must be a string or an integer");
    }

    len = json_string_length(v);
    if (len == 0 || (zero_absent && len == 1 && json_string_value(v)[0] == '0'))
    {
        return GN_ABSENT;
    }
    if (len > max) {
        return gn_bad(err, prefix, name, "must be 1-%zu bytes of UTF-8", max);
    }

    memcpy(dst, json_string_value(v), len);
    dst[len] = '\0';
    return GN_OK;
}

/* An integer in [min, max]; reals (10.0), strings ("10") and booleans are
 * refused. */
static int
gn_uint(const json_t *obj, const char *prefix, const char *name,
    uint32_t min, uint32_t max, uint32_t *out, gift_norm_error_t *err)
{
    json_t      *v;
    json_int_t   n;

    v = gn_get(obj, name);
    if (v == NULL) {
        return GN_ABSENT;
    }

    if (!json_is_integer(v)) {
        return gn_bad(err, prefix, name, "must be an integer from %u to %u",
                      (unsigned) min, (unsigned) max);
    }

    n = json_integer_value(v);
    if (n < (json_int_t) min || n > (json_int_t) max) {
        return gn_bad(err, prefix, name, "must be an integer from %u to %u",
                      (unsigned) min, (unsigned) max);
    }

    *out = (uint32_t) n;
    return GN_OK;
}

/* A flag: true/false, or 0/1 (repeatEnd is an integer in the 2.x form). */
static int
gn_flag(const json_t *obj, const char *prefix, const char *name, int *out,
    gift_norm_error_t *err)
{
    json_t  *v;

    v = gn_get(obj, name);
    if (v == NULL) {
        return GN_ABSENT;
    }

    if (json_is_boolean(v)) {
        *out = json_is_true(v);
        return GN_OK;
    }
    if (json_is_integer(v)
        && (json_integer_value(v) == 0 || json_integer_value(v) == 1))
    {
        *out = (int) json_integer_value(v);
        return GN_OK;
    }

    return gn_bad(err, prefix, name, "must be true, false, 0 or 1");
}

/*
 * Milliseconds since the epoch, 0 <= t < year 3000.  A JSON integer; with
 * `digits`, also a string of decimal digits (TikTok-Live-Connector writes
 * its 64-bit createTime as a string).
 */
static int
gn_time(const json_t *obj, const char *prefix, const char *name, int digits,
    int64_t *out, gift_norm_error_t *err)
{
    json_t       *v;
    const char   *s;
    size_t        len, i;
    int64_t       t;

    v = gn_get(obj, name);
    if (v == NULL) {
        return GN_ABSENT;
    }

    if (json_is_integer(v)) {
        t = (int64_t) json_integer_value(v);

    } else if (digits && json_is_string(v)) {
        s = json_string_value(v);
        len = json_string_length(v);

        /* 16 digits cannot overflow; the limit has 14 */
        if (len == 0 || len > 16) {
            goto bad;
        }
        t = 0;
        for (i = 0; i < len; i++) {
            if (s[i] < '0' || s[i] > '9') {
                goto bad;
            }
            t = t * 10 + (s[i] - '0');
        }

    } else {
        goto bad;
    }

    if (t < 0 || t >= GN_TS_LIMIT) {
        goto bad;
    }

    *out = t;
    return GN_OK;

bad:
    return gn_bad(err, prefix, name,
                  "must be milliseconds since the epoch (an integer%s, "
                  "before the year 3000)", digits ? " or a digit string" : "");
}

/* The same text from the first candidate member that has one. */
static int
gn_text_any(const json_t *obj, const char *prefix, const char *const *names,
    char *dst, gift_norm_error_t *err)
{
    int  rc;

    for ( /* void */ ; *names != NULL; names++) {
        rc = gn_text(obj, prefix, *names, dst, err);
        if (rc != GN_ABSENT) {
            return rc;
        }
    }
    return GN_ABSENT;
}

static int
gn_id_any(const json_t *obj, const char *prefix, const char *const *names,
    char *dst, gift_norm_error_t *err)
{
    int  rc;

    for ( /* void */ ; *names != NULL; names++) {
        rc = gn_id(obj, prefix, *names, 1, GIFT_STR_MAX, dst, err);
        if (rc != GN_ABSENT) {
            return rc;
        }
    }
    return GN_ABSENT;
}


/* ------------------------------------------------------------ ids */

static const char  gn_hex[] = "0123456789abcdef";

static void
gn_hex32(const unsigned char *md, char *out)
{
    size_t  i;

    /* 16 bytes = 32 hex digits = 128 bits: plenty against collisions */
    for (i = 0; i < 16; i++) {
        out[2 * i] = gn_hex[md[i] >> 4];
        out[2 * i + 1] = gn_hex[md[i] & 0x0f];
    }
    out[32] = '\0';
}

/* Append s and a NUL separator (no field holds a NUL, so the encoding is
 * unambiguous). */
static size_t
gn_put(char *buf, size_t n, const char *s)
{
    size_t  len;

    len = strlen(s);
    memcpy(buf + n, s, len);
    buf[n + len] = '\0';
    return n + len + 1;
}

/*
 * The event id of an event that carries none: "h:" + 32 hex digits of the
 * SHA-256 of every normalized field, so that an identical retry gets the
 * same id (and is deduplicated by JetStream) whatever its key order or
 * whitespace.  The time of receipt is not part of it.
 */
static void
gn_hash_id(gift_event_t *ev)
{
    char           buf[16 + 7 * (GIFT_STR_MAX + 1) + GIFT_PLATFORM_MAX + 1
                       + 5 * 24];
    char           num[24];
    unsigned char  md[SHA256_DIGEST_LENGTH];
    size_t         n;

    n = gn_put(buf, 0, "gift.v1");
    n = gn_put(buf, n, ev->platform);
    n = gn_put(buf, n, ev->room_id);
    n = gn_put(buf, n, ev->user_id);
    n = gn_put(buf, n, ev->user_name);
    n = gn_put(buf, n, ev->gift_id);
    n = gn_put(buf, n, ev->gift_name);
    snprintf(num, sizeof(num), "%u", (unsigned) ev->diamond);
    n = gn_put(buf, n, num);
    snprintf(num, sizeof(num), "%u", (unsigned) ev->quantity);
    n = gn_put(buf, n, num);
    snprintf(num, sizeof(num), "%lld", (long long) ev->occurred_at_ms);
    n = gn_put(buf, n, num);
    n = gn_put(buf, n, ev->streak_id);
    snprintf(num, sizeof(num), "%u.%d", (unsigned) ev->streak_count,
             ev->streak_end);
    n = gn_put(buf, n, num);

    SHA256((const unsigned char *) buf, n, md);

    memcpy(ev->event_id, "h:", 2);
    gn_hex32(md, ev->event_id + 2);
}

/*
 * A TikTok streak: "tiktok:<user id>:<gift id>:<group id>".  When an id
 * holds characters outside [A-Za-z0-9._:-] (TikTok's are digits, a
 * hand-made event's may not be) or the whole is too long, the streak id
 * becomes "tiktok:h:" + 32 hex digits of its SHA-256, so that it stays a
 * safe key for the dispatcher.
 */
static void
gn_streak_id(gift_event_t *ev, const char *group)
{
    char           buf[3 * (GIFT_STR_MAX + 1) + 16];
    unsigned char  md[SHA256_DIGEST_LENGTH];
    int            n;

    n = snprintf(buf, sizeof(buf), "tiktok:%s:%s:%s", ev->user_id,
                 ev->gift_id[0] ? ev->gift_id : "0", group);

    if (n > 0 && gn_is_id(buf, (size_t) n, GIFT_STR_MAX)) {
        memcpy(ev->streak_id, buf, (size_t) n + 1);
        return;
    }

    SHA256((const unsigned char *) buf, strlen(buf), md);
    memcpy(ev->streak_id, "tiktok:h:", 9);
    gn_hex32(md, ev->streak_id + 9);
}


/* ------------------------------------------------------------ shapes */

/* `event`, when present, must say "gift" (in the TikTok 2.0 form it is the
 * message's {msgId, createTime} object instead). */
static int
gn_check_event(const json_t *root, gn_shape_t shape, gift_norm_error_t *err)
{
    json_t  *v;

    v = gn_get(root, "event");
    if (v == NULL || (shape == GN_TIKTOK_V2 && json_is_object(v))) {
        return GN_OK;
    }
    if (json_is_string(v) && json_string_length(v) == 4
        && memcmp(json_string_value(v), "gift", 4) == 0)
    {
        return GN_OK;
    }
    return gn_bad(err, NULL, "event", "must be \"gift\"");
}

/* [a-z0-9_-]{1,32}: it becomes a token of the NATS subject
 * gift.events.<platform>, where '.', ' ', '*' or '>' would be an injection */
static int
gn_platform(const json_t *root, char *dst, gift_norm_error_t *err)
{
    json_t      *v;
    const char  *s;
    size_t       len, i;

    v = gn_get(root, "platform");
    if (v == NULL) {
        return GN_ABSENT;
    }
    if (!json_is_string(v)) {
        goto bad;
    }

    s = json_string_value(v);
    len = json_string_length(v);
    if (len == 0 || len > GIFT_PLATFORM_MAX) {
        goto bad;
    }
    for (i = 0; i < len; i++) {
        if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9')
              || s[i] == '_' || s[i] == '-'))
        {
            goto bad;
        }
    }

    memcpy(dst, s, len);
    dst[len] = '\0';
    return GN_OK;

bad:
    return gn_bad(err, NULL, "platform", "must be 1-%d characters of "
                  "[a-z0-9_-]", GIFT_PLATFORM_MAX);
}

/* eventId (any shape): [A-Za-z0-9._:-]{1,128}; it travels in a NATS header,
 * where a CR or LF would be an injection. */
static int
gn_event_id(const json_t *root, char *dst, gift_norm_error_t *err)
{
    json_t  *v;
    size_t   len;

    v = gn_get(root, "eventId");
    if (v == NULL) {
        return GN_ABSENT;
    }
    if (!json_is_string(v)
        || !gn_is_id(json_string_value(v), json_string_length(v),
                     GIFT_ID_MAX))
    {
        return gn_bad(err, NULL, "eventId", "must be 1-%d characters of "
                      "[A-Za-z0-9._:-]", GIFT_ID_MAX);
    }

    len = json_string_length(v);
    memcpy(dst, json_string_value(v), len);
    dst[len] = '\0';
    return GN_OK;
}

static int
gn_canonical(const json_t *root, gift_event_t *ev, gift_norm_error_t *err)
{
    json_t  *v;
    size_t   len;
    int      rc;

    rc = gn_platform(root, ev->platform, err);
    if (rc == GN_ERR) {
        return GN_ERR;
    }
    if (rc == GN_ABSENT) {
        return gn_bad(err, NULL, "platform", "is required (1-%d characters "
                      "of [a-z0-9_-])", GIFT_PLATFORM_MAX);
    }

    rc = gn_id(root, NULL, "userId", 0, GIFT_STR_MAX, ev->user_id, err);
    if (rc == GN_ERR) {
        return GN_ERR;
    }
    if (rc == GN_ABSENT) {
        return gn_bad(err, NULL, "userId", "is required (1-%d bytes)",
                      GIFT_STR_MAX);
    }

    if (gn_text(root, NULL, "userName", ev->user_name, err) == GN_ERR
        || gn_id(root, NULL, "giftId", 0, GIFT_STR_MAX, ev->gift_id, err)
           == GN_ERR)
    {
        return GN_ERR;
    }

    rc = gn_text(root, NULL, "giftName", ev->gift_name, err);
    if (rc == GN_ERR) {
        return GN_ERR;
    }
    if (rc == GN_ABSENT) {
        return gn_bad(err, NULL, "giftName", "is required (1-%d bytes of "
                      "UTF-8)", GIFT_STR_MAX);
    }

    if (gn_id(root, NULL, "roomId", 0, GIFT_STR_MAX, ev->room_id, err)
        == GN_ERR)
    {
        return GN_ERR;
    }

    rc = gn_uint(root, NULL, "diamond", 1, GIFT_DIAMOND_MAX, &ev->diamond,
                 err);
    if (rc == GN_ERR) {
        return GN_ERR;
    }
    if (rc == GN_ABSENT) {
        return gn_bad(err, NULL, "diamond", "is required (an integer from 1 "
                      "to %d)", GIFT_DIAMOND_MAX);
    }

    rc = gn_uint(root, NULL, "quantity", 1, GIFT_QUANTITY_MAX, &ev->quantity,
                 err);
    if (rc == GN_ERR) {
        return GN_ERR;
    }
    if (rc == GN_ABSENT) {
        return gn_bad(err, NULL, "quantity", "is required (an integer from 1 "
                      "to %d)", GIFT_QUANTITY_MAX);
    }

    if (gn_time(root, NULL, "timestamp", 0, &ev->occurred_at_ms, err)
        == GN_ERR)
    {
        return GN_ERR;
    }

    /* no streak unless the sender names one */
    ev->streak_count = ev->quantity;
    ev->streak_end = 1;

    v = gn_get(root, "streakId");
    if (v != NULL) {
        if (!json_is_string(v)
            || !gn_is_id(json_string_value(v), json_string_length(v),
                         GIFT_ID_MAX))
        {
            return gn_bad(err, NULL, "streakId", "must be 1-%d characters "
                          "of [A-Za-z0-9._:-]", GIFT_ID_MAX);
        }
        len = json_string_length(v);
        memcpy(ev->streak_id, json_string_value(v), len);
        ev->streak_id[len] = '\0';

        ev->streak_end = 0;
        if (gn_flag(root, NULL, "streakEnd", &ev->streak_end, err) == GN_ERR) {
            return GN_ERR;
        }
    }

    return GN_OK;
}

/*
 * Both TikTok-Live-Connector forms, field by field (docs/input.md); "a|b"
 * takes the first one present:
 *
 *              flat (1.x, 2.x legacy)      2.x
 *   user id    userId                      user.userId|idStr|id
 *   user name  nickname|uniqueId           user.nickname|uniqueId|displayId
 *   gift id    giftId                      giftId|gift.id
 *   gift name  giftName|x.name|giftId      gift.name|giftName|x.name|giftId
 *   diamond    diamondCount|x.diamond_count  gift.diamondCount|x.diamond_count
 *   quantity   repeatCount (default 1)     repeatCount (default 1)
 *   streakable giftType|x.type == 1        gift.type|giftType|x.type == 1
 *   streak end repeatEnd                   repeatEnd
 *   group      groupId                     groupId
 *   room       roomId                      common.roomId
 *   event id   eventId|"tt:"+msgId         eventId|"tt:"+common.msgId
 *   time       createTime|timestamp        common.createTime
 *
 * where "gift" is giftDetails in 2.0-2.2, "common" is event in 2.0, and x
 * is extendedGiftInfo (the room's gift list entry, when the connector was
 * asked for it).
 */
static int
gn_tiktok(const json_t *root, gn_shape_t shape, gift_event_t *ev,
    gift_norm_error_t *err)
{
    static const char *const  user_ids[] = { "userId", "idStr", "id", NULL };
    static const char *const  user_names_flat[] = {
        "nickname", "uniqueId", NULL
    };
    static const char *const  user_names_v2[] = {
        "nickname", "uniqueId", "displayId", NULL
    };
    static const char *const  gift_names[] = { "name", "giftName", NULL };
    static const char *const  gift_types[] = { "type", "giftType", NULL };

    const json_t  *user, *gift, *meta, *ext;
    const char    *up, *gp, *mp;
    char           platform[GIFT_PLATFORM_MAX + 1];
    char           group[GIFT_STR_MAX + 1];
    char           msgid[GIFT_STR_MAX + 1];
    uint32_t       type;
    int            rc, v2, repeat_end, i;

    v2 = (shape == GN_TIKTOK_V2);

    if (v2) {
        user = gn_get(root, "user");
        up = "user";

        gift = gn_get(root, "gift");
        gp = "gift";
        if (!json_is_object(gift)) {
            gift = gn_get(root, "giftDetails");
            gp = "giftDetails";
            if (!json_is_object(gift)) {
                gift = NULL;
                gp = "gift";
            }
        }

        meta = gn_get(root, "common");
        mp = "common";
        if (!json_is_object(meta)) {
            meta = gn_get(root, "event");
            mp = "event";
            if (!json_is_object(meta)) {
                meta = NULL;
                mp = "common";
            }
        }

    } else {
        user = root;
        gift = root;
        meta = root;
        up = NULL;
        gp = NULL;
        mp = NULL;
    }

    ext = gn_get(root, "extendedGiftInfo");
    if (!json_is_object(ext)) {
        ext = NULL;
    }

    /* a platform, if the sender added one, cannot contradict the shape */
    rc = gn_platform(root, platform, err);
    if (rc == GN_ERR) {
        return GN_ERR;
    }
    if (rc == GN_OK && strcmp(platform, "tiktok") != 0) {
        return gn_bad(err, NULL, "platform", "must be \"tiktok\" for a "
                      "TikTok-Live-Connector event");
    }
    memcpy(ev->platform, "tiktok", sizeof("tiktok"));

    rc = v2 ? gn_id_any(user, up, user_ids, ev->user_id, err)
            : gn_id(user, up, "userId", 1, GIFT_STR_MAX, ev->user_id, err);
    if (rc == GN_ERR) {
        return GN_ERR;
    }
    if (rc == GN_ABSENT) {
        return gn_bad(err, up, "userId", "is required%s",
                      v2 ? " (user.userId, user.idStr or user.id)" : "");
    }

    if (gn_text_any(user, up, v2 ? user_names_v2 : user_names_flat,
                    ev->user_name, err) == GN_ERR)
    {
        return GN_ERR;
    }

    rc = gn_id(root, NULL, "giftId", 1, GIFT_STR_MAX, ev->gift_id, err);
    if (rc == GN_ABSENT && v2) {
        rc = gn_id(gift, gp, "id", 1, GIFT_STR_MAX, ev->gift_id, err);
    }
    if (rc == GN_ERR) {
        return GN_ERR;
    }

    /* the name: the gift's own, the room gift list's, else its id (2.x's
     * legacy converter drops the gift struct; see docs/input.md) */
    rc = v2 ? gn_text_any(gift, gp, gift_names, ev->gift_name, err)
            : gn_text(gift, gp, "giftName", ev->gift_name, err);
    if (rc == GN_ABSENT) {
        rc = gn_text(ext, "extendedGiftInfo", "name", ev->gift_name, err);
    }
    if (rc == GN_ERR) {
        return GN_ERR;
    }
    if (rc == GN_ABSENT) {
        if (ev->gift_id[0] == '\0') {
            return gn_bad(err, gp, v2 ? "name" : "giftName",
                          "is required (or a giftId)");
        }
        memcpy(ev->gift_name, ev->gift_id, strlen(ev->gift_id) + 1);
    }

    rc = gn_uint(gift, gp, "diamondCount", 1, GIFT_DIAMOND_MAX, &ev->diamond,
                 err);
    if (rc == GN_ABSENT) {
        rc = gn_uint(ext, "extendedGiftInfo", "diamond_count", 1,
                     GIFT_DIAMOND_MAX, &ev->diamond, err);
    }
    if (rc == GN_ERR) {
        return GN_ERR;
    }
    if (rc == GN_ABSENT) {
        return gn_bad(err, gp, "diamondCount", "is required (an integer from "
                      "1 to %d, or extendedGiftInfo.diamond_count)",
                      GIFT_DIAMOND_MAX);
    }

    /* 1.x omits protobuf defaults; a frame always has at least one gift */
    ev->quantity = 1;
    if (gn_uint(root, NULL, "repeatCount", 1, GIFT_QUANTITY_MAX,
                &ev->quantity, err) == GN_ERR)
    {
        return GN_ERR;
    }

    /* absent giftType is protobuf's 0: not streakable */
    type = 0;
    rc = GN_ABSENT;
    if (v2) {
        for (i = 0; rc == GN_ABSENT && gift_types[i] != NULL; i++) {
            rc = gn_uint(gift, gp, gift_types[i], 0, INT32_MAX, &type, err);
        }
    } else {
        rc = gn_uint(gift, gp, "giftType", 0, INT32_MAX, &type, err);
    }
    if (rc == GN_ABSENT) {
        rc = gn_uint(ext, "extendedGiftInfo", "type", 0, INT32_MAX, &type,
                     err);
    }
    if (rc == GN_ERR) {
        return GN_ERR;
    }

    repeat_end = 0;
    if (gn_flag(root, NULL, "repeatEnd", &repeat_end, err) == GN_ERR) {
        return GN_ERR;
    }

    rc = gn_id(root, NULL, "groupId", 0, GIFT_STR_MAX, group, err);
    if (rc == GN_ERR) {
        return GN_ERR;
    }
    if (rc == GN_ABSENT) {
        memcpy(group, "0", 2);
    }

    if (gn_id(meta, mp, "roomId", 1, GIFT_STR_MAX, ev->room_id, err)
        == GN_ERR)
    {
        return GN_ERR;
    }

    rc = gn_time(meta, mp, "createTime", 1, &ev->occurred_at_ms, err);
    if (rc != GN_ERR && ev->occurred_at_ms == 0 && !v2) {
        rc = gn_time(root, NULL, "timestamp", 1, &ev->occurred_at_ms, err);
    }
    if (rc == GN_ERR) {
        return GN_ERR;
    }

    /* streaks: giftType 1 only; other gifts are complete in one frame */
    ev->streak_count = ev->quantity;
    if (type == 1) {
        gn_streak_id(ev, group);
        ev->streak_end = repeat_end;
    } else {
        ev->streak_end = 1;
    }

    if (ev->event_id[0] != '\0') {
        return GN_OK;                     /* the sender's eventId wins */
    }

    rc = gn_id(meta, mp, "msgId", 1, GIFT_STR_MAX, msgid, err);
    if (rc == GN_ERR) {
        return GN_ERR;
    }
    if (rc == GN_OK) {
        if (!gn_is_id(msgid, strlen(msgid), GN_MSGID_MAX)) {
            return gn_bad(err, mp, "msgId", "must be 1-%zu characters of "
                          "[A-Za-z0-9._:-]", GN_MSGID_MAX);
        }
        memcpy(ev->event_id, GN_TT_PREFIX, sizeof(GN_TT_PREFIX) - 1);
        memcpy(ev->event_id + sizeof(GN_TT_PREFIX) - 1, msgid,
               strlen(msgid) + 1);
    }

    return GN_OK;
}

/*
 * Which shape: the 2.x form has a user object; the flat form has TikTok's
 * gift fields at the top; anything else is read as canonical (so that its
 * errors name canonical fields).  "diamond" settles it for canonical.
 */
static gn_shape_t
gn_shape(const json_t *root)
{
    if (gn_get(root, "diamond") != NULL) {
        return GN_CANONICAL;
    }
    if (json_is_object(gn_get(root, "user"))) {
        return GN_TIKTOK_V2;
    }
    if (gn_get(root, "diamondCount") != NULL
        || gn_get(root, "repeatCount") != NULL
        || gn_get(root, "repeatEnd") != NULL
        || gn_get(root, "giftType") != NULL)
    {
        return GN_TIKTOK_FLAT;
    }
    return GN_CANONICAL;
}


/* ------------------------------------------------------------ API */

int
gift_normalize(const char *body, size_t len, gift_event_t *ev,
    gift_norm_error_t *err)
{
    json_t        *root;
    json_error_t   je;
    gn_shape_t     shape;
    int            rc;

    err->status = 0;
    err->code = NULL;
    err->field[0] = '\0';
    err->message[0] = '\0';

    if (body == NULL) {
        body = "";
        len = 0;
    }

    /* no JSON_ALLOW_NUL: a \u0000 is refused, so every string is a C
     * string; no JSON_DECODE_ANY: the root is an object or an array */
    root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (root == NULL) {
        return gn_parse_error(body, len, &je, err);
    }

    if (!json_is_object(root)) {
        json_decref(root);
        return gn_bad_json(err, "the body must be a JSON object");
    }

    memset(ev, 0, sizeof(*ev));

    shape = gn_shape(root);

    rc = gn_check_event(root, shape, err);
    if (rc == GN_OK) {
        rc = gn_event_id(root, ev->event_id, err);
    }
    if (rc != GN_ERR) {
        rc = (shape == GN_CANONICAL) ? gn_canonical(root, ev, err)
                                     : gn_tiktok(root, shape, ev, err);
    }

    json_decref(root);

    if (rc == GN_ERR) {
        return -1;
    }

    if (ev->event_id[0] == '\0') {
        gn_hash_id(ev);
    }

    return 0;
}

size_t
gift_event_pack(const gift_event_t *ev, int64_t received_at_ms, uint8_t *out,
    size_t cap)
{
    Gift__V1__GiftEvent  m = GIFT__V1__GIFT_EVENT__INIT;

    /* protobuf-c's fields are not const; pack only reads them */
    m.event_id = (char *) ev->event_id;
    m.platform = (char *) ev->platform;
    m.room_id = (char *) ev->room_id;
    m.user_id = (char *) ev->user_id;
    m.user_name = (char *) ev->user_name;
    m.gift_id = (char *) ev->gift_id;
    m.gift_name = (char *) ev->gift_name;
    m.diamond = ev->diamond;
    m.quantity = ev->quantity;
    m.occurred_at_ms = ev->occurred_at_ms;
    m.received_at_ms = received_at_ms;
    m.streak_id = (char *) ev->streak_id;
    m.streak_count = ev->streak_count;
    m.streak_end = ev->streak_end ? 1 : 0;

    if (gift__v1__gift_event__get_packed_size(&m) > cap) {
        return 0;
    }

    return gift__v1__gift_event__pack(&m, out);
}

/* Tag (1 byte: field numbers < 16) + length varint + bytes, per string;
 * tag + varint per number. */
#define GN_PB_STR(max)  (1 + ((max) < 128 ? 1 : 2) + (max))
#define GN_PB_U32       (1 + 5)
#define GN_PB_I64       (1 + 10)
#define GN_PB_BOOL      (1 + 1)

size_t
gift_event_packed_max(void)
{
    return GN_PB_STR(GIFT_ID_MAX)                /* event_id */
           + GN_PB_STR(GIFT_PLATFORM_MAX)        /* platform */
           + 6 * GN_PB_STR(GIFT_STR_MAX)         /* room, user id and
                                                    name, gift id and
                                                    name, streak_id */
           + 3 * GN_PB_U32                       /* diamond, quantity,
                                                    streak_count */
           + 2 * GN_PB_I64                       /* occurred, received */
           + GN_PB_BOOL;                         /* streak_end */
}
