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
 * Gift state has one owner, the main thread's gift code, in three files
 * (dispatch_int.h is their interface): this one owns the gift itself --
 * its memory, the held list and map, decoding, routing, outcomes,
 * attempts, ack and nak; publish.c owns its publishes in flight (which
 * gift each belongs to, g->pubs, the retry list); timers.c owns what time
 * does to held gifts and the orderly stop.  The devices (queues, limits,
 * RPCs in flight) are scheduler.c's; it reports each gift of a finished
 * RPC back here (gift_answered).  The I/O modules (nats_in.c, kv.c,
 * mqtt_out.c) write none of it: they return results, post them to the
 * main thread's queues, or hand them to the dispatch_*() entry points.
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
 * The marker is written with the GiftAck (publish_ack, publish.c) once
 * the device answered ok; the delivery is acked on the GiftAck's PubAck.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dispatcher.h"
#include "dispatch_int.h"
#include "gift_kvkey.h"
#include "gift_normalize.h"
#include "gift_util.h"

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
void
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
void
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
    nats_in_msg_free(d, g->msg);     /* batched: see nats_in.c */
    free(g);
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
void
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
 * Failpoints for the tests (t/27), GIFT_DISPATCHER_FAILPOINT=
 * - "exit_before_ack=N": _exit(9) just before the N-th ack, when that
 *   gift's GiftAck and completion marker are stored: the crash between
 *   the device's answer and the ack, made exact;
 * - "exit_with_held_acks=N": _exit(9) just after the N-th ack, with it and
 *   the others held back by nats.ack_linger_ms not sent (nor anything
 *   else buffered): a crash within the linger;
 * - "break_with_held_acks=N": just after the N-th ack, with the acks held
 *   back, the NATS connection breaks (nats_in_break); the dispatcher goes
 *   on: a network's break within the linger.
 * Unset: no cost but one comparison.
 */
static long failpoint_acks = -1;
static int  failpoint_held;         /* 1: exit, 2: break, with held acks */

static void
failpoint_init(void)
{
    const char *f = getenv("GIFT_DISPATCHER_FAILPOINT");

    if (f != NULL && strncmp(f, "exit_before_ack=", 16) == 0) {
        failpoint_acks = strtol(f + 16, NULL, 10);
    } else if (f != NULL && strncmp(f, "exit_with_held_acks=", 20) == 0) {
        failpoint_acks = strtol(f + 20, NULL, 10);
        failpoint_held = 1;
    } else if (f != NULL && strncmp(f, "break_with_held_acks=", 21) == 0) {
        failpoint_acks = strtol(f + 21, NULL, 10);
        failpoint_held = 2;
    } else {
        return;
    }
    gift_log(GIFT_LOG_WARN, "failpoint: %s ack number %ld",
             failpoint_held == 2 ? "breaking the NATS connection with "
                                   "held-back acks after"
             : failpoint_held ? "exiting with held-back acks after"
                              : "exiting before",
             failpoint_acks);
}

