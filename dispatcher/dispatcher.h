/*
 * dispatcher.h: the one internal header of gift-dispatcher.
 *
 * Files and what they own (one concern each):
 *   main.c      start-up, the poll() loop, signals, teardown
 *   conf.c      the libconfig file -> dconf_t (with rules), errors as
 *               "FILE:LINE: KEY: why"
 *   rules.c     gift -> device and rounds (pure; unit-tested)
 *   rpc.c       MQTT topic templates, RPC payloads, reply parsing (pure)
 *   util.c      dmap (u64 -> pointer hash), dchan (thread -> main queue)
 *   nats_in.c   the NATS connection, provisioning, the continuous pull,
 *               GiftAck / DLQ publishes and their PubAcks
 *   mqtt_out.c  the libmosquitto client driven by the main loop
 *   dispatch.c  the state of every gift held: device queues, RPCs in
 *               flight, coalescing, outcomes (ack, retry, dead letter)
 *   streaks.c   streak arithmetic: what a frame adds (pure; unit-tested)
 *   limits.c    rounds-per-minute windows (pure; unit-tested)
 *   kv.c        the KV thread: GIFT_DONE lookups and GIFT_STREAKS
 *               compare-and-set; the GIFT_DEVICES watcher (pause, rates)
 *   ctl.c       `gift-dispatcher ctl ...`: the operator's switches in KV
 *   metrics.c   /metrics (libmicrohttpd, its own thread; atomics only)
 *
 * Every object has one owner and a create/destroy pair.  Everything in
 * dsp_t is owned by the main thread, except what is marked "shared".
 */
#ifndef GIFT_DISPATCHER_H
#define GIFT_DISPATCHER_H

#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include <nats/nats.h>

#include "gift.pb-c.h"
#include "gift_provision.h"

#define DSP_PROGRAM        "gift-dispatcher"
#define DSP_DEVICE_MAX     64     /* device ids: [A-Za-z0-9_-]{1,64} */
#define DSP_NO_DEVICE      "_none" /* gift.acks.<device> for unroutable gifts */
#define GIFT_PART_ID_MAX   160     /* "<event id (128)>#<k>" + NUL */

/* ------------------------------------------------------------------ rules */

/* rounds_per_minute = "stopped" (0 is refused: it used to mean no limit) */
#define DSP_RPM_STOPPED    UINT64_MAX

/* Motor safety by default (the example config says the same): rounds per
 * gift, per command, per device per minute. */
#define DSP_DEF_GIFT_ROUNDS  10000
#define DSP_DEF_CMD_ROUNDS   1000
#define DSP_DEF_RPM          6000

/* A set of strings a rule field may match ("any of"); n == 0: any value. */
typedef struct {
    char   **v;
    size_t   n;
} dstrset_t;

typedef struct {
    dstrset_t    gift;         /* gift names, compared without ASCII case */
    dstrset_t    gift_id;      /* gift ids, exact */
    dstrset_t    platform;     /* exact */
    dstrset_t    room;         /* exact */
    char        *device;
    uint32_t     multiplier;   /* >= 0; 1 by default */
    char        *file;         /* where the rule was written, for logs */
    unsigned     line;
} drule_t;

typedef struct {
    char        *gift_id;
    uint32_t     diamond;
} dcat_entry_t;

/* Rules, catalogue and routing limits: replaced as a whole on SIGHUP. */
typedef struct {
    drule_t       *rule;
    size_t         nrule;
    char          *default_device;      /* NULL: unmatched gifts dead-letter */
    uint32_t       default_multiplier;
    dcat_entry_t  *cat;                 /* sorted by gift_id */
    size_t         ncat;
    int            cat_override;        /* 1: catalogue wins; 0: fills 0 only */
    uint64_t       max_rounds;          /* per gift; above: clamped, or
                                           "overflow" with over_dead_letter */
    int            over_dead_letter;
} drules_t;

typedef enum {
    ROUTE_OK = 0,
    ROUTE_NO_DEVICE,          /* no rule matched and no default device */
    ROUTE_OVERFLOW            /* rounds above max_rounds or 64 bits */
} droute_rc;

typedef struct {
    const char     *device;     /* points into the drules_t */
    uint64_t        rounds;
    uint32_t        diamond;    /* effective (after the catalogue) */
    uint32_t        multiplier;
    const drule_t  *rule;       /* NULL when the default device was used */
} droute_t;

/* The largest rounds value a gift may reach by default: 2^53 - 1, the
 * largest integer every JSON reader (JavaScript) keeps exact. */
#define DSP_ROUNDS_JSON_MAX  9007199254740991ULL

/*
 * Route one gift: the first rule (in file order) whose every given field
 * matches wins; else the default device.  rounds = diamond x quantity x
 * multiplier, where diamond comes from the catalogue when the gift id is
 * listed (always with cat_override, else only when the event has none).
 * Overflow of 64 bits or of max_rounds gives ROUTE_OVERFLOW.  Never
 * allocates; `out` points into `r`, valid while `r` lives.
 */
droute_rc rules_route(const drules_t *r, const char *platform,
    const char *room, const char *gift_id, const char *gift_name,
    uint32_t diamond, uint32_t quantity, droute_t *out);

/*
 * rounds = diamond x quantity x multiplier, checked against 64 bits and
 * max_rounds (0: DSP_ROUNDS_JSON_MAX).  0, or -1 on overflow.
 */
int rules_rounds(const drules_t *r, uint32_t diamond, uint32_t quantity,
    uint32_t multiplier, uint64_t *rounds);

/* The same against 2^53 - 1 only (the dispatcher clamps to max_rounds). */
int rules_rounds_raw(uint32_t diamond, uint32_t quantity, uint32_t multiplier,
    uint64_t *rounds);

/* Catalogue lookup by gift id: the entry or NULL. */
const dcat_entry_t *rules_catalogue(const drules_t *r, const char *gift_id);

/* Sort the catalogue (after loading); returns the index of a duplicate
 * id, or -1 when all ids are distinct. */
long rules_prepare(drules_t *r);

/* Free a drules_t and everything it owns (NULL is fine). */
void rules_free(drules_t *r);

/* 1 when `s` is a valid device id ([A-Za-z0-9_-]{1,64}: it is a NATS
 * subject token in gift.acks.<device>). */
int rules_device_valid(const char *s);

/* ------------------------------------------------------------ configuration */

/* devices.device = ( { id = ...; rounds_per_minute = ...; paused = ...; } ) */
typedef struct {
    char        *id;
    int64_t      rounds_per_minute;    /* -1: the default */
    int          paused;
} ddevconf_t;

