/*
 * libFuzzer target: the X-Gift-Signature header parser and check.  The
 * input is split at the first NUL into header and body; a header that the
 * fuzzer makes valid for one of the secrets must verify.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gift_signature.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const gift_secret_t  secrets[2] = {
        { (const unsigned char *) "fuzz-secret-0123456789", 22 },
        { (const unsigned char *) "second-secret-abcdefgh", 22 },
    };
    const uint8_t  *nul, *body;
    size_t          hlen, blen;
    gift_sig_rc     rc;
    char            hdr[128];
    size_t          n;

    nul = memchr(data, 0, size);
    hlen = nul ? (size_t) (nul - data) : size;
    body = nul ? nul + 1 : data + size;
    blen = nul ? size - hlen - 1 : 0;

    rc = gift_signature_verify((const char *) data, hlen, body, blen,
                               secrets, 2, 1700000000, 300);
    if (rc != GIFT_SIG_OK && gift_sig_code(rc) == NULL) {
        abort();
    }

    /* a header we make ourselves must verify against the same body */
    n = gift_signature_make(&secrets[1], 1700000000, body, blen, hdr,
                            sizeof(hdr));
    if (n == 0 || gift_signature_verify(hdr, n, body, blen, secrets, 2,
                                        1700000000, 300) != GIFT_SIG_OK)
    {
        abort();
    }

    return 0;
}
