/*
 * tbsim: ThingsBoard and its motors, simulated on a real MQTT broker.
 *
 * It answers the client-side RPCs that gift-dispatcher publishes on
 * v1/devices/me/rpc/request/<n> the way ThingsBoard's rule chain would
 * (the device's answer, {"ok":true} or {"ok":false,"error":...}, on
 * v1/devices/me/rpc/response/<n>), after a latency, with an error rate, and
 * with devices that never answer.  Like good firmware, each motor ignores
 * an event id it has already executed (a bounded window of recent ids).
 *
 * It counts per device the rounds executed, the RPCs received, the events
 * executed and ignored as duplicates, and writes them as JSON on SIGUSR1
 * and at exit, so that tests and benchmarks can check what the motors did:
 *   {"snapshot":S,"devices":{"motor_01":{"rounds":N,"rpcs":M,"events":K,
 *    "duplicates":D,"errors":E,"ignored":I,"max_cmd_rounds":X,"stops":P,
 *    "max_pending":Q,"max_minute_rounds":R}},
 *    "totals":{...}}
 * "duplicates" counts commands' events for ids already executed: tests
 * assert it (0 where exactly-once is promised).  "max_cmd_rounds" is the
 * largest command a motor got (the dispatcher's per-command limit);
 * "stops" counts the emergency "stop" method, which is always accepted.
 * "max_pending" is the most commands a device had received and not yet
 * answered at once (1: never two in flight); "max_minute_rounds" the most
 * rounds it executed within any 59 s (a rate limit kept, seen by the motor).
 *
 * One thread: ppoll() over the broker socket (libmosquitto driven with
 * mosquitto_loop_read/write/misc) and a timer heap of replies due, so
 * latency never serializes RPCs.
 *
 * At run time (tests bring a device back, or break one): with --control
 * FILE, SIGUSR2 makes it read FILE, one command a line:
 *   offline D1,D2     these devices stop answering
 *   online D1,D2      ... and answer again
 *   latency A[-B]     a new reply latency (ms)
 *   slow D1,D2=MS     these devices answer after MS ms (-1: the global)
 *   error-rate P      a new error rate
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <mosquitto.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "gift_util.h"

#define PROGRAM "tbsim"

/* ------------------------------------------------------------ options */

static struct {
    const char  *host;
    int          port;
    const char  *client_id;
    const char  *username;
    const char  *password;
    const char  *req_filter;
    const char  *resp_tmpl;
    const char  *method;
    int          qos;
    int          lat_min_ms, lat_max_ms;
    double       error_rate;
    char       **offline;
    size_t       noffline;
    uint64_t     seed;
    size_t       window;
    const char  *out;
    int          verbose;
    const char  *control;
} opt = {
    "127.0.0.1", 1883, NULL, NULL, NULL, "v1/devices/me/rpc/request/+",
    "v1/devices/me/rpc/response/{n}", "rotate", 1, 0, 0, 0.0, NULL, 0, 0,
    65536, NULL, 0, NULL
};

static volatile sig_atomic_t sig_term, sig_usr1, sig_usr2;

static void
on_signal(int sig)
{
    if (sig == SIGUSR1) {
        sig_usr1 = 1;
    } else if (sig == SIGUSR2) {
        sig_usr2 = 1;
    } else {
        sig_term = 1;
    }
}

/* xorshift64*: reproducible with --seed */
static uint64_t rng_state;

static uint64_t
rng(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static double
rng_unit(void)
{
    return (double) (rng() >> 11) / 9007199254740992.0;
}

/* ------------------------------------------------------------ devices */

typedef struct idnode {
    char           *id;
    uint64_t        h;
    struct idnode  *next;         /* bucket chain */
} idnode_t;

typedef struct {
    char        *name;
    uint64_t     rounds, rpcs, events, duplicates, errors, ignored;
    uint64_t     max_cmd_rounds;  /* the largest command's rounds */
    uint64_t     stops;           /* "stop" commands (emergency stop) */
    uint64_t     pending;         /* commands received, not yet answered */
    uint64_t     max_pending;     /* the most at once: 1 when the
                                     dispatchers keep one in flight */
    /* rounds executed in the last MINUTE_US, as a ring of (time, rounds) */
    int64_t     *mt;
    uint64_t    *mr;
    size_t       mcap, mhead, mn;
    uint64_t     msum, max_minute;
    int          slow_ms;         /* its own reply latency; -1: --latency-ms */
    int          offline;
    /* the dedup window: a ring of the last `window` ids, and a hash */
    idnode_t   **ring;
    size_t       ring_head, ring_n;
    idnode_t   **bucket;
    size_t       nbucket;
} device_t;

static device_t  **devices;
static size_t      ndevices, devcap;

static uint64_t
hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ULL;

    for (; *s; s++) {
        h = (h ^ (unsigned char) *s) * 1099511628211ULL;
    }
    return h;
}