typedef struct {
    char        *path;                 /* the file given with -c */
    int          log_level;            /* gift_log_level_t */

    /* nats { } */
    char       **nats_urls;
    size_t       nnats_urls;
    char        *nats_name;
    char        *nats_user;
    char        *nats_password;
    char        *nats_token;
    char        *nats_creds;           /* a .creds file (JWT + nkey) */
    char        *nats_nkey;            /* an NKey seed file */
    char        *nats_tls_ca;
    char        *nats_tls_cert;
    char        *nats_tls_key;
    int          nats_reconnect_min_ms;
    int          nats_reconnect_max_ms;
    int          provision;            /* create what is missing at start */
    gift_provision_opts_t prov;
    int          fetch_batch;
    int          fetch_wait_ms;
    int          max_inflight;         /* gifts held at once (all devices) */
    int          publish_timeout_ms;   /* GiftAck / DLQ PubAck wait */
    int          publish_retry_ms;
    int          ack_linger_ms;        /* hold +ACKs for the next write */
    int64_t     *retry_delays_ms;      /* NakWithDelay by delivery count */
    size_t       nretry_delays;
    int          shutdown_timeout_ms;
    int          done_markers;         /* write GIFT_DONE markers */
    int          max_attempts;         /* device attempts before the DLQ */
    int64_t      max_gift_age_s;       /* older: dead letter "expired" */
    int          lease_ms;             /* the owner's lease (lease.c); 0:
                                          no lease, every dispatcher active */

    /* mqtt { } */
    char        *mqtt_host;
    int          mqtt_port;
    char        *mqtt_client_id;       /* default gift-dispatcher-<host>-<pid> */
    char        *mqtt_token;           /* access token: the MQTT user name */
    char       **mqtt_tokens;          /* mqtt.access_tokens: a pool, one */
    size_t       nmqtt_tokens;         /* leased per dispatcher (identity.c) */
    char        *mqtt_password;
    int          mqtt_keepalive;
    int          mqtt_qos;
    char        *mqtt_request_topic;   /* template: {n}, {device} */
    char        *mqtt_response_topic;
    char        *mqtt_method;
    int          mqtt_max_payload;     /* request payload bytes (65536) */
    int          rpc_timeout_ms;
    int          late_reply_ms;        /* a timed-out RPC's id is not used
                                          again for this long */
    int          mqtt_reconnect_min_ms;
    int          mqtt_reconnect_max_ms;
    int          mqtt_send_maximum;    /* QoS 1 publishes in flight */
    int          rpc_id_bits;          /* 31 (ThingsBoard) or 63 */
    int64_t      instance_id;          /* -1: random */
    char        *tls_ca_file;
    char        *tls_ca_path;
    char        *tls_cert_file;
    char        *tls_key_file;
    char        *tls_version;
    int          tls_insecure;

    /* devices { } */
    int          dev_max_inflight;     /* RPCs in flight per device */
    int          coalesce_max_events;  /* gifts per RPC */
    uint64_t     coalesce_max_rounds;  /* rounds per RPC (a lone gift may
                                          exceed it; it is never split) */
    uint64_t     rounds_per_minute;    /* default limit; 0: none;
                                          DSP_RPM_STOPPED: sends nothing */
    int          offline_grace_ms;     /* a device that does not answer is
                                          waited for this long (attempts
                                          not spent) */
    int          offline_retry_ms;     /* its probes, one RPC at a time */
    int          max_held;             /* gifts one device may hold (its
                                          share of nats.max_inflight) */
    int          busy_retry_ms;        /* above it: released, back then */
    ddevconf_t  *devconf;              /* devices.device: per device */
    size_t       ndevconf;
    int          control;              /* watch KV GIFT_DEVICES */

    /* metrics { } */
    char        *metrics_listen;       /* "ADDR:PORT"; NULL: off */

    /* rules { } */
    drules_t    *rules;
} dconf_t;

/*
 * Read and check the configuration file `path`.  On success returns 0 and
 * a new dconf_t in *out.  On failure returns -1 and writes every problem
 * found into `err` (cap bytes, NUL-terminated), one per line, each as
 * "FILE:LINE: KEY: why" (a syntax error as "FILE:LINE: why").
 */
int  dconf_load(const char *path, dconf_t **out, char *err, size_t cap);
/* Free a configuration and its rules (NULL is fine). */
void dconf_free(dconf_t *c);

/* ------------------------------------------------------------------ rpc */

/*
 * Topic templates hold literal text and the placeholders {n} (the RPC id)
 * and {device}; each placeholder fills one whole topic level.  Check one:
 * returns NULL when valid, else a static sentence saying why not.
 * `need_n`: the template must contain {n}.
 */
const char *rpc_topic_check(const char *tmpl, int need_n);

/* Expand: returns the length written, or -1 when cap is too small. */
int rpc_topic_expand(const char *tmpl, uint64_t n, const char *device,
    char *out, size_t cap);

/* The subscription filter of a template: every placeholder becomes '+'. */
int rpc_topic_filter(const char *tmpl, char *out, size_t cap);

/* Match `topic` against `tmpl`: 0 and *n set when it matches and {n} is a
 * decimal number that fits in 64 bits, else -1. */
int rpc_topic_match(const char *tmpl, const char *topic, uint64_t *n);

typedef struct {
    const char  *id;           /* event id */
    uint64_t     rounds;
} drpc_event_t;

/*
 * The request payload of docs/design.md:
 * {"method":M,"params":{"deviceId":D,"rounds":R,"events":[{"id":..,"rounds":..},..]}}
 * Returns the length (no NUL counted), or 0 when cap is too small.
 * rpc_payload_max() is an upper bound for (nev, method, device).
 */
size_t rpc_payload_build(char *out, size_t cap, const char *method,
    const char *device, uint64_t rounds, const drpc_event_t *ev, size_t nev);
size_t rpc_payload_max(const char *method, const char *device,
    const drpc_event_t *ev, size_t nev);
/* Upper bound of the bytes one event adds to a request payload. */
size_t rpc_event_bytes(const char *id);
/* "device_timeout" (TIMEOUT), "device_offline" (NO_ACTIVE_CONNECTION), or
 * "device_error": the acknowledgement's reason for a failed reply. */
const char *rpc_error_reason(const char *why);

typedef enum {
    RPC_REPLY_OK = 0,          /* {"ok":true} */
    RPC_REPLY_ERROR,           /* {"ok":false,"error":"..."} */
    RPC_REPLY_MALFORMED        /* anything else */
} drpc_reply_rc;

/* Parse a reply (len bytes, not NUL-terminated).  For ERROR and MALFORMED
 * a short reason is copied into err. */
drpc_reply_rc rpc_reply_parse(const char *payload, size_t len, char *err,
    size_t cap);

/*
 * RPC ids.  ThingsBoard parses <n> as a Java int, so by default an id is a
 * 31-bit number: an 11-bit instance tag over a 20-bit counter.  With
 * rpc_id_bits = 63 (plain brokers shared by many instances): a 32-bit tag
 * over a 31-bit counter.  The counter starts at a random value.
 */
