/*
 * gift_kvkey: strings as NATS KV keys (see gift_kvkey.h).
 */
#include "gift_kvkey.h"

static const char hexd[] = "0123456789ABCDEF";

static int
plain(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
           || (c >= '0' && c <= '9') || c == '-' || c == '_';
}

int
gift_kvkey_encode(const char *s, char *out, size_t cap)
{
    const unsigned char *p = (const unsigned char *) s;
    size_t               o = 0;

    if (cap == 0) {
        return -1;
    }
    out[0] = '\0';
    if (*p == '\0') {
        return -1;
    }
    for (; *p; p++) {
        if (plain(*p)) {
            if (o + 1 >= cap) {
                out[0] = '\0';
                return -1;
            }
            out[o++] = (char) *p;
        } else {
            if (o + 3 >= cap) {
                out[0] = '\0';
                return -1;
            }
            out[o++] = '=';
            out[o++] = hexd[*p >> 4];
            out[o++] = hexd[*p & 0x0f];
        }
    }
    out[o] = '\0';
    return (int) o;
}

static int
hexval(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

int
gift_kvkey_decode(const char *key, char *out, size_t cap)
{
    size_t o = 0;
    int    hi, lo;

    for (; *key; key++) {
        if (o + 1 >= cap) {
            return -1;
        }
        if (*key != '=') {
            if (!plain((unsigned char) *key)) {
                return -1;
            }
            out[o++] = *key;
            continue;
        }
        if ((hi = hexval(key[1])) < 0 || (lo = hexval(key[2])) < 0) {
            return -1;
        }
        out[o++] = (char) (hi << 4 | lo);
        key += 2;
    }
    if (cap == 0) {
        return -1;
    }
    out[o] = '\0';
    return (int) o;
}