static device_t *
device_get(const char *name)
{
    device_t *d;
    size_t    i, nb;

    for (i = 0; i < ndevices; i++) {          /* tens of devices: a scan */
        if (strcmp(devices[i]->name, name) == 0) {
            return devices[i];
        }
    }
    if (ndevices == devcap) {
        size_t     cap = devcap ? devcap * 2 : 16;
        device_t **p = realloc(devices, cap * sizeof(*p));

        if (p == NULL) {
            return NULL;
        }
        devices = p;
        devcap = cap;
    }
    d = calloc(1, sizeof(*d));
    if (d == NULL) {
        return NULL;
    }
    for (nb = 16; nb < opt.window; nb <<= 1) {
    }
    d->name = strdup(name);
    d->slow_ms = -1;
    d->ring = calloc(opt.window, sizeof(idnode_t *));
    d->bucket = calloc(nb, sizeof(idnode_t *));
    d->nbucket = nb;
    if (d->name == NULL || d->ring == NULL || d->bucket == NULL) {
        free(d->name);
        free(d->ring);
        free(d->bucket);
        free(d);
        return NULL;
    }
    for (i = 0; i < opt.noffline; i++) {
        if (strcmp(opt.offline[i], name) == 0) {
            d->offline = 1;
        }
    }
    devices[ndevices++] = d;
    return d;
}

static int
window_has(device_t *d, const char *id, uint64_t h)
{
    idnode_t *n;

    for (n = d->bucket[h & (d->nbucket - 1)]; n != NULL; n = n->next) {
        if (n->h == h && strcmp(n->id, id) == 0) {
            return 1;
        }
    }
    return 0;
}

static void
window_add(device_t *d, const char *id, uint64_t h)
{
    idnode_t  *n, **pp;
    size_t     slot;

    if (opt.window == 0) {
        return;
    }
    slot = (d->ring_head + d->ring_n) % opt.window;
    if (d->ring_n == opt.window) {
        /* evict the oldest */
        n = d->ring[d->ring_head];
        for (pp = &d->bucket[n->h & (d->nbucket - 1)]; *pp != n;
             pp = &(*pp)->next)
        {
        }
        *pp = n->next;
        free(n->id);
        free(n);
        slot = d->ring_head;
        d->ring_head = (d->ring_head + 1) % opt.window;
        d->ring_n--;
    }
    n = malloc(sizeof(*n));
    if (n == NULL || (n->id = strdup(id)) == NULL) {
        free(n);
        return;
    }
    n->h = h;
    n->next = d->bucket[h & (d->nbucket - 1)];
    d->bucket[h & (d->nbucket - 1)] = n;
    d->ring[slot] = n;
    d->ring_n++;
}

static void
device_free(device_t *d)
{
    size_t i;

    free(d->mt);
    free(d->mr);
    for (i = 0; i < d->ring_n; i++) {
        idnode_t *n = d->ring[(d->ring_head + i) % opt.window];

        free(n->id);
        free(n);
    }
    free(d->ring);
    free(d->bucket);
    free(d->name);
    free(d);
}

/* ------------------------------------------------------------ control */

static int parse_latency(const char *s);

