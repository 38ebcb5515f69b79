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
 *   nats_in.c   the NATS connection, provisioning, the fetch thread,
 *               GiftAck / DLQ publishes and their PubAcks
 *   mqtt_out.c  the libmosquitto client driven by the main loop
 *   dispatch.c  the state of every gift held: device queues, RPCs in
 *               flight, coalescing, outcomes (ack, retry, dead letter)
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

/* ------------------------------------------------------------------ rules */

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
    uint64_t       max_rounds;          /* per gift; above: "overflow" */
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
    int64_t     *retry_delays_ms;      /* NakWithDelay by delivery count */
    size_t       nretry_delays;
    int          shutdown_timeout_ms;

    /* mqtt { } */
    char        *mqtt_host;
    int          mqtt_port;
    char        *mqtt_client_id;       /* default gift-dispatcher-<host>-<pid> */
    char        *mqtt_token;           /* access token: the MQTT user name */
    char        *mqtt_password;
    int          mqtt_keepalive;
    int          mqtt_qos;
    char        *mqtt_request_topic;   /* template: {n}, {device} */
    char        *mqtt_response_topic;
    char        *mqtt_method;
    int          rpc_timeout_ms;
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
 * The request payload of DESIGN.md:
 * {"method":M,"params":{"deviceId":D,"rounds":R,"events":[{"id":..,"rounds":..},..]}}
 * Returns the length (no NUL counted), or 0 when cap is too small.
 * rpc_payload_max() is an upper bound for (nev, method, device).
 */
size_t rpc_payload_build(char *out, size_t cap, const char *method,
    const char *device, uint64_t rounds, const drpc_event_t *ev, size_t nev);
size_t rpc_payload_max(const char *method, const char *device,
    const drpc_event_t *ev, size_t nev);

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
    int              wake_fd;
} dchan_t;

/* An empty queue signalling wake_fd (an eventfd the caller owns). */
int    dchan_init(dchan_t *c, int wake_fd);
/* Free the queue's storage (items left in it are the caller's). */
void   dchan_destroy(dchan_t *c);
int    dchan_push(dchan_t *c, void *item);               /* -1: no memory */
int    dchan_push_many(dchan_t *c, void **items, size_t n);
/* Swap the queue's contents out: *items and *n (the caller frees *items). */
void   dchan_take(dchan_t *c, void ***items, size_t *n);

/* ------------------------------------------------------------- dispatcher */

typedef struct dgift   dgift_t;
typedef struct drpc    drpc_t;
typedef struct ddevice ddevice_t;
typedef struct dsp     dsp_t;

typedef enum {
    GIFT_QUEUED = 0,           /* in its device's queue */
    GIFT_SENT,                 /* in an RPC in flight */
    GIFT_PUBLISHING,           /* GiftAck (and DLQ) publishes awaiting PubAck */
} dgift_state;

struct dgift {
    natsMsg               *msg;          /* the delivery; acked, naked, freed */
    Gift__V1__GiftEvent   *ev;           /* NULL when undecodable */
    uint64_t               seq;          /* GIFTS stream sequence */
    uint64_t               delivered;    /* NumDelivered of msg */
    ddevice_t             *dev;
    uint64_t               rounds;
    uint32_t               diamond;      /* effective */
    dgift_state            state;
    drpc_t                *rpc;
    int                    pubs;         /* publishes awaiting PubAck */
    int64_t                touched_us;   /* fetched or last InProgress */
    int64_t                rpc_latency_us;
    dgift_t               *qnext, *qprev;   /* device queue or RPC list */
    dgift_t               *hnext, *hprev;   /* dsp.held, by touched_us */
};

struct drpc {
    uint64_t       n;
    ddevice_t     *dev;
    dgift_t       *gifts;          /* singly linked through qnext */
    size_t         ngifts;
    uint64_t       rounds;
    int64_t        sent_us;
    int64_t        deadline_us;
    drpc_t        *tnext, *tprev;  /* dsp.rpcs, by deadline */
};

struct ddevice {
    char          *name;
    dgift_t       *qhead, *qtail;  /* gifts waiting for an RPC slot */
    size_t         queued;
    int            inflight;       /* RPCs in flight */
    uint64_t       rpcs, gifts_ok, rounds_ok;
};

/* A publish whose PubAck failed, waiting to be sent again. */
typedef struct dretry {
    natsMsg        *m;
    dgift_t        *g;
    int64_t         due_us;
    struct dretry  *next;
} dretry_t;

/* What the PubAck handler (a cnats thread) posts to the main thread. */
typedef struct {
    natsMsg     *m;            /* the message we published (ours to free) */
    natsStatus   err;          /* NATS_OK on success */
    int          jerr;
    char         text[96];
} dpuback_t;