typedef struct {
    uint64_t  tag;
    uint64_t  counter;
    int       counter_bits;
} drpc_ids_t;

/* instance_id < 0: a tag derived from seed (random bytes at start). */
void     rpc_ids_init(drpc_ids_t *ids, int bits, int64_t instance_id,
    uint64_t seed);
/* The next id: tag | counter (the counter wraps within its bits). */
uint64_t rpc_ids_next(drpc_ids_t *ids);

/* ------------------------------------------------------------------ streaks */

#define STREAK_RECENT     16      /* claims remembered in the value */
#define STREAK_VALUE_MAX  512     /* "v1 <counted>" + 16 x " <hash>=<inc>" */

typedef struct {
    uint64_t  h;                  /* streak_event_hash(event id) */
    uint32_t  inc;                /* what that frame added */
} dclaim_t;

/* The state of one streak (the value of "s.<streak id>"). */
typedef struct {
    uint32_t  counted;            /* the highest count counted so far */
    int       ended;              /* its end frame was counted */
    size_t    n;
    dclaim_t  recent[STREAK_RECENT];   /* oldest first */
} dstreak_t;

typedef enum {
    STREAK_NEW = 0,               /* a new claim: *inc > 0, s changed */
    STREAK_KNOWN,                 /* this event claimed before: its *inc */
    STREAK_STALE                  /* adds nothing (*inc 0), unless an old
                                     claim of this event exists elsewhere */
} dstreak_rc;

/* 64 bits of SHA-256(event id): how claims are remembered. */
uint64_t   streak_event_hash(const char *event_id);
/* Parse a value (len bytes).  0, or -1 when malformed (s is then empty). */
int        streak_parse(const char *v, size_t len, dstreak_t *s);
/* Write a value; its length, or 0 when cap is too small. */
size_t     streak_format(const dstreak_t *s, char *out, size_t cap);
/*
 * What a frame with running total `count` of event hash `eh` adds: the
 * claim recorded for eh if any (KNOWN), else count - counted when
 * positive (NEW: counted = count, the claim appended, the oldest dropped
 * beyond STREAK_RECENT), else 0 (STALE: a repeat or a late frame).
 */
dstreak_rc streak_apply(dstreak_t *s, uint64_t eh, uint32_t count,
    uint32_t *inc);

/*
 * The same, telling a user's next streak of the same gift from a late or
 * repeated frame when streak ids repeat (TikTok without groupId: the id
 * is "<platform>:<user>:<gift>:0"): for such `nogroup` streaks, a new
 * frame after the end frame was counted, or one whose count is below what
 * was counted, starts a new streak (counted from 0).  Streaks with a
 * groupId keep streak_apply's rule (a lower count is a late frame).  `end`: this frame ends its
 * streak.  Stored as "v1 <counted>e ..." once ended.
 */
dstreak_rc streak_apply_ex(dstreak_t *s, uint64_t eh, uint32_t count,
    int nogroup, int end, uint32_t *inc);

/* ------------------------------------------------------------------ limits */

#define RATE_WINDOW_US   60000000LL    /* rounds per minute: a sliding minute */
#define RATE_MERGE_US    100000LL      /* sends closer than this share an entry */

typedef struct {
    int64_t   t_us;
    uint64_t  rounds;
} drate_ev_t;

/* Rounds sent in the last minute, as a ring of (time, rounds). */
typedef struct {
    drate_ev_t  *ev;
    size_t       cap, head, n;
    uint64_t     sum;
} drate_t;

/*
 * May `rounds` more go now under `limit` rounds per minute (0: no limit)?
 * Yes when the last minute's sum plus rounds stays within the limit, or
 * when nothing at all went in the last minute (a single gift above the
 * limit goes alone, then the device rests until the minute has passed).
 */
int     rate_fits(drate_t *r, uint64_t limit, int64_t now_us, uint64_t rounds);
/* The earliest time at which rate_fits(rounds) becomes true. */
int64_t rate_next(drate_t *r, uint64_t limit, int64_t now_us, uint64_t rounds);
/* Record rounds sent at now_us.  0, or -1 (memory: not recorded). */
int     rate_add(drate_t *r, int64_t now_us, uint64_t rounds);
/* Rounds sent in the minute before now_us. */
uint64_t rate_sum(drate_t *r, int64_t now_us);
void    rate_free(drate_t *r);
/* The window as "<wall ms>:<rounds>,..." (one entry a second, oldest
 * first; now_ms is the wall clock at now_us): what a new owner takes
 * over (lease.c).  Its length, or 0 when empty or cap is too small. */
size_t  rate_format(drate_t *r, int64_t now_us, int64_t now_ms, char *out,
    size_t cap);

/*
 * Coalescing: may the next RPC, holding `taken` gifts of `taken_rounds`
 * rounds, take one more of `next_rounds`?  The first always goes (a gift
 * larger than a cap goes alone); then up to max_events gifts and
 * max_rounds rounds, and within `room` (what the device's rate limit
 * leaves in its minute; UINT64_MAX without a limit).
 */
int     coalesce_more(size_t taken, uint64_t taken_rounds,
    uint64_t next_rounds, size_t max_events, uint64_t max_rounds,
    uint64_t room);

/* The NakWithDelay of a failed delivery number `delivered` (1-based):
 * delays[delivered - 1], the last one repeating. */
int64_t retry_delay_ms(const int64_t *delays, size_t n, uint64_t delivered);

/* ------------------------------------------------------------------ util */

/* dmap: uint64_t -> void* open-addressing hash (linear probing, backward
 * shift deletion).  Keys are any values, 0 included. */
typedef struct {
    uint64_t  *keys;
    void     **vals;
    size_t     cap;            /* power of two */
    size_t     n;
} dmap_t;

/* Room for cap_hint entries before the first growth; 0 or -1 (memory). */
int    dmap_init(dmap_t *m, size_t cap_hint);
void   dmap_free(dmap_t *m);
/* The value stored under key, or NULL. */
void  *dmap_get(const dmap_t *m, uint64_t key);
int    dmap_put(dmap_t *m, uint64_t key, void *val);    /* -1: no memory */
void  *dmap_del(dmap_t *m, uint64_t key);               /* the value or NULL */

/* dchan: a queue of pointers from other threads to the main thread.  The
 * first push into an empty queue writes the shared wake eventfd.  shared */
typedef struct {
    pthread_mutex_t  mu;
    void           **items;
    size_t           n, cap;
    void           **spare;        /* the other array, for the next turn */
    size_t           spare_cap, taken_cap;
    int              wake_fd;
} dchan_t;

