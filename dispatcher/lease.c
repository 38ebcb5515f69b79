/*
 * lease.c: one active dispatcher among those sharing the consumer.
 *
 * Several dispatchers run for availability; one of them, the owner, holds
 * a lease and is the only one that pulls from the consumer "dispatcher"
 * and sends commands, so that every device has one owner: one command in
 * flight per motor, rate limits, pause and coalescing over all of a
 * device's gifts, fleet-wide.  The others (standbys) hold nothing and
 * watch the lease.
 *
 * The lease is key GIFT_LEASE_KEY ("_owner") in KV GIFT_DEVICES, written
 * only by compare-and-set on its revision (NATS itself, no server-side
 * setting: nats-server 2.9 has no per-key TTL, so expiry is counted by
 * the readers):
 *
 *   - absent, deleted, or empty (released at a stop): a standby takes it
 *     at once (kvStore_Create, or kvStore_Update on the empty revision);
 *   - held: the owner puts it again every lease/3 (kvStore_Update on its
 *     revision).  A standby notes each new revision on its own monotonic
 *     clock; a revision unchanged for nats.lease_ms is stale (its holder
 *     died) and taken over with kvStore_Update on that revision, so two
 *     standbys never both win.  A revision written more than twice the
 *     lease ago by the server's clock is stale after half a lease here (a
 *     lone dispatcher restarted after kill -9 waits less);
 *   - the owner that cannot renew stops sending at the time of its last
 *     renewal sent + lease - margin (fencing by time): before any standby
 *     can count the lease as expired, since that count starts after the
 *     renewal was stored.  Its queued gifts are released (no attempt);
 *     the lease thread keeps trying, and a renewal that succeeds on the
 *     same revision resumes; a revision changed by another is lost;
 *   - at a stop (SIGTERM), after the gifts in flight are finished or
 *     released, the owner writes the empty value on its revision:
 *     released, taken by a standby within one poll.
 *
 * The thread is ours and only talks to KV (synchronous cnats calls); the
 * the main thread and others read `active` and `until_us` (atomics).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dispatcher.h"
#include "gift_util.h"

#define LD(f)     __atomic_load_n(&d->lease.f, __ATOMIC_ACQUIRE)
#define LS(f, v)  __atomic_store_n(&d->lease.f, (v), __ATOMIC_RELEASE)

static void
wake_main(dsp_t *d)
{
    uint64_t one = 1;
    ssize_t  w = write(d->wake_fd, &one, sizeof(one));

    (void) w;
}

/* Wait up to ms; 1 when asked to stop. */
static int
lease_wait(dsp_t *d, int64_t ms)
{
    struct timespec until;
    int             stop;

    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t) (ms / 1000);
    until.tv_nsec += (long) (ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&d->lease.mu);
    if (!d->lease.stop) {
        pthread_cond_timedwait(&d->lease.cond, &d->lease.mu, &until);
    }
    stop = d->lease.stop;
    pthread_mutex_unlock(&d->lease.mu);
    return stop;
}

/* The lease value: who holds it ("released <who>" after a stop), then the
 * rate-limited devices' last minute (dispatch_rates_format), so that a
 * new owner goes on with the same sliding minutes.  NULL on memory. */
static char *
compose(dsp_t *d, int released)
{
    size_t  n;
    char   *v;

    pthread_mutex_lock(&d->lease.mu);
    n = strlen(d->lease.val) + 16
        + (d->lease.rates != NULL ? strlen(d->lease.rates) : 0);
    v = malloc(n);
    if (v != NULL) {
        snprintf(v, n, "%s%s\n%s", released ? "released " : "",
                 d->lease.val, d->lease.rates ? d->lease.rates : "");
    }
    pthread_mutex_unlock(&d->lease.mu);
    return v;
}

static natsStatus
put_value(dsp_t *d, uint64_t *rev, uint64_t last, int released)
{
    char       *v = compose(d, released);
    natsStatus  s;

    if (v == NULL) {
        return NATS_NO_MEMORY;
    }
    s = kvStore_Update(rev, d->lease.kv, GIFT_LEASE_KEY, v, (int) strlen(v),
                       last);
    free(v);
    return s;
}

/* A lease value of ours, not released: its first line is who we are
 * (compose()); `val` is set once at start. */
static int
is_ours(const dsp_t *d, const char *v)
{
    size_t n = strlen(d->lease.val);

    return v != NULL && strncmp(v, d->lease.val, n) == 0 && v[n] == '\n';
}

