/*
 * gift_ssereq: query, filter and Last-Event-ID parsing (see the header).
 */
#include "gift_ssereq.h"

#include <string.h>

int
gift_sse_event_id(const char *v, size_t len, uint64_t *seq)
{
    size_t    i;
    uint64_t  n;

    if (len == 0) {
        return 1;
    }

    if (len > 19) {
        return -1;                      /* 19 digits fit in 64 bits */
    }

    n = 0;
    for (i = 0; i < len; i++) {
        if (v[i] < '0' || v[i] > '9') {
            return -1;
        }
        n = n * 10 + (uint64_t) (v[i] - '0');
    }

    *seq = n;
    return 0;
}

int
gift_query_next(const char **p, const char *end, const char **key,
    size_t *klen, const char **val, size_t *vlen)
{
    const char  *s, *amp, *eq;

    while (*p < end) {
        s = *p;
        amp = memchr(s, '&', (size_t) (end - s));
        if (amp == NULL) {
            amp = end;
        }
        *p = (amp < end) ? amp + 1 : end;

        eq = memchr(s, '=', (size_t) (amp - s));
        if (eq == NULL) {
            continue;
        }

        *key = s;
        *klen = (size_t) (eq - s);
        *val = eq + 1;
        *vlen = (size_t) (amp - eq - 1);
        return 1;
    }

    return 0;
}

static int
gift_hex(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    c = (char) (c | 0x20);
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

size_t
gift_filter_next(const char **p, const char *end, char *out)
{
    size_t       n;
    const char  *s, *comma;

    while (*p < end) {
        s = *p;
        comma = memchr(s, ',', (size_t) (end - s));
        if (comma == NULL) {
            comma = end;
        }
        *p = (comma < end) ? comma + 1 : end;

        if (comma == s) {
            continue;
        }

        n = 0;
        while (s < comma) {
            if (*s == '%' && comma - s >= 3 && gift_hex(s[1]) >= 0
                && gift_hex(s[2]) >= 0)
            {
                out[n++] = (char) (gift_hex(s[1]) << 4 | gift_hex(s[2]));
                s += 3;

            } else {
                out[n++] = *s++;
            }
        }

        return n;
    }

    return (size_t) -1;
}