/* SIGUSR2: apply the commands of the --control file (see the top). */
static void
read_control(void)
{
    FILE     *f;
    char      line[4096], *cmd, *arg, *tok, *save;
    device_t *d;

    if (opt.control == NULL || (f = fopen(opt.control, "r")) == NULL) {
        gift_log(GIFT_LOG_WARN, "control file %s: %s",
                 opt.control ? opt.control : "(none: --control)",
                 strerror(errno));
        return;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        cmd = strtok_r(line, " \t\r\n", &save);
        arg = cmd ? strtok_r(NULL, " \t\r\n", &save) : NULL;
        if (cmd == NULL || cmd[0] == '#') {
            continue;
        }
        if (arg == NULL) {
            gift_log(GIFT_LOG_WARN, "control: %s needs an argument", cmd);
            continue;
        }
        if (strcmp(cmd, "offline") == 0 || strcmp(cmd, "online") == 0) {
            char *s2 = NULL;

            for (tok = strtok_r(arg, ",", &s2); tok;
                 tok = strtok_r(NULL, ",", &s2))
            {
                if ((d = device_get(tok)) != NULL) {
                    d->offline = cmd[1] == 'f';
                    gift_log(GIFT_LOG_INFO, "device %s is %s", d->name, cmd);
                }
            }
        } else if (strcmp(cmd, "slow") == 0 && strchr(arg, '=') != NULL) {
            char *eq = strchr(arg, '='), *s2 = NULL;
            int   ms = atoi(eq + 1);

            *eq = '\0';
            for (tok = strtok_r(arg, ",", &s2); tok;
                 tok = strtok_r(NULL, ",", &s2))
            {
                if ((d = device_get(tok)) != NULL) {
                    d->slow_ms = ms;
                    gift_log(GIFT_LOG_INFO, "device %s: latency %d ms",
                             d->name, ms);
                }
            }
        } else if (strcmp(cmd, "latency") == 0) {
            if (parse_latency(arg) == 0) {
                gift_log(GIFT_LOG_INFO, "latency %d-%d ms", opt.lat_min_ms,
                         opt.lat_max_ms);
            }
        } else if (strcmp(cmd, "error-rate") == 0) {
            double p = strtod(arg, NULL);

            if (p >= 0 && p <= 1) {
                opt.error_rate = p;
                gift_log(GIFT_LOG_INFO, "error rate %.3f", p);
            }
        } else {
            gift_log(GIFT_LOG_WARN, "control: unknown command %s", cmd);
        }
    }
    fclose(f);
}

/* ------------------------------------------------------------ replies */

typedef struct {
    int64_t   due_us;
    uint64_t  order;              /* FIFO among equal deadlines */
    char     *topic;
    char     *payload;
    device_t *dev;                /* its pending count drops when sent */
} reply_t;

static reply_t  *heap;
static size_t    nheap, heapcap;
static uint64_t  reply_order;

static int
reply_before(const reply_t *a, const reply_t *b)
{
    return a->due_us < b->due_us
           || (a->due_us == b->due_us && a->order < b->order);
}

static int
heap_push(reply_t r)
{
    size_t i;

    if (nheap == heapcap) {
        size_t   cap = heapcap ? heapcap * 2 : 1024;
        reply_t *p = realloc(heap, cap * sizeof(*p));

        if (p == NULL) {
            return -1;
        }
        heap = p;
        heapcap = cap;
    }
    r.order = reply_order++;
    for (i = nheap++; i > 0 && reply_before(&r, &heap[(i - 1) / 2]);
         i = (i - 1) / 2)
    {
        heap[i] = heap[(i - 1) / 2];
    }
    heap[i] = r;
    return 0;
}

static reply_t
heap_pop(void)
{
    reply_t top = heap[0], last = heap[--nheap];
    size_t  i = 0, c;

    for (;;) {
        c = 2 * i + 1;
        if (c >= nheap) {
            break;
        }
        if (c + 1 < nheap && reply_before(&heap[c + 1], &heap[c])) {
            c++;
        }
        if (!reply_before(&heap[c], &last)) {
            break;
        }
        heap[i] = heap[c];
        i = c;
    }
    if (nheap > 0) {
        heap[i] = last;
    }
    return top;
}

/* ------------------------------------------------------------ output */

static uint64_t snapshot;