/* An empty queue signalling wake_fd (an eventfd the caller owns). */
int    dchan_init(dchan_t *c, int wake_fd);
/* Free the queue's storage (items left in it are the caller's). */
void   dchan_destroy(dchan_t *c);
int    dchan_push(dchan_t *c, void *item);               /* -1: no memory */
int    dchan_push_many(dchan_t *c, void **items, size_t n);
/* Swap the queue's contents out: *items and *n.  One taker (the main
 * thread); it hands *items back with dchan_done() (or frees it). */
void   dchan_take(dchan_t *c, void ***items, size_t *n);
void   dchan_done(dchan_t *c, void **items);

/* A delivery's stream sequence, delivery count and the consumer's pending
 * count, parsed from its "$JS.ACK...." reply subject.  0, or -1 when the
 * subject is not one. */
int    js_ack_meta(const char *reply, uint64_t *sseq, uint64_t *delivered,
    uint64_t *pending);

/* ------------------------------------------------------------- dispatcher */

typedef struct dgift   dgift_t;
typedef struct drpc    drpc_t;
typedef struct ddevice ddevice_t;
typedef struct dsp     dsp_t;

typedef struct dkvjob  dkvjob_t;

typedef enum {
    GIFT_QUEUED = 0,           /* in its device's queue */
    GIFT_SENT,                 /* in an RPC in flight */
    GIFT_PUBLISHING,           /* GiftAck (and DLQ) publishes awaiting PubAck */
    GIFT_KV                    /* waiting for the KV thread (marker, streak) */
} dgift_state;

struct dgift {
    natsMsg               *msg;          /* the delivery; acked, naked, freed */
    Gift__V1__GiftEvent   *ev;           /* NULL when undecodable */
    uint64_t               seq;          /* GIFTS stream sequence */
    uint64_t               delivered;    /* NumDelivered of msg */
    ddevice_t             *dev;
    uint64_t               rounds;
    uint32_t               diamond;      /* effective */
    uint32_t               multiplier;   /* of the rule that routed it */
    uint32_t               streak_inc;   /* streak frames: what it added */
    uint32_t               failures;     /* device attempts failed before
                                            this delivery (KV "a.<id>") */
    char                   first_dev[DSP_DEVICE_MAX + 1]; /* recorded */
    int64_t                received_ms;  /* nginx's clock (0: unknown) */
    uint64_t               rounds_req;   /* before rules.max_rounds */
    int                    capped;       /* rounds clamped to max_rounds */
    int                    dev_counted;  /* counted in dev->held */
    uint32_t               parts_done;   /* split gifts: parts confirmed */
    uint64_t               rounds_done;  /* ... their rounds */
    dgift_state            state;
    int                    replay;       /* a DLQ replay (giftctl dlq) */
    int                    seq_seen;     /* delivery count 1, but at or
                                            below d->seq_hwm: delivered
                                            before all the same */
    int                    marker;       /* its GiftAck has a completion
                                            marker, sent again before each
                                            retry of it (publish.c) */
    drpc_t                *rpc;
    dkvjob_t              *job;          /* GIFT_KV: the job out */
    int                    pubs;         /* publishes awaiting PubAck */
    int64_t                touched_us;   /* fetched or last InProgress */
    int64_t                rpc_latency_us;
    dgift_t               *qnext, *qprev;   /* device queue or RPC list */
    dgift_t               *hnext, *hprev;   /* dsp.held, by touched_us */
    /* ev lives in mem[] (a bump allocator for protobuf-c: one allocation
     * per gift instead of one per string field); what does not fit is
     * malloc'd and counted in spilled */
    ProtobufCAllocator     pa;
    size_t                 mem_cap, mem_used;
    int                    spilled;
    max_align_t            mem[];
};

struct drpc {
    uint64_t       n;
    uint32_t       part;           /* 0, or k: part k of one split gift,
                                      sent as "<event id>#k" */
    char           part_id[GIFT_PART_ID_MAX];
    ddevice_t     *dev;
    dgift_t       *gifts;          /* singly linked through qnext */
    size_t         ngifts;
    uint64_t       rounds;
    int64_t        sent_us;
    int64_t        deadline_us;
    int64_t        done_ms;        /* wall clock of its answer: every
                                      GiftAck of the command carries it */
    drpc_t        *tnext, *tprev;  /* dsp.rpcs, by deadline */
};

struct ddevice {
    char          *name;
    dgift_t       *qhead, *qtail;  /* gifts waiting for an RPC slot */
    size_t         queued;
    int            inflight;       /* RPCs in flight */
    uint64_t       rpcs, gifts_ok, rounds_ok;

    /* limits: the configuration's, overridden by KV GIFT_DEVICES */
    int            paused;         /* effective */
    int64_t        offline_since;  /* mono us of the first unanswered RPC
                                      of an outage; 0: online */
    int64_t        probe_at_us;    /* offline: the next RPC not before */
    uint64_t       offline_waits;  /* gifts put back while offline */
    size_t         held;           /* gifts routed to it and not freed */
    int64_t        drop_before_ms; /* ctl resume --drop-backlog: gifts
                                      received before are dead-lettered */
    int            stop_pending;   /* ctl stop: send "stop" when ready */
    uint64_t       rpm;            /* effective rounds per minute; 0: none */
    int            kv_paused;      /* -1: not set in KV */
    int64_t        kv_rpm;         /* -1: not set in KV */
    drate_t        rate;           /* rounds sent in the last minute */
    int64_t        wake_us;        /* rate-limited: kick again then (0: no) */
};

/* A publish that failed (at once or in its PubAck), waiting to be sent
 * again (publish.c). */
typedef struct dretry {
    natsMsg        *m;
    dgift_t        *g;
    int64_t         due_us;
    struct dretry  *next;
} dretry_t;

/* A PubAck (or its failure, or its timeout) as nats_in_puback() hands it
 * to dispatch_puback(): on success the published message's pointer with
 * its low bit set (PUBACK_OK), else a dpuback_t. */
#define PUBACK_OK(m)  ((void *) ((uintptr_t) (m) | 1))

typedef struct {
    natsMsg     *m;            /* the message we published (ours to free) */
    natsStatus   err;          /* NATS_OK on success */
    int          jerr;
    char         text[96];
} dpuback_t;

/* A JetStream publish waiting for its PubAck (nats_in.c): found by the
 * number in its reply subject, timed out in send order. */
typedef struct dpend {
    natsMsg       *m;
    uint64_t       seq;        /* reply subject <pub_prefix>.<seq> */
    int64_t        due_us;     /* no PubAck by then: failed */
    int            lost;       /* failed by a reconnect */
    struct dpend  *prev, *next;
} dpend_t;

