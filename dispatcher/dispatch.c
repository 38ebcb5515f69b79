/*
 * dispatch.c: the life of a gift inside the dispatcher (main thread only).
 *
 *   delivery --decode/route--> QUEUED on its device
 *            --device slot--> SENT in an RPC (several gifts when coalesced)
 *            --reply ok-----> PUBLISHING its GiftAck --PubAck--> ack, freed
 *            --silent device> QUEUED again (within offline_grace_ms)
 *            --error--------> attempt record + NakWithDelay (retry), or on
 *                             the max_attempts-th failed attempt
 *                             PUBLISHING DLQ + GiftAck dead_letter --> ack
 *
 * A gift is acknowledged on NATS only after every publish recording its
 * outcome got its PubAck.  Until then it is "held": counted against
 * nats.max_inflight, kept alive with InProgress, and released with a nak
 * when the daemon stops before its outcome is known.
 *
 * This file is the one owner of gift state.  The devices (queues, limits,
 * RPCs in flight) are scheduler.c's; it reports each gift of a finished
 * RPC back here (gift_answered).  The I/O modules (nats_in.c, kv.c,
 * mqtt_out.c) hand their results to the dispatch_*() entry points.
 *
 * Attempts are counted here, not by the server: an attempt record in KV
 * GIFT_DONE ("a.<event id>": failed attempts, the device of the first
 * attempt, parts accepted) is written before the nak of a failed attempt
 * and read back with the completion marker when the gift comes back.
 *
 * Two detours through the KV thread (kv.c), both off the main loop:
 *   - a redelivered (or DLQ-replayed) gift first looks for its completion
 *     marker in GIFT_DONE: when the device already answered ok for it (a
 *     crash came between that answer and the ack), its GiftAck is
 *     published again from the marker (same Nats-Msg-Id: deduplicated)
 *     and it is acked without an RPC;
 *   - a streak frame claims its increment in GIFT_STREAKS (streaks.c):
 *     rounds = diamond x increment x multiplier, 0 when it adds nothing.
 * The marker is written with the GiftAck, as an asynchronous publish, once
 * the device answered ok; the delivery is acked when both are stored.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dispatcher.h"
#include "dispatch_int.h"
#include "gift_kvkey.h"
#include "gift_json.h"
#include "gift_normalize.h"
#include "gift_util.h"

#define ACK_BUF   8192      /* a packed GiftAck: strings are <= 256 bytes */

/* publish failures: logged at most once a second (dispatch_int.h) */
static rlimit_t rl_pub;









/* ------------------------------------------------------------ gift memory */

static void *
arena_alloc(void *ad, size_t n)
{
    dgift_t *g = ad;
    void    *p;

    n = (n + sizeof(max_align_t) - 1) & ~(sizeof(max_align_t) - 1);
    if (g->mem_used + n <= g->mem_cap) {
        p = (char *) g->mem + g->mem_used;
        g->mem_used += n;
        return p;
    }
    g->spilled++;
    return malloc(n);
}

static void
arena_free(void *ad, void *p)
{
    dgift_t *g = ad;

    if ((char *) p < (char *) g->mem
        || (char *) p >= (char *) g->mem + g->mem_cap)
    {
        free(p);
    }
}

/* A gift with room for its decoded event: the struct plus the strings,
 * which together take less than the encoded bytes and the struct. */
static dgift_t *
gift_new(size_t len)
{
    size_t   cap = len + sizeof(Gift__V1__GiftEvent) + 16 * sizeof(max_align_t);
    dgift_t *g = malloc(sizeof(*g) + cap);

    if (g != NULL) {
        memset(g, 0, sizeof(*g));
        g->mem_cap = cap;
        g->pa.alloc = arena_alloc;
        g->pa.free = arena_free;
        g->pa.allocator_data = g;
    }
    return g;
}

/* ------------------------------------------------------------ held gifts */

static void
held_unlink(dsp_t *d, dgift_t *g)
{
    if (g->hprev) {
        g->hprev->hnext = g->hnext;
    } else {
        d->held = g->hnext;
    }
    if (g->hnext) {
        g->hnext->hprev = g->hprev;
    } else {
        d->held_tail = g->hprev;
    }
    g->hnext = g->hprev = NULL;
}

/* Append (or move) g to the tail: the list stays ordered by touched_us. */
static void
held_touch(dsp_t *d, dgift_t *g, int64_t now)
{
    if (g->hprev || g->hnext || d->held == g) {
        held_unlink(d, g);
    }
    g->touched_us = now;
    g->hprev = d->held_tail;
    if (d->held_tail) {
        d->held_tail->hnext = g;
    } else {
        d->held = g;
    }
    d->held_tail = g;
}

/* The end of a gift: its delivery was acked or naked (or is abandoned). */
static void
gift_free(dsp_t *d, dgift_t *g)
{
    if (g->dev != NULL && g->dev_counted) {
        g->dev->held--;
    }
    held_unlink(d, g);
    dmap_del(&d->by_seq, g->seq);
    d->nheld--;
    if (g->ev && g->spilled) {
        gift__v1__gift_event__free_unpacked(g->ev, &g->pa);
    }
    natsMsg_Destroy(g->msg);
    free(g);
    d->credit_back++;
}

const char *
event_id(const dgift_t *g)
{
    return g->ev && g->ev->event_id ? g->ev->event_id : "";
}

/*
 * The stem of the Nats-Msg-Ids recording g's outcome ("<stem>:ack",
 * "<stem>:dlq"): the event id, or for a DLQ replay the replay's own
 * message id ("<event id>:replay:<dlq seq>"), so that the replay's
 * GiftAck is stored next to the dead_letter one it follows (and its own
 * dead letter, if it fails again, is not dropped as a duplicate of the
 * first), while a repeat of the same replay is still deduplicated.
 */