void
gift_ack_and_free(dsp_t *d, dgift_t *g)
{
    natsStatus s;

    if (failpoint_acks > 0 && --failpoint_acks == 0 && !failpoint_held) {
        gift_log(GIFT_LOG_WARN, "failpoint: exiting before the ack of %s",
                 event_id(g));
        /* what was sent before the ack has left (a marker written just
         * now), as in a crash a moment later */
        (void) nats_in_flush(d, 2000);
        _exit(9);
    }
    s = nats_in_ack(d, g->msg, DACK_ACK, 0);       /* asynchronous */
    if (failpoint_acks == 0 && failpoint_held == 2) {
        failpoint_acks = -1;
        gift_log(GIFT_LOG_WARN, "failpoint: breaking the NATS connection "
                 "with %d acks held back, the last of %s",
                 nats_in_acks_held(d), event_id(g));
        nats_in_break(d);
    } else if (failpoint_acks == 0 && failpoint_held) {
        gift_log(GIFT_LOG_WARN, "failpoint: exiting with %d acks held back, "
                 "the last of %s", nats_in_acks_held(d), event_id(g));
        _exit(9);
    }

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
    /* each device attempt came with a delivery: never fewer than those
     * (nats-server 2.9 can present a redelivery as new, count 1) */
    snprintf(count, sizeof(count), "%" PRIu64,
             g->delivered > (uint64_t) g->failures + 1
             ? g->delivered : (uint64_t) g->failures + 1);
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
    gift_publish(d, g, dsubj, natsMsg_GetData(g->msg),
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
 * before (NumDelivered > 1, or a stream sequence at or below one delivered
 * before: seq_seen), or when it is a DLQ replay (giftctl gives it the
 * Nats-Msg-Id "<event id>:replay:<seq>").  First deliveries, nearly all of
 * them, skip the lookup.
 */
static int
done_check_needed(dgift_t *g)
{
    const char *id = NULL;

    g->replay = natsMsgHeader_Get(g->msg, "Nats-Msg-Id", &id) == NATS_OK
                && id != NULL && strstr(id, ":replay:") != NULL;
    return g->delivered > 1 || g->replay || g->seq_seen;
}

/* Past max_gift_age (by nginx's clock, else the sender's)? */
int
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
    gift_publish(d, g, subject, val, len, msg_id, NULL);
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
        if (j->found && (j->val == NULL || j->len == 0)) {
            /* the probe found its GiftAck in GIFT_ACKS (or an empty
             * marker says an earlier probe did): done */
            gift_log(GIFT_LOG_INFO, "event %s (seq %" PRIu64 ", delivery %"
                     PRIu64 ") was done already (%s): acknowledged without "
                     "a command", event_id(g), g->seq, g->delivered,
                     j->val == NULL ? "its GiftAck is stored"
                                    : "its marker says its GiftAck is stored");
            STAT_ADD(d, done_hits, 1);
            if (j->val == NULL && j->key != NULL) {
                /* its marker was lost: an empty one now covers later
                 * redeliveries past GIFT_ACKS' duplicate window */
                publish_marker(d, g, "", 0);
            }
            kv_job_free(j);
            gift_ack_and_free(d, g);
            return;
        }
        if (!j->found) {
            /* a redelivery whose earlier deliveries never completed (a
             * release, a crash before the answer): sent as new */
            gift_log(g->delivered > 1 ? GIFT_LOG_INFO : GIFT_LOG_DEBUG,
                     "event %s (seq %" PRIu64 ", delivery %" PRIu64 ") not "
                     "done before (no completion marker, no stored GiftAck):"
                     " handled as new", event_id(g), g->seq, g->delivered);
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
    int            seen;
    const Gift__V1__GiftEvent *e;

    if (js_ack_meta(natsMsg_GetReply(m), &sseq, &delivered, &pending) != 0) {
        gift_log(GIFT_LOG_WARN, "a message without JetStream metadata on %s;"
                 " dropped", natsMsg_GetSubject(m));
        natsMsg_Destroy(m);
        return;
    }

    /* A first delivery comes in stream order, above every sequence
     * delivered before; one at or below them was delivered before,
     * whatever its count says (the server may say 1: main.c,
     * lease_check) */
    seen = delivered == 1 && sseq <= d->seq_hwm;
    if (sseq > d->seq_hwm) {
        d->seq_hwm = sseq;
    }

    if ((g = dmap_get(&d->by_seq, sseq)) != NULL) {
        /* The ack wait ran out while we held it (a long device queue, a
         * broker outage): keep the newest delivery, whose ack counts. */
        natsMsg_Destroy(g->msg);
        g->msg = m;
        g->delivered = delivered;
        held_touch(d, g, now);
        STAT_ADD(d, duplicates, 1);
        return;
    }
    if (d->stopping || !lease_active(d)) {
        /* stopping, or no longer the owner: at once to the next one, no
         * attempt spent */
        nats_in_ack(d, m, DACK_NAK, 0);
        natsMsg_Destroy(m);
        STAT_ADD(d, released, 1);
        return;
    }

    g = gift_new((size_t) natsMsg_GetDataLength(m));
    if (g == NULL) {
        natsMsg_Destroy(m);         /* redelivered after the ack wait */
        return;
    }
    g->msg = m;
    g->seq = sseq;
    g->delivered = delivered;
    g->seq_seen = seen;
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
        if (j != NULL) {
            /* without markers the probe of GIFT_ACKS answers; with them
             * it answers when the marker is missing (kv.c) */
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

/* ------------------------------------------------------------ lifetime */

int
dispatch_init(dsp_t *d)
{
    d->devcap = 64;
    d->dev = calloc(d->devcap, sizeof(ddevice_t *));
    if (d->dev == NULL
        || dmap_init(&d->by_seq, (size_t) d->conf->max_inflight) != 0
        || dmap_init(&d->by_rpc, 1024) != 0
        || dmap_init(&d->quarantine, 1024) != 0
        || publish_init(d) != 0)
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
    dgift_t  *g;
    size_t    i;

    while ((r = d->rpcs) != NULL) {
        rpc_unlink(d, r);
        free(r);
    }
    publish_destroy(d);
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
    dmap_free(&d->quarantine);
    free(d->quar);
    d->quar = NULL;
}
