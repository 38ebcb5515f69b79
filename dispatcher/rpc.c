/*
 * rpc.c: the MQTT side's data, with no I/O: topic templates, the request
 * payload, the reply, and RPC ids.  Unit-tested in tests/test_rpc.c.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "dispatcher.h"
#include "gift_json.h"

#define PH_N       "{n}"
#define PH_DEVICE  "{device}"

enum { PH_NONE = 0, PH_IS_N, PH_IS_DEVICE };

/* The placeholder at p (PH_IS_N, PH_IS_DEVICE) or PH_NONE; *len set to
 * its length. */
static int
placeholder(const char *p, size_t *len)
{
    if (strncmp(p, PH_N, sizeof(PH_N) - 1) == 0) {
        *len = sizeof(PH_N) - 1;
        return PH_IS_N;
    }
    if (strncmp(p, PH_DEVICE, sizeof(PH_DEVICE) - 1) == 0) {
        *len = sizeof(PH_DEVICE) - 1;
        return PH_IS_DEVICE;
    }
    return PH_NONE;
}

const char *
rpc_topic_check(const char *t, int need_n)
{
    const char *p;
    int         ph;
    size_t      len;
    int         nn = 0, nd = 0;

    if (t == NULL || t[0] == '\0') {
        return "must not be empty";
    }
    if (strlen(t) > 400) {
        return "is too long (400 bytes at most)";
    }
    for (p = t; *p; p++) {
        if (*p == '+' || *p == '#') {
            return "must not contain the wildcards + or #";
        }
        if (*p == '}') {
            return "has a '}' outside a placeholder ({n} or {device})";
        }
        if (*p != '{') {
            continue;
        }
        if ((ph = placeholder(p, &len)) == PH_NONE) {
            return "has an unknown placeholder (only {n} and {device})";
        }
        if ((p != t && p[-1] != '/') || (p[len] != '/' && p[len] != '\0')) {
            return "a placeholder must fill a whole topic level";
        }
        if (ph == PH_IS_N) {
            nn++;
        } else {
            nd++;
        }
        p += len - 1;
    }
    if (nn > 1 || nd > 1) {
        return "has a placeholder twice";
    }
    if (need_n && nn == 0) {
        return "must contain {n} (the RPC id)";
    }
    return NULL;
}

int
rpc_topic_expand(const char *t, uint64_t n, const char *device, char *out,
    size_t cap)
{
    size_t      o = 0, len;
    int         ph, w;

    for (; *t; t++) {
        if (*t == '{' && (ph = placeholder(t, &len)) != PH_NONE) {
            if (ph == PH_IS_N) {
                w = snprintf(out + o, cap - o, "%" PRIu64, n);
            } else {
                w = snprintf(out + o, cap - o, "%s", device ? device : "");
            }
            if (w < 0 || (size_t) w >= cap - o) {
                return -1;
            }
            o += (size_t) w;
            t += len - 1;
            continue;
        }
        if (o + 1 >= cap) {
            return -1;
        }
        out[o++] = *t;
    }
    if (o >= cap) {
        return -1;
    }
    out[o] = '\0';
    return (int) o;
}

int
rpc_topic_filter(const char *t, char *out, size_t cap)
{
    size_t o = 0, len;

    for (; *t; t++) {
        if (*t == '{' && placeholder(t, &len) != PH_NONE) {
            if (o + 1 >= cap) {
                return -1;
            }
            out[o++] = '+';
            t += len - 1;
            continue;
        }
        if (o + 1 >= cap) {
            return -1;
        }
        out[o++] = *t;
    }
    out[o] = '\0';
    return (int) o;
}

int
rpc_topic_match(const char *t, const char *topic, uint64_t *n)
{
    size_t      len;
    uint64_t    v;
    int         ph, got = 0;

    while (*t) {
        if (*t == '{' && (ph = placeholder(t, &len)) != PH_NONE) {
            if (ph == PH_IS_N) {
                if (*topic < '0' || *topic > '9') {
                    return -1;
                }
                for (v = 0; *topic >= '0' && *topic <= '9'; topic++) {
                    if (v > (UINT64_MAX - 9) / 10) {
                        return -1;
                    }
                    v = v * 10 + (uint64_t) (*topic - '0');
                }
                if (*topic != '/' && *topic != '\0') {
                    return -1;
                }
                *n = v;
                got = 1;
            } else {
                if (*topic == '/' || *topic == '\0') {
                    return -1;
                }
                while (*topic != '/' && *topic != '\0') {
                    topic++;
                }
            }
            t += len;
            continue;
        }
        if (*t != *topic) {
            return -1;
        }
        t++;
        topic++;
    }
    return (*topic == '\0' && got) ? 0 : -1;
}

size_t
rpc_payload_max(const char *method, const char *device,
    const drpc_event_t *ev, size_t nev)
{
    size_t i, n;

    /* every byte of a string may become \u00XX (6 bytes); 20 digits per
     * number; the fixed text is under 96 bytes */
    n = 96 + 6 * strlen(method) + 6 * strlen(device) + 20;
    for (i = 0; i < nev; i++) {
        n += 32 + 6 * strlen(ev[i].id) + 20;
    }
    return n;
}

