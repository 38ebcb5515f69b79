/*
 * dispatch.c: the life of a gift inside the dispatcher (main thread only).
 *
 *   delivery --decode/route--> QUEUED on its device
 *            --device slot--> SENT in an RPC (several gifts when coalesced)
 *            --reply ok-----> PUBLISHING its GiftAck --PubAck--> ack, freed
 *            --error/timeout> NakWithDelay (retry), or on the last delivery
 *                             PUBLISHING DLQ + GiftAck dead_letter --> ack
 *
 * A gift is acknowledged on NATS only after every publish recording its
 * outcome got its PubAck.  Until then it is "held": counted against
 * nats.max_inflight, kept alive with InProgress, and released with a nak
 * when the daemon stops before its outcome is known.
 *
 * Devices: each has a FIFO queue and at most devices.max_inflight RPCs in
 * flight.  When a slot frees, the next RPC takes up to
 * devices.coalesce_max_events queued gifts (rounds summed, each listed in
 * "events"), so a busy motor gets fewer, larger commands, and every gift
 * still gets its own GiftAck.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"
#include "gift_normalize.h"
#include "gift_util.h"

#define ACK_BUF   8192      /* a packed GiftAck: strings are <= 256 bytes */

/* ------------------------------------------------------------ logging */

/*
 * Outages fail thousands of gifts at once (every GiftAck publish during a
 * NATS restart, every RPC of a dead broker): log the first of a kind, then
 * at most one line a second saying how many were not logged.
 */
typedef struct {
    int64_t   next_us;
    uint64_t  quiet;
} rlimit_t;

static int
rlimit_ok(rlimit_t *r, int64_t now, uint64_t *quiet)
{
    if (now < r->next_us) {
        r->quiet++;
        return 0;
    }
    *quiet = r->quiet;
    r->quiet = 0;
    r->next_us = now + 1000000;
    return 1;
}

static rlimit_t rl_pub, rl_rpc;

/* ------------------------------------------------------------ devices */

static uint64_t
str_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL;

    for (; *s; s++) {
        h = (h ^ (unsigned char) *s) * 1099511628211ULL;
    }
    return h;
}

static ddevice_t *
device_find(dsp_t *d, const char *name, size_t *slot)
{
    size_t mask = d->devcap - 1, i;

    for (i = str_hash(name) & mask; d->dev[i] != NULL; i = (i + 1) & mask) {
        if (strcmp(d->dev[i]->name, name) == 0) {
            return d->dev[i];
        }
    }
    *slot = i;
    return NULL;
}

/* The device named `name`, created on first use (never removed: the set of
 * names is bounded by the rules ever loaded). */
static ddevice_t *
device_get(dsp_t *d, const char *name)
{
    ddevice_t *dev;
    size_t     slot, i;

    if ((dev = device_find(d, name, &slot)) != NULL) {
        return dev;
    }
    if ((d->ndev + 1) * 2 > d->devcap) {
        ddevice_t **old = d->dev;
        size_t      oldcap = d->devcap;

        d->dev = calloc(oldcap * 2, sizeof(ddevice_t *));
        if (d->dev == NULL) {
            d->dev = old;
            return NULL;
        }
        d->devcap = oldcap * 2;
        for (i = 0; i < oldcap; i++) {
            if (old[i] != NULL) {
                device_find(d, old[i]->name, &slot);
                d->dev[slot] = old[i];
            }
        }
        free(old);
        device_find(d, name, &slot);
    }
    dev = calloc(1, sizeof(*dev));
    if (dev == NULL || (dev->name = strdup(name)) == NULL) {
        free(dev);
        return NULL;
    }
    d->dev[slot] = dev;
    d->ndev++;
    return dev;
}

static void
queue_push_tail(ddevice_t *dev, dgift_t *g)
{
    g->qnext = NULL;
    g->qprev = dev->qtail;
    if (dev->qtail) {
        dev->qtail->qnext = g;
    } else {
        dev->qhead = g;
    }
    dev->qtail = g;
    dev->queued++;
}

static void
queue_push_head(ddevice_t *dev, dgift_t *g)
{
    g->qprev = NULL;
    g->qnext = dev->qhead;
    if (dev->qhead) {
        dev->qhead->qprev = g;
    } else {
        dev->qtail = g;
    }
    dev->qhead = g;
    dev->queued++;
}