static void
msg_id_stem(const dgift_t *g, char *out, size_t cap)
{
    const char *id = NULL;
    size_t      n = strlen(event_id(g));

    if (n == 0) {
        snprintf(out, cap, "seq-%" PRIu64, g->seq);
    } else if (g->replay && g->msg != NULL
               && natsMsgHeader_Get(g->msg, "Nats-Msg-Id", &id) == NATS_OK
               && id != NULL && strncmp(id, event_id(g), n) == 0
               && strncmp(id + n, ":replay:", 8) == 0
               && strlen(id) + 8 < cap)
    {
        snprintf(out, cap, "%s", id);
    } else {
        snprintf(out, cap, "%s", event_id(g));
    }
}

/*
 * A failpoint for the tests (t/26): GIFT_DISPATCHER_FAILPOINT=
 * "exit_before_ack=N" makes the daemon _exit(9) just before its N-th ack,
 * when that gift's GiftAck and completion marker are stored: the crash
 * between the device's answer and the ack, made exact.  Unset: no cost
 * but one comparison.
 */
static long failpoint_acks = -1;

static void
failpoint_init(void)
{
    const char *f = getenv("GIFT_DISPATCHER_FAILPOINT");

    if (f != NULL && strncmp(f, "exit_before_ack=", 16) == 0) {
        failpoint_acks = strtol(f + 16, NULL, 10);
        gift_log(GIFT_LOG_WARN, "failpoint: exiting before ack number %ld",
                 failpoint_acks);
    }
}

static void
gift_ack_and_free(dsp_t *d, dgift_t *g)
{
    natsStatus s;

    if (failpoint_acks > 0 && --failpoint_acks == 0) {
        gift_log(GIFT_LOG_WARN, "failpoint: exiting before the ack of %s",
                 event_id(g));
        _exit(9);
    }
    s = nats_in_ack(d, g->msg, DACK_ACK, 0);       /* asynchronous */

    if (s != NATS_OK) {
        /* redelivered after the ack wait; the device and GIFT_ACKS
         * deduplicate the repeat */
        gift_log(GIFT_LOG_WARN, "ack of %s (seq %" PRIu64 "): %s",
                 event_id(g), g->seq, natsStatus_GetText(s));
    }
    gift_free(d, g);
}

void
gift_release(dsp_t *d, dgift_t *g, int64_t delay_ms)
{
    natsStatus s;

    /* on failure (NATS down) it comes back after the ack wait anyway */
    s = nats_in_ack(d, g->msg, DACK_NAK, delay_ms);
    STAT_ADD(d, naks, 1);
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_DEBUG, "nak of %s: %s", event_id(g),
                 natsStatus_GetText(s));
    }
    gift_free(d, g);
}

/* ------------------------------------------------------------ outcomes */

/* Fill the GiftAck's copy of the event (pointers into g->ev). */
static void
ack_fill(const dgift_t *g, Gift__V1__GiftAck *a)
{
    const Gift__V1__GiftEvent *e = g->ev;

    a->event_id = (char *) event_id(g);
    a->device_id = g->dev ? g->dev->name : (char *) DSP_NO_DEVICE;
    a->rounds = g->rounds;
    a->rounds_requested = g->rounds_req > g->rounds ? g->rounds_req
                                                    : g->rounds;
    a->capped = g->capped;
    a->parts = g->parts_done;
    /* device attempts: those failed before this delivery, and this one */
    a->attempts = g->failures + 1;
    a->completed_at_ms = gift_now_ms();
    a->diamond = g->diamond;
    if (e != NULL) {
        a->platform = e->platform;
        a->room_id = e->room_id;
        a->user_id = e->user_id;
        a->user_name = e->user_name;
        a->gift_name = e->gift_name;
        a->quantity = e->quantity;
        a->received_at_ms = e->received_at_ms;
    }
}

/*
 * Publish the GiftAck `a` of g (Nats-Msg-Id "<event id>:ack"; it counts
 * in g->pubs: the delivery is acked on its PubAck); with `marker`, first
 * the completion marker: the same bytes as the value of key <event id> in
 * GIFT_DONE.  A KV put is a publish to $KV.GIFT_DONE.<key>; this one is a
 * plain core publish, without waiting for a PubAck: it goes out before the
 * GiftAck on the same connection, so the server has it whenever the
 * GiftAck's PubAck comes back, and it costs a third of a tracked publish
 * (no reply inbox, no pending table, no callback) on the way of every
 * gift.  A marker lost with a failing server only means that a redelivery
 * sends the RPC again, which the device's event-id window absorbs.
 */
static void
publish_ack(dsp_t *d, dgift_t *g, Gift__V1__GiftAck *a, int marker)
{
    uint8_t  buf[ACK_BUF];
    char     subject[sizeof(GIFT_SUBJ_ACKS_PREFIX) + DSP_DEVICE_MAX + 8];
    char     msg_id[2 * GIFT_ID_MAX + 64];
    char     ksubj[sizeof("$KV." GIFT_KV_DONE ".") + GIFT_KVKEY_SIZE(GIFT_ID_MAX)];
    size_t   len;
    int      n;

    len = gift__v1__gift_ack__get_packed_size(a);
    if (len > sizeof(buf)) {
        gift_log(GIFT_LOG_ERR, "GiftAck of %s too large (%zu bytes)",
                 event_id(g), len);
        return;
    }
    gift__v1__gift_ack__pack(a, buf);

    /* one line per outcome (log_level "warning" silences them) */
    gift_log(GIFT_LOG_INFO, "event %s: %s%s%s, device %s, %" PRIu64
             " rounds, attempt %" PRIu32 ", rpc %" PRIu64 ".%03" PRIu64
             " ms, %" PRId64 " ms since the webhook", a->event_id,
             gift_ack_status_name(a->status),
             a->reason && a->reason[0] ? " " : "",
             a->reason ? a->reason : "", a->device_id, a->rounds,
             a->attempts, a->rpc_latency_us / 1000, a->rpc_latency_us % 1000,
             a->received_at_ms > 0 ? a->completed_at_ms - a->received_at_ms
                                   : (int64_t) 0);

    if (marker && event_id(g)[0] != '\0') {
        n = snprintf(ksubj, sizeof(ksubj), "$KV." GIFT_KV_DONE ".");
        if (gift_kvkey_encode(event_id(g), ksubj + n, sizeof(ksubj)
                              - (size_t) n) > 0)
        {
            nats_in_publish_core(d, ksubj, buf, len);
        }
    }

    snprintf(subject, sizeof(subject), GIFT_SUBJ_ACKS_PREFIX "%s",
             a->device_id);
    msg_id_stem(g, msg_id, sizeof(msg_id) - 4);
    strcat(msg_id, ":ack");
    nats_in_publish(d, g, subject, buf, len, msg_id, NULL);
}

