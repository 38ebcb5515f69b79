/*
 * gift_signature: X-Gift-Signature, "t=<unix seconds>,v1=<hex>[,v1=<hex>...]"
 * where hex is HMAC-SHA256(secret, "<t>.<raw body>") in 64 hex digits (any
 * case).  The digits of t are MACed exactly as sent.
 *
 * Order of checks: the header's syntax, then the MAC, then the time.  A
 * stale or future request is "expired" only when it is authentic; one with
 * no valid MAC is "invalid" whatever its time, so that a caller without a
 * key learns nothing about our window, and a legitimate sender whose clock
 * is off gets a precise answer.
 *
 * The MAC runs over "<t>", "." and the body in place (EVP_MAC, OpenSSL 3),
 * without copying the body.  No global state: safe in any thread.
 */
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include "gift_signature.h"

#define GS_MAC_LEN    32         /* SHA-256 */
#define GS_HEX_LEN    (2 * GS_MAC_LEN)
#define GS_HDR_MAX    1024       /* longer headers are refused unparsed */
#define GS_V1_MAX     8          /* v1 entries per header */
#define GS_T_DIGITS   12         /* no overflow; 10 digits last until 2286 */

typedef struct {
    const char     *t;           /* the digits as sent */
    size_t          tlen;
    int64_t         tval;
    unsigned char   v1[GS_V1_MAX][GS_MAC_LEN];
    size_t          nv1;
} gs_header_t;


const char *
gift_sig_code(gift_sig_rc rc)
{
    switch (rc) {
    case GIFT_SIG_MISSING:
        return "signature_missing";
    case GIFT_SIG_INVALID:
        return "signature_invalid";
    case GIFT_SIG_EXPIRED:
        return "signature_expired";
    case GIFT_SIG_OK:
    default:
        return NULL;
    }
}

