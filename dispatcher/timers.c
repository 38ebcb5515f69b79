/*
 * timers.c: what time does to held gifts, and the orderly stop (main
 * thread only).
 *
 * dispatch_timers() is the main loop's tick: it runs the scheduler's
 * timers (RPC deadlines, quarantine, rate and probe wake-ups) and the
 * publish retries (publish.c), then walks the held gifts oldest first:
 * one held for a third of the ack wait gets an InProgress (it waits for a
 * busy device or a broker; without it the server would redeliver), and a
 * queued one past max_gift_age is dead-lettered "expired".
 *
 * Stopping, in the order of main.c's loop: dispatch_stop() stops fetching
 * and releases what waits in device queues (a nak without delay: no
 * attempt spent); RPCs and publishes in flight finish; when
 * nats.shutdown_timeout_ms passes, dispatch_abandon() releases the rest;
 * dispatch_idle() says when nothing is left.  dispatch_standby() is the
 * same release for a dispatcher that lost the owner lease.
 *
 * It owns no state of its own: d->stopping, and the walk over d->held
 * (dispatch.c's list, in touch order).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "dispatcher.h"
#include "dispatch_int.h"
#include "gift_util.h"

/* ------------------------------------------------------------ timers */

int64_t
dispatch_timers(dsp_t *d, int64_t now)
{
    int64_t   next = now + 1000000;
    int64_t   every;
    dgift_t  *g;
    size_t    k;

    next = sched_timers(d, now, next);
    next = publish_timers(d, now, next);

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
            uint64_t seq = g->seq;

            queue_unlink(g->dev, g);
            STAT_ADD(d, expired, 1);
            gift_dead_letter(d, g, "expired", "waited past max_gift_age");
            if (dmap_get(&d->by_seq, seq) != g) {
                continue;                   /* freed already: g is gone */
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
    return d->nheld == 0 || (d->stopping > 1 && publish_idle(d));
}