/* The device turned: record it. */
static void
gift_ok(dsp_t *d, dgift_t *g, int64_t latency_us, int64_t done_ms)
{
    Gift__V1__GiftAck a = GIFT__V1__GIFT_ACK__INIT;

    g->state = GIFT_PUBLISHING;
    g->rpc = NULL;
    ack_fill(g, &a);
    a.status = GIFT__V1__ACK_STATUS__ACK_STATUS_OK;
    a.rpc_latency_us = latency_us > 0 ? (uint64_t) latency_us : 0;
    if (done_ms > 0) {
        /* the command's answer: the same in all of its GiftAcks */
        a.completed_at_ms = done_ms;
    }
    /* a marker only where a motor turned: a gift of 0 rounds is
     * recomputed as 0 on any redelivery anyway */
    publish_ack(d, g, &a, g->rounds > 0 && d->conf->done_markers);
    if (g->dev) {
        g->dev->gifts_ok++;
        g->dev->rounds_ok += g->rounds;
    }
    STAT_ADD(d, acked_ok, 1);
    STAT_ADD(d, rounds_ok, g->rounds);
    if (g->rounds == 0) {
        STAT_ADD(d, zero_rounds, 1);
    }
    if (g->pubs == 0) {
        /* could not even build the message: leave it to redelivery */
        gift_release(d, g, 0);
    }
}

/*
 * Dead-letter: the original bytes to gift.dlq.<platform> with the reason
 * and the delivery count in headers, and a GiftAck with status
 * dead_letter; the delivery is acked once both are stored.
 */
void
gift_dead_letter(dsp_t *d, dgift_t *g, const char *reason,
    const char *detail)
{
    Gift__V1__GiftAck a = GIFT__V1__GIFT_ACK__INIT;
    const char       *subj = natsMsg_GetSubject(g->msg);
    const char       *plat;
    const char       *hdrs[5];
    char              dsubj[256], msg_id[2 * GIFT_ID_MAX + 64], count[24];

    plat = subj && strncmp(subj, GIFT_SUBJ_EVENTS_PREFIX,
                           sizeof(GIFT_SUBJ_EVENTS_PREFIX) - 1) == 0
           ? subj + sizeof(GIFT_SUBJ_EVENTS_PREFIX) - 1 : "unknown";
    snprintf(dsubj, sizeof(dsubj), GIFT_SUBJ_DLQ_PREFIX "%s", plat);
    msg_id_stem(g, msg_id, sizeof(msg_id) - 4);
    strcat(msg_id, ":dlq");
    snprintf(count, sizeof(count), "%" PRIu64, g->delivered);
    hdrs[0] = GIFT_HDR_DLQ_REASON;
    hdrs[1] = reason;
    hdrs[2] = GIFT_HDR_DLQ_DELIVERIES;
    hdrs[3] = count;
    hdrs[4] = NULL;

    gift_log(GIFT_LOG_WARN, "dead letter: event %s (seq %" PRIu64 ", "
             "delivery %" PRIu64 ") device %s: %s%s%s", event_id(g), g->seq,
             g->delivered, g->dev ? g->dev->name : DSP_NO_DEVICE, reason,
             detail ? ": " : "", detail ? detail : "");

    g->state = GIFT_PUBLISHING;
    g->rpc = NULL;
    nats_in_publish(d, g, dsubj, natsMsg_GetData(g->msg),
                    (size_t) natsMsg_GetDataLength(g->msg), msg_id, hdrs);

    ack_fill(g, &a);
    a.status = GIFT__V1__ACK_STATUS__ACK_STATUS_DEAD_LETTER;
    a.reason = (char *) reason;
    publish_ack(d, g, &a, 0);
    STAT_ADD(d, dead_letters, 1);
    if (g->pubs == 0) {
        gift_release(d, g, 0);
    }
}

/*
 * The attempt record of g, key "a.<stem>" in GIFT_DONE: "v1 <failed
 * device attempts> <device> <parts confirmed> <their rounds>".  Written
 * before the nak of a failed attempt and after each confirmed part of a
 * split gift, as a core publish on the connection that then naks (so the
 * server has it before the redelivery); read back by the KV thread when
 * the gift comes back (dispatch_kv).  It is what counts attempts: the
 * server's delivery count also counts releases at stops and crashes, and
 * the consumer redelivers without limit (MaxDeliver -1).
 */
static void
attempt_record(dsp_t *d, dgift_t *g, uint32_t failures)
{
    char   subj[sizeof("$KV." GIFT_KV_DONE ".a.")
                + GIFT_KVKEY_SIZE(2 * GIFT_ID_MAX + 64)];
    char   stem[2 * GIFT_ID_MAX + 64], val[128];
    int    n, len;

    msg_id_stem(g, stem, sizeof(stem));
    n = snprintf(subj, sizeof(subj), "$KV." GIFT_KV_DONE ".a.");
    if (gift_kvkey_encode(stem, subj + n, sizeof(subj) - (size_t) n) <= 0) {
        return;
    }
    len = snprintf(val, sizeof(val), "v1 %" PRIu32 " %s %" PRIu32 " %"
                   PRIu64, failures, g->dev ? g->dev->name : DSP_NO_DEVICE,
                   g->parts_done, g->rounds_done);
    nats_in_publish_core(d, subj, val, (size_t) len);
}

/* The device did not confirm: retry later (its attempt recorded first),
 * or dead-letter the max_attempts-th failed attempt. */