/*
 * The NATS side (nats_in.c): two connections.
 *
 *   nc/js   control: cnats's own threads; start-up, provisioning, consumer
 *           info, KV (kv.c's thread), the lease, /metrics' info requests:
 *           calls that block on a reply.
 *   hnc     hot: driven by the main loop through cnats's external event
 *           loop API (no reader, no flusher, no delivery thread): pull
 *           requests and their deliveries, acks, GiftAck/DLQ publishes
 *           and their PubAcks, the core markers.  Its subscriptions are
 *           synchronous and drained by the main thread.
 *
 * Everything but `ev` (under ev_mu: cnats calls the event loop callbacks
 * from its reconnect and timer threads too) and the atomic flags is the
 * main thread's.
 */
#define DSP_PULL_RETIRED  8
#define DSP_ACKS_HELD_MAX 256      /* held-back acks sent at once beyond */

typedef struct {
    int                inited;     /* nats_in_start() ran its set-up */
    natsOptions       *opts;
    natsConnection    *nc;
    jsCtx             *js;

    natsOptions       *hopts;
    natsConnection    *hnc;
    pthread_t          loop_tid;   /* the main thread */
    pthread_mutex_t    ev_mu;
    int                ev_fd;      /* hnc's socket; -1: detached */
    int                ev_rd;      /* poll it for reading */
    int                ev_wr;      /* it has something to write */
    unsigned           ev_gen;     /* sockets attached so far */

    /* the pull: requests to $JS.API.CONSUMER.MSG.NEXT answered on psub's
     * inbox; a reset drains psub (the server drops requests whose inbox
     * has no interest) and takes a new inbox */
    natsSubscription  *psub;
    char               reply[64];  /* psub's subject */
    natsSubscription  *retired[DSP_PULL_RETIRED];  /* draining */
    int                nretired;
    char               next_subj[128];  /* $JS.API.CONSUMER.MSG.NEXT... */
    int                window;     /* messages asked for at most */
    int                low;        /* top up by at least this many */
    int                outstanding;/* asked for, not yet come or expired */
    int64_t            expires_ns; /* of each request */
    int64_t            hb_ns;      /* idle heartbeat asked for */
    int64_t            live_us;    /* silence longer than this: lost */
    int64_t            seen_us;    /* last arrival on the inbox, or ask */
    int64_t            asked_us;   /* the last pull request sent */
    int64_t            retry_us;   /* after a refusal: not before then */
    int                backoff_ms;
    int                on;         /* nats_in_fetch_start() was called */
    int                stop;       /* pull nothing more */
    int                reconnected;/* hnc reconnected (atomic: callback) */
    int                hot_down;   /* hnc disconnected, not yet back
                                      (atomic: callbacks) */
    uint64_t           pulls;      /* requests sent (debug log) */

    /* JetStream publishes: reply <pub_prefix>.<seq>, PubAcks on asub */
    natsSubscription  *asub;       /* <pub_prefix>.* */
    char               inbox[64];  /* ours on hnc: _INBOX.<nuid> */
    char               pub_prefix[72];   /* <inbox>.a */
    uint64_t           pub_seq;
    dmap_t             pending;    /* seq -> dpend_t */
    dpend_t           *pend_head, *pend_tail;   /* by due_us */

    /* messages done with, destroyed in batches (nats_in_msg_free) */
    natsMsg          **grave;
    int                ngrave;
    int64_t            grave_us;   /* when the oldest was added */

    /* +ACKs held back (nats.ack_linger_ms): their reply subjects, each
     * NUL-terminated, sent with the next write or when the oldest has
     * waited the linger (nats_in_write) */
    char              *acks;
    size_t             acks_len, acks_cap;
    int                nacks;
    int64_t            acks_us;    /* when the oldest was held back */
    unsigned           acks_gen;   /* the socket they were held on
                                      (ev_gen, never 0: nats_in_ack
                                      sends nothing on a broken one) */

    volatile int       closing;         /* draining at exit (log level) */
    int                lost;            /* cnats closed a connection for
                                           good (atomic: callback) */
    int64_t            ack_wait_us;     /* from the consumer's info */
    int                max_deliver;     /* from the consumer's info */
    int64_t            max_req_batch;   /* from the consumer's info; 0 */
    int64_t            max_req_expires_ns; /* likewise */
} dnats_t;

typedef struct {
    struct mosquitto  *mosq;
    int                ready;          /* CONNACK and SUBACK seen */
    int                connecting;     /* a socket exists */
    int64_t            reconnect_at_us;
    int                backoff_ms;
    int                sub_mid;
    char               client_id[256];
    char               filter[512];
    char              *buf;            /* payload scratch */
    size_t             bufcap;
    drpc_ids_t         ids;
} dmqtt_t;

/* A job for the KV thread (kv.c).  Created by main, owned by the KV
 * thread while queued there, handed back to main with its answer. */
typedef enum {
    KVJ_DONE = 1,              /* is there a GIFT_DONE marker for the event? */
    KVJ_STREAK                 /* claim a streak frame's increment */
} dkvjob_kind;

struct dkvjob {
    dkvjob_kind     kind;
    uint64_t        seq;       /* the gift's stream sequence (by_seq) */
    char           *key;       /* DONE: the marker's key (NULL: probe);
                                  STREAK: "s.<id>" */
    char           *probe_id;  /* DONE without markers: "<stem>:ack" */
    char           *ckey;      /* STREAK: "e.<event id>" */
    uint64_t        eh;        /* STREAK: streak_event_hash(event id) */
    uint32_t        count;     /* STREAK: the frame's running total */
    int             nogroup;   /* STREAK: its id says no groupId */
    int             end;       /* STREAK: the frame ends its streak */
    int             again;     /* STREAK: a redelivery or a replay */
    int             expired;   /* STREAK: ... and its streak is gone */
    /* answers */
    int             failed;    /* no answer (stopping) */
    int             found;     /* DONE: a marker exists ... */
    void           *val;       /* ... its value (malloc'd; a GiftAck); NULL
                                  when a probe found the GiftAck stored */
    size_t          len;
    uint32_t        inc;       /* STREAK: what the frame adds */
    dstreak_rc      how;
    int             conflicts; /* STREAK: lost compare-and-sets */
    char           *akey;      /* DONE: the attempt record "a.<stem>" */
    int             afound;    /* ... it exists: */
    uint32_t        afail;     /*     device attempts that failed */
    uint32_t        aparts;    /*     split gifts: parts confirmed */
    uint64_t        arounds;   /*     ... their rounds */
    char            adev[DSP_DEVICE_MAX + 1];   /* the device chosen */
    int64_t         lat_us;    /* time spent in the KV thread */
    dkvjob_t       *next;
};

/* A device switch changed in KV GIFT_DEVICES (watcher -> main). */
typedef enum { CTL_PAUSED = 1, CTL_RPM, CTL_DROP_BEFORE, CTL_STOP } dctl_what;

typedef struct {
    char        device[DSP_DEVICE_MAX + 1];
    dctl_what   what;
    int64_t     value;         /* -1: deleted (the configuration applies) */
} dctl_t;

