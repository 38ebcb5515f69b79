/*
 * gift_provision: the NATS names and settings of docs/design.md, and the one
 * copy of the code that creates them (`giftctl setup` and the dispatcher
 * at start).
 *
 * Rule: create what is missing; when something exists with other settings,
 * warn and leave it alone.  Never update or scale down a stream (a
 * 3-replica production stream must survive a dispatcher restart).
 */
#ifndef GIFT_PROVISION_H
#define GIFT_PROVISION_H

#include <nats/nats.h>
#include <stdint.h>

#define GIFT_STREAM_EVENTS      "GIFTS"
#define GIFT_STREAM_ACKS        "GIFT_ACKS"
#define GIFT_STREAM_DLQ         "GIFTS_DLQ"
#define GIFT_SUBJ_EVENTS        "gift.events.>"
#define GIFT_SUBJ_EVENTS_PREFIX "gift.events."
#define GIFT_SUBJ_ACKS          "gift.acks.>"
#define GIFT_SUBJ_ACKS_PREFIX   "gift.acks."
#define GIFT_SUBJ_DLQ           "gift.dlq.>"
#define GIFT_SUBJ_DLQ_PREFIX    "gift.dlq."
#define GIFT_CONSUMER           "dispatcher"
#define GIFT_KV_STREAKS         "GIFT_STREAKS"
#define GIFT_KV_DONE            "GIFT_DONE"

#define GIFT_HDR_DLQ_REASON     "Gift-Dlq-Reason"
#define GIFT_HDR_DLQ_DELIVERIES "Gift-Deliveries"

/* New consumers redeliver without limit: the dispatcher counts device
 * attempts itself (nats.max_attempts), so that a release at a stop or a
 * crash never spends a gift's last delivery (which nats-server would then
 * drop, leaving no GiftAck).  Existing consumers are left alone: run
 * `giftctl setup --upgrade`. */
#define GIFT_MAX_DELIVER        (-1)
#define GIFT_MAX_ATTEMPTS       5             /* device attempts per gift */
#define GIFT_MAX_ACK_PENDING    100000        /* consumer MaxAckPending */
#define GIFT_MAX_GIFT_AGE_S     ((int64_t) 3600)         /* older: dead letter "expired" */
#define GIFT_STATE_MARGIN_S     600           /* state outlives that bound */
#define GIFT_DUP_WINDOW_S       600           /* >= signature window (300 s) */
#define GIFT_EVENTS_MAX_AGE_S   (7 * 86400)
#define GIFT_ACKS_MAX_AGE_S     86400
#define GIFT_DLQ_MAX_AGE_S      (30 * 86400)
/* streak and completion state live as long as a gift can come back */
#define GIFT_STREAKS_TTL_S      (GIFT_MAX_GIFT_AGE_S + GIFT_STATE_MARGIN_S)
#define GIFT_DONE_TTL_S         (GIFT_MAX_GIFT_AGE_S + GIFT_STATE_MARGIN_S)
#define GIFT_ACK_WAIT_S         30

typedef struct {
    int      replicas;           /* 1 by default; 3 on a cluster */
    int64_t  events_max_msgs;    /* -1: unlimited (tests use a small one) */
    int64_t  events_max_bytes;   /* -1: unlimited */
    int64_t  ack_wait_ms;        /* consumer ack wait */
    int      max_deliver;        /* consumer MaxDeliver */
    int      max_ack_pending;    /* consumer MaxAckPending; -1 = server default */
    int      quiet;              /* only warnings and errors */
    int      upgrade;            /* raise what an older setup left below
                                    what the dispatcher needs (MaxDeliver,
                                    KV TTLs); never lowers anything */
    int64_t  state_ttl_s;        /* GIFT_STREAKS and GIFT_DONE TTL */
} gift_provision_opts_t;

/* Fill `o` with docs/design.md's defaults. */
void gift_provision_defaults(gift_provision_opts_t *o);

/*
 * Create whatever of GIFTS, GIFT_ACKS, GIFTS_DLQ, the consumer `dispatcher`
 * and the KV buckets GIFT_STREAKS and GIFT_DONE is missing.  Logs what it
 * created, what it found, and a warning per setting that differs, through
 * gift_log().  Returns 0 on success, -1 when something could not be created
 * or looked up (the cause is logged).
 */
int gift_provision(natsConnection *nc, jsCtx *js, const gift_provision_opts_t *o);

/*
 * Does what exists hold a gift's promises?  The consumer must redeliver
 * without limit (MaxDeliver -1) and GIFT_STREAKS and GIFT_DONE must keep
 * keys at least `ttl_s` seconds (0: no TTL is fine).  Writes one sentence
 * per problem into err (cap bytes) and returns their number (0: fine), or
 * -1 when something could not be looked up.
 */
int gift_provision_check(jsCtx *js, int64_t ttl_s, char *err, size_t cap);

#endif /* GIFT_PROVISION_H */