static void
write_totals(void)
{
    char     tmp[4096];
    FILE    *f;
    size_t   i;
    uint64_t t[6] = { 0, 0, 0, 0, 0, 0 };

    if (opt.out == NULL) {
        f = stdout;
    } else {
        snprintf(tmp, sizeof(tmp), "%s.tmp", opt.out);
        if ((f = fopen(tmp, "w")) == NULL) {
            gift_log(GIFT_LOG_ERR, "%s: %s", tmp, strerror(errno));
            return;
        }
    }
    snapshot++;
    fprintf(f, "{\"snapshot\":%" PRIu64 ",\"pid\":%ld,\"devices\":{", snapshot,
            (long) getpid());
    for (i = 0; i < ndevices; i++) {
        device_t *d = devices[i];

        /* device ids come from JSON strings: escape what JSON needs */
        fputs(i ? ",\"" : "\"", f);
        for (const char *p = d->name; *p; p++) {
            if (*p == '"' || *p == '\\') {
                fputc('\\', f);
            }
            if ((unsigned char) *p < 0x20) {
                fprintf(f, "\\u%04x", *p);
            } else {
                fputc(*p, f);
            }
        }
        fprintf(f, "\":{\"rounds\":%" PRIu64 ",\"rpcs\":%" PRIu64
                ",\"events\":%" PRIu64 ",\"duplicates\":%" PRIu64
                ",\"errors\":%" PRIu64 ",\"ignored\":%" PRIu64
                ",\"max_cmd_rounds\":%" PRIu64 ",\"stops\":%" PRIu64
                ",\"max_pending\":%" PRIu64 ",\"max_minute_rounds\":%"
                PRIu64 "}",
                d->rounds, d->rpcs, d->events, d->duplicates, d->errors,
                d->ignored, d->max_cmd_rounds, d->stops, d->max_pending,
                d->max_minute);
        t[0] += d->rounds;
        t[1] += d->rpcs;
        t[2] += d->events;
        t[3] += d->duplicates;
        t[4] += d->errors;
        t[5] += d->ignored;
    }
    fprintf(f, "},\"totals\":{\"rounds\":%" PRIu64 ",\"rpcs\":%" PRIu64
            ",\"events\":%" PRIu64 ",\"duplicates\":%" PRIu64 ",\"errors\":%"
            PRIu64 ",\"ignored\":%" PRIu64 "}}\n", t[0], t[1], t[2], t[3],
            t[4], t[5]);
    if (f == stdout) {
        fflush(f);
        return;
    }
    if (fclose(f) != 0 || rename(tmp, opt.out) != 0) {
        gift_log(GIFT_LOG_ERR, "%s: %s", opt.out, strerror(errno));
    }
}

/* ------------------------------------------------------------ MQTT */

static struct mosquitto *mosq;
static int               connected, connecting;
static int64_t           reconnect_at_us;
static int               backoff_ms = 100;

/* The RPC id: the last level of the request topic. */
static const char *
rpc_id(const char *topic)
{
    const char *s = strrchr(topic, '/');

    return s ? s + 1 : topic;
}

static int
response_topic(const char *id, const char *device, char *out, size_t cap)
{
    const char *t = opt.resp_tmpl;
    size_t      o = 0;
    int         w;

    while (*t) {
        if (strncmp(t, "{n}", 3) == 0 || strncmp(t, "{device}", 8) == 0) {
            int is_n = t[1] == 'n';

            w = snprintf(out + o, cap - o, "%s", is_n ? id : device);
            if (w < 0 || (size_t) w >= cap - o) {
                return -1;
            }
            o += (size_t) w;
            t += is_n ? 3 : 8;
            continue;
        }
        if (o + 1 >= cap) {
            return -1;
        }
        out[o++] = *t++;
    }
    out[o] = '\0';
    return 0;
}

static void
schedule_reply(const char *id, const char *device, const char *payload)
{
    reply_t r = { 0, 0, NULL, NULL, NULL };
    char    topic[512];
    int64_t lat = opt.lat_min_ms;
    device_t *d = strcmp(device, "me") ? device_get(device) : NULL;

    if (response_topic(id, device, topic, sizeof(topic)) != 0) {
        return;
    }
    if (d != NULL && d->slow_ms >= 0) {
        lat = d->slow_ms;
    } else if (opt.lat_max_ms > opt.lat_min_ms) {
        lat += (int64_t) (rng() % (uint64_t) (opt.lat_max_ms
                                               - opt.lat_min_ms + 1));
    }
    if (d != NULL && ++d->pending > d->max_pending) {
        d->max_pending = d->pending;
    }
    if (lat == 0) {
        mosquitto_publish(mosq, NULL, topic, (int) strlen(payload), payload,
                          opt.qos, false);
        if (d != NULL) {
            d->pending--;
        }
        return;
    }
    r.dev = d;
    r.due_us = gift_mono_us() + lat * 1000;
    r.topic = strdup(topic);
    r.payload = strdup(payload);
    if (r.topic == NULL || r.payload == NULL || heap_push(r) != 0) {
        free(r.topic);
        free(r.payload);
        if (d != NULL) {
            d->pending--;
        }
    }
}