#define GIFT_KV_DEVICES  "GIFT_DEVICES"   /* pause and rate switches */

typedef struct {
    int               inited;
    jsCtx            *js;              /* for the GIFT_ACKS probes */
    kvStore          *streaks, *done, *devices;
    kvWatcher        *watch;
    pthread_t         tid, ctl_tid;
    int               started, ctl_started;
    pthread_mutex_t   mu;
    pthread_cond_t    cond;
    dkvjob_t         *head, *tail;     /* queued for the thread, under mu */
    int               stop;            /* under mu */
    dchan_t           out;             /* dkvjob_t* answered */
    dchan_t           ctl;             /* dctl_t* from the watcher */
    size_t            pending;         /* main: jobs not yet answered */
    char              lease_key[64];   /* "_rpc_tag.<tag>"; "" when none */
    char              lease_val[384];
} dkv_t;

#define KV_LEASE_REFRESH_S  60
#define KV_LEASE_STALE_S    300

/*
 * Counters.  Written by the main thread only, read by the metrics thread:
 * every update is a relaxed atomic store of the new value (STAT_ADD), so
 * a reader never sees a torn value and the writer never takes a lock.
 */
typedef struct {
    uint64_t  received, duplicates, acked_ok, dead_letters, released, retried;
    uint64_t  rpcs_sent, rpc_ok, rpc_errors, rpc_timeouts, replies_unknown;
    uint64_t  pub_errors, in_progress;
    uint64_t  coalesced;           /* gifts that shared an RPC with others */
    uint64_t  rounds_ok;
    uint64_t  zero_rounds;         /* acknowledged without a command */
    uint64_t  done_hits;           /* redeliveries found done in GIFT_DONE */
    uint64_t  done_checks;
    uint64_t  streak_frames, streak_new, streak_known, streak_stale;
    uint64_t  streak_conflicts;
    uint64_t  rate_waits;          /* times a device waited for its rate */
    uint64_t  expired;             /* dead-lettered past max_gift_age */
    uint64_t  capped;              /* gifts clamped to rules.max_rounds */
    uint64_t  busy_released;       /* released: their device held its share */
    uint64_t  offline_requeued;    /* gifts put back: device offline */
    uint64_t  kv_jobs;
    uint64_t  naks;                /* naks sent (retries and releases) */
    uint64_t  rpc_lat_le[16];      /* RPC latency histogram (cumulative) */
    uint64_t  rpc_lat_count;
    uint64_t  rpc_lat_sum_us;
    uint64_t  consumer_pending;    /* NumPending of the last delivery */
    uint64_t  held;                /* gauge */
    uint64_t  mqtt_up;             /* gauge: 1 when ready */
} dstats_t;

#define STAT_ADD(d, f, v) \
    __atomic_store_n(&(d)->st.f, (d)->st.f + (v), __ATOMIC_RELAXED)
#define STAT_SET(d, f, v) \
    __atomic_store_n(&(d)->st.f, (v), __ATOMIC_RELAXED)
#define STAT_GET(d, f) \
    __atomic_load_n(&(d)->st.f, __ATOMIC_RELAXED)

/* RPC latency histogram bounds (ms), in dstats_t.rpc_lat_le order. */
#define DSP_LAT_BUCKETS  { 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, \
                           5000, 10000, 30000 }
#define DSP_NLAT_BUCKETS 14

typedef struct dmetrics dmetrics_t;

struct dquar {
    uint64_t  n;
    int64_t   until_us;
};

/*
 * lease.c: one active dispatcher (the owner of every device) among those
 * sharing the consumer.  The lease is key GIFT_LEASE_KEY in KV
 * GIFT_DEVICES, taken by compare-and-set, renewed by its own thread.
 * Fields marked "shared" are atomics read by the main and lease threads.
 */
#define GIFT_LEASE_KEY   "_owner"

typedef struct {
    pthread_t        tid;
    int              started;
    pthread_mutex_t  mu;
    pthread_cond_t   cond;
    int              stop;         /* under mu */
    kvStore         *kv;           /* the lease thread's own handle */
    uint64_t         rev;          /* our lease's revision (lease thread) */
    char             val[384];     /* who we are */
    char            *rates;        /* under mu: our devices' last minute */
    char            *inherit;      /* under mu: the last owner's value */
    int64_t          rates_us;     /* main: next rates snapshot */
    int              active;       /* shared: may fetch and send */
    int64_t          until_us;     /* shared: may send until (monotonic):
                                      last renewal sent + lease - margin */
    int64_t          takeover_us;  /* shared: the last takeover's time */
    uint64_t         takeovers;    /* shared */
    int              seen_active;  /* main thread: the state it acted on */
    int64_t          fenced_us;    /* main: when it stopped sending, or 0 */
    uint64_t         seq_floor;    /* shared: the consumer's delivered
                                      stream sequence plus its messages
                                      pending an ack when we became the
                                      owner (UINT64_MAX: unknown) */
} dlease_t;

struct dsp {
    dconf_t           *conf;       /* replaced on SIGHUP (rules part) */
    int                wake_fd;    /* eventfd: chans and signals */
    dnats_t            nats;
    dmqtt_t            mqtt;

    /* devices by name (string hash, never shrinks) */
    ddevice_t        **dev;
    size_t             devcap, ndev;

    dmap_t             by_seq;     /* stream seq -> dgift_t held */
    dmap_t             by_rpc;     /* RPC id -> drpc_t */
    dmap_t             by_pub;     /* natsMsg* published -> dgift_t
                                      (publish.c) */
    dmap_t             quarantine; /* RPC ids timed out recently: a late
                                      reply must not complete a new RPC */
    struct dquar      *quar;       /* ... in expiry order (a ring) */
    size_t             quar_cap, quar_head, quar_n;
    dgift_t           *held, *held_tail;   /* all held gifts */
    size_t             nheld;
    drpc_t            *rpcs, *rpcs_tail;   /* in flight, by deadline */
    dretry_t          *retries, *retries_tail;   /* publish.c */
    uint64_t           seq_hwm;            /* the highest stream sequence
                                              delivered before, as far as
                                              we know (dispatch_msg) */

    int                stopping;
    int64_t            stop_deadline_us;
    int64_t            next_tick_us;
    dstats_t           st;

    dkv_t              kv;
    int                identity;   /* index in mqtt.access_tokens; -1 */
    char               identity_key[64];
    char               identity_val[384];
    size_t             nwaiting;   /* devices with wake_us set */
    int64_t            wake_min_us;
    dmetrics_t        *metrics;
    dlease_t           lease;
};

/* lease.c --------------------------------------------------------------- */

