/*
 * publish.c: a gift's JetStream publishes in flight (main thread only).
 *
 * What records a gift's outcome goes out as JetStream publishes: its
 * GiftAck (publish_ack, with the completion marker before it), and for a
 * dead letter the original bytes to GIFTS_DLQ.  The delivery is acked when
 * every one of them got its PubAck.  This file owns that bookkeeping:
 *
 *   d->by_pub          message published -> its gift, until the PubAck
 *   g->pubs            how many of g's publishes wait for a PubAck
 *   d->retries         publishes that failed (at once, or in the PubAck),
 *                      sent again every nats.publish_retry_ms, oldest first
 *   pub_errors         the counter of failed publishes
 *
 * nats_in.c only sends (nats_in_publish, nats_in_republish: sent or not)
 * and hands back each PubAck, failure or timeout (nats_in_puback), which
 * the main loop passes to dispatch_puback() here.  When the last publish of a gift is stored, the
 * gift goes back to dispatch.c to be acked (gift_ack_and_free).
 *
 * A failed publish is retried without end while the gift is held: the
 * outcome happened (a motor turned), so it must be recorded, and the
 * gift's InProgress keeps the delivery alive meanwhile.  Nats-Msg-Id makes
 * the retries of a publish that was in fact stored harmless.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"
#include "dispatch_int.h"
#include "gift_json.h"
#include "gift_kvkey.h"
#include "gift_normalize.h"
#include "gift_util.h"

#define ACK_BUF   8192      /* a packed GiftAck: strings are <= 256 bytes */

/* publish failures: logged at most once a second (dispatch_int.h) */
static rlimit_t rl_pub;

/* ------------------------------------------------------------ sending */

/*
 * Send m for g, recorded in d->by_pub first: once the library has taken
 * the message, a record that failed could not be undone (the PubAck would
 * find no gift, and g would wait for it forever).  `again`: a resend, with
 * the Nats-Msg-Id the message carries.  0, or -1: not sent, m still ours.
 */
static int
send_tracked(dsp_t *d, dgift_t *g, natsMsg *m, const char *msg_id, int again)
{
    if (dmap_put(&d->by_pub, (uint64_t) (uintptr_t) m, g) != 0) {
        return -1;
    }
    if ((again ? nats_in_republish(d, m) : nats_in_publish(d, m, msg_id))
        != 0)
    {
        dmap_del(&d->by_pub, (uint64_t) (uintptr_t) m);
        return -1;
    }
    return 0;
}

/* Keep a message whose publish failed, to send it again later.  0, or -1
 * (memory: m is destroyed; the caller decides what becomes of g). */
static int
retry_later(dsp_t *d, dgift_t *g, natsMsg *m)
{
    dretry_t *r = calloc(1, sizeof(*r));

    if (r == NULL) {
        natsMsg_Destroy(m);
        gift_log(GIFT_LOG_ERR, "out of memory keeping a publish to retry");
        return -1;
    }
    r->m = m;
    r->g = g;
    r->due_us = gift_mono_us() + (int64_t) d->conf->publish_retry_ms * 1000;
    if (d->retries_tail) {
        d->retries_tail->next = r;
    } else {
        d->retries = r;
    }
    d->retries_tail = r;
    return 0;
}

int
gift_publish(dsp_t *d, dgift_t *g, const char *subject, const void *data,
    size_t len, const char *msg_id, const char **hdrs)
{
    natsMsg *m = nats_in_msg_new(d, subject, data, len, hdrs);

    if (m == NULL) {
        return -1;
    }
    g->pubs++;
    if (send_tracked(d, g, m, msg_id, 0) != 0) {
        STAT_ADD(d, pub_errors, 1);
        /* on -1 (memory) g waits for a publish that will not come:
         * held, unacknowledged, released at the next stop */
        (void) retry_later(d, g, m);
    }
    return 0;
}

/* ------------------------------------------------------------ GiftAcks */

/* The completion marker of g: `data` (its GiftAck) as the value of key
 * <event id> in GIFT_DONE, by a core publish (see publish_ack).  An empty
 * value says "done, its GiftAck is stored" (written when a redelivery
 * found the GiftAck but no marker: dispatch_kv). */
