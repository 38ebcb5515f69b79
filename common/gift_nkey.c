/*
 * NATS NKeys with OpenSSL's Ed25519.  The encoding (nats-io/nkeys): base32
 * (RFC 4648, no padding) of a prefix, the 32 key bytes and a CRC-16/XMODEM
 * of both, little-endian.  A seed has two prefix bytes: 'S' in the top five
 * bits of the first, the key's type in the next five.
 */

#include "gift_nkey.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/rand.h>


static const char  b32[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";


static uint16_t
crc16(const unsigned char *p, size_t len)
{
    uint16_t  crc = 0;
    int       i;

    while (len--) {
        crc ^= (uint16_t) (*p++ << 8);
        for (i = 0; i < 8; i++) {
            crc = (crc & 0x8000) ? (uint16_t) ((crc << 1) ^ 0x1021)
                                 : (uint16_t) (crc << 1);
        }
    }

    return crc;
}


static size_t
b32_encode(const unsigned char *in, size_t len, char *out)
{
    size_t    i, n = 0;
    unsigned  bits = 0, acc = 0;

    for (i = 0; i < len; i++) {
        acc = (acc << 8) | in[i];
        bits += 8;
        while (bits >= 5) {
            out[n++] = b32[(acc >> (bits - 5)) & 31];
            bits -= 5;
        }
    }
    if (bits) {
        out[n++] = b32[(acc << (5 - bits)) & 31];
    }
    out[n] = '\0';

    return n;
}


/* -1 on a character outside the alphabet */
static int
b32_decode(const char *in, size_t len, unsigned char *out, size_t max,
    size_t *n)
{
    size_t    i;
    unsigned  bits = 0, acc = 0;
    const char *c;

    *n = 0;
    for (i = 0; i < len; i++) {
        if (in[i] == '\0' || (c = strchr(b32, in[i])) == NULL) {
            return -1;
        }
        acc = (acc << 5) | (unsigned) (c - b32);
        bits += 5;
        if (bits >= 8) {
            if (*n == max) {
                return -1;
            }
            out[(*n)++] = (unsigned char) (acc >> (bits - 8));
            bits -= 8;
        }
    }

    return 0;
}


static int
derive_public(gift_nkey_t *k)
{
    unsigned char  raw[35];
    size_t         plen = 32;
    uint16_t       crc;
    EVP_PKEY      *pk;

    pk = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, k->seed, 32);
    if (pk == NULL) {
        return -1;
    }
    if (EVP_PKEY_get_raw_public_key(pk, k->pub, &plen) != 1 || plen != 32) {
        EVP_PKEY_free(pk);
        return -1;
    }
    EVP_PKEY_free(pk);

    raw[0] = (unsigned char) k->type;
    memcpy(raw + 1, k->pub, 32);
    crc = crc16(raw, 33);
    raw[33] = (unsigned char) (crc & 0xff);
    raw[34] = (unsigned char) (crc >> 8);
    b32_encode(raw, sizeof(raw), k->public_key);

    return 0;
}


int
gift_nkey_from_seed(const char *s, size_t len, gift_nkey_t *k,
    const char **err)
{
    unsigned char  raw[40];
    size_t         n;
    uint16_t       crc;

    if (len != GIFT_NKEY_SEED_LEN || b32_decode(s, len, raw, sizeof(raw), &n)
        || n != 36)
    {
        *err = "not an NKey seed (58 base32 characters)";
        return -1;
    }

    crc = crc16(raw, 34);
    if (raw[34] != (crc & 0xff) || raw[35] != (crc >> 8)) {
        *err = "the seed's checksum is wrong";
        return -1;
    }

    if ((raw[0] & 0xf8) != GIFT_NKEY_SEED) {
        *err = "not a seed (it must start with 'S')";
        return -1;
    }

    k->type = ((raw[0] & 7) << 5) | ((raw[1] & 0xf8) >> 3);
    if (k->type != GIFT_NKEY_USER && k->type != GIFT_NKEY_ACCOUNT
        && k->type != GIFT_NKEY_OPERATOR)
    {
        *err = "a seed of an unknown key type";
        return -1;
    }

    memcpy(k->seed, raw + 2, 32);
    OPENSSL_cleanse(raw, sizeof(raw));

    if (derive_public(k) != 0) {
        *err = "OpenSSL cannot make an Ed25519 key of it";
        return -1;
    }

    return 0;
}


int
gift_nkey_generate(int type, gift_nkey_t *k)
{
    k->type = type;

    if (RAND_bytes(k->seed, 32) != 1) {
        return -1;
    }

    return derive_public(k);
}