/* Start the lease thread (nats.lease_ms > 0; else active at once). */
int  lease_start(dsp_t *d);
/* Stop it; with `release`, delete the lease key when we hold it. */
void lease_stop(dsp_t *d, int release);
/* May this dispatcher send commands now (holds a lease not yet due)? */
int  lease_may_send(dsp_t *d, int64_t now_us);
/* Is it the owner (for fetching and /metrics)? */
int  lease_active(dsp_t *d);
/* Main thread: the rate windows the lease carries (once a second); the
 * last owner's, taken over on becoming the owner. */
void lease_rates_tick(dsp_t *d, int64_t now_us);
void lease_take_over_rates(dsp_t *d);

/* Flags set by signal handlers (main.c); the loop acts on them. */
extern volatile sig_atomic_t dsp_sig_term, dsp_sig_hup, dsp_sig_usr1;

/* dispatch.c ------------------------------------------------------------ */

/*
 * The entry points of the main thread's gift and device code.  Gift state
 * is owned by dispatch.c (the gift's life), publish.c (its publishes in
 * flight) and timers.c (time and the stop); devices by scheduler.c.  The
 * I/O modules hand results to these functions and write none of that
 * state themselves.  dispatch_int.h is the interface between those files.
 */

/* Create / destroy the gift state (maps, device table) of `d`. */
int  dispatch_init(dsp_t *d);
/* Free every gift still held (naking it), every RPC and device. */
void dispatch_destroy(dsp_t *d);

/* A delivery from the pull inbox: decode, route, queue (or finish at
 * once: dead letter, zero rounds, release while stopping).  Takes `m`. */
void dispatch_msg(dsp_t *d, natsMsg *m);

/* An answer from the KV thread.  Takes `job`. */
void dispatch_kv(dsp_t *d, dkvjob_t *job);

/* scheduler.c ----------------------------------------------------------- */

/* A reply on the response topic with id n (unknown ids are counted and
 * ignored: they belong to another instance or to an RPC that timed out). */
void dispatch_reply(dsp_t *d, uint64_t n, const char *payload, size_t len);

/* The rate-limited devices' last minute as "rate <device> <window>\n"
 * lines (rate_format), for the lease value; and taking them over. */
size_t dispatch_rates_format(dsp_t *d, char *buf, size_t cap);
void   dispatch_rates_restore(dsp_t *d, const char *text);

/* Send what device queues allow (after MQTT became ready, or a reload). */
void dispatch_kick_all(dsp_t *d);

/* A device switch changed in KV GIFT_DEVICES.  Takes `c`. */
void dispatch_ctl(dsp_t *d, dctl_t *c);

/* Recompute every device's limits from the configuration (after a
 * reload) and kick those that may send now. */
void dispatch_limits_reload(dsp_t *d);

/* Per-device state for /metrics, as Prometheus text lines, into buf
 * (cap bytes): the length written (truncated at a line boundary). */
size_t dispatch_device_metrics(const dsp_t *d, char *buf, size_t cap);

/* publish.c ------------------------------------------------------------- */

/* A PubAck result from nats_in_puback(): PUBACK_OK(msg) or
 * a dpuback_t.  Takes it. */
void dispatch_puback(dsp_t *d, void *item);

/* timers.c -------------------------------------------------------------- */

/* Time-driven work: RPC timeouts, publish retries, InProgress for gifts
 * held long.  Returns the next time (monotonic us) it wants to run. */
int64_t dispatch_timers(dsp_t *d, int64_t now_us);

/* The lease was lost: release what waits in device queues. */
void dispatch_standby(dsp_t *d);

/* Begin an orderly stop: release queued gifts, stop fetching. */
void dispatch_stop(dsp_t *d);

/* Release (nak) everything still held: the stop deadline passed. */
void dispatch_abandon(dsp_t *d);

/* 1 when nothing is held and nothing is in flight. */
int  dispatch_idle(const dsp_t *d);

/* metrics.c (its log line) ---------------------------------------------- */

/* One info line with the counters (SIGUSR1, and at exit). */
void dispatch_log_stats(const dsp_t *d);

/* nats_in.c ------------------------------------------------------------- */

/* Options, both connections (retrying until connected or dsp_sig_term),
 * provisioning, the control connection's JetStream context, the consumer's
 * settings, the hot connection's PubAck inbox.  0, or -1 (logged). */
int  nats_in_start(dsp_t *d);

/* Options for a connection to c's servers with c's credentials and TLS
 * (no callbacks).  The caller destroys *out. */
natsStatus nats_options_base(const dconf_t *c, natsOptions **out);

/* Whether those credentials sign the server's nonce (creds or nkey): what
 * gift_nats_connect() wants to know to retry a refusal (cnats < 3.10). */
int  nats_signs(const dconf_t *c);

/* Start pulling (the first request goes out from nats_in_pull()). */
int  nats_in_fetch_start(dsp_t *d);

/* Main loop, every pass: acts on a reconnect of the hot connection (the
 * pull starts over, PubAcks outstanding fail), tops the pull window up
 * within the credit (nats.max_inflight minus gifts held), a lost request
 * or the lease; returns when it wants to run again (PubAck timeouts
 * included). */
int64_t nats_in_pull(dsp_t *d, int64_t now);

/* The hot connection's socket for the main loop's ppoll(): the fd and
 * the events to wait for (0 when there is none: detached, reconnecting).
 * nats_in_io() with what ppoll() returned; nats_in_write() sends what is
 * buffered at once (the end of each loop pass). */
int  nats_in_fd(dsp_t *d, short *events);
void nats_in_io(dsp_t *d, short revents);
void nats_in_write(dsp_t *d);
int  nats_in_hot_down(dsp_t *d);

/* The next message of the pull inbox (current, then retired ones) that
 * the main thread has not taken yet, or NULL; for nats_in_arrived(). */
natsMsg *nats_in_next(dsp_t *d);

/* The next PubAck result for dispatch_puback() (an arrival, a failure, a
 * timeout past nats.publish_timeout_ms), or NULL. */
void *nats_in_puback(dsp_t *d, int64_t now);

/* An arrival on the inbox (main thread): 1 for a gift (the caller owns
 * it), 0 for a status message (consumed: heartbeat, expiry, refusal). */
int  nats_in_arrived(dsp_t *d, natsMsg *m);

/* Pull nothing more; what already came is still delivered (drain). */
void nats_in_fetch_stop(dsp_t *d);

/* 1 once stopped and what was on its way has come (or never started). */
int  nats_in_fetch_done(dsp_t *d);

/* A message for `subject` with `data` and the extra headers (NULL-
 * terminated key/value pairs), its reply subject the PubAck inbox's, or
 * NULL (logged). */
natsMsg *nats_in_msg_new(dsp_t *d, const char *subject, const void *data,
    size_t len, const char **hdrs);