static void
gift_fail(dsp_t *d, dgift_t *g, const char *reason, const char *detail)
{
    const dconf_t *c = d->conf;
    int64_t        delay;

    if (g->failures + 1 >= (uint32_t) c->max_attempts) {
        gift_dead_letter(d, g, reason, detail);
        return;
    }
    attempt_record(d, g, g->failures + 1);
    delay = retry_delay_ms(c->retry_delays_ms, c->nretry_delays,
                           g->failures + 1);
    gift_log(GIFT_LOG_DEBUG, "event %s device %s: %s%s%s; retry %" PRIu64
             " in %" PRId64 " ms", event_id(g), g->dev->name, reason,
             detail ? ": " : "", detail ? detail : "",
             (uint64_t) g->failures + 2, delay);
    STAT_ADD(d, retried, 1);
    gift_release(d, g, delay);
}













/*
 * What an RPC's end means for one of its gifts (scheduler.c reports it):
 * ok -- done, or the next part of a split gift; a silent device within its
 * grace -- back in the queue, no attempt spent; otherwise a failed attempt.
 * Returns 1 when g goes back to the head of its device's queue (only when
 * `room`).
 */
int
gift_answered(dsp_t *d, dgift_t *g, const drpc_t *r, drpc_reply_rc rc,
    const char *why, int64_t lat, int offline, int room)
{
    if (rc == RPC_REPLY_OK && r->part > 0) {
        /* one part of a split gift accepted */
        g->parts_done = r->part;
        g->rounds_done += r->rounds;
        if (gift_left(g) > 0 && !d->stopping && room) {
            attempt_record(d, g, g->failures);
            g->state = GIFT_QUEUED;
            return 1;
        }
        if (gift_left(g) > 0) {
            attempt_record(d, g, g->failures);
            gift_release(d, g, 0);
            STAT_ADD(d, released, 1);
            return 0;
        }
        gift_ok(d, g, lat, r->done_ms);
    } else if (rc == RPC_REPLY_OK) {
        g->rounds_done = g->rounds;
        gift_ok(d, g, lat, r->done_ms);
    } else if (offline && d->stopping) {
        gift_release(d, g, 0);              /* no attempt spent either */
        STAT_ADD(d, released, 1);
    } else if (offline && room) {
        /* like a paused device: it waits, no attempt spent */
        g->state = GIFT_QUEUED;
        STAT_ADD(d, offline_requeued, 1);
        return 1;
    } else {
        gift_fail(d, g, why == NULL ? "timeout" : rpc_error_reason(why),
                  why);
    }
    return 0;
}

/* ------------------------------------------------------------ deliveries */

/*
 * A marker can exist only if this very stream message was delivered
 * before (NumDelivered > 1), or when it is a DLQ replay (giftctl gives it
 * the Nats-Msg-Id "<event id>:replay:<seq>").  First deliveries, nearly
 * all of them, skip the lookup.
 */
static int
done_check_needed(dgift_t *g)
{
    const char *id = NULL;

    g->replay = natsMsgHeader_Get(g->msg, "Nats-Msg-Id", &id) == NATS_OK
                && id != NULL && strstr(id, ":replay:") != NULL;
    return g->delivered > 1 || g->replay;
}

/* Past max_gift_age (by nginx's clock, else the sender's)? */
static int
gift_expired(const dsp_t *d, const dgift_t *g)
{
    return g->received_ms > 0
           && gift_now_ms() - g->received_ms > d->conf->max_gift_age_s * 1000;
}

/* The per-gift limit (rules.max_rounds): above it a gift is clamped, or
 * dead-lettered "overflow" with over_max_rounds = "dead_letter".  0, or
 * -1 when g was finished. */
static int
gift_limit(dsp_t *d, dgift_t *g, uint64_t rounds)
{
    const drules_t *ru = d->conf->rules;
    uint64_t        max = ru->max_rounds ? ru->max_rounds : DSP_ROUNDS_JSON_MAX;
    char            why[96];

    g->rounds_req = rounds;
    g->rounds = rounds;
    if (rounds <= max) {
        return 0;
    }
    if (ru->over_dead_letter) {
        snprintf(why, sizeof(why), "%" PRIu64 " rounds above max_rounds %"
                 PRIu64, rounds, max);
        gift_dead_letter(d, g, "overflow", why);
        return -1;
    }
    gift_log(GIFT_LOG_WARN, "event %s: %" PRIu64 " rounds clamped to "
             "max_rounds %" PRIu64, event_id(g), rounds, max);
    g->rounds = max;
    g->capped = 1;
    STAT_ADD(d, capped, 1);
    return 0;
}

/* Does the device the rules give g hold its share already? */
static int
gift_device_busy(dsp_t *d, const dgift_t *g)
{
    const Gift__V1__GiftEvent *e = g->ev;
    droute_t                   rt;
    ddevice_t                 *dev;

    if (rules_route(d->conf->rules, e->platform, e->room_id, e->gift_id,
                    e->gift_name, e->diamond, 1, &rt) == ROUTE_NO_DEVICE)
    {
        return 0;
    }
    dev = device_get(d, rt.device);
    return dev != NULL && dev->held >= (size_t) d->conf->max_held;
}

/* Queue a routed gift for its device, or finish it when it has nothing
 * to turn. */
static void
gift_queue(dsp_t *d, dgift_t *g)
{
    const Gift__V1__GiftEvent *e = g->ev;

    gift_log(GIFT_LOG_DEBUG, "event %s (seq %" PRIu64 ", delivery %" PRIu64
             "): %s x%u%s -> %s, %" PRIu64 " rounds", e->event_id, g->seq,
             g->delivered, e->gift_name, e->quantity,
             e->streak_id && e->streak_id[0] ? " (streak frame)" : "",
             g->dev->name, g->rounds);
    if (g->rounds == 0) {
        /* nothing to turn: acknowledged without a command */
        gift_ok(d, g, 0, 0);
        return;
    }
    g->state = GIFT_QUEUED;
    queue_push_tail(g->dev, g);
    device_kick(d, g->dev);
}

