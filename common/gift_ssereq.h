/*
 * gift_ssereq: what an SSE or WebSocket request says in its URL and
 * headers, parsed without nginx so that it can be fuzzed: the query's
 * key=value pairs, the comma-separated, percent-escaped filter values
 * (?device=a,b&room=r&status=ok), and Last-Event-ID.
 */
#ifndef GIFT_SSEREQ_H
#define GIFT_SSEREQ_H

#include <stddef.h>
#include <stdint.h>

/*
 * A Last-Event-ID value (header or ?last_event_id=): 1 to 19 decimal
 * digits.  0 with *seq set; 1 when empty (absent); -1 when malformed.
 */
int gift_sse_event_id(const char *v, size_t len, uint64_t *seq);

/*
 * The next key=value pair of a query string at *p (up to end); pairs
 * without '=' are skipped.  1 with key/value set (raw, still escaped), 0 at
 * the end.  *p moves past the pair.
 */
int gift_query_next(const char **p, const char *end, const char **key,
    size_t *klen, const char **val, size_t *vlen);

/*
 * The next non-empty value of a comma-separated list at *p (up to end),
 * %XX-unescaped into out (which has room for end - *p bytes; a '%' not
 * followed by two hex digits stays as it is).  Returns its length, or
 * (size_t) -1 when no value is left.  *p moves past it.
 */
size_t gift_filter_next(const char **p, const char *end, char *out);

#endif /* GIFT_SSEREQ_H */