/* The NATS side: the connection and the fetch thread. */
typedef struct {
    int                inited;     /* queues and locks exist */
    natsOptions       *opts;
    natsConnection    *nc;
    jsCtx             *js;
    natsSubscription  *sub;
    pthread_t          fetch_tid;
    int                fetch_started;

    /* shared with the fetch thread, under mu */
    pthread_mutex_t    mu;
    pthread_cond_t     cond;
    int                credit;     /* gifts the fetch thread may still pull */
    int                stop;       /* the fetch thread must exit */
    int                done;       /* ... and it has */

    dchan_t            inbox;      /* natsMsg* from the fetch thread */
    dchan_t            acks;       /* dpuback_t* from the PubAck handler */

    volatile int       closing;         /* draining at exit (log level) */
    int64_t            ack_wait_us;     /* from the consumer's info */
    int                max_deliver;     /* from the consumer's info */
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

typedef struct {
    uint64_t  received, duplicates, acked_ok, dead_letters, released, retried;
    uint64_t  rpcs_sent, rpc_ok, rpc_errors, rpc_timeouts, replies_unknown;
    uint64_t  pub_errors, in_progress;
} dstats_t;

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
    dmap_t             by_pub;     /* natsMsg* published -> dgift_t */
    dgift_t           *held, *held_tail;   /* all held gifts */
    size_t             nheld;
    drpc_t            *rpcs, *rpcs_tail;   /* in flight, by deadline */
    dretry_t          *retries, *retries_tail;
    int                credit_back;        /* slots freed this iteration */

    int                stopping;
    int64_t            stop_deadline_us;
    int64_t            next_tick_us;
    dstats_t           st;
};

/* Flags set by signal handlers (main.c); the loop acts on them. */
extern volatile sig_atomic_t dsp_sig_term, dsp_sig_hup, dsp_sig_usr1;

/* dispatch.c ------------------------------------------------------------ */

/* Create / destroy the gift state (maps, device table) of `d`. */
int  dispatch_init(dsp_t *d);
/* Free every gift still held (naking it), every RPC and device. */
void dispatch_destroy(dsp_t *d);

/* A delivery from the fetch thread: decode, route, queue (or finish at
 * once: dead letter, zero rounds, release while stopping).  Takes `m`. */
void dispatch_msg(dsp_t *d, natsMsg *m);

/* A reply on the response topic with id n (unknown ids are counted and
 * ignored: they belong to another instance or to an RPC that timed out). */
void dispatch_reply(dsp_t *d, uint64_t n, const char *payload, size_t len);

/* A PubAck (or its failure) from the handler thread.  Takes `pa`. */
void dispatch_puback(dsp_t *d, dpuback_t *pa);

/* Send what device queues allow (after MQTT became ready, or a reload). */
void dispatch_kick_all(dsp_t *d);

/* Time-driven work: RPC timeouts, publish retries, InProgress for gifts
 * held long.  Returns the next time (monotonic us) it wants to run. */
int64_t dispatch_timers(dsp_t *d, int64_t now_us);

/* Begin an orderly stop: release queued gifts, stop fetching. */
void dispatch_stop(dsp_t *d);

/* Release (nak) everything still held: the stop deadline passed. */
void dispatch_abandon(dsp_t *d);

/* 1 when nothing is held and nothing is in flight. */
int  dispatch_idle(const dsp_t *d);

/* One info line with the counters (SIGUSR1, and at exit). */
void dispatch_log_stats(const dsp_t *d);

/* nats_in.c ------------------------------------------------------------- */

/* Options, connection (retrying until connected or dsp_sig_term),
 * provisioning, the JetStream context with its PubAck handler, the pull
 * subscription bound to the durable consumer.  0, or -1 (logged). */
int  nats_in_start(dsp_t *d);

/* Start the fetch thread (credit = max_inflight). */
int  nats_in_fetch_start(dsp_t *d);

/* Give `n` slots back to the fetch thread (gifts finished). */
void nats_in_release(dsp_t *d, int n);

/* Ask the fetch thread to stop; it sets done when it has. */
void nats_in_fetch_stop(dsp_t *d);

/* 1 when the fetch thread has exited (or never ran). */
int  nats_in_fetch_done(dsp_t *d);

/*
 * Publish `data` to `subject` through JetStream asynchronously with
 * Nats-Msg-Id `msg_id` (and the extra headers, NULL-terminated key/value
 * pairs).  The PubAck arrives through dispatch_puback().  The published
 * message is recorded in d->by_pub -> g.  0 or -1 (not sent; g untouched).
 */
int  nats_in_publish(dsp_t *d, dgift_t *g, const char *subject,
    const void *data, size_t len, const char *msg_id, const char **hdrs);

/* Publish an existing message again (after a PubAck failure).  0 / -1. */
int  nats_in_republish(dsp_t *d, dgift_t *g, natsMsg *m);

/* Stop and join the fetch thread (before gifts are freed: acking needs
 * the subscription alive). */
void nats_in_fetch_join(dsp_t *d);

/* Join the fetch thread, unsubscribe, flush acks, drain and close;
 * destroy all.  Every gift must have been freed before (acks use the
 * subscription). */
void nats_in_stop(dsp_t *d);

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
/* Disconnect cleanly (at exit). */
void mqtt_out_disconnect(dsp_t *d);

#endif /* GIFT_DISPATCHER_H */