size_t
rpc_payload_build(char *out, size_t cap, const char *method,
    const char *device, uint64_t rounds, const drpc_event_t *ev, size_t nev)
{
    size_t  len = 0, i;
    int     w;

#define LIT(s) do {                                                         \
        if (len + sizeof(s) - 1 >= cap) return 0;                           \
        memcpy(out + len, s, sizeof(s) - 1); len += sizeof(s) - 1;          \
    } while (0)
#define NUM(v) do {                                                         \
        w = snprintf(out + len, cap - len, "%" PRIu64, (uint64_t) (v));     \
        if (w < 0 || (size_t) w >= cap - len) return 0;                     \
        len += (size_t) w;                                                  \
    } while (0)
#define STR(s) do {                                                         \
        if (gift_json_str(out, cap, &len, (s)) != 0) return 0;              \
    } while (0)

    LIT("{\"method\":");
    STR(method);
    LIT(",\"params\":{\"deviceId\":");
    STR(device);
    LIT(",\"rounds\":");
    NUM(rounds);
    LIT(",\"events\":[");
    for (i = 0; i < nev; i++) {
        if (i > 0) {
            LIT(",");
        }
        LIT("{\"id\":");
        STR(ev[i].id);
        LIT(",\"rounds\":");
        NUM(ev[i].rounds);
        LIT("}");
    }
    LIT("]}}");
    if (len >= cap) {
        return 0;
    }
    out[len] = '\0';
    return len;

#undef LIT
#undef NUM
#undef STR
}

drpc_reply_rc
rpc_reply_parse(const char *payload, size_t len, char *err, size_t cap)
{
    json_t       *root, *ok, *e;
    json_error_t  jerr;
    drpc_reply_rc rc;

    if (cap > 0) {
        err[0] = '\0';
    }
    root = json_loadb(payload, len, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        snprintf(err, cap, "reply is not JSON: %s", jerr.text);
        return RPC_REPLY_MALFORMED;
    }
    if (!json_is_object(root)) {
        snprintf(err, cap, "reply is not a JSON object");
        json_decref(root);
        return RPC_REPLY_MALFORMED;
    }
    ok = json_object_get(root, "ok");
    if (json_is_true(ok)) {
        rc = RPC_REPLY_OK;
    } else if (json_is_false(ok)) {
        rc = RPC_REPLY_ERROR;
        e = json_object_get(root, "error");
        if (json_is_string(e)) {
            snprintf(err, cap, "%s", json_string_value(e));
        } else {
            snprintf(err, cap, "device error");
        }
    } else if (json_is_string(e = json_object_get(root, "error"))) {
        /* ThingsBoard's own failure shape, {"error":"TIMEOUT"} */
        rc = RPC_REPLY_ERROR;
        snprintf(err, cap, "%s", json_string_value(e));
    } else {
        snprintf(err, cap, "reply has no boolean \"ok\"");
        rc = RPC_REPLY_MALFORMED;
    }
    json_decref(root);
    return rc;
}

/*
 * The acknowledgement's reason for a failed reply: ThingsBoard's RPC
 * errors by name (the rule chain passes them on as the error text), the
 * rest "device_error".
 */
const char *
rpc_error_reason(const char *why)
{
    if (why != NULL && strcmp(why, "TIMEOUT") == 0) {
        return "device_timeout";          /* the motor got it, never answered */
    }
    if (why != NULL && strcmp(why, "NO_ACTIVE_CONNECTION") == 0) {
        return "device_offline";          /* the motor was not connected */
    }
    return "device_error";
}

/* Bytes one event adds to the request payload, at most (event ids are
 * [A-Za-z0-9._:-]: no escapes): {"id":"..","rounds":N} and a comma. */
size_t
rpc_event_bytes(const char *id)
{
    return strlen(id) + 42;
}

void
rpc_ids_init(drpc_ids_t *ids, int bits, int64_t instance_id, uint64_t seed)
{
    int      tag_bits;
    uint64_t x = seed;

    ids->counter_bits = bits == 63 ? 31 : 20;
    tag_bits = (bits == 63 ? 63 : 31) - ids->counter_bits;

    /* splitmix64: spread a seed (time, pid, urandom) over both parts */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    x ^= x >> 31;

    ids->tag = instance_id >= 0 ? (uint64_t) instance_id
                                : (x >> 32) & ((1ULL << tag_bits) - 1);
    ids->tag &= (1ULL << tag_bits) - 1;
    ids->counter = x & ((1ULL << ids->counter_bits) - 1);
}

uint64_t
rpc_ids_next(drpc_ids_t *ids)
{
    uint64_t mask = (1ULL << ids->counter_bits) - 1;
    uint64_t n = (ids->tag << ids->counter_bits) | (ids->counter & mask);

    ids->counter++;
    return n;
}
