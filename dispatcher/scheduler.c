/*
 * scheduler.c: the devices (main thread only).
 *
 * Each device has a FIFO queue and at most devices.max_inflight RPCs in
 * flight.  When a slot frees, the next RPC takes up to
 * devices.coalesce_max_events queued gifts and coalesce_max_rounds rounds
 * (rounds summed, each gift listed in "events"), so a busy motor gets
 * fewer, larger commands, and every gift still gets its own GiftAck; a gift
 * above coalesce_max_rounds goes alone, in parts "<event id>#k".  A paused
 * or "stopped" device sends nothing; a device with a rate limit sends only
 * what fits in its last minute, and is kicked again when more fits
 * (limits.c); a device that does not answer is probed one RPC at a time.
 * Waiting gifts stay held (dispatch.c).
 *
 * RPC ids never repeat within mqtt.late_reply_ms of a timeout, so a late
 * reply only completes its own command.  When an RPC ends, every gift in
 * it is reported to dispatch.c (gift_answered), which owns gift state.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"
#include "dispatch_int.h"

static rlimit_t rl_rpc, rl_ids;

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

/* The effective switches: KV GIFT_DEVICES over devices.device over the
 * devices defaults. */
static void
device_limits(dsp_t *d, ddevice_t *dev)
{
    const dconf_t *c = d->conf;
    size_t         i;
    int            paused = 0;
    int64_t        rpm = -1;

    for (i = 0; i < c->ndevconf; i++) {
        if (strcmp(c->devconf[i].id, dev->name) == 0) {
            paused = c->devconf[i].paused;
            rpm = c->devconf[i].rounds_per_minute;
            break;
        }
    }
    /* -1: not set; -2: "stopped"; 0: "unlimited"; else the limit */
    if (dev->kv_rpm != -1) {
        rpm = dev->kv_rpm;
    }
    if (dev->kv_paused >= 0) {
        paused = dev->kv_paused;
    }
    {
        uint64_t eff = rpm == -1 ? c->rounds_per_minute
                       : rpm == -2 ? DSP_RPM_STOPPED : (uint64_t) rpm;

        if (paused != dev->paused || eff != dev->rpm) {
            if (eff == DSP_RPM_STOPPED) {
                gift_log(GIFT_LOG_INFO, "device %s: %s, rate stopped",
                         dev->name, paused ? "paused" : "running");
            } else if (eff == 0) {
                gift_log(GIFT_LOG_INFO, "device %s: %s, rate unlimited",
                         dev->name, paused ? "paused" : "running");
            } else {
                gift_log(GIFT_LOG_INFO, "device %s: %s, %" PRIu64 " rounds"
                         " per minute", dev->name, paused ? "paused"
                         : "running", eff);
            }
        }
        dev->paused = paused;
        dev->rpm = eff;
    }
}

/* The device named `name`, created on first use (never removed: the set of
 * names is bounded by the rules ever loaded). */
ddevice_t *
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
    dev->kv_paused = -1;
    dev->kv_rpm = -1;
    dev->paused = -1;                   /* logged once at creation */
    device_limits(d, dev);
    d->dev[slot] = dev;
    d->ndev++;
    return dev;
}

void
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

void
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

void
queue_unlink(ddevice_t *dev, dgift_t *g)
{
    if (g->qprev) {
        g->qprev->qnext = g->qnext;
    } else {
        dev->qhead = g->qnext;
    }
    if (g->qnext) {
        g->qnext->qprev = g->qprev;
    } else {
        dev->qtail = g->qprev;
    }
    g->qnext = g->qprev = NULL;
    dev->queued--;
}

dgift_t *
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

void
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

/* A rate-limited device: kick it again at `when`. */
static void
device_wait(dsp_t *d, ddevice_t *dev, int64_t when)
{
    if (dev->wake_us == 0) {
        d->nwaiting++;
        STAT_ADD(d, rate_waits, 1);
    }
    dev->wake_us = when;
    if (d->wake_min_us == 0 || when < d->wake_min_us) {
        d->wake_min_us = when;
    }
}

/*
 * A new RPC id that no RPC in flight has and that no RPC timed out with
 * in the last mqtt.late_reply_ms: the counter wraps (20 bits: about a
 * minute at 15k RPCs/s), and a very late reply to an old RPC must not
 * complete a new one.  Answered RPCs' ids are free at once: a device
 * answers a command once.
 */