/*
 * The most rounds executed within any MINUTE_US: 59 s, a second short of
 * the dispatchers' sliding minute, so that delivery jitter between their
 * send and our receipt never shows a limit kept as exceeded.
 */
#define MINUTE_US  59000000LL

static void
minute_add(device_t *d, uint64_t rounds)
{
    int64_t now = gift_mono_us();

    while (d->mn > 0 && d->mt[d->mhead] <= now - MINUTE_US) {
        d->msum -= d->mr[d->mhead];
        d->mhead = (d->mhead + 1) % d->mcap;
        d->mn--;
    }
    if (d->mn == d->mcap) {
        size_t    cap = d->mcap ? d->mcap * 2 : 64, i;
        int64_t  *t = malloc(cap * sizeof(*t));
        uint64_t *r = malloc(cap * sizeof(*r));

        if (t == NULL || r == NULL) {
            free(t);
            free(r);
            return;
        }
        for (i = 0; i < d->mn; i++) {
            t[i] = d->mt[(d->mhead + i) % d->mcap];
            r[i] = d->mr[(d->mhead + i) % d->mcap];
        }
        free(d->mt);
        free(d->mr);
        d->mt = t;
        d->mr = r;
        d->mcap = cap;
        d->mhead = 0;
    }
    d->mt[(d->mhead + d->mn) % d->mcap] = now;
    d->mr[(d->mhead + d->mn) % d->mcap] = rounds;
    d->mn++;
    d->msum += rounds;
    if (d->msum > d->max_minute) {
        d->max_minute = d->msum;
    }
}

static void
on_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg)
{
    json_t       *root, *params, *dev, *events, *ev, *idv, *rv;
    json_error_t  jerr;
    const char   *id = rpc_id(msg->topic);
    const char   *method;
    device_t     *d;
    size_t        i;
    uint64_t      rounds = 0;
    char          err[200];

    (void) m;
    (void) obj;
    root = json_loadb(msg->payload ? msg->payload : "", (size_t) msg->payloadlen,
                      0, &jerr);
    params = root ? json_object_get(root, "params") : NULL;
    dev = params ? json_object_get(params, "deviceId") : NULL;
    if (root == NULL || !json_is_string(dev)) {
        /* ThingsBoard would not route it: answer for "me" */
        snprintf(err, sizeof(err), "{\"ok\":false,\"error\":\"bad request\"}");
        schedule_reply(id, "me", err);
        json_decref(root);
        return;
    }
    d = device_get(json_string_value(dev));
    if (d == NULL) {
        json_decref(root);
        return;
    }
    d->rpcs++;
    method = json_string_value(json_object_get(root, "method"));
    if (d->offline) {
        d->ignored++;
        json_decref(root);
        return;
    }
    if (method != NULL && strcmp(method, "stop") == 0) {
        /* the emergency stop of the firmware contract: accepted at once */
        d->stops++;
        gift_log(GIFT_LOG_INFO, "device %s: stop", d->name);
        schedule_reply(id, d->name, "{\"ok\":true}");
        json_decref(root);
        return;
    }
    if (method == NULL || strcmp(method, opt.method) != 0) {
        d->errors++;
        schedule_reply(id, d->name,
                       "{\"ok\":false,\"error\":\"unknown method\"}");
        json_decref(root);
        return;
    }
    if (opt.error_rate > 0 && rng_unit() < opt.error_rate) {
        d->errors++;
        schedule_reply(id, d->name,
                       "{\"ok\":false,\"error\":\"simulated failure\"}");
        json_decref(root);
        return;
    }

    events = json_object_get(params, "events");
    if (json_is_array(events) && json_array_size(events) > 0) {
        json_array_foreach(events, i, ev) {
            const char *eid;
            uint64_t    h;

            idv = json_object_get(ev, "id");
            rv = json_object_get(ev, "rounds");
            if (!json_is_string(idv) || !json_is_integer(rv)
                || json_integer_value(rv) < 0)
            {
                continue;
            }
            eid = json_string_value(idv);
            h = hash_str(eid);
            if (window_has(d, eid, h)) {
                /* named, so that a test that finds repeats can say which */
                d->duplicates++;
                gift_log(GIFT_LOG_INFO, "device %s: event %s repeated "
                         "(executed already)", d->name, eid);
                continue;
            }
            window_add(d, eid, h);
            d->events++;
            rounds += (uint64_t) json_integer_value(rv);
        }
    } else {
        rv = json_object_get(params, "rounds");
        if (json_is_integer(rv) && json_integer_value(rv) > 0) {
            rounds = (uint64_t) json_integer_value(rv);
        }
        d->events++;
    }
    d->rounds += rounds;
    if (rounds > 0) {
        minute_add(d, rounds);
    }
    {
        /* what the command asked for, duplicates included */
        json_t  *pr = json_object_get(params, "rounds");
        uint64_t asked = json_is_integer(pr) && json_integer_value(pr) > 0
                         ? (uint64_t) json_integer_value(pr) : rounds;

        if (asked > d->max_cmd_rounds) {
            d->max_cmd_rounds = asked;
        }
    }
    if (opt.verbose) {
        gift_log(GIFT_LOG_DEBUG, "rpc %s %s: +%" PRIu64 " rounds (total %"
                 PRIu64 ")", id, d->name, rounds, d->rounds);
    }
    schedule_reply(id, d->name, "{\"ok\":true}");
    json_decref(root);
}