static int64_t
margin_us(const dconf_t *c)
{
    /* a fifth of the lease, at least 500 ms */
    int64_t m = (int64_t) c->lease_ms * 1000 / 5;

    return m < 500000 ? 500000 : m;
}

/*
 * The highest stream sequence delivered before, for the main thread's
 * seq_hwm (dispatch_msg): a message at or below it was delivered before,
 * to us or to the last owner, whatever delivery count it carries.  It is
 * the consumer's delivered sequence plus its messages pending an ack:
 * nats-server 2.9 steps its delivered sequence back by one each time a
 * redelivery finds no live pull request (consumer.go "We will redo this
 * one": o.sseq--), and the message that failed stays pending, so there
 * are at most as many such steps, past and to come, as pending messages.
 * On failure UINT64_MAX: every message is looked up until the next owner.
 */
static void
note_delivered(dsp_t *d)
{
    jsConsumerInfo *ci = NULL;
    jsErrCode       jerr = 0;
    natsStatus      s;
    int             i;

    for (i = 0; i < 3; i++) {
        s = js_GetConsumerInfo(&ci, d->nats.js, GIFT_STREAM_EVENTS,
                               GIFT_CONSUMER, NULL, &jerr);
        if (s == NATS_OK) {
            uint64_t f = ci->Delivered.Stream;
            uint64_t p = ci->NumAckPending > 0 ? (uint64_t) ci->NumAckPending
                                               : 0;

            LS(seq_floor, f > UINT64_MAX - p ? UINT64_MAX : f + p);
            jsConsumerInfo_Destroy(ci);
            return;
        }
        if (lease_wait(d, 200)) {
            break;
        }
    }
    gift_log(GIFT_LOG_WARN, "lease: cannot read the consumer's delivered "
             "sequence (%s): every gift is looked up in GIFT_DONE until the "
             "next take-over", natsStatus_GetText(s));
    LS(seq_floor, UINT64_MAX);
}

static void
became_owner(dsp_t *d, int64_t t0, uint64_t rev, int64_t gap_us,
    const char *how, const char *prev)
{
    note_delivered(d);
    d->lease.rev = rev;
    LS(until_us, t0 + (int64_t) d->conf->lease_ms * 1000 - margin_us(d->conf));
    LS(active, 1);
    if (gap_us >= 0) {
        LS(takeover_us, gap_us);
        LS(takeovers, LD(takeovers) + 1);
        gift_log(GIFT_LOG_WARN, "lease: now the active dispatcher (took over"
                 " from %s, %s; %" PRId64 ".%03" PRId64 " s without an owner"
                 " seen)", prev[0] ? prev : "?", how, gap_us / 1000000,
                 (gap_us / 1000) % 1000);
    } else {
        gift_log(GIFT_LOG_INFO, "lease: now the active dispatcher (%s)", how);
    }
    wake_main(d);
}