static int fp_counter_bits = -1;

static int
rpc_id_fresh(dsp_t *d, uint64_t *out)
{
    uint64_t n = 0, high, quiet;
    int      k, bits = d->mqtt.ids.counter_bits;

    if (fp_counter_bits < 0) {
        /* a failpoint for the tests (t/29-dispatcher-late-replies.t):
         * GIFT_DISPATCHER_FAILPOINT="rpc_counter_bits=N" makes the counter
         * wrap after 2^N ids, as 20 bits do within a minute at 15k RPCs/s */
        const char *f = getenv("GIFT_DISPATCHER_FAILPOINT");

        fp_counter_bits = 0;
        if (f != NULL && strncmp(f, "rpc_counter_bits=", 17) == 0) {
            fp_counter_bits = atoi(f + 17);
            gift_log(GIFT_LOG_WARN, "failpoint: RPC ids wrap after %d bits",
                     fp_counter_bits);
        }
    }
    for (k = 0; k < 1024; k++) {
        n = rpc_ids_next(&d->mqtt.ids);
        if (fp_counter_bits > 0 && fp_counter_bits < bits) {
            high = n >> bits << bits;
            n = high | (n & ((1ULL << fp_counter_bits) - 1));
        }
        if (dmap_get(&d->by_rpc, n) == NULL
            && dmap_get(&d->quarantine, n) == NULL)
        {
            *out = n;
            return 0;
        }
    }
    /* never reuse one: the device waits until an id leaves quarantine */
    if (rlimit_ok(&rl_ids, gift_mono_us(), &quiet)) {
        gift_log(GIFT_LOG_WARN, "no RPC id free of late replies in 1024 "
                 "tries (%zu quarantined): waiting (%" PRIu64 " more not "
                 "logged)", d->quar_n, quiet);
    }
    return -1;
}

/* An RPC timed out: keep its id away from new RPCs for late_reply_ms. */
static void
rpc_quarantine(dsp_t *d, uint64_t n, int64_t now)
{
    struct dquar *q;
    size_t        i;

    if (d->conf->late_reply_ms == 0 || dmap_get(&d->quarantine, n) != NULL) {
        return;
    }
    if (d->quar_n == d->quar_cap) {
        size_t cap = d->quar_cap ? d->quar_cap * 2 : 1024;

        q = malloc(cap * sizeof(*q));
        if (q == NULL) {
            return;
        }
        for (i = 0; i < d->quar_n; i++) {
            q[i] = d->quar[(d->quar_head + i) % d->quar_cap];
        }
        free(d->quar);
        d->quar = q;
        d->quar_cap = cap;
        d->quar_head = 0;
    }
    if (dmap_put(&d->quarantine, n, (void *) 1) != 0) {
        return;
    }
    q = &d->quar[(d->quar_head + d->quar_n) % d->quar_cap];
    q->n = n;
    q->until_us = now + (int64_t) d->conf->late_reply_ms * 1000;
    d->quar_n++;
}

/* The rounds one command may carry for dev: devices.coalesce_max_rounds,
 * and never above the device's minute (a part must fit in it). */
static uint64_t
cmd_max_rounds(const dsp_t *d, const ddevice_t *dev)
{
    uint64_t m = d->conf->coalesce_max_rounds;

    if (dev->rpm > 0 && dev->rpm != DSP_RPM_STOPPED && dev->rpm < m) {
        m = dev->rpm;
    }
    return m ? m : 1;
}


/*
 * Send what the device's slots allow, coalescing queued gifts: up to
 * coalesce_max_events gifts and coalesce_max_rounds rounds per RPC.  A
 * gift above coalesce_max_rounds goes alone, in parts of at most that
 * many rounds ("<event id>#k", one after the other): no command ever
 * carries more.  With a rate limit only what fits in the device's last
 * minute goes.  Paused or stopped: nothing.  Offline (an RPC went
 * unanswered): one RPC at a time, offline_retry_ms apart.
 */