static void
on_connect(struct mosquitto *m, void *obj, int rc)
{
    (void) obj;
    if (rc != 0) {
        gift_log(GIFT_LOG_ERR, "broker refused: %s", mosquitto_connack_string(rc));
        return;
    }
    connected = 1;
    backoff_ms = 100;
    mosquitto_subscribe(m, NULL, opt.req_filter, opt.qos);
    gift_log(GIFT_LOG_INFO, "connected to %s:%d; serving %s", opt.host,
             opt.port, opt.req_filter);
}

static void
on_disconnect(struct mosquitto *m, void *obj, int rc)
{
    (void) m;
    (void) obj;
    connected = 0;
    connecting = 0;
    if (rc != 0 && !sig_term) {
        gift_log(GIFT_LOG_WARN, "connection lost (%s); reconnecting",
                 mosquitto_strerror(rc));
    }
    reconnect_at_us = gift_mono_us() + (int64_t) backoff_ms * 1000;
    backoff_ms = backoff_ms * 2 > 2000 ? 2000 : backoff_ms * 2;
}

static void
try_connect(void)
{
    int rc;

    if (connecting || gift_mono_us() < reconnect_at_us) {
        return;
    }
    rc = mosquitto_connect_async(mosq, opt.host, opt.port, 30);
    if (rc != MOSQ_ERR_SUCCESS) {
        gift_log(GIFT_LOG_WARN, "cannot connect to %s:%d: %s", opt.host,
                 opt.port, rc == MOSQ_ERR_ERRNO ? strerror(errno)
                                                : mosquitto_strerror(rc));
        reconnect_at_us = gift_mono_us() + (int64_t) backoff_ms * 1000;
        backoff_ms = backoff_ms * 2 > 2000 ? 2000 : backoff_ms * 2;
        return;
    }
    connecting = 1;
}

/* ------------------------------------------------------------ main */

static int
parse_latency(const char *s)
{
    char *end;
    long  a, b;

    a = strtol(s, &end, 10);
    b = a;
    if (*end == '-') {
        b = strtol(end + 1, &end, 10);
    }
    if (*end != '\0' || a < 0 || b < a || b > 600000) {
        return -1;
    }
    opt.lat_min_ms = (int) a;
    opt.lat_max_ms = (int) b;
    return 0;
}