static void *
lease_main(void *arg)
{
    dsp_t          *d = arg;
    const dconf_t  *c = d->conf;
    const int64_t   lease_us = (int64_t) c->lease_ms * 1000;
    int64_t         poll_ms = c->lease_ms / 10, now, t0, next_renew = 0;
    int64_t         seen_at = 0, present_at = -1, age_ms;
    uint64_t        seen_rev = 0, rev;
    kvEntry        *e;
    natsStatus      s;
    char            prev[384] = "";
    int             held = 0, warned = 0;

    if (poll_ms < 50) {
        poll_ms = 50;
    }
    if (poll_ms > 500) {
        poll_ms = 500;
    }
    for (;;) {
        now = gift_mono_us();
        if (held) {
            if (now < next_renew) {
                if (lease_wait(d, (next_renew - now) / 1000 + 1)) {
                    break;
                }
                continue;
            }
            t0 = gift_mono_us();
            rev = 0;
            s = put_value(d, &rev, d->lease.rev, 0);
            if (s == NATS_OK) {
                d->lease.rev = rev;
                LS(until_us, t0 + lease_us - margin_us(c));
                if (!LD(active)) {
                    LS(active, 1);
                    gift_log(GIFT_LOG_WARN, "lease: renewed again; sending");
                    wake_main(d);
                }
                warned = 0;
                next_renew = t0 + lease_us / 3;
                continue;
            }
            /* lost (the revision moved on), or unreachable? */
            e = NULL;
            s = kvStore_Get(&e, d->lease.kv, GIFT_LEASE_KEY);
            if (s == NATS_OK && kvEntry_Revision(e) != d->lease.rev
                && is_ours(d, kvEntry_ValueString(e)))
            {
                /*
                 * Our own value on a newer revision: a renewal sent during
                 * an outage was written after all (its answer was lost).
                 * Still ours: renew on that revision at once, rather than
                 * standing by for a lease we hold (and releasing gifts).
                 */
                d->lease.rev = kvEntry_Revision(e);
                kvEntry_Destroy(e);
                next_renew = 0;
                continue;
            }
            if (s == NATS_NOT_FOUND
                || (s == NATS_OK && kvEntry_Revision(e) != d->lease.rev))
            {
                held = 0;
                LS(active, 0);
                gift_log(GIFT_LOG_WARN, "lease: lost to %s; standing by",
                         s == NATS_OK ? kvEntry_ValueString(e) : "nobody");
                wake_main(d);
                seen_rev = 0;
                present_at = -1;
            } else {
                if (!warned++) {
                    gift_log(GIFT_LOG_WARN, "lease: cannot renew (%s); "
                             "sending stops %" PRId64 " ms after the last "
                             "renewal", natsStatus_GetText(s),
                             (lease_us - margin_us(c)) / 1000);
                }
                if (LD(active) && gift_mono_us() >= LD(until_us)) {
                    LS(active, 0);
                    gift_log(GIFT_LOG_WARN, "lease: not renewed in time: "
                             "stopped sending, gifts released");
                    wake_main(d);
                }
                next_renew = gift_mono_us() + poll_ms * 1000;
            }
            kvEntry_Destroy(e);
            continue;
        }

        /* a standby: is the lease free, or stale? */
        e = NULL;
        t0 = gift_mono_us();
        s = kvStore_Get(&e, d->lease.kv, GIFT_LEASE_KEY);
        if (s == NATS_NOT_FOUND) {
            rev = 0;
            {
                char *v = compose(d, 0);

                s = v == NULL ? NATS_NO_MEMORY
                    : kvStore_Create(&rev, d->lease.kv, GIFT_LEASE_KEY, v,
                                     (int) strlen(v));
                free(v);
            }
            if (s == NATS_OK) {
                held = 1;
                became_owner(d, t0, rev, present_at >= 0 ? t0 - present_at
                             : -1, "lease released", prev);
                next_renew = t0 + lease_us / 3;
                continue;
            }
        } else if (s == NATS_OK) {
            const char *v = kvEntry_ValueString(e);
            int         empty = kvEntry_ValueLen(e) == 0
                                || strncmp(v, "released ", 9) == 0;

            rev = kvEntry_Revision(e);
            age_ms = gift_now_ms() - kvEntry_Created(e) / 1000000;
            if (rev != seen_rev) {
                seen_rev = rev;
                seen_at = t0;
                {
                    const char *w = strncmp(v, "released ", 9) == 0 ? v + 9
                                                                   : v;

                    snprintf(prev, sizeof(prev), "%.*s",
                             (int) strcspn(w, "\n"), w);
                }
            }
            if (!empty) {
                present_at = t0;
            }
            /* stale: unchanged for a lease on our clock; or written over
             * two leases ago by the server's clock and unchanged here for
             * half a lease (longer than the owner's renewal period, so a
             * clock skew alone never takes a live lease) */
            if (empty || t0 - seen_at >= lease_us
                || (age_ms > 2 * (int64_t) c->lease_ms
                    && t0 - seen_at >= lease_us / 2))
            {
                int64_t gap = empty ? (present_at >= 0 ? t0 - present_at : -1)
                              : (present_at >= 0 && t0 - seen_at >= lease_us
                                 ? t0 - seen_at : age_ms * 1000);

                rev = 0;
                s = put_value(d, &rev, seen_rev, 0);
                if (s == NATS_OK) {
                    /* the old owner's devices' last minutes, for main */
                    pthread_mutex_lock(&d->lease.mu);
                    free(d->lease.inherit);
                    d->lease.inherit = strdup(v);
                    pthread_mutex_unlock(&d->lease.mu);
                    held = 1;
                    became_owner(d, t0, rev, gap, empty ? "lease released"
                                 : "lease expired", prev);
                    next_renew = t0 + lease_us / 3;
                    kvEntry_Destroy(e);
                    continue;
                }
            }
        }
        kvEntry_Destroy(e);
        if (lease_wait(d, poll_ms)) {
            break;
        }
    }
    return NULL;
}