void
device_kick(dsp_t *d, ddevice_t *dev)
{
    const dconf_t *c = d->conf;
    drpc_t        *r;
    dgift_t       *g, *last;
    int64_t        now;
    uint64_t       room = UINT64_MAX, sent, cmax, head;
    size_t         bytes;

    if (dev->qhead != NULL && !lease_may_send(d, gift_mono_us())) {
        /* not (or no longer) the owner: nothing is sent; what comes to a
         * queue now goes back to the stream, no attempt spent */
        while ((g = queue_pop(dev)) != NULL) {
            gift_release(d, g, 0);
            STAT_ADD(d, released, 1);
        }
        return;
    }
    while (dev->qhead != NULL && dev->inflight < c->dev_max_inflight
           && d->mqtt.ready && dev->paused <= 0
           && dev->rpm != DSP_RPM_STOPPED)
    {
        now = gift_mono_us();
        if (dev->offline_since != 0) {
            if (dev->inflight > 0) {
                return;                     /* one probe at a time */
            }
            if (now < dev->probe_at_us) {
                device_wait(d, dev, dev->probe_at_us);
                return;
            }
        }
        cmax = cmd_max_rounds(d, dev);
        g = dev->qhead;
        head = gift_left(g);
        if (head > cmax) {
            head = cmax;
        }
        if (dev->rpm > 0) {
            if (!rate_fits(&dev->rate, dev->rpm, now, head)) {
                device_wait(d, dev, rate_next(&dev->rate, dev->rpm, now,
                                              head));
                return;
            }
            sent = rate_sum(&dev->rate, now);
            room = sent < dev->rpm ? dev->rpm - sent : 0;
        }
        r = calloc(1, sizeof(*r));
        if (r == NULL) {
            return;
        }
        r->dev = dev;
        if (rpc_id_fresh(d, &r->n) != 0) {
            free(r);
            device_wait(d, dev, now + 10000);
            return;
        }
        if (g->rounds_done > 0 || gift_left(g) > cmax) {
            /* a split gift: its next part, alone */
            g = queue_pop(dev);
            g->state = GIFT_SENT;
            g->rpc = r;
            r->gifts = g;
            r->ngifts = 1;
            r->rounds = head;
            r->part = g->parts_done + 1;
            snprintf(r->part_id, sizeof(r->part_id), "%s#%" PRIu32,
                     g->ev->event_id, r->part);
        } else {
            last = NULL;
            /* split before mqtt.max_payload (ThingsBoard closes the
             * connection of a bigger PUBLISH) */
            bytes = rpc_payload_max(c->mqtt_method, dev->name, NULL, 0);
            while (dev->qhead != NULL && dev->qhead->rounds_done == 0
                   && coalesce_more(r->ngifts, r->rounds, dev->qhead->rounds,
                                    (size_t) c->coalesce_max_events, cmax,
                                    room)
                   && (r->ngifts == 0
                       || bytes + rpc_event_bytes(dev->qhead->ev->event_id)
                          <= (size_t) c->mqtt_max_payload))
            {
                bytes += rpc_event_bytes(dev->qhead->ev->event_id);
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
        if (dev->rpm > 0 && rate_add(&dev->rate, now, r->rounds) != 0) {
            gift_log(GIFT_LOG_ERR, "out of memory recording %s's rate",
                     dev->name);
        }
        r->sent_us = now;
        r->deadline_us = now + (int64_t) c->rpc_timeout_ms * 1000;
        if (dmap_put(&d->by_rpc, r->n, r) != 0) {
            gift_log(GIFT_LOG_ERR, "out of memory tracking an RPC");
        }
        rpc_link(d, r);
        dev->inflight++;
        dev->rpcs++;
        STAT_ADD(d, rpcs_sent, 1);
        if (r->ngifts > 1) {
            STAT_ADD(d, coalesced, r->ngifts);
        }
    }
}

/* The RPC latency histogram (cumulative buckets, as Prometheus wants). */
static void
lat_observe(dsp_t *d, int64_t us)
{
    static const int64_t le[DSP_NLAT_BUCKETS] = DSP_LAT_BUCKETS;
    int                  i;

    for (i = DSP_NLAT_BUCKETS - 1; i >= 0 && us <= le[i] * 1000; i--) {
        STAT_ADD(d, rpc_lat_le[i], 1);
    }
    STAT_ADD(d, rpc_lat_count, 1);
    STAT_ADD(d, rpc_lat_sum_us, (uint64_t) (us > 0 ? us : 0));
}

/* "The device is not connected" as ThingsBoard (or a gateway) says it. */
static int
reply_offline(const char *why)
{
    /* ThingsBoard's TIMEOUT: the rule chain's RPC to the motor got no
     * answer; NO_ACTIVE_CONNECTION: the motor is not connected */
    return why != NULL && (strcmp(why, "TIMEOUT") == 0
                           || strstr(why, "NO_ACTIVE_CONNECTION") != NULL
                           || strstr(why, "offline") != NULL
                           || strstr(why, "not connected") != NULL);
}

/* An RPC is over (reply or timeout): free its slot, keep the device's
 * offline state, and report each gift to dispatch.c. */
static void
rpc_finish(dsp_t *d, drpc_t *r, drpc_reply_rc rc, const char *why)
{
    ddevice_t *dev = r->dev;
    dgift_t   *g, *next, *back[1024];
    int64_t    now = gift_mono_us();
    int64_t    lat = now - r->sent_us;
    size_t     nback = 0;
    int        offline;

    rpc_unlink(d, r);
    dev->inflight--;
    r->done_ms = gift_now_ms();
    if (rc == RPC_REPLY_OK || why != NULL) {
        lat_observe(d, lat);             /* answered: not a timeout */
    }
    offline = rc != RPC_REPLY_OK && (why == NULL || reply_offline(why));
    if (rc == RPC_REPLY_OK) {
        if (dev->offline_since != 0) {
            gift_log(GIFT_LOG_INFO, "device %s answers again after %" PRId64
                     " ms", dev->name, (now - dev->offline_since) / 1000);
        }
        dev->offline_since = 0;
    } else if (offline) {
        if (dev->offline_since == 0) {
            dev->offline_since = now;
            gift_log(GIFT_LOG_WARN, "device %s does not answer (%s): its "
                     "gifts wait up to %d ms without spending attempts",
                     dev->name, why ? why : "timeout", d->conf->offline_grace_ms);
        }
        dev->probe_at_us = now + (int64_t) d->conf->offline_retry_ms * 1000;
        if (now - dev->offline_since
            >= (int64_t) d->conf->offline_grace_ms * 1000)
        {
            offline = 0;                 /* too long: attempts count again */
        }
    }
    for (g = r->gifts; g != NULL; g = next) {
        next = g->qnext;
        g->qnext = NULL;
        g->rpc = NULL;
        /* the owner of gift state settles it; back to the head of the
         * queue when it says so (another part, or the device is silent) */
        if (gift_answered(d, g, r, rc, why, lat, offline, nback < 1024)) {
            back[nback++] = g;
        }
    }
    while (nback-- > 0) {
        queue_push_head(dev, back[nback]);
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
        STAT_ADD(d, replies_unknown, 1);
        gift_log(GIFT_LOG_DEBUG, "reply %" PRIu64 " is not ours (another "
                 "instance, or timed out)", n);
        return;
    }
    rc = rpc_reply_parse(payload, len, err, sizeof(err));
    if (rc == RPC_REPLY_OK) {
        STAT_ADD(d, rpc_ok, 1);
        rpc_finish(d, r, rc, NULL);
    } else {
        STAT_ADD(d, rpc_errors, 1);
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
        if (d->dev[i] != NULL && d->dev[i]->stop_pending
            && mqtt_out_send_stop(d, d->dev[i]->name) == 0)
        {
            d->dev[i]->stop_pending = 0;
        }
        if (d->dev[i] != NULL && d->dev[i]->qhead != NULL) {
            device_kick(d, d->dev[i]);
        }
    }
}

/* ctl resume --drop-backlog: the gifts the device held from before the
 * resume are dead-lettered "dropped" instead of turning. */
static void
device_drop_backlog(dsp_t *d, ddevice_t *dev)
{
    dgift_t *g, *next;
    size_t   n = 0;

    for (g = dev->qhead; g != NULL; g = next) {
        next = g->qnext;
        if (g->received_ms > dev->drop_before_ms || g->msg == NULL) {
            continue;
        }
        queue_unlink(dev, g);
        gift_dead_letter(d, g, "dropped", "the backlog of a paused device, "
                         "dropped by the operator at resume");
        n++;
    }
    gift_log(GIFT_LOG_INFO, "device %s: %zu gifts of its backlog dropped "
             "(received before %" PRId64 ")", dev->name, n,
             dev->drop_before_ms);
}

void
dispatch_ctl(dsp_t *d, dctl_t *c)
{
    ddevice_t *dev = device_get(d, c->device);

    if (dev != NULL) {
        if (c->what == CTL_STOP) {
            /* ctl stop: send "stop" now, unless this is an old switch
             * read at start (a stop is for the moment it was given) */
            if (c->value > 0 && gift_now_ms() - c->value < 60000) {
                if (mqtt_out_send_stop(d, dev->name) != 0) {
                    dev->stop_pending = 1;
                }
            }
            free(c);
            return;
        }
        if (c->what == CTL_DROP_BEFORE) {
            dev->drop_before_ms = c->value > 0 ? c->value : 0;
            if (dev->drop_before_ms > 0) {
                device_drop_backlog(d, dev);
            }
            free(c);
            return;
        }
        if (c->what == CTL_PAUSED) {
            dev->kv_paused = (int) c->value;
        } else {
            dev->kv_rpm = c->value;
        }
        device_limits(d, dev);
        if (dev->wake_us != 0) {            /* the limit may have changed */
            dev->wake_us = 0;
            d->nwaiting--;
        }
        if (!d->stopping) {
            device_kick(d, dev);
        }
    }
    free(c);
}

void
dispatch_limits_reload(dsp_t *d)
{
    const drules_t *ru = d->conf->rules;
    size_t          i;

    /* every device the configuration names exists from now on (limits
     * and /metrics show it before its first gift) */
    for (i = 0; i < d->conf->ndevconf; i++) {
        device_get(d, d->conf->devconf[i].id);
    }
    for (i = 0; i < ru->nrule; i++) {
        device_get(d, ru->rule[i].device);
    }
    if (ru->default_device != NULL) {
        device_get(d, ru->default_device);
    }
    for (i = 0; i < d->devcap; i++) {
        if (d->dev[i] != NULL) {
            device_limits(d, d->dev[i]);
            if (d->dev[i]->wake_us != 0) {
                d->dev[i]->wake_us = 0;
                d->nwaiting--;
            }
        }
    }
    if (!d->stopping) {
        dispatch_kick_all(d);
    }
}

size_t
dispatch_device_metrics(const dsp_t *d, char *buf, size_t cap)
{
    static const char *const head =
        "# HELP gift_dispatcher_device_inflight RPCs in flight per device.\n"
        "# TYPE gift_dispatcher_device_inflight gauge\n"
        "# HELP gift_dispatcher_device_queued Gifts waiting for the device.\n"
        "# TYPE gift_dispatcher_device_queued gauge\n"
        "# HELP gift_dispatcher_device_paused 1 when the device is paused.\n"
        "# TYPE gift_dispatcher_device_paused gauge\n"
        "# HELP gift_dispatcher_device_rate_limit Rounds per minute allowed "
        "(0: unlimited, -1: stopped).\n"
        "# TYPE gift_dispatcher_device_rate_limit gauge\n"
        "# HELP gift_dispatcher_device_rpcs_total RPCs sent per device.\n"
        "# TYPE gift_dispatcher_device_rpcs_total counter\n"
        "# HELP gift_dispatcher_device_rounds_total Rounds the device "
        "confirmed.\n"
        "# TYPE gift_dispatcher_device_rounds_total counter\n";
    size_t           o, i, k;
    int              w;
    const ddevice_t *dev;
    const char      *names[6] = { "inflight", "queued", "paused",
                                  "rate_limit", "rpcs_total",
                                  "rounds_total" };

    w = snprintf(buf, cap, "%s", head);
    if (w < 0 || (size_t) w >= cap) {
        return 0;
    }
    o = (size_t) w;
    for (k = 0; k < 6; k++) {
        for (i = 0; i < d->devcap; i++) {
            uint64_t v;

            if ((dev = d->dev[i]) == NULL) {
                continue;
            }
            switch (k) {
            case 0: v = (uint64_t) dev->inflight; break;
            case 1: v = dev->queued; break;
            case 2: v = (uint64_t) dev->paused; break;
            case 3: v = dev->rpm; break;
            case 4: v = dev->rpcs; break;
            default: v = dev->rounds_ok; break;
            }
            if (k == 3 && v == DSP_RPM_STOPPED) {
                w = snprintf(buf + o, cap - o, "gift_dispatcher_device_%s"
                             "{device=\"%s\"} -1\n", names[k], dev->name);
            } else {
                w = snprintf(buf + o, cap - o, "gift_dispatcher_device_%s"
                             "{device=\"%s\"} %" PRIu64 "\n", names[k],
                             dev->name, v);
            }
            if (w < 0 || (size_t) w >= cap - o) {
                return o;
            }
            o += (size_t) w;
        }
    }
    return o;
}

/*
 * The scheduler's time-driven work: RPC ids out of quarantine, RPCs past
 * their deadline (their gifts reported as timed out), devices whose rate
 * or probe wait is over.  Returns the earlier of `next` and its own next
 * time.
 */
int64_t
sched_timers(dsp_t *d, int64_t now, int64_t next)
{
    drpc_t   *r;
    uint64_t  quiet;

    /* ids out of quarantine */
    while (d->quar_n > 0 && d->quar[d->quar_head].until_us <= now) {
        dmap_del(&d->quarantine, d->quar[d->quar_head].n);
        d->quar_head = (d->quar_head + 1) % d->quar_cap;
        d->quar_n--;
    }

    /* RPCs past their deadline */
    while ((r = d->rpcs) != NULL && r->deadline_us <= now) {
        dmap_del(&d->by_rpc, r->n);
        rpc_quarantine(d, r->n, now);
        STAT_ADD(d, rpc_timeouts, 1);
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

    /* rate-limited devices whose minute has room again */
    if (d->nwaiting > 0 && now >= d->wake_min_us) {
        size_t     i;
        ddevice_t *dev;

        d->wake_min_us = 0;
        for (i = 0; i < d->devcap; i++) {
            dev = d->dev[i];
            if (dev == NULL || dev->wake_us == 0) {
                continue;
            }
            if (dev->wake_us <= now) {
                dev->wake_us = 0;
                d->nwaiting--;
                if (!d->stopping) {
                    device_kick(d, dev);      /* may wait again */
                }
            } else if (d->wake_min_us == 0 || dev->wake_us < d->wake_min_us) {
                d->wake_min_us = dev->wake_us;
            }
        }
    }
    if (d->nwaiting > 0 && d->wake_min_us < next) {
        next = d->wake_min_us;
    }
    return next;
}

/* ------------------------------------------------------------ lease hand-over */

size_t
dispatch_rates_format(dsp_t *d, char *buf, size_t cap)
{
    int64_t    now_us = gift_mono_us(), now_ms = gift_now_ms();
    size_t     o = 0, i, n;
    ddevice_t *dev;
    int        w;

    for (i = 0; i < d->devcap; i++) {
        dev = d->dev[i];
        if (dev == NULL || dev->rpm == 0 || dev->rate.n == 0) {
            continue;
        }
        w = snprintf(buf + o, cap - o, "rate %s ", dev->name);
        if (w < 0 || (size_t) w >= cap - o) {
            break;                       /* full: the rest is not handed */
        }
        n = rate_format(&dev->rate, now_us, now_ms, buf + o + (size_t) w,
                        cap - o - (size_t) w - 1);
        if (n == 0) {
            buf[o] = '\0';
            continue;
        }
        o += (size_t) w + n;
        buf[o++] = '\n';
        buf[o] = '\0';
    }
    return o;
}

void
dispatch_rates_restore(dsp_t *d, const char *text)
{
    int64_t     now_us = gift_mono_us(), now_ms = gift_now_ms(), t;
    const char *p = text, *nl;
    char        name[DSP_DEVICE_MAX + 1];
    ddevice_t  *dev;
    long long   ms;
    unsigned long long rounds;
    int         k, adv;
    size_t      ndev = 0;

    for (; p != NULL && *p != '\0'; p = nl ? nl + 1 : NULL) {
        nl = strchr(p, '\n');
        if (sscanf(p, "rate %64s %n", name, &k) != 1
            || !rules_device_valid(name)
            || (dev = device_get(d, name)) == NULL)
        {
            continue;
        }
        p += k;
        while (sscanf(p, "%lld:%llu%n", &ms, &rounds, &adv) == 2) {
            t = now_us - (now_ms - (int64_t) ms) * 1000;
            if (t > now_us - RATE_WINDOW_US && t <= now_us) {
                rate_add(&dev->rate, t, (uint64_t) rounds);
            }
            p += adv;
            if (*p != ',') {
                break;
            }
            p++;
        }
        ndev++;
    }
    if (ndev > 0) {
        gift_log(GIFT_LOG_INFO, "lease: took over the last minute's rounds "
                 "of %zu rate-limited devices", ndev);
    }
}