static int
parse_offline(char *s)
{
    char *tok, *save = NULL;

    for (tok = strtok_r(s, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char **p = realloc(opt.offline, (opt.noffline + 1) * sizeof(char *));

        if (p == NULL) {
            return -1;
        }
        opt.offline = p;
        opt.offline[opt.noffline++] = tok;
    }
    return 0;
}

static void
usage(FILE *f)
{
    fprintf(f,
        "usage: " PROGRAM " [options]\n"
        "  --host HOST            broker (127.0.0.1)\n"
        "  --port PORT            broker port (1883)\n"
        "  --client-id ID         (tbsim-<pid>)\n"
        "  --username U --password P   broker credentials\n"
        "  --request-topic F      filter of requests (v1/devices/me/rpc/request/+);\n"
        "                         the last level is the RPC id <n>\n"
        "  --response-topic T     reply template with {n} and {device}\n"
        "                         (v1/devices/me/rpc/response/{n})\n"
        "  --method M             the method devices accept (rotate)\n"
        "  --qos 0|1              subscription and replies (1)\n"
        "  --latency-ms A[-B]     reply after A ms, or uniformly A..B ms (0)\n"
        "  --error-rate P         answer {\"ok\":false} with probability P (0)\n"
        "  --offline D1,D2        devices that never answer\n"
        "  --seed N               random seed (time and pid)\n"
        "  --window N             event ids remembered per device (65536)\n"
        "  --out FILE             totals as JSON on SIGUSR1 and at exit (stdout)\n"
        "  --control FILE         on SIGUSR2 apply FILE's lines: offline D1,D2 |\n"
        "                         online D1,D2 | latency A[-B] | error-rate P\n"
        "  -v                     log every RPC\n");
}

int
main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "host", required_argument, NULL, 'H' },
        { "port", required_argument, NULL, 'p' },
        { "client-id", required_argument, NULL, 'i' },
        { "username", required_argument, NULL, 'u' },
        { "password", required_argument, NULL, 'P' },
        { "request-topic", required_argument, NULL, 'R' },
        { "response-topic", required_argument, NULL, 'S' },
        { "method", required_argument, NULL, 'm' },
        { "qos", required_argument, NULL, 'q' },
        { "latency-ms", required_argument, NULL, 'l' },
        { "error-rate", required_argument, NULL, 'e' },
        { "offline", required_argument, NULL, 'o' },
        { "seed", required_argument, NULL, 's' },
        { "window", required_argument, NULL, 'w' },
        { "out", required_argument, NULL, 'O' },
        { "control", required_argument, NULL, 'C' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 }
    };
    struct sigaction  sa;
    sigset_t          block, unblocked;
    struct pollfd     pfd;
    struct timespec   ts;
    char              cid[64];
    int               c, fd, rc;
    int64_t           now, wait_us, next_misc = 0;
    size_t            i;

    gift_log_set_program(PROGRAM);
    rng_state = (uint64_t) time(NULL) ^ ((uint64_t) getpid() << 20);
    while ((c = getopt_long(argc, argv, "vh", lo, NULL)) != -1) {
        switch (c) {
        case 'H': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'i': opt.client_id = optarg; break;
        case 'u': opt.username = optarg; break;
        case 'P': opt.password = optarg; break;
        case 'R': opt.req_filter = optarg; break;
        case 'S': opt.resp_tmpl = optarg; break;
        case 'm': opt.method = optarg; break;
        case 'q': opt.qos = atoi(optarg) ? 1 : 0; break;
        case 'l':
            if (parse_latency(optarg) != 0) {
                fprintf(stderr, PROGRAM ": bad --latency-ms %s\n", optarg);
                return 2;
            }
            break;
        case 'e':
            opt.error_rate = strtod(optarg, NULL);
            if (opt.error_rate < 0 || opt.error_rate > 1) {
                fprintf(stderr, PROGRAM ": --error-rate is 0..1\n");
                return 2;
            }
            break;
        case 'o':
            if (parse_offline(optarg) != 0) {
                return 1;
            }
            break;
        case 's': rng_state = strtoull(optarg, NULL, 10); break;
        case 'w': opt.window = (size_t) strtoull(optarg, NULL, 10); break;
        case 'O': opt.out = optarg; break;
        case 'C': opt.control = optarg; break;
        case 'v': opt.verbose = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (opt.port <= 0 || opt.port > 65535) {
        fprintf(stderr, PROGRAM ": bad --port\n");
        return 2;
    }
    if (rng_state == 0) {
        rng_state = 0x9e3779b97f4a7c15ULL;
    }
    if (opt.verbose) {
        gift_log_set_level(GIFT_LOG_DEBUG);
    }

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGUSR2);
    sigprocmask(SIG_BLOCK, &block, &unblocked);
    sigdelset(&unblocked, SIGTERM);
    sigdelset(&unblocked, SIGINT);
    sigdelset(&unblocked, SIGUSR1);
    sigdelset(&unblocked, SIGUSR2);

    mosquitto_lib_init();
    if (opt.client_id == NULL) {
        snprintf(cid, sizeof(cid), "tbsim-%ld", (long) getpid());
        opt.client_id = cid;
    }
    mosq = mosquitto_new(opt.client_id, true, NULL);
    if (mosq == NULL) {
        gift_log(GIFT_LOG_ERR, "mosquitto_new: %s", strerror(errno));
        return 1;
    }
    mosquitto_int_option(mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
    mosquitto_int_option(mosq, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_int_option(mosq, MOSQ_OPT_SEND_MAXIMUM, 65535);
    if (opt.username) {
        mosquitto_username_pw_set(mosq, opt.username, opt.password);
    }
    mosquitto_connect_callback_set(mosq, on_connect);
    mosquitto_disconnect_callback_set(mosq, on_disconnect);
    mosquitto_message_callback_set(mosq, on_message);
    gift_log(GIFT_LOG_INFO, "latency %d-%d ms, error rate %.3f, %zu offline "
             "devices, window %zu", opt.lat_min_ms, opt.lat_max_ms,
             opt.error_rate, opt.noffline, opt.window);

    while (!sig_term) {
        now = gift_mono_us();
        if (sig_usr2) {
            sig_usr2 = 0;
            read_control();
        }
        if (sig_usr1) {
            sig_usr1 = 0;
            write_totals();
        }
        /* replies due */
        while (nheap > 0 && heap[0].due_us <= now) {
            reply_t r = heap_pop();

            if (connected) {
                mosquitto_publish(mosq, NULL, r.topic, (int) strlen(r.payload),
                                  r.payload, opt.qos, false);
            }
            if (r.dev != NULL) {
                r.dev->pending--;
            }
            free(r.topic);
            free(r.payload);
        }
        if (mosquitto_socket(mosq) < 0) {
            connecting = 0;
            try_connect();
        } else if (now >= next_misc) {
            mosquitto_loop_misc(mosq);
            next_misc = now + 1000000;
        }

        wait_us = 1000000;
        if (nheap > 0 && heap[0].due_us - now < wait_us) {
            wait_us = heap[0].due_us - now;
        }
        if (!connecting && reconnect_at_us - now < wait_us) {
            wait_us = reconnect_at_us - now;
        }
        if (wait_us < 0) {
            wait_us = 0;
        }
        ts.tv_sec = wait_us / 1000000;
        ts.tv_nsec = (long) (wait_us % 1000000) * 1000L;

        fd = mosquitto_socket(mosq);
        pfd.fd = fd;
        pfd.events = POLLIN | (mosquitto_want_write(mosq) ? POLLOUT : 0);
        pfd.revents = 0;
        rc = ppoll(fd >= 0 ? &pfd : NULL, fd >= 0 ? 1 : 0, &ts, &unblocked);
        if (rc < 0 && errno != EINTR) {
            gift_log(GIFT_LOG_ERR, "ppoll: %s", strerror(errno));
            break;
        }
        if (rc > 0 && fd >= 0) {
            if (pfd.revents & (POLLIN | POLLERR | POLLHUP)) {
                mosquitto_loop_read(mosq, 1);
            }
            if ((pfd.revents & POLLOUT) && mosquitto_socket(mosq) >= 0) {
                mosquitto_loop_write(mosq, 1);
            }
        }
        if (mosquitto_socket(mosq) >= 0 && mosquitto_want_write(mosq)) {
            mosquitto_loop_write(mosq, 1);
        }
    }

    write_totals();
    gift_log(GIFT_LOG_INFO, "exiting");
    if (mosquitto_socket(mosq) >= 0) {
        mosquitto_disconnect(mosq);
        mosquitto_loop_write(mosq, 1);
    }
    mosquitto_destroy(mosq);
    mosquitto_lib_cleanup();
    while (nheap > 0) {
        reply_t r = heap_pop();

        free(r.topic);
        free(r.payload);
    }
    free(heap);
    for (i = 0; i < ndevices; i++) {
        device_free(devices[i]);
    }
    free(devices);
    free(opt.offline);
    return 0;
}