static dgift_t *
queue_pop(ddevice_t *dev)
{
    dgift_t *g = dev->qhead;

    if (g != NULL) {
        dev->qhead = g->qnext;
        if (dev->qhead) {
            dev->qhead->qprev = NULL;
        } else {
            dev->qtail = NULL;
        }
        g->qnext = g->qprev = NULL;
        dev->queued--;
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
    held_unlink(d, g);
    dmap_del(&d->by_seq, g->seq);
    d->nheld--;
    if (g->ev) {
        gift__v1__gift_event__free_unpacked(g->ev, NULL);
    }
    natsMsg_Destroy(g->msg);
    free(g);
    d->credit_back++;
}

static const char *
event_id(const dgift_t *g)
{
    return g->ev && g->ev->event_id ? g->ev->event_id : "";
}

static void
gift_ack_and_free(dsp_t *d, dgift_t *g)
{
    natsStatus s = natsMsg_Ack(g->msg, NULL);     /* asynchronous (NULL) */

    if (s != NATS_OK) {
        /* redelivered after the ack wait; the device and GIFT_ACKS
         * deduplicate the repeat */
        gift_log(GIFT_LOG_WARN, "ack of %s (seq %" PRIu64 "): %s",
                 event_id(g), g->seq, natsStatus_GetText(s));
    }
    gift_free(d, g);
}

static void
gift_release(dsp_t *d, dgift_t *g, int64_t delay_ms)
{
    natsStatus s;

    /* on failure (NATS down) it comes back after the ack wait anyway */
    s = delay_ms > 0 ? natsMsg_NakWithDelay(g->msg, delay_ms, NULL)
                     : natsMsg_Nak(g->msg, NULL);
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
    a->attempts = (uint32_t) g->delivered;
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

static void
publish_ack(dsp_t *d, dgift_t *g, Gift__V1__GiftAck *a)
{
    uint8_t  buf[ACK_BUF];
    char     subject[sizeof(GIFT_SUBJ_ACKS_PREFIX) + DSP_DEVICE_MAX + 8];
    char     msg_id[GIFT_ID_MAX + 32];
    size_t   len;

    len = gift__v1__gift_ack__get_packed_size(a);
    if (len > sizeof(buf)) {
        gift_log(GIFT_LOG_ERR, "GiftAck of %s too large (%zu bytes)",
                 event_id(g), len);
        return;
    }
    gift__v1__gift_ack__pack(a, buf);
    snprintf(subject, sizeof(subject), GIFT_SUBJ_ACKS_PREFIX "%s",
             a->device_id);
    if (event_id(g)[0] != '\0') {
        snprintf(msg_id, sizeof(msg_id), "%s:ack", event_id(g));
    } else {
        snprintf(msg_id, sizeof(msg_id), "seq-%" PRIu64 ":ack", g->seq);
    }
    nats_in_publish(d, g, subject, buf, len, msg_id, NULL);
}

/* The device turned: record it. */
static void
gift_ok(dsp_t *d, dgift_t *g, int64_t latency_us)
{
    Gift__V1__GiftAck a = GIFT__V1__GIFT_ACK__INIT;

    g->state = GIFT_PUBLISHING;
    g->rpc = NULL;
    ack_fill(g, &a);
    a.status = GIFT__V1__ACK_STATUS__ACK_STATUS_OK;
    a.rpc_latency_us = latency_us > 0 ? (uint64_t) latency_us : 0;
    publish_ack(d, g, &a);
    if (g->dev) {
        g->dev->gifts_ok++;
        g->dev->rounds_ok += g->rounds;
    }
    d->st.acked_ok++;
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
static void
gift_dead_letter(dsp_t *d, dgift_t *g, const char *reason,
    const char *detail)
{
    Gift__V1__GiftAck a = GIFT__V1__GIFT_ACK__INIT;
    const char       *subj = natsMsg_GetSubject(g->msg);
    const char       *plat;
    const char       *hdrs[5];
    char              dsubj[256], msg_id[GIFT_ID_MAX + 32], count[24];

    plat = subj && strncmp(subj, GIFT_SUBJ_EVENTS_PREFIX,
                           sizeof(GIFT_SUBJ_EVENTS_PREFIX) - 1) == 0
           ? subj + sizeof(GIFT_SUBJ_EVENTS_PREFIX) - 1 : "unknown";
    snprintf(dsubj, sizeof(dsubj), GIFT_SUBJ_DLQ_PREFIX "%s", plat);
    if (event_id(g)[0] != '\0') {
        snprintf(msg_id, sizeof(msg_id), "%s:dlq", event_id(g));
    } else {
        snprintf(msg_id, sizeof(msg_id), "seq-%" PRIu64 ":dlq", g->seq);
    }
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
    publish_ack(d, g, &a);
    d->st.dead_letters++;
    if (g->pubs == 0) {
        gift_release(d, g, 0);
    }
}

/* The device did not confirm: retry later, or dead-letter the last try
 * (the server never redelivers past MaxDeliver). */
static void
gift_fail(dsp_t *d, dgift_t *g, const char *reason, const char *detail)
{
    const dconf_t *c = d->conf;
    size_t         i;

    if (g->delivered >= (uint64_t) d->nats.max_deliver) {
        gift_dead_letter(d, g, reason, detail);
        return;
    }
    i = g->delivered > 0 ? (size_t) g->delivered - 1 : 0;
    if (i >= c->nretry_delays) {
        i = c->nretry_delays - 1;
    }
    gift_log(GIFT_LOG_DEBUG, "event %s device %s: %s%s%s; retry %" PRIu64
             " in %" PRId64 " ms", event_id(g), g->dev->name, reason,
             detail ? ": " : "", detail ? detail : "", g->delivered + 1,
             c->retry_delays_ms[i]);
    d->st.retried++;
    gift_release(d, g, c->retry_delays_ms[i]);
}

/* ------------------------------------------------------------ RPCs */

static void
rpc_link(dsp_t *d, drpc_t *r)
{
    /* one timeout for all: appending keeps the list sorted by deadline */
    r->tnext = NULL;
    r->tprev = d->rpcs_tail;
    if (d->rpcs_tail) {
        d->rpcs_tail->tnext = r;
    } else {
        d->rpcs = r;
    }
    d->rpcs_tail = r;
}

static void
rpc_unlink(dsp_t *d, drpc_t *r)
{
    if (r->tprev) {
        r->tprev->tnext = r->tnext;
    } else {
        d->rpcs = r->tnext;
    }
    if (r->tnext) {
        r->tnext->tprev = r->tprev;
    } else {
        d->rpcs_tail = r->tprev;
    }
}

/* Send what the device's slots allow, coalescing queued gifts. */
static void
device_kick(dsp_t *d, ddevice_t *dev)
{
    const dconf_t *c = d->conf;
    drpc_t        *r;
    dgift_t       *g, *last;
    int64_t        now;

    while (dev->qhead != NULL && dev->inflight < c->dev_max_inflight
           && d->mqtt.ready)
    {
        r = calloc(1, sizeof(*r));
        if (r == NULL) {
            return;
        }
        r->dev = dev;
        r->n = rpc_ids_next(&d->mqtt.ids);
        last = NULL;
        while (dev->qhead != NULL
               && r->ngifts < (size_t) c->coalesce_max_events
               && (r->ngifts == 0
                   || r->rounds + dev->qhead->rounds
                      <= c->coalesce_max_rounds))
        {
            g = queue_pop(dev);
            g->state = GIFT_SENT;
            g->rpc = r;
            if (last) {
                last->qnext = g;
            } else {
                r->gifts = g;
            }
            last = g;
            r->rounds += g->rounds;
            r->ngifts++;
        }
        if (mqtt_out_send(d, r) != 0) {
            /* not connected after all: put them back, in order */
            dgift_t *rev[1024];
            size_t   k = 0;

            for (g = r->gifts; g != NULL && k < 1024; g = g->qnext) {
                rev[k++] = g;
            }
            while (k-- > 0) {
                rev[k]->state = GIFT_QUEUED;
                rev[k]->rpc = NULL;
                queue_push_head(dev, rev[k]);
            }
            free(r);
            return;
        }
        now = gift_mono_us();
        r->sent_us = now;
        r->deadline_us = now + (int64_t) c->rpc_timeout_ms * 1000;
        if (dmap_put(&d->by_rpc, r->n, r) != 0) {
            gift_log(GIFT_LOG_ERR, "out of memory tracking an RPC");
        }
        rpc_link(d, r);
        dev->inflight++;
        dev->rpcs++;
        d->st.rpcs_sent++;
    }
}

/* An RPC is over (reply or timeout): free its slot, settle its gifts. */
static void
rpc_finish(dsp_t *d, drpc_t *r, drpc_reply_rc rc, const char *why)
{
    ddevice_t *dev = r->dev;
    dgift_t   *g, *next;
    int64_t    lat = gift_mono_us() - r->sent_us;

    rpc_unlink(d, r);
    dev->inflight--;
    for (g = r->gifts; g != NULL; g = next) {
        next = g->qnext;
        g->qnext = NULL;
        if (rc == RPC_REPLY_OK) {
            gift_ok(d, g, lat);
        } else {
            gift_fail(d, g, why == NULL ? "timeout" : "device_error", why);
        }
    }
    free(r);
    if (!d->stopping) {
        device_kick(d, dev);
    }
}

void
dispatch_reply(dsp_t *d, uint64_t n, const char *payload, size_t len)
{
    drpc_t        *r = dmap_del(&d->by_rpc, n);
    drpc_reply_rc  rc;
    char           err[160];
    uint64_t       quiet;

    if (r == NULL) {
        d->st.replies_unknown++;
        gift_log(GIFT_LOG_DEBUG, "reply %" PRIu64 " is not ours (another "
                 "instance, or timed out)", n);
        return;
    }
    rc = rpc_reply_parse(payload, len, err, sizeof(err));
    if (rc == RPC_REPLY_OK) {
        d->st.rpc_ok++;
        rpc_finish(d, r, rc, NULL);
    } else {
        d->st.rpc_errors++;
        if (rlimit_ok(&rl_rpc, gift_mono_us(), &quiet)) {
            gift_log(GIFT_LOG_WARN, "device %s: RPC %" PRIu64 " failed: %s "
                     "(%" PRIu64 " more RPC failures not logged)",
                     r->dev->name, n, err, quiet);
        }
        rpc_finish(d, r, rc, err);
    }
}

void
dispatch_kick_all(dsp_t *d)
{
    size_t i;

    for (i = 0; i < d->devcap; i++) {
        if (d->dev[i] != NULL && d->dev[i]->qhead != NULL) {
            device_kick(d, d->dev[i]);
        }
    }
}

/* ------------------------------------------------------------ deliveries */

void
dispatch_msg(dsp_t *d, natsMsg *m)
{
    jsMsgMetaData *meta = NULL;
    dgift_t       *g;
    droute_t       rt;
    droute_rc      rc;
    int64_t        now = gift_mono_us();
    const Gift__V1__GiftEvent *e;

    if (natsMsg_GetMetaData(&meta, m) != NATS_OK) {
        gift_log(GIFT_LOG_WARN, "a message without JetStream metadata on %s;"
                 " dropped", natsMsg_GetSubject(m));
        natsMsg_Destroy(m);
        d->credit_back++;
        return;
    }

    if ((g = dmap_get(&d->by_seq, meta->Sequence.Stream)) != NULL) {
        /* The ack wait ran out while we held it (a long device queue, a
         * broker outage): keep the newest delivery, whose ack counts. */
        natsMsg_Destroy(g->msg);
        g->msg = m;
        g->delivered = meta->NumDelivered;
        held_touch(d, g, now);
        jsMsgMetaData_Destroy(meta);
        d->st.duplicates++;
        d->credit_back++;
        return;
    }
    if (d->stopping) {
        natsMsg_Nak(m, NULL);
        natsMsg_Destroy(m);
        jsMsgMetaData_Destroy(meta);
        d->st.released++;
        d->credit_back++;
        return;
    }

    g = calloc(1, sizeof(*g));
    if (g == NULL) {
        natsMsg_Destroy(m);         /* redelivered after the ack wait */
        jsMsgMetaData_Destroy(meta);
        d->credit_back++;
        return;
    }
    g->msg = m;
    g->seq = meta->Sequence.Stream;
    g->delivered = meta->NumDelivered;
    jsMsgMetaData_Destroy(meta);
    d->nheld++;
    d->st.received++;
    held_touch(d, g, now);
    dmap_put(&d->by_seq, g->seq, g);

    g->ev = gift__v1__gift_event__unpack(NULL,
                (size_t) natsMsg_GetDataLength(m),
                (const uint8_t *) natsMsg_GetData(m));
    e = g->ev;
    if (e == NULL || e->event_id == NULL || e->event_id[0] == '\0') {
        gift_dead_letter(d, g, "undecodable", NULL);
        return;
    }

    rc = rules_route(d->conf->rules, e->platform, e->room_id, e->gift_id,
                     e->gift_name, e->diamond, e->quantity, &rt);
    g->diamond = rt.diamond;
    if (rc == ROUTE_NO_DEVICE) {
        gift_dead_letter(d, g, "no_route", e->gift_name);
        return;
    }
    g->dev = device_get(d, rt.device);
    if (g->dev == NULL) {
        gift_release(d, g, 1000);
        return;
    }
    if (rc == ROUTE_OVERFLOW) {
        gift_dead_letter(d, g, "overflow", NULL);
        return;
    }
    g->rounds = rt.rounds;
    gift_log(GIFT_LOG_DEBUG, "event %s (seq %" PRIu64 ", delivery %" PRIu64
             "): %s x%u -> %s, %" PRIu64 " rounds", e->event_id, g->seq,
             g->delivered, e->gift_name, e->quantity, g->dev->name,
             g->rounds);

    if (g->rounds == 0) {
        /* nothing to turn: acknowledged without a command */
        gift_ok(d, g, 0);
        return;
    }
    g->state = GIFT_QUEUED;
    queue_push_tail(g->dev, g);
    device_kick(d, g->dev);
}

void
dispatch_puback(dsp_t *d, dpuback_t *p)
{
    dgift_t  *g = dmap_del(&d->by_pub, (uint64_t) (uintptr_t) p->m);
    uint64_t  quiet;

    if (g == NULL) {
        natsMsg_Destroy(p->m);
        free(p);
        return;
    }
    if (p->err != NATS_OK) {
        d->st.pub_errors++;
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
    free(p);
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
    drpc_t   *r;
    dretry_t *t;
    dgift_t  *g;
    size_t    k;
    uint64_t  quiet;

    /* RPCs past their deadline */
    while ((r = d->rpcs) != NULL && r->deadline_us <= now) {
        dmap_del(&d->by_rpc, r->n);
        d->st.rpc_timeouts++;
        if (rlimit_ok(&rl_rpc, now, &quiet)) {
            gift_log(GIFT_LOG_WARN, "device %s: RPC %" PRIu64 " (%zu gifts) "
                     "timed out after %d ms (%" PRIu64 " more RPC failures "
                     "not logged)", r->dev->name, r->n, r->ngifts,
                     d->conf->rpc_timeout_ms, quiet);
        }
        rpc_finish(d, r, RPC_REPLY_MALFORMED, NULL);
    }
    if (d->rpcs != NULL && d->rpcs->deadline_us < next) {
        next = d->rpcs->deadline_us;
    }

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

    /* InProgress for gifts held a third of the ack wait: they wait for a
     * busy device or a broker; without it the server would redeliver */
    every = d->nats.ack_wait_us / 3;
    if (every < 1000000) {
        every = 1000000;
    }
    for (k = d->nheld; k > 0 && (g = d->held) != NULL
         && now - g->touched_us >= every; k--)
    {
        natsMsg_InProgress(g->msg, NULL);
        d->st.in_progress++;
        held_touch(d, g, now);
    }
    if (d->held != NULL && d->held->touched_us + every < next) {
        next = d->held->touched_us + every;
    }
    return next;
}

/* ------------------------------------------------------------ stopping */

void
dispatch_stop(dsp_t *d)
{
    size_t     i, n = 0;
    dgift_t   *g;

    d->stopping = 1;
    nats_in_fetch_stop(d);
    for (i = 0; i < d->devcap; i++) {
        if (d->dev[i] == NULL) {
            continue;
        }
        while ((g = queue_pop(d->dev[i])) != NULL) {
            gift_release(d, g, 0);
            n++;
        }
    }
    d->st.released += n;
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
            natsMsg_Nak(g->msg, NULL);
            natsMsg_Destroy(g->msg);
            g->msg = NULL;
            n++;
        }
    }
    d->st.released += n;
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
        || dmap_init(&d->by_pub, (size_t) d->conf->max_inflight) != 0)
    {
        return -1;
    }
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
            natsMsg_Nak(g->msg, NULL);
        }
        gift_free(d, g);
    }
    for (i = 0; i < d->devcap; i++) {
        if (d->dev != NULL && d->dev[i] != NULL) {
            free(d->dev[i]->name);
            free(d->dev[i]);
        }
    }
    free(d->dev);
    d->dev = NULL;
    dmap_free(&d->by_seq);
    dmap_free(&d->by_rpc);
    dmap_free(&d->by_pub);
}
