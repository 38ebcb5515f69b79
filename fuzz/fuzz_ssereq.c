/*
 * libFuzzer target: what a browser puts in an SSE or WebSocket request's
 * URL and headers.  The input is split at its first NUL: a query string
 * (?device=a,b&room=..&status=..&last_event_id=..), then a Last-Event-ID
 * header value.  Pairs and values must lie inside the input, an unescaped
 * value is never longer than its escaped form, and an event id is accepted
 * only as the number its digits say.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gift_ssereq.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int          rc;
    char        *out, check[32];
    size_t       klen, vlen, n;
    uint64_t     seq;
    const char  *in, *end, *nul, *p, *key, *val, *vp, *vend;

    in = (const char *) data;
    end = in + size;
    nul = memchr(in, '\0', size);
    if (nul == NULL) {
        nul = end;
    }

    out = malloc(size + 1);
    if (out == NULL) {
        return 0;
    }

    p = in;
    while (gift_query_next(&p, nul, &key, &klen, &val, &vlen)) {
        if (key < in || key + klen > nul || val < in || val + vlen > nul) {
            abort();
        }

        vp = val;
        vend = val + vlen;
        while ((n = gift_filter_next(&vp, vend, out)) != (size_t) -1) {
            if (n == 0 || n > vlen || vp > vend) {
                abort();
            }
        }

        if (klen == 13 && memcmp(key, "last_event_id", 13) == 0) {
            (void) gift_sse_event_id(val, vlen, &seq);
        }
    }

    if (nul < end) {
        rc = gift_sse_event_id(nul + 1, (size_t) (end - nul - 1), &seq);
        if (rc == 0) {
            /* the digits, and nothing but, say this number */
            snprintf(check, sizeof(check), "%llu", (unsigned long long) seq);
            n = (size_t) (end - nul - 1);
            vp = nul + 1;
            while (n > 1 && *vp == '0') {
                vp++;
                n--;
            }
            if (strlen(check) != n || memcmp(check, vp, n) != 0) {
                abort();
            }
        }
    }

    free(out);
    return 0;
}
