/*
 * gift_signature: the X-Gift-Signature check of docs/design.md.
 *
 *   X-Gift-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>
 *
 * Several secrets may be configured (key rotation); any one may match.  The
 * comparison is constant time (CRYPTO_memcmp).  Secrets are never logged.
 */
#ifndef GIFT_SIGNATURE_H
#define GIFT_SIGNATURE_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

typedef struct {
    const unsigned char *data;
    size_t               len;
} gift_secret_t;

typedef enum {
    GIFT_SIG_OK = 0,
    GIFT_SIG_MISSING,     /* no header (hdr == NULL or empty) */
    GIFT_SIG_INVALID,     /* malformed header, or no secret matches */
    GIFT_SIG_EXPIRED      /* well-formed and matching, but |now - t| > window */
} gift_sig_rc;

/* The error code of docs/design.md for a result: "signature_missing" etc.;
 * NULL for OK. */
const char *gift_sig_code(gift_sig_rc rc);

/*
 * Check header `hdr` (`hlen` bytes, not NUL-terminated) against `body`.
 * A header may carry several v1= values (a sender signing with two keys
 * during rotation); it is valid when any v1 matches any secret.
 */
gift_sig_rc gift_signature_verify(const char *hdr, size_t hlen,
    const unsigned char *body, size_t blen,
    const gift_secret_t *secrets, size_t nsecrets,
    time_t now, time_t window);

/*
 * The same, with a separate bound into the future: valid when
 * now - window <= t <= now + skew.  A request is then replayable for at
 * most window + skew seconds after it was signed (gift_signature_verify()
 * is this with skew = window).
 */
gift_sig_rc gift_signature_verify_skew(const char *hdr, size_t hlen,
    const unsigned char *body, size_t blen,
    const gift_secret_t *secrets, size_t nsecrets,
    time_t now, time_t window, time_t skew);

/* Write the header value for (secret, t, body) into out (>= 100 bytes).
 * Used by tests, giftbench and the forwarder's C twin. Returns its length. */
size_t gift_signature_make(const gift_secret_t *secret, time_t t,
    const unsigned char *body, size_t blen, char *out, size_t cap);

#endif /* GIFT_SIGNATURE_H */