/*
 * Route a decoded gift: its device and multiplier by the rules, then its
 * rounds; a streak frame's rounds wait for the KV thread to say what the
 * frame adds (dispatch_kv).
 */
static void
gift_route(dsp_t *d, dgift_t *g)
{
    const Gift__V1__GiftEvent *e = g->ev;
    droute_t                   rt;
    droute_rc                  rc;
    dkvjob_t                  *j;
    int                        streak = e->streak_id && e->streak_id[0];
    size_t                     n;

    /* a frame's own quantity is a running total: route it as 1 (the
     * overflow check of what it adds comes with its increment) */
    if (gift_expired(d, g)) {
        STAT_ADD(d, expired, 1);
        gift_dead_letter(d, g, "expired", NULL);
        return;
    }
    /* anything that can publish to NATS reaches us: the webhook's ranges
     * again */
    if (e->diamond > GIFT_DIAMOND_MAX || e->quantity > GIFT_QUANTITY_MAX
        || e->quantity == 0)
    {
        gift_dead_letter(d, g, "invalid", "diamond or quantity out of range");
        return;
    }
    rc = rules_route(d->conf->rules, e->platform, e->room_id, e->gift_id,
                     e->gift_name, e->diamond, streak ? 1 : e->quantity, &rt);
    g->diamond = rt.diamond;
    g->multiplier = rt.multiplier;
    if (g->first_dev[0] != '\0' && rc != ROUTE_NO_DEVICE
        && strcmp(g->first_dev, rt.device) != 0)
    {
        /* a retry goes where its first attempt went, whatever a reload
         * changed meanwhile (the device may have turned for it) */
        gift_log(GIFT_LOG_INFO, "event %s: retried on %s, its first "
                 "device (the rules now say %s)", e->event_id, g->first_dev,
                 rt.device);
        rt.device = g->first_dev;
    } else if (g->first_dev[0] != '\0' && rc == ROUTE_NO_DEVICE) {
        rt.device = g->first_dev;
        rc = ROUTE_OK;
        if (rules_rounds_raw(g->diamond, streak ? 1 : e->quantity,
                             g->multiplier, &rt.rounds) != 0)
        {
            rc = ROUTE_OVERFLOW;
        }
    }
    if (rc == ROUTE_NO_DEVICE) {
        gift_dead_letter(d, g, "no_route", e->gift_name);
        return;
    }
    g->dev = device_get(d, rt.device);
    if (g->dev == NULL) {
        gift_release(d, g, 1000);
        return;
    }
    if (g->dev->held >= (size_t) d->conf->max_held) {
        /* one device (paused, offline, slow) holds at most its share of
         * nats.max_inflight: the others keep theirs.  Back later; no
         * attempt spent. */
        STAT_ADD(d, busy_released, 1);
        gift_release(d, g, d->conf->busy_retry_ms);
        return;
    }
    g->dev->held++;
    g->dev_counted = 1;
    if (g->dev->drop_before_ms > 0 && g->received_ms <= g->dev->drop_before_ms)
    {
        gift_dead_letter(d, g, "dropped", "the backlog of a paused device, "
                         "dropped by the operator at resume");
        return;
    }
    if (rc == ROUTE_OVERFLOW
        && rules_rounds_raw(g->diamond, streak ? 1 : e->quantity,
                            g->multiplier, &rt.rounds) != 0)
    {
        /* beyond 2^53 (or 64 bits): not a number of rounds at all */
        gift_dead_letter(d, g, "overflow", NULL);
        return;
    }
    if (!streak) {
        if (gift_limit(d, g, rt.rounds) != 0) {
            return;
        }
        gift_queue(d, g);
        return;
    }

    STAT_ADD(d, streak_frames, 1);
    j = kv_job_new(KVJ_STREAK, g->seq);
    if (j == NULL) {
        gift_release(d, g, 1000);
        return;
    }
    j->count = e->streak_count ? e->streak_count : e->quantity;
    j->again = g->delivered > 1 || g->replay;
    j->end = e->streak_end;
    n = strlen(e->streak_id);
    j->nogroup = n >= 2 && strcmp(e->streak_id + n - 2, ":0") == 0;
    j->eh = streak_event_hash(e->event_id);
    n = GIFT_KVKEY_SIZE(strlen(e->streak_id)) + 2;
    j->key = malloc(n);
    if (j->key != NULL) {
        memcpy(j->key, "s.", 2);
        if (gift_kvkey_encode(e->streak_id, j->key + 2, n - 2) < 0) {
            free(j->key);
            j->key = NULL;
        }
    }
    n = GIFT_KVKEY_SIZE(strlen(e->event_id)) + 2;
    j->ckey = malloc(n);
    if (j->ckey != NULL) {
        memcpy(j->ckey, "e.", 2);
        if (gift_kvkey_encode(e->event_id, j->ckey + 2, n - 2) < 0) {
            free(j->ckey);
            j->ckey = NULL;
        }
    }
    if (j->key == NULL || j->ckey == NULL || kv_submit(d, j) != 0) {
        kv_job_free(j);
        gift_release(d, g, 1000);
        return;
    }
    g->state = GIFT_KV;
    g->job = j;
}

/*
 * The completion marker of g exists: the device already turned for it.
 * Publish the GiftAck stored in the marker again (its Nats-Msg-Id makes
 * GIFT_ACKS drop it if the first one was stored) and ack on its PubAck.
 */