int
gift_nkey_encode_seed(const gift_nkey_t *k, char out[GIFT_NKEY_SEED_LEN + 1])
{
    unsigned char  raw[36];
    uint16_t       crc;

    raw[0] = (unsigned char) (GIFT_NKEY_SEED | (k->type >> 5));
    raw[1] = (unsigned char) ((k->type & 31) << 3);
    memcpy(raw + 2, k->seed, 32);
    crc = crc16(raw, 34);
    raw[34] = (unsigned char) (crc & 0xff);
    raw[35] = (unsigned char) (crc >> 8);
    b32_encode(raw, sizeof(raw), out);
    OPENSSL_cleanse(raw, sizeof(raw));

    return 0;
}


int
gift_nkey_sign(const gift_nkey_t *k, const unsigned char *msg, size_t len,
    unsigned char sig[64])
{
    int          rc = -1;
    size_t       slen = 64;
    EVP_PKEY    *pk;
    EVP_MD_CTX  *md;

    pk = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, k->seed, 32);
    md = EVP_MD_CTX_new();

    if (pk != NULL && md != NULL
        && EVP_DigestSignInit(md, NULL, NULL, NULL, pk) == 1
        && EVP_DigestSign(md, sig, &slen, msg, len) == 1 && slen == 64)
    {
        rc = 0;
    }

    EVP_MD_CTX_free(md);
    EVP_PKEY_free(pk);

    return rc;
}


size_t
gift_base64url(const unsigned char *in, size_t len, char *out)
{
    static const char  t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                             "0123456789-_";
    size_t    i, n = 0;
    uint32_t  v;

    for (i = 0; i + 2 < len; i += 3) {
        v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8 | in[i + 2];
        out[n++] = t[v >> 18];
        out[n++] = t[(v >> 12) & 63];
        out[n++] = t[(v >> 6) & 63];
        out[n++] = t[v & 63];
    }
    if (len - i == 1) {
        v = (uint32_t) in[i] << 16;
        out[n++] = t[v >> 18];
        out[n++] = t[(v >> 12) & 63];
    } else if (len - i == 2) {
        v = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8;
        out[n++] = t[v >> 18];
        out[n++] = t[(v >> 12) & 63];
        out[n++] = t[(v >> 6) & 63];
    }
    out[n] = '\0';

    return n;
}


static int
is_b32(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= '2' && c <= '7');
}


int
gift_nkey_find_seed(const char *text, size_t len, const char **seed,
    const char **err)
{
    size_t  i, j;

    for (i = 0; i + GIFT_NKEY_SEED_LEN <= len; i++) {
        if (text[i] != 'S' || (i > 0 && is_b32(text[i - 1]))) {
            continue;
        }
        for (j = i; j < len && is_b32(text[j]); j++) {
            /* void */
        }
        if (j - i == GIFT_NKEY_SEED_LEN) {
            *seed = text + i;
            return 0;
        }
        i = j;
    }

    *err = "no NKey seed in it (a line \"SU...\" of 58 characters)";
    return -1;
}


int
gift_nkey_find_jwt(const char *text, size_t len, const char **jwt,
    size_t *jwt_len, const char **err)
{
    const char  *p, *e, *s;

    e = text + len;
    for (p = text; p + 19 <= e; p++) {
        if (memcmp(p, "BEGIN NATS USER JWT", 19) == 0) {
            break;
        }
    }
    if (p + 19 > e) {
        *err = "no \"BEGIN NATS USER JWT\" in it";
        return -1;
    }

    /* the rest of that line, then the first line that is not empty */
    p = memchr(p, '\n', (size_t) (e - p));
    while (p != NULL && p < e && (*p == '\n' || *p == '\r' || *p == ' ')) {
        p++;
    }
    if (p == NULL || p == e) {
        *err = "the user JWT is missing";
        return -1;
    }

    for (s = p; s < e && *s != '\n' && *s != '\r' && *s != ' '; s++) {
        /* void */
    }

    if (s - p < 10 || *p == '-') {
        *err = "the user JWT is missing";
        return -1;
    }

    *jwt = p;
    *jwt_len = (size_t) (s - p);

    return 0;
}


int
gift_nkey_read_file(const char *file, gift_nkey_t *k, const char **err)
{
    char         buf[4096];
    size_t       n;
    FILE        *f;
    const char  *seed;

    f = fopen(file, "r");
    if (f == NULL) {
        *err = strerror(errno);
        return -1;
    }
    n = fread(buf, 1, sizeof(buf), f);
    fclose(f);

    if (gift_nkey_find_seed(buf, n, &seed, err) != 0
        || gift_nkey_from_seed(seed, GIFT_NKEY_SEED_LEN, k, err) != 0)
    {
        return -1;
    }
    return 0;
}