int
lease_start(dsp_t *d)
{
    dlease_t   *l = &d->lease;
    char        host[64];
    natsStatus  s;
    sigset_t    all, old;
    int         rc;

    if (d->conf->lease_ms <= 0) {
        LS(active, 1);
        LS(until_us, INT64_MAX);
        return 0;
    }
    if (pthread_mutex_init(&l->mu, NULL) != 0
        || pthread_cond_init(&l->cond, NULL) != 0)
    {
        return -1;
    }
    s = js_KeyValue(&l->kv, d->nats.js, GIFT_KV_DEVICES);
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_ERR, "lease: KV %s: %s", GIFT_KV_DEVICES,
                 natsStatus_GetText(s));
        return -1;
    }
    if (gethostname(host, sizeof(host)) != 0) {
        snprintf(host, sizeof(host), "?");
    }
    host[sizeof(host) - 1] = '\0';
    snprintf(l->val, sizeof(l->val), "%s pid %ld on %s", d->mqtt.client_id,
             (long) getpid(), host);
    LS(takeover_us, -1);
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = pthread_create(&l->tid, NULL, lease_main, d);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        gift_log(GIFT_LOG_ERR, "cannot start the lease thread: %s",
                 strerror(rc));
        return -1;
    }
    l->started = 1;
    gift_log(GIFT_LOG_INFO, "lease: one active dispatcher (KV %s key %s, "
             "lease %d ms); standing by until it is ours", GIFT_KV_DEVICES,
             GIFT_LEASE_KEY, d->conf->lease_ms);
    return 0;
}

void
lease_stop(dsp_t *d, int release)
{
    dlease_t   *l = &d->lease;
    natsStatus  s;

    if (!l->started) {
        return;
    }
    pthread_mutex_lock(&l->mu);
    l->stop = 1;
    pthread_cond_broadcast(&l->cond);
    pthread_mutex_unlock(&l->mu);
    pthread_join(l->tid, NULL);
    l->started = 0;
    if (release && l->rev != 0 && LD(active)) {
        /* the empty value on our revision: released, unless another took
         * it meanwhile (then the compare-and-set fails, as it should) */
        s = put_value(d, NULL, l->rev, 1);
        gift_log(s == NATS_OK ? GIFT_LOG_INFO : GIFT_LOG_WARN,
                 "lease: %s", s == NATS_OK ? "released"
                 : "not released (lost meanwhile, or NATS unreachable)");
    }
    LS(active, 0);
    kvStore_Destroy(l->kv);
    l->kv = NULL;
    free(l->rates);
    free(l->inherit);
    l->rates = l->inherit = NULL;
    pthread_cond_destroy(&l->cond);
    pthread_mutex_destroy(&l->mu);
}

int
lease_may_send(dsp_t *d, int64_t now_us)
{
    return LD(active) && now_us < LD(until_us);
}

int
lease_active(dsp_t *d)
{
    return lease_may_send(d, gift_mono_us());
}

/* Main thread, about once a second while we own: the snapshot of the
 * rate-limited devices' last minute that the next renewal carries. */
void
lease_rates_tick(dsp_t *d, int64_t now_us)
{
    static char  buf[65536];
    size_t       n;
    char        *v;

    if (!d->lease.started || !d->lease.seen_active
        || now_us < d->lease.rates_us)
    {
        return;
    }
    d->lease.rates_us = now_us + 1000000;
    n = dispatch_rates_format(d, buf, sizeof(buf));
    v = n > 0 ? strdup(buf) : NULL;
    pthread_mutex_lock(&d->lease.mu);
    free(d->lease.rates);
    d->lease.rates = v;
    pthread_mutex_unlock(&d->lease.mu);
}

/* Main thread, on becoming the owner: go on with the last owner's
 * sliding minutes. */
void
lease_take_over_rates(dsp_t *d)
{
    char *v;

    if (!d->lease.started) {
        return;
    }
    pthread_mutex_lock(&d->lease.mu);
    v = d->lease.inherit;
    d->lease.inherit = NULL;
    pthread_mutex_unlock(&d->lease.mu);
    if (v != NULL) {
        dispatch_rates_restore(d, v);
        free(v);
    }
}