void
publish_marker(dsp_t *d, dgift_t *g, const void *data, size_t len)
{
    char  ksubj[sizeof("$KV." GIFT_KV_DONE ".") + GIFT_KVKEY_SIZE(GIFT_ID_MAX)];
    int   n;

    n = snprintf(ksubj, sizeof(ksubj), "$KV." GIFT_KV_DONE ".");
    if (gift_kvkey_encode(event_id(g), ksubj + n, sizeof(ksubj) - (size_t) n)
        > 0)
    {
        nats_in_publish_core(d, ksubj, data, len);
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
 * gift.  Nothing says whether a core publish arrived: a marker published
 * while the server stops (JetStream already down: "no responders") or
 * into a connection that breaks is lost without a word, and its GiftAck,
 * sent just after it, fails too.  So every retry of a GiftAck sends its
 * marker again first (publish_timers): the PubAck that leads to the ack
 * always comes after a marker sent on the same connection, and a
 * redelivery of the gift -- the server's ack wait may run out during the
 * outage, or cross our late ack -- finds it done instead of turning the
 * motor again.  One case this cannot cover: a server that stops runs its
 * streams down one by one, so the marker can find GIFT_DONE gone while
 * GIFT_ACKS still stores the GiftAck and answers.  The ack is then lost
 * with the server -- an ack is never sent on the next connection
 * (nats_in.c, acks_send) -- unless GIFTS still runs when it arrives, in
 * the milliseconds the server takes to stop its streams: that gift keeps
 * no marker.  A redelivery without a marker therefore also asks GIFT_ACKS
 * (kv.c, run_probe).
 */
void
publish_ack(dsp_t *d, dgift_t *g, Gift__V1__GiftAck *a, int marker)
{
    uint8_t  buf[ACK_BUF];
    char     subject[sizeof(GIFT_SUBJ_ACKS_PREFIX) + DSP_DEVICE_MAX + 8];
    char     msg_id[2 * GIFT_ID_MAX + 64];
    size_t   len;

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
        g->marker = 1;
        publish_marker(d, g, buf, len);
    }

    snprintf(subject, sizeof(subject), GIFT_SUBJ_ACKS_PREFIX "%s",
             a->device_id);
    msg_id_stem(g, msg_id, sizeof(msg_id) - 4);
    strcat(msg_id, ":ack");
    gift_publish(d, g, subject, buf, len, msg_id, NULL);
}

/* ------------------------------------------------------------ PubAcks */

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
        if (retry_later(d, g, p->m) == 0) {
            free(p);
            return;
        }
        /* no memory for a retry: leave the gift to redelivery */
        free(p);
        g->pubs--;
        if (g->pubs == 0) {
            gift_release(d, g, 0);
        }
        return;
    }
    nats_in_msg_free(d, p->m);
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

/* ------------------------------------------------------------ retries */

int64_t
publish_timers(dsp_t *d, int64_t now, int64_t next)
{
    dretry_t *t;

    /* publishes to send again */
    while ((t = d->retries) != NULL && t->due_us <= now) {
        if (t->g->msg != NULL && d->stopping <= 1 && nats_in_hot_down(d)) {
            /* NATS is away: a send would only add one more copy to
             * cnats's reconnect buffer (8 MB, full within a minute of
             * retries with 1,000 gifts held); they all go, once each,
             * when it is back (the reconnection wakes the loop) */
            int64_t again = now + (int64_t) d->conf->publish_retry_ms * 1000;

            return again < next ? again : next;
        }
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
            if (t->g->marker) {
                /* its GiftAck (a gift with a marker publishes nothing
                 * else): the marker may have been lost with it */
                publish_marker(d, t->g, natsMsg_GetData(t->m),
                           (size_t) natsMsg_GetDataLength(t->m));
            }
            if (send_tracked(d, t->g, t->m, NULL, 1) != 0) {
                (void) retry_later(d, t->g, t->m);
            }
        }
        free(t);
    }
    if (d->retries != NULL && d->retries->due_us < next) {
        next = d->retries->due_us;
    }
    return next;
}

int
publish_idle(const dsp_t *d)
{
    return d->retries == NULL && d->by_pub.n == 0;
}

/* ------------------------------------------------------------ lifetime */

int
publish_init(dsp_t *d)
{
    return dmap_init(&d->by_pub, (size_t) d->conf->max_inflight);
}

void
publish_destroy(dsp_t *d)
{
    dretry_t *t;

    while ((t = d->retries) != NULL) {
        d->retries = t->next;
        natsMsg_Destroy(t->m);
        free(t);
    }
    d->retries_tail = NULL;
    dmap_free(&d->by_pub);
}