/* Acknowledge a delivery: publishes the JetStream ack body to its reply
 * subject (cnats' natsMsg_Ack() refuses messages of a plain subscription).
 * DACK_NAK with delay_ms > 0 is a nak with delay.  A +ACK is held back for
 * nats.ack_linger_ms or until the next write (nats_in_write());
 * nats_in_acks_held() counts those not sent yet, nats_in_acks_due() says
 * when the oldest must go (the main loop's wake-up). */
typedef enum {
    DACK_ACK = 0,              /* +ACK */
    DACK_NAK,                  /* -NAK */
    DACK_WPI,                  /* +WPI: in progress, restart the ack wait */
    DACK_TERM                  /* +TERM */
} dack_kind;

natsStatus nats_in_ack(dsp_t *d, natsMsg *m, dack_kind kind,
    int64_t delay_ms);
int        nats_in_acks_held(const dsp_t *d);
int64_t    nats_in_acks_due(const dsp_t *d);   /* INT64_MAX: none held */

/* A failpoint's (t/27): break the hot connection's socket as a network
 * would, and have cnats see it now (it stops polling it, reconnects). */
void       nats_in_break(dsp_t *d);

/*
 * Publish m (from nats_in_msg_new) to its JetStream stream with
 * Nats-Msg-Id `msg_id` (none when NULL).  0: sent; m is held until its
 * PubAck, a failure or nats.publish_timeout_ms, which nats_in_puback()
 * hands back with this same pointer (publish.c's dispatch_puback takes
 * it).  -1: not sent; m is still the caller's, its Nats-Msg-Id header
 * set for nats_in_republish.  Writes no gift state.
 */
int  nats_in_publish(dsp_t *d, natsMsg *m, const char *msg_id);

/* A plain (core) publish, no PubAck awaited: the GIFT_DONE markers. */
void nats_in_publish_core(dsp_t *d, const char *subject, const void *data,
    size_t len);

/* Publish a message again (its publish or PubAck failed), with the
 * Nats-Msg-Id it carries.  As nats_in_publish. */
int  nats_in_republish(dsp_t *d, natsMsg *m);

/* Push out what the hot connection holds and wait (up to timeout_ms,
 * driving its socket here) until the server has read it: a message to
 * ourselves comes back.  0, or -1 (not connected, timed out). */
int  nats_in_flush(dsp_t *d, int timeout_ms);

/* Destroy m a little later, with others (main thread).  cnats hands
 * every destroyed message to its garbage-collector thread, waking it when
 * idle: one wake per batch instead of three per gift. */
void nats_in_msg_free(dsp_t *d, natsMsg *m);

/* Stop pulling and unsubscribe the inbox at once (teardown). */
void nats_in_fetch_join(dsp_t *d);

/* Unsubscribe, flush acks, drain and close; destroy all.  Every gift
 * must have been freed before (acks use the connection). */
void nats_in_stop(dsp_t *d);

/* identity.c ------------------------------------------------------------ */

/* With mqtt.access_tokens: lease one token in KV GIFT_DEVICES (compare-and-
 * set; a lease not refreshed for KV_LEASE_STALE_S may be taken over) and
 * make it the MQTT user name.  Before the KV thread starts and before MQTT
 * connects.  0 (also without a pool), or -1: none free. */
int  identity_claim(dsp_t *d);
void identity_refresh(dsp_t *d);       /* the kv thread, every minute */
void identity_release(dsp_t *d);       /* at exit */

/* kv.c ------------------------------------------------------------------ */

/* The KV buckets (GIFT_STREAKS, GIFT_DONE; GIFT_DEVICES, created when
 * missing, with devices.control), the device switches' initial state
 * (applied through dispatch_ctl before any gift arrives), then the KV
 * thread and the watcher thread.  Retries until it works or SIGTERM.
 * 0, or -1. */
int  kv_start(dsp_t *d);

/* Lease an RPC id tag no live dispatcher holds (when mqtt.instance_id is
 * not set): sets d->mqtt.ids.tag.  Before the KV thread starts.  0, or -1
 * (the random tag stays). */
int  kv_claim_tag(dsp_t *d);

/* Queue a job for the KV thread (main).  0, or -1 (not started). */
int  kv_submit(dsp_t *d, dkvjob_t *job);

/* A new job (main); NULL on memory. */
dkvjob_t *kv_job_new(dkvjob_kind kind, uint64_t seq);
void      kv_job_free(dkvjob_t *job);

/* Stop and join both threads; every queued job comes back failed
 * through d->kv.out. */
void kv_stop(dsp_t *d);

/* Free the KV handles and queues (after kv_stop and the last drain). */
void kv_destroy(dsp_t *d);

/* ctl.c ----------------------------------------------------------------- */

/* `gift-dispatcher -c FILE ctl ARGS...`: set, clear or show the device
 * switches in KV GIFT_DEVICES.  Returns the exit status. */
int  ctl_main(const dconf_t *c, int argc, char **argv);

/* metrics.c ------------------------------------------------------------- */

/* Serve /metrics on conf->metrics_listen from libmicrohttpd's own thread.
 * 0, or -1 (logged; the address is taken, for instance). */
int  metrics_start(dsp_t *d);
/* Refresh what the metrics thread shows that main owns (per-device text):
 * never waits for the metrics thread (a busy lock skips this turn). */
void metrics_tick(dsp_t *d, int64_t now_us);
void metrics_stop(dsp_t *d);

/* mqtt_out.c ------------------------------------------------------------ */

/* The client (id, credentials, TLS, TCP_NODELAY, callbacks, RPC ids); no
 * connection yet.  0 or -1 (logged). */
int  mqtt_out_init(dsp_t *d);
/* Destroy the client (after mqtt_out_disconnect). */
void mqtt_out_destroy(dsp_t *d);
/* Start (or restart) connecting when the back-off allows. */
void mqtt_out_connect(dsp_t *d, int64_t now_us);
/* The socket to poll, or -1; and whether to poll for writing. */
int  mqtt_out_fd(dsp_t *d);
int  mqtt_out_want_write(dsp_t *d);
/* The socket is readable / writable: run libmosquitto's side (callbacks
 * run inside; a lost connection schedules the reconnect). */
void mqtt_out_read(dsp_t *d);
void mqtt_out_write(dsp_t *d);
/* Keepalive and reconnect; returns the next time it wants to run. */
int64_t mqtt_out_misc(dsp_t *d, int64_t now_us);
/* Publish the request of rpc (its id and gifts set).  0, or -1 when the
 * client is not ready or the library refused (the caller requeues). */
int  mqtt_out_send(dsp_t *d, drpc_t *rpc);
/* The emergency stop: {"method":"stop","params":{"deviceId":D,...}} to
 * the device (its answer is not waited for).  0, or -1 when not ready. */
int  mqtt_out_send_stop(dsp_t *d, const char *device);
/* Disconnect cleanly (at exit). */
void mqtt_out_disconnect(dsp_t *d);

#endif /* GIFT_DISPATCHER_H */