static int
gift_done_again(dsp_t *d, dgift_t *g, const void *val, size_t len)
{
    Gift__V1__GiftAck *a;
    char               subject[sizeof(GIFT_SUBJ_ACKS_PREFIX) + DSP_DEVICE_MAX
                               + 8];
    char               msg_id[2 * GIFT_ID_MAX + 64];

    a = gift__v1__gift_ack__unpack(NULL, len, val);
    if (a == NULL || a->device_id == NULL
        || !rules_device_valid(a->device_id)
        || a->status != GIFT__V1__ACK_STATUS__ACK_STATUS_OK)
    {
        if (a != NULL) {
            gift__v1__gift_ack__free_unpacked(a, NULL);
        }
        gift_log(GIFT_LOG_WARN, "event %s: its GIFT_DONE marker is not a "
                 "GiftAck; handling the gift as new", event_id(g));
        return -1;
    }
    gift_log(GIFT_LOG_INFO, "event %s (seq %" PRIu64 ", delivery %" PRIu64
             ") was done already (%s, %" PRIu64 " rounds): acknowledged "
             "without a command", event_id(g), g->seq, g->delivered,
             a->device_id, a->rounds);
    snprintf(subject, sizeof(subject), GIFT_SUBJ_ACKS_PREFIX "%s",
             a->device_id);
    msg_id_stem(g, msg_id, sizeof(msg_id) - 4);
    strcat(msg_id, ":ack");
    gift__v1__gift_ack__free_unpacked(a, NULL);
    STAT_ADD(d, done_hits, 1);
    g->state = GIFT_PUBLISHING;
    nats_in_publish(d, g, subject, val, len, msg_id, NULL);
    if (g->pubs == 0) {
        gift_release(d, g, 0);
    }
    return 0;
}

void
dispatch_kv(dsp_t *d, dkvjob_t *j)
{
    dgift_t  *g = dmap_get(&d->by_seq, j->seq);
    uint64_t  rounds;

    d->kv.pending--;
    if (g == NULL || g->job != j) {
        kv_job_free(j);             /* released meanwhile */
        return;
    }
    g->job = NULL;
    if (g->msg == NULL) {
        gift_free(d, g);            /* abandoned at the stop deadline */
        kv_job_free(j);
        return;
    }
    if (j->failed || d->stopping) {
        gift_release(d, g, 0);
        STAT_ADD(d, released, 1);
        kv_job_free(j);
        return;
    }
    if (j->kind == KVJ_DONE) {
        if (j->afound) {
            g->failures = j->afail;
            g->parts_done = j->aparts;
            g->rounds_done = j->arounds;
            if (rules_device_valid(j->adev)) {
                memcpy(g->first_dev, j->adev, sizeof(g->first_dev));
            }
        }
        if (j->found && j->val == NULL) {
            /* the probe found its GiftAck in GIFT_ACKS: done */
            gift_log(GIFT_LOG_INFO, "event %s (seq %" PRIu64 ", delivery %"
                     PRIu64 ") was done already (its GiftAck is stored): "
                     "acknowledged without a command", event_id(g), g->seq,
                     g->delivered);
            STAT_ADD(d, done_hits, 1);
            kv_job_free(j);
            gift_ack_and_free(d, g);
            return;
        }
        if (!j->found || gift_done_again(d, g, j->val, j->len) != 0) {
            gift_route(d, g);
        }
        kv_job_free(j);
        return;
    }

    /* a streak frame: what it adds */
    STAT_ADD(d, streak_conflicts, (uint64_t) j->conflicts);
    if (j->expired) {
        kv_job_free(j);
        gift_dead_letter(d, g, "streak_expired", "no state for its streak "
                         "on a redelivery or replay: not counted from 0");
        return;
    }
    switch (j->how) {
    case STREAK_NEW:
        STAT_ADD(d, streak_new, 1);
        break;
    case STREAK_KNOWN:
        STAT_ADD(d, streak_known, 1);
        break;
    case STREAK_STALE:
        STAT_ADD(d, streak_stale, 1);
        break;
    }
    g->streak_inc = j->inc;
    gift_log(GIFT_LOG_DEBUG, "event %s: streak %s at %u adds %u (%s)",
             event_id(g), g->ev->streak_id, j->count, j->inc,
             j->how == STREAK_NEW ? "new" : j->how == STREAK_KNOWN
             ? "claimed before" : "nothing new");
    kv_job_free(j);
    if (rules_rounds_raw(g->diamond, g->streak_inc, g->multiplier, &rounds)
        != 0)
    {
        gift_dead_letter(d, g, "overflow", NULL);
        return;
    }
    if (gift_limit(d, g, rounds) != 0) {
        return;
    }
    gift_queue(d, g);
}


