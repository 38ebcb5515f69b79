/*
 * gift_kvkey: any string -> a valid NATS KV key, reversibly.
 *
 * KV keys are subject tokens: [-/_=.A-Za-z0-9], and '.' splits tokens (a
 * key may not start or end with it, nor hold "..").  Event ids and streak
 * ids carry ':' (for example "tt:7312..." and "tiktok:123:5655:9"), so
 * they are escaped: A-Z a-z 0-9 '-' '_' stay as they are, every other
 * byte becomes "=XX" (two upper-case hex digits).  The encoding is
 * injective ('=' itself is escaped) and readable ("tt=3A7312..."), and
 * its output never holds '.', so callers may join encoded parts with '.'
 * ("s.<streak>", "e.<event>").
 */
#ifndef GIFT_KVKEY_H
#define GIFT_KVKEY_H

#include <stddef.h>

/* Room needed to encode a string of `len` bytes (NUL included). */
#define GIFT_KVKEY_SIZE(len)  (3 * (len) + 1)

/*
 * Encode `s` (NUL-terminated) into `out` (cap bytes, NUL-terminated).
 * Returns the length written, or -1 when `s` is empty or cap is too small
 * (out is then the empty string).
 */
int gift_kvkey_encode(const char *s, char *out, size_t cap);

/* Decode what gift_kvkey_encode() wrote.  Returns the length, or -1 on a
 * malformed escape or when cap is too small. */
int gift_kvkey_decode(const char *key, char *out, size_t cap);

#endif /* GIFT_KVKEY_H */