static int
gs_unhex(unsigned char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

static int
gs_is_ows(char c)
{
    return c == ' ' || c == '\t';
}

/*
 * Parse the header strictly: comma-separated key=value elements with
 * optional spaces around them; exactly one t (1-12 digits), 1 to GS_V1_MAX
 * v1 (64 hex digits each); other keys ([a-z0-9]+, e.g. a future v2) are
 * skipped.  Returns 0, or -1 when malformed.
 */
static int
gs_parse(const char *hdr, size_t hlen, gs_header_t *h)
{
    const char  *p, *end, *e, *eq, *k, *v;
    size_t       klen, vlen, i;
    int          hi, lo;

    h->t = NULL;
    h->tlen = 0;
    h->tval = 0;
    h->nv1 = 0;

    p = hdr;
    end = hdr + hlen;

    for ( ;; ) {
        e = memchr(p, ',', (size_t) (end - p));
        if (e == NULL) {
            e = end;
        }

        /* the element is [k, e) without its surrounding spaces */
        k = p;
        while (k < e && gs_is_ows(*k)) {
            k++;
        }
        while (e > k && gs_is_ows(e[-1])) {
            e--;
        }

        eq = memchr(k, '=', (size_t) (e - k));
        if (eq == NULL || eq == k) {
            return -1;                       /* empty element or no key */
        }
        klen = (size_t) (eq - k);
        v = eq + 1;
        vlen = (size_t) (e - v);

        if (klen == 1 && k[0] == 't') {
            if (h->t != NULL || vlen == 0 || vlen > GS_T_DIGITS) {
                return -1;
            }
            h->tval = 0;
            for (i = 0; i < vlen; i++) {
                if (v[i] < '0' || v[i] > '9') {
                    return -1;
                }
                h->tval = h->tval * 10 + (v[i] - '0');
            }
            h->t = v;
            h->tlen = vlen;

        } else if (klen == 2 && k[0] == 'v' && k[1] == '1') {
            if (vlen != GS_HEX_LEN || h->nv1 == GS_V1_MAX) {
                return -1;
            }
            for (i = 0; i < GS_MAC_LEN; i++) {
                hi = gs_unhex((unsigned char) v[2 * i]);
                lo = gs_unhex((unsigned char) v[2 * i + 1]);
                if (hi < 0 || lo < 0) {
                    return -1;
                }
                h->v1[h->nv1][i] = (unsigned char) (hi << 4 | lo);
            }
            h->nv1++;

        } else {
            for (i = 0; i < klen; i++) {
                if (!((k[i] >= 'a' && k[i] <= 'z')
                      || (k[i] >= '0' && k[i] <= '9')))
                {
                    return -1;
                }
            }
        }

        /* the comma we stopped at, if any, must be followed by an element */
        p = memchr(p, ',', (size_t) (end - p));
        if (p == NULL) {
            break;
        }
        p++;
    }

    return (h->t != NULL && h->nv1 > 0) ? 0 : -1;
}

/* HMAC-SHA256(key, "<t>.<body>") with a context the caller owns. */
static int
gs_mac(EVP_MAC_CTX *ctx, const gift_secret_t *key, const char *t,
    size_t tlen, const unsigned char *body, size_t blen,
    unsigned char out[GS_MAC_LEN])
{
    OSSL_PARAM  params[2];
    size_t      olen;

    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
                                                 (char *) "SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();

    if (EVP_MAC_init(ctx, key->data, key->len, params) != 1
        || EVP_MAC_update(ctx, (const unsigned char *) t, tlen) != 1
        || EVP_MAC_update(ctx, (const unsigned char *) ".", 1) != 1
        || (blen > 0 && EVP_MAC_update(ctx, body, blen) != 1)
        || EVP_MAC_final(ctx, out, &olen, GS_MAC_LEN) != 1
        || olen != GS_MAC_LEN)
    {
        return -1;
    }

    return 0;
}

/* A MAC context, or NULL (callers then fail closed). */
static EVP_MAC_CTX *
gs_ctx_new(void)
{
    EVP_MAC      *mac;
    EVP_MAC_CTX  *ctx;

    mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    if (mac == NULL) {
        return NULL;
    }
    ctx = EVP_MAC_CTX_new(mac);
    EVP_MAC_free(mac);                   /* the context keeps a reference */
    return ctx;
}

gift_sig_rc
gift_signature_verify(const char *hdr, size_t hlen,
    const unsigned char *body, size_t blen,
    const gift_secret_t *secrets, size_t nsecrets,
    time_t now, time_t window)
{
    return gift_signature_verify_skew(hdr, hlen, body, blen, secrets,
                                      nsecrets, now, window, window);
}

gift_sig_rc
gift_signature_verify_skew(const char *hdr, size_t hlen,
    const unsigned char *body, size_t blen,
    const gift_secret_t *secrets, size_t nsecrets,
    time_t now, time_t window, time_t skew)
{
    gs_header_t     h;
    EVP_MAC_CTX    *ctx;
    unsigned char   mac[GS_MAC_LEN];
    size_t          i, j;
    int             match;
    int64_t         age;

    if (hdr == NULL || hlen == 0) {
        return GIFT_SIG_MISSING;
    }
    if (hlen > GS_HDR_MAX || gs_parse(hdr, hlen, &h) != 0) {
        return GIFT_SIG_INVALID;
    }
    if (secrets == NULL || nsecrets == 0) {
        return GIFT_SIG_INVALID;
    }

    ctx = gs_ctx_new();
    if (ctx == NULL) {
        return GIFT_SIG_INVALID;
    }

    match = 0;
    for (i = 0; i < nsecrets && !match; i++) {
        /* an empty key would be a MAC anyone can compute */
        if (secrets[i].data == NULL || secrets[i].len == 0) {
            continue;
        }
        if (gs_mac(ctx, &secrets[i], h.t, h.tlen, body, blen, mac) != 0) {
            break;
        }
        for (j = 0; j < h.nv1; j++) {
            match |= (CRYPTO_memcmp(mac, h.v1[j], GS_MAC_LEN) == 0);
        }
    }

    EVP_MAC_CTX_free(ctx);
    OPENSSL_cleanse(mac, sizeof(mac));

    if (!match) {
        return GIFT_SIG_INVALID;
    }

    if (window < 0) {
        window = 0;
    }
    if (skew < 0) {
        skew = 0;
    }
    age = (int64_t) now - h.tval;
    if (age > (int64_t) window || age < -(int64_t) skew) {
        return GIFT_SIG_EXPIRED;
    }

    return GIFT_SIG_OK;
}

size_t
gift_signature_make(const gift_secret_t *secret, time_t t,
    const unsigned char *body, size_t blen, char *out, size_t cap)
{
    static const char  hex[] = "0123456789abcdef";
    EVP_MAC_CTX       *ctx;
    unsigned char      mac[GS_MAC_LEN];
    char               ts[24], *p, c;
    size_t             tlen, n, i;
    uint64_t           u;
    int                rc;

    if (t < 0 || secret == NULL || secret->data == NULL || secret->len == 0)
    {
        return 0;
    }

    /* the digits, written backwards then turned round */
    u = (uint64_t) t;
    tlen = 0;
    do {
        ts[tlen++] = (char) ('0' + u % 10);
        u /= 10;
    } while (u > 0);
    for (i = 0; i < tlen / 2; i++) {
        c = ts[i];
        ts[i] = ts[tlen - 1 - i];
        ts[tlen - 1 - i] = c;
    }

    n = 2 + tlen + 4 + GS_HEX_LEN;          /* "t=" t ",v1=" hex */
    if (cap < n + 1) {
        return 0;
    }

    ctx = gs_ctx_new();
    if (ctx == NULL) {
        return 0;
    }
    rc = gs_mac(ctx, secret, ts, tlen, body, blen, mac);
    EVP_MAC_CTX_free(ctx);
    if (rc != 0) {
        return 0;
    }

    p = out;
    memcpy(p, "t=", 2);
    p += 2;
    memcpy(p, ts, tlen);
    p += tlen;
    memcpy(p, ",v1=", 4);
    p += 4;
    for (i = 0; i < GS_MAC_LEN; i++) {
        *p++ = hex[mac[i] >> 4];
        *p++ = hex[mac[i] & 0x0f];
    }
    *p = '\0';

    return n;
}