void
dispatch_msg(dsp_t *d, natsMsg *m)
{
    uint64_t       sseq, delivered, pending;
    dgift_t       *g;
    dkvjob_t      *j;
    int64_t        now = gift_mono_us();
    const Gift__V1__GiftEvent *e;

    if (js_ack_meta(natsMsg_GetReply(m), &sseq, &delivered, &pending) != 0) {
        gift_log(GIFT_LOG_WARN, "a message without JetStream metadata on %s;"
                 " dropped", natsMsg_GetSubject(m));
        natsMsg_Destroy(m);
        d->credit_back++;
        return;
    }

    if ((g = dmap_get(&d->by_seq, sseq)) != NULL) {
        /* The ack wait ran out while we held it (a long device queue, a
         * broker outage): keep the newest delivery, whose ack counts. */
        natsMsg_Destroy(g->msg);
        g->msg = m;
        g->delivered = delivered;
        held_touch(d, g, now);
        STAT_ADD(d, duplicates, 1);
        d->credit_back++;
        return;
    }
    if (d->stopping || !lease_active(d)) {
        /* stopping, or no longer the owner: at once to the next one, no
         * attempt spent */
        nats_in_ack(d, m, DACK_NAK, 0);
        natsMsg_Destroy(m);
        STAT_ADD(d, released, 1);
        d->credit_back++;
        return;
    }

    g = gift_new((size_t) natsMsg_GetDataLength(m));
    if (g == NULL) {
        natsMsg_Destroy(m);         /* redelivered after the ack wait */
        d->credit_back++;
        return;
    }
    g->msg = m;
    g->seq = sseq;
    g->delivered = delivered;
    STAT_SET(d, consumer_pending, pending);
    d->nheld++;
    STAT_ADD(d, received, 1);
    held_touch(d, g, now);
    dmap_put(&d->by_seq, g->seq, g);

    g->ev = gift__v1__gift_event__unpack(&g->pa,
                (size_t) natsMsg_GetDataLength(m),
                (const uint8_t *) natsMsg_GetData(m));
    e = g->ev;
    if (e == NULL || e->event_id == NULL || e->event_id[0] == '\0') {
        gift_dead_letter(d, g, "undecodable", NULL);
        return;
    }
    g->received_ms = e->received_at_ms > 0 ? e->received_at_ms
                                           : e->occurred_at_ms;

    if (done_check_needed(g) && gift_device_busy(d, g)) {
        /* a busy device's surplus coming back: released again before it
         * costs a KV lookup (the rules' device; the exact one, which may
         * be the recorded first device, is checked when it is routed) */
        STAT_ADD(d, busy_released, 1);
        gift_release(d, g, d->conf->busy_retry_ms);
        return;
    }
    if (done_check_needed(g)) {
        /* did an earlier delivery complete?  (a crash between the
         * device's answer and the ack) */
        j = kv_job_new(KVJ_DONE, g->seq);
        if (j != NULL && !d->conf->done_markers) {
            char stem[2 * GIFT_ID_MAX + 64];

            msg_id_stem(g, stem, sizeof(stem) - 4);
            strcat(stem, ":ack");
            j->probe_id = strdup(stem);
        }
        if (j != NULL) {
            char   stem[2 * GIFT_ID_MAX + 64];
            size_t n;

            msg_id_stem(g, stem, sizeof(stem));
            n = GIFT_KVKEY_SIZE(strlen(stem)) + 2;
            if ((j->akey = malloc(n)) != NULL) {
                memcpy(j->akey, "a.", 2);
                if (gift_kvkey_encode(stem, j->akey + 2, n - 2) <= 0) {
                    free(j->akey);
                    j->akey = NULL;
                }
            }
        }
        if (j != NULL
            && (d->conf->done_markers
                ? (j->key = malloc(GIFT_KVKEY_SIZE(strlen(e->event_id))))
                  != NULL
                  && gift_kvkey_encode(e->event_id, j->key,
                         GIFT_KVKEY_SIZE(strlen(e->event_id))) > 0
                : j->probe_id != NULL)
            && kv_submit(d, j) == 0)
        {
            g->state = GIFT_KV;
            g->job = j;
            STAT_ADD(d, done_checks, 1);
            return;
        }
        /* no check possible: the device's event-id window still keeps
         * it from turning twice */
        kv_job_free(j);
    }
    gift_route(d, g);
}

void
dispatch_puback(dsp_t *d, void *item)
{
    dpuback_t  ok, *p;
    dgift_t   *g;
    uint64_t   quiet;

    if ((uintptr_t) item & 1) {
        /* success, posted as the tagged message pointer alone */
        ok.m = (natsMsg *) ((uintptr_t) item & ~(uintptr_t) 1);
        ok.err = NATS_OK;
        p = &ok;
    } else {
        p = item;
    }
    g = dmap_del(&d->by_pub, (uint64_t) (uintptr_t) p->m);
    if (g == NULL) {
        natsMsg_Destroy(p->m);
        if (p != &ok) {
            free(p);
        }
        return;
    }
    if (p->err != NATS_OK) {
        STAT_ADD(d, pub_errors, 1);
        if (rlimit_ok(&rl_pub, gift_mono_us(), &quiet)) {
            gift_log(GIFT_LOG_WARN, "publish to %s for %s failed: %s (js "
                     "error %d); retrying every %d ms (%" PRIu64 " more "
                     "publish failures not logged)", natsMsg_GetSubject(p->m),
                     event_id(g), p->text, p->jerr, d->conf->publish_retry_ms,
                     quiet);
        }
        {
            dretry_t *r = calloc(1, sizeof(*r));

            if (r != NULL) {
                r->m = p->m;
                r->g = g;
                r->due_us = gift_mono_us()
                            + (int64_t) d->conf->publish_retry_ms * 1000;
                if (d->retries_tail) {
                    d->retries_tail->next = r;
                } else {
                    d->retries = r;
                }
                d->retries_tail = r;
                free(p);
                return;
            }
        }
        /* no memory for a retry: leave the gift to redelivery */
        natsMsg_Destroy(p->m);
        free(p);
        g->pubs--;
        if (g->pubs == 0) {
            gift_release(d, g, 0);
        }
        return;
    }
    natsMsg_Destroy(p->m);
    if (p != &ok) {
        free(p);
    }
    if (--g->pubs > 0) {
        return;
    }
    if (g->state == GIFT_PUBLISHING && g->msg != NULL) {
        gift_ack_and_free(d, g);
    } else {
        gift_free(d, g);            /* abandoned at shutdown: already naked */
    }
}

/* ------------------------------------------------------------ timers */

int64_t
dispatch_timers(dsp_t *d, int64_t now)
{
    int64_t   next = now + 1000000;
    int64_t   every;
    dretry_t *t;
    dgift_t  *g;
    size_t    k;

    next = sched_timers(d, now, next);

    /* publishes to send again */
    while ((t = d->retries) != NULL && t->due_us <= now) {
        d->retries = t->next;
        if (d->retries == NULL) {
            d->retries_tail = NULL;
        }
        if (t->g->msg == NULL || d->stopping > 1) {
            natsMsg_Destroy(t->m);
            if (--t->g->pubs == 0) {
                gift_free(d, t->g);
            }
        } else {
            nats_in_republish(d, t->g, t->m);
        }
        free(t);
    }
    if (d->retries != NULL && d->retries->due_us < next) {
        next = d->retries->due_us;
    }

    STAT_SET(d, held, d->nheld);
    STAT_SET(d, mqtt_up, (uint64_t) d->mqtt.ready);

    /* InProgress for gifts held a third of the ack wait: they wait for a
     * busy device or a broker; without it the server would redeliver */
    every = d->nats.ack_wait_us / 3;
    if (every < 1000000) {
        every = 1000000;
    }
    for (k = d->nheld; k > 0 && (g = d->held) != NULL
         && now - g->touched_us >= every; k--)
    {
        if (g->state == GIFT_QUEUED && g->msg != NULL && !d->stopping
            && gift_expired(d, g))
        {
            /* waited past max_gift_age (a paused or offline device): the
             * stream it belonged to is over */
            queue_unlink(g->dev, g);
            STAT_ADD(d, expired, 1);
            gift_dead_letter(d, g, "expired", "waited past max_gift_age");
            if (dmap_get(&d->by_seq, g->seq) != g) {
                continue;                   /* freed already */
            }
            held_touch(d, g, now);
            continue;
        }
        if (g->msg != NULL) {
            nats_in_ack(d, g->msg, DACK_WPI, 0);
        }
        STAT_ADD(d, in_progress, 1);
        held_touch(d, g, now);
    }
    if (d->held != NULL && d->held->touched_us + every < next) {
        next = d->held->touched_us + every;
    }
    return next;
}

/* ------------------------------------------------------------ stopping */

/* Release every gift waiting in a device queue (no attempt spent). */
static size_t
release_queued(dsp_t *d)
{
    size_t     i, n = 0;
    dgift_t   *g;

    for (i = 0; i < d->devcap; i++) {
        if (d->dev[i] == NULL) {
            continue;
        }
        while ((g = queue_pop(d->dev[i])) != NULL) {
            gift_release(d, g, 0);
            n++;
        }
    }
    STAT_ADD(d, released, n);
    return n;
}

void
dispatch_standby(dsp_t *d)
{
    size_t n = release_queued(d);

    gift_log(GIFT_LOG_WARN, "no longer the active dispatcher: released %zu "
             "queued gifts; %zu RPCs and publishes in flight finish", n,
             d->nheld);
}

void
dispatch_stop(dsp_t *d)
{
    size_t n;

    d->stopping = 1;
    nats_in_fetch_stop(d);
    n = release_queued(d);
    gift_log(GIFT_LOG_INFO, "stopping: released %zu queued gifts; waiting for"
             " %zu RPCs and publishes in flight (up to %d ms)", n, d->nheld,
             d->conf->shutdown_timeout_ms);
}

void
dispatch_abandon(dsp_t *d)
{
    drpc_t   *r;
    dgift_t  *g, *next;
    size_t    n = 0;

    d->stopping = 2;
    while ((r = d->rpcs) != NULL) {
        dmap_del(&d->by_rpc, r->n);
        rpc_unlink(d, r);
        r->dev->inflight--;
        for (g = r->gifts; g != NULL; g = next) {
            next = g->qnext;
            gift_release(d, g, 0);
            n++;
        }
        free(r);
    }
    /* gifts waiting for a PubAck: nak now, free when the PubAck comes or
     * at exit (the library still holds their messages) */
    for (g = d->held; g != NULL; g = next) {
        next = g->hnext;
        if (g->msg != NULL) {
            nats_in_ack(d, g->msg, DACK_NAK, 0);
            natsMsg_Destroy(g->msg);
            g->msg = NULL;
            n++;
        }
    }
    STAT_ADD(d, released, n);
    gift_log(GIFT_LOG_WARN, "stop deadline reached: released %zu gifts "
             "unfinished (they will be redelivered)", n);
}

int
dispatch_idle(const dsp_t *d)
{
    return d->nheld == 0 || (d->stopping > 1 && d->retries == NULL
                             && d->by_pub.n == 0);
}

void
dispatch_log_stats(const dsp_t *d)
{
    const dstats_t *s = &d->st;

    gift_log(GIFT_LOG_INFO, "stats: received %" PRIu64 " redelivered-held %"
             PRIu64 " ok %" PRIu64 " dead %" PRIu64 " retried %" PRIu64
             " released %" PRIu64 "; rpcs %" PRIu64 " ok %" PRIu64 " errors %"
             PRIu64 " timeouts %" PRIu64 " unknown-replies %" PRIu64
             "; publish errors %" PRIu64 "; held %zu, devices %zu",
             s->received, s->duplicates, s->acked_ok, s->dead_letters,
             s->retried, s->released, s->rpcs_sent, s->rpc_ok, s->rpc_errors,
             s->rpc_timeouts, s->replies_unknown, s->pub_errors, d->nheld,
             d->ndev);
}





/* ------------------------------------------------------------ lifetime */

int
dispatch_init(dsp_t *d)
{
    d->devcap = 64;
    d->dev = calloc(d->devcap, sizeof(ddevice_t *));
    if (d->dev == NULL
        || dmap_init(&d->by_seq, (size_t) d->conf->max_inflight) != 0
        || dmap_init(&d->by_rpc, 1024) != 0
        || dmap_init(&d->by_pub, (size_t) d->conf->max_inflight) != 0
        || dmap_init(&d->quarantine, 1024) != 0)
    {
        return -1;
    }
    dispatch_limits_reload(d);
    failpoint_init();
    return 0;
}

void
dispatch_destroy(dsp_t *d)
{
    drpc_t   *r;
    dretry_t *t;
    dgift_t  *g;
    size_t    i;

    while ((r = d->rpcs) != NULL) {
        rpc_unlink(d, r);
        free(r);
    }
    while ((t = d->retries) != NULL) {
        d->retries = t->next;
        natsMsg_Destroy(t->m);
        free(t);
    }
    d->retries_tail = NULL;
    while ((g = d->held) != NULL) {
        if (g->msg != NULL) {
            nats_in_ack(d, g->msg, DACK_NAK, 0);
        }
        gift_free(d, g);
    }
    for (i = 0; i < d->devcap; i++) {
        if (d->dev != NULL && d->dev[i] != NULL) {
            rate_free(&d->dev[i]->rate);
            free(d->dev[i]->name);
            free(d->dev[i]);
        }
    }
    free(d->dev);
    d->dev = NULL;
    dmap_free(&d->by_seq);
    dmap_free(&d->by_rpc);
    dmap_free(&d->by_pub);
    dmap_free(&d->quarantine);
    free(d->quar);
    d->quar = NULL;
}
