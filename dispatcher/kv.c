/*
 * kv.c: the dispatcher's KV work, off the main loop.
 *
 * cnats' KV calls are synchronous (a round trip each, ~0.2-0.5 ms here),
 * so the main loop never makes one.  Two threads of ours:
 *
 *   kv       takes jobs from a queue and answers them through d->kv.out:
 *              KVJ_DONE    is there a completion marker in GIFT_DONE for
 *                          this event (asked for redeliveries only: a
 *                          first delivery cannot have one)?  When it
 *                          has none, or without markers, a probe of
 *                          GIFT_ACKS' duplicate window answers
 *                          (run_probe).
 *              KVJ_STREAK  claim a streak frame's increment in
 *                          GIFT_STREAKS by compare-and-set (streaks.c
 *                          says what a frame adds).
 *            A job whose KV call fails is retried with back-off until it
 *            succeeds or the daemon stops: its gift stays held (and kept
 *            alive with InProgress), so no delivery attempt is spent on
 *            an outage.  Jobs run one at a time, in order.
 *            It also refreshes, every minute, this instance's lease on its
 *            RPC id tag (kv_claim_tag).
 *   watch    follows the bucket GIFT_DEVICES (kvWatcher) and posts each
 *            change of a device switch to d->kv.ctl:
 *              <device>.paused             "true"/"1": hold its gifts
 *              <device>.rounds_per_minute  a number: its rate limit
 *            A deleted key gives the device back to the configuration.
 *
 * The markers themselves are written by the main thread, as asynchronous
 * JetStream publishes to $KV.GIFT_DONE.<key> next to the GiftAck, so
 * they cost no round trip on the way of every gift.
 *
 * Why a streak claim is three calls (get, compare-and-set, put): the CAS
 * on "s.<streak id>" is what makes two dispatchers (or a restarted one)
 * agree on what each frame adds; the put of "e.<event id>" keeps the
 * claim of that one frame for retries and DLQ replays beyond the last
 * STREAK_RECENT claims that the streak's value remembers.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dispatcher.h"
#include "gift_kvkey.h"
#include "gift_util.h"

#define NS_PER_S  1000000000LL

/* ------------------------------------------------------------ jobs */

dkvjob_t *
kv_job_new(dkvjob_kind kind, uint64_t seq)
{
    dkvjob_t *j = calloc(1, sizeof(*j));

    if (j != NULL) {
        j->kind = kind;
        j->seq = seq;
    }
    return j;
}

void
kv_job_free(dkvjob_t *j)
{
    if (j != NULL) {
        free(j->key);
        free(j->ckey);
        free(j->probe_id);
        free(j->akey);
        free(j->val);
        free(j);
    }
}

int
kv_submit(dsp_t *d, dkvjob_t *j)
{
    dkv_t *k = &d->kv;

    if (!k->started) {
        return -1;
    }
    j->next = NULL;
    pthread_mutex_lock(&k->mu);
    if (k->tail) {
        k->tail->next = j;
    } else {
        k->head = j;
    }
    k->tail = j;
    pthread_cond_signal(&k->cond);
    pthread_mutex_unlock(&k->mu);
    k->pending++;
    STAT_ADD(d, kv_jobs, 1);
    return 0;
}

/* ------------------------------------------------------------ the kv thread */

/* Sleep ms unless told to stop: 1 when stopping. */
static int
pause_or_stop(dkv_t *k, int ms)
{
    struct timespec until;
    int             stop;

    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += ms / 1000;
    until.tv_nsec += (long) (ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&k->mu);
    if (!k->stop) {
        pthread_cond_timedwait(&k->cond, &k->mu, &until);
    }
    stop = k->stop;
    pthread_mutex_unlock(&k->mu);
    return stop;
}

/* Log a failing KV call: the first, then one a minute at most. */
static void
kv_warn(const char *what, const char *key, natsStatus s)
{
    static int64_t last;
    int64_t        now = gift_mono_us();

    if (last == 0 || now - last > 60000000) {
        last = now;
        gift_log(GIFT_LOG_WARN, "KV: %s %s: %s (%s); retrying", what, key,
                 natsStatus_GetText(s), nats_GetLastError(NULL));
    }
}

static int
backoff_next(int ms)
{
    return ms >= 2000 ? 2000 : ms * 2;
}

static void
run_done(dkv_t *k, dkvjob_t *j)
{
    kvEntry    *e = NULL;
    natsStatus  s;
    int         ms = 50;

    for (;;) {
        s = kvStore_Get(&e, k->done, j->key);
        if (s == NATS_OK) {
            j->len = (size_t) kvEntry_ValueLen(e);
            j->val = malloc(j->len ? j->len : 1);
            if (j->val != NULL) {
                memcpy(j->val, kvEntry_Value(e), j->len);
                j->found = 1;
            }
            kvEntry_Destroy(e);
            return;
        }
        if (s == NATS_NOT_FOUND) {
            return;
        }
        kv_warn("get", j->key, s);
        if (pause_or_stop(k, ms)) {
            j->failed = 1;
            return;
        }
        ms = backoff_next(ms);
    }
}

/*
 * Without markers (nats.done_markers = false), GIFT_ACKS itself tells
 * whether a gift was done: publish a probe carrying the gift's GiftAck
 * Nats-Msg-Id and an expected last sequence the stream can never have.
 * The server checks duplicates first: a GiftAck stored under that id
 * within the duplicate window (10 minutes) answers "duplicate" -- done --
 * and otherwise the expectation fails (10071) and nothing is stored.  No
 * write on the way of any gift; only redeliveries pay one round trip.
 */
static void
run_probe(dkv_t *k, dkvjob_t *j)
{
    natsMsg     *m = NULL;
    jsPubAck    *pa = NULL;
    jsPubOptions po;
    jsErrCode    jerr = 0;
    natsStatus   s;
    int          ms = 50;

    for (;;) {
        s = natsMsg_Create(&m, GIFT_SUBJ_ACKS_PREFIX "_probe", NULL, "", 0);
        if (s == NATS_OK) {
            s = natsMsgHeader_Set(m, "Nats-Msg-Id", j->probe_id);
        }
        if (s == NATS_OK) {
            s = natsMsgHeader_Set(m, "Nats-Expected-Last-Sequence",
                                  "18446744073709551615");
        }
        if (s == NATS_OK) {
            jsPubOptions_Init(&po);
            po.MaxWait = 5000;
            jerr = 0;
            s = js_PublishMsg(&pa, k->js, m, &po, &jerr);
        }
        natsMsg_Destroy(m);
        m = NULL;
        if (s == NATS_OK) {
            j->found = pa->Duplicate;
            jsPubAck_Destroy(pa);
            pa = NULL;
            if (!j->found) {
                /* stored?  impossible with that expectation; say so */
                gift_log(GIFT_LOG_ERR, "GIFT_ACKS took a probe for %s",
                         j->probe_id);
            }
            return;
        }
        if (jerr == JSStreamWrongLastSequenceErr) {
            return;                     /* not done */
        }
        kv_warn("probe", j->probe_id, s);
        if (pause_or_stop(k, ms)) {
            j->failed = 1;
            return;
        }
        ms = backoff_next(ms);
    }
}

static void
run_streak(dkv_t *k, dkvjob_t *j)
{
    kvEntry    *e = NULL;
    dstreak_t   st;
    natsStatus  s;
    uint64_t    rev;
    char        buf[STREAK_VALUE_MAX];
    size_t      len;
    int         ms = 50, lost = 0, ended_news = 0;

    for (;;) {
        if (lost > 2 && pause_or_stop(k, 5 * lost)) {
            j->failed = 1;           /* busy streak: back off a little */
            return;
        }
        s = kvStore_Get(&e, k->streaks, j->key);
        if (s == NATS_OK) {
            rev = kvEntry_Revision(e);
            if (streak_parse(kvEntry_Value(e), (size_t) kvEntry_ValueLen(e),
                             &st) != 0)
            {
                gift_log(GIFT_LOG_WARN, "KV: %s holds no streak state; "
                         "counting from 0", j->key);
            }
            kvEntry_Destroy(e);
        } else if (s == NATS_NOT_FOUND) {
            rev = 0;
            memset(&st, 0, sizeof(st));
            if (j->again) {
                /* a redelivery or replay finds no streak: it lived longer
                 * than its state (or never got this far).  Its own claim,
                 * if any, still answers; else it is not counted from 0. */
                s = kvStore_Get(&e, k->streaks, j->ckey);
                if (s == NATS_OK) {
                    char   num[24];
                    size_t n = (size_t) kvEntry_ValueLen(e);

                    n = n < sizeof(num) - 1 ? n : sizeof(num) - 1;
                    memcpy(num, kvEntry_Value(e), n);
                    num[n] = '\0';
                    j->inc = (uint32_t) strtoul(num, NULL, 10);
                    j->how = STREAK_KNOWN;
                    kvEntry_Destroy(e);
                    return;
                }
                if (s == NATS_NOT_FOUND) {
                    j->expired = 1;
                    return;
                }
                kv_warn("get", j->ckey, s);
                if (pause_or_stop(k, ms)) {
                    j->failed = 1;
                    return;
                }
                ms = backoff_next(ms);
                continue;
            }
        } else {
            kv_warn("get", j->key, s);
            if (pause_or_stop(k, ms)) {
                j->failed = 1;
                return;
            }
            ms = backoff_next(ms);
            continue;
        }

        {
            int was_ended = st.ended;

            j->how = streak_apply_ex(&st, j->eh, j->count, j->nogroup,
                                     j->end, &j->inc);
            ended_news = st.ended && !was_ended;
        }
        if (j->how == STREAK_KNOWN) {
            return;
        }
        if (j->how == STREAK_STALE) {
            /* claimed long ago (beyond the recent list)? */
            s = kvStore_Get(&e, k->streaks, j->ckey);
            if (s == NATS_OK) {
                char     num[24];
                size_t   n = (size_t) kvEntry_ValueLen(e);

                n = n < sizeof(num) - 1 ? n : sizeof(num) - 1;
                memcpy(num, kvEntry_Value(e), n);
                num[n] = '\0';
                j->inc = (uint32_t) strtoul(num, NULL, 10);
                j->how = STREAK_KNOWN;
                kvEntry_Destroy(e);
                return;
            }
            if (s == NATS_NOT_FOUND && !ended_news) {
                return;
            }
            if (s == NATS_NOT_FOUND) {
                /* a stale end frame: only the end is news; store it */
                len = streak_format(&st, buf, sizeof(buf));
                s = rev == 0
                    ? kvStore_Create(NULL, k->streaks, j->key, buf, (int) len)
                    : kvStore_Update(NULL, k->streaks, j->key, buf, (int) len,
                                     rev);
                if (s != NATS_OK) {
                    j->conflicts++;
                    lost++;
                    continue;
                }
                return;
            }
            kv_warn("get", j->ckey, s);
            if (pause_or_stop(k, ms)) {
                j->failed = 1;
                return;
            }
            ms = backoff_next(ms);
            continue;
        }

        len = streak_format(&st, buf, sizeof(buf));
        s = rev == 0
            ? kvStore_Create(NULL, k->streaks, j->key, buf, (int) len)
            : kvStore_Update(NULL, k->streaks, j->key, buf, (int) len, rev);
        if (s != NATS_OK) {
            /* another dispatcher got there first (or the call failed):
             * read again and recompute */
            j->conflicts++;
            lost++;
            continue;
        }
        break;
    }

    /* the claim of this frame, for retries beyond the recent list */
    snprintf(buf, sizeof(buf), "%" PRIu32, j->inc);
    ms = 50;
    while ((s = kvStore_PutString(NULL, k->streaks, j->ckey, buf))
           != NATS_OK)
    {
        kv_warn("put", j->ckey, s);
        if (pause_or_stop(k, ms)) {
            return;             /* the recent list still has the claim */
        }
        ms = backoff_next(ms);
    }
}

/* The attempt record of a redelivered gift (dispatch.c, attempt_record):
 * "v1 <failures> <device> <parts> <rounds>". */
static void
run_attempts(dkv_t *k, dkvjob_t *j)
{
    kvEntry    *e = NULL;
    natsStatus  s;
    int         ms = 50;
    char        val[160];
    size_t      n;
    unsigned    fail = 0, parts = 0;
    unsigned long long rounds = 0;

    if (k->done == NULL || j->akey == NULL) {
        return;
    }
    for (;;) {
        s = kvStore_Get(&e, k->done, j->akey);
        if (s == NATS_OK) {
            n = (size_t) kvEntry_ValueLen(e);
            n = n < sizeof(val) - 1 ? n : sizeof(val) - 1;
            memcpy(val, kvEntry_Value(e), n);
            val[n] = '\0';
            kvEntry_Destroy(e);
            if (sscanf(val, "v1 %u %64s %u %llu", &fail, j->adev, &parts,
                       &rounds) == 4)
            {
                j->afound = 1;
                j->afail = fail;
                j->aparts = parts;
                j->arounds = rounds;
            } else {
                j->adev[0] = '\0';
                gift_log(GIFT_LOG_WARN, "KV %s: %s is not an attempt record;"
                         " ignored", GIFT_KV_DONE, j->akey);
            }
            return;
        }
        if (s == NATS_NOT_FOUND) {
            return;
        }
        kv_warn("get", j->akey, s);
        if (pause_or_stop(k, ms)) {
            j->failed = 1;
            return;
        }
        ms = backoff_next(ms);
    }
}

/* Keep our RPC tag's lease fresh (the kv thread, every minute). */
static void
lease_refresh(dkv_t *k)
{
    natsStatus s;

    if (k->lease_key[0] == '\0') {
        return;
    }
    s = kvStore_PutString(NULL, k->devices, k->lease_key, k->lease_val);
    if (s != NATS_OK) {
        kv_warn("put", k->lease_key, s);
    }
}

static void *
kv_main(void *arg)
{
    dsp_t    *d = arg;
    dkv_t    *k = &d->kv;
    dkvjob_t *j;
    int       stop;
    int64_t   t0, lease_at = gift_mono_us();

    for (;;) {
        if ((k->lease_key[0] != '\0' || d->identity >= 0)
            && gift_mono_us() - lease_at >= KV_LEASE_REFRESH_S * 1000000LL)
        {
            lease_refresh(k);             /* busy or idle: every minute */
            identity_refresh(d);
            lease_at = gift_mono_us();
        }
        pthread_mutex_lock(&k->mu);
        while (!k->stop && k->head == NULL) {
            struct timespec until;

            if (k->lease_key[0] == '\0' && d->identity < 0) {
                pthread_cond_wait(&k->cond, &k->mu);
                continue;
            }
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_sec += KV_LEASE_REFRESH_S;
            if (pthread_cond_timedwait(&k->cond, &k->mu, &until)
                == ETIMEDOUT && !k->stop)
            {
                pthread_mutex_unlock(&k->mu);
                lease_refresh(k);
                identity_refresh(d);
                lease_at = gift_mono_us();
                pthread_mutex_lock(&k->mu);
            }
        }
        j = k->head;
        if (j == NULL) {
            pthread_mutex_unlock(&k->mu);
            break;                          /* stopping, and nothing left */
        }
        k->head = j->next;
        if (k->head == NULL) {
            k->tail = NULL;
        }
        stop = k->stop;
        pthread_mutex_unlock(&k->mu);

        t0 = gift_mono_us();
        if (stop) {
            j->failed = 1;
        } else if (j->kind == KVJ_DONE && j->key == NULL) {
            run_probe(k, j);
            if (!j->found && !j->failed) {
                run_attempts(k, j);
            }
        } else if (j->kind == KVJ_DONE) {
            run_done(k, j);
            if (!j->found && !j->failed && j->probe_id != NULL) {
                /* No marker.  Was the GiftAck stored all the same?  A
                 * server that stops runs its streams down one by one:
                 * the marker can find GIFT_DONE gone while GIFT_ACKS
                 * still stores the GiftAck just after it and answers
                 * its PubAck, and the consumer's ack is lost with the
                 * server. */
                run_probe(k, j);
            }
            if (!j->found && !j->failed) {
                run_attempts(k, j);
            }
        } else {
            run_streak(k, j);
        }
        j->lat_us = gift_mono_us() - t0;
        if (dchan_push(&k->out, j) != 0) {
            gift_log(GIFT_LOG_ERR, "out of memory in the KV thread");
            abort();        /* nothing acked: every gift is redelivered */
        }
    }
    return NULL;
}

/* ------------------------------------------------------------ the watcher */

/* "<device>.paused" / "<device>.rounds_per_minute" -> a dctl_t, or NULL
 * when the key or value means nothing to us (logged). */
static dctl_t *
ctl_parse(kvEntry *e)
{
    const char *key = kvEntry_Key(e);
    const char *dot = strrchr(key, '.');
    dctl_t     *c;
    char        val[32];
    size_t      n;
    kvOperation op = kvEntry_Operation(e);

    if (key[0] == '_') {
        return NULL;                /* ours: RPC tag leases (below) */
    }
    if (dot == NULL || (size_t) (dot - key) > DSP_DEVICE_MAX) {
        gift_log(GIFT_LOG_WARN, "KV %s: key %s is not <device>.paused or "
                 "<device>.rounds_per_minute; ignored", GIFT_KV_DEVICES, key);
        return NULL;
    }
    c = calloc(1, sizeof(*c));
    if (c == NULL) {
        return NULL;
    }
    memcpy(c->device, key, (size_t) (dot - key));
    c->device[dot - key] = '\0';
    if (strcmp(dot + 1, "paused") == 0) {
        c->what = CTL_PAUSED;
    } else if (strcmp(dot + 1, "rounds_per_minute") == 0) {
        c->what = CTL_RPM;
    } else if (strcmp(dot + 1, "drop_before") == 0) {
        c->what = CTL_DROP_BEFORE;
    } else if (strcmp(dot + 1, "stop") == 0) {
        c->what = CTL_STOP;
    }
    if (c->what == 0 || !rules_device_valid(c->device)) {
        gift_log(GIFT_LOG_WARN, "KV %s: key %s is not <device>.paused or "
                 "<device>.rounds_per_minute; ignored", GIFT_KV_DEVICES, key);
        free(c);
        return NULL;
    }
    if (op == kvOp_Delete || op == kvOp_Purge) {
        c->value = -1;
        return c;
    }
    n = (size_t) kvEntry_ValueLen(e);
    n = n < sizeof(val) - 1 ? n : sizeof(val) - 1;
    memcpy(val, kvEntry_Value(e), n);
    val[n] = '\0';
    if (c->what == CTL_DROP_BEFORE || c->what == CTL_STOP) {
        c->value = strtoll(val, NULL, 10);
        if (c->value <= 0) {
            c->value = -1;
        }
        return c;
    }
    if (c->what == CTL_PAUSED) {
        if (strcmp(val, "true") == 0 || strcmp(val, "1") == 0
            || strcmp(val, "yes") == 0 || strcmp(val, "on") == 0)
        {
            c->value = 1;
        } else if (strcmp(val, "false") == 0 || strcmp(val, "0") == 0
                   || strcmp(val, "no") == 0 || strcmp(val, "off") == 0
                   || val[0] == '\0')
        {
            c->value = 0;
        } else {
            gift_log(GIFT_LOG_WARN, "KV %s: %s = \"%s\" is not true or false;"
                     " ignored", GIFT_KV_DEVICES, key, val);
            free(c);
            return NULL;
        }
    } else {
        char               *end;
        unsigned long long  v;

        if (strcmp(val, "unlimited") == 0) {
            c->value = 0;
            return c;
        }
        if (strcmp(val, "stopped") == 0) {
            c->value = -2;
            return c;
        }
        errno = 0;
        v = strtoull(val, &end, 10);
        if (v == 0 && *end == '\0' && val[0] == '0') {
            /* written by an older ctl, where 0 meant no limit */
            gift_log(GIFT_LOG_WARN, "KV %s: %s = 0 is read as \"unlimited\" "
                     "(its old meaning); set \"unlimited\" or \"stopped\"",
                     GIFT_KV_DEVICES, key);
        }
        if (val[0] < '0' || val[0] > '9' || *end != '\0' || errno != 0
            || v > DSP_ROUNDS_JSON_MAX)
        {
            gift_log(GIFT_LOG_WARN, "KV %s: %s = \"%s\" is not a number of "
                     "rounds; ignored", GIFT_KV_DEVICES, key, val);
            free(c);
            return NULL;
        }
        c->value = (int64_t) v;
    }
    return c;
}

static void *
watch_main(void *arg)
{
    dsp_t      *d = arg;
    dkv_t      *k = &d->kv;
    kvEntry    *e;
    dctl_t     *c;
    natsStatus  s;
    int         stop;

    for (;;) {
        pthread_mutex_lock(&k->mu);
        stop = k->stop;
        pthread_mutex_unlock(&k->mu);
        if (stop) {
            break;
        }
        e = NULL;
        s = kvWatcher_Next(&e, k->watch, 1000);
        if (s == NATS_OK) {
            if (e != NULL && (c = ctl_parse(e)) != NULL
                && dchan_push(&k->ctl, c) != 0)
            {
                free(c);
            }
            kvEntry_Destroy(e);
        } else if (s == NATS_ILLEGAL_STATE) {
            break;                              /* kvWatcher_Stop() */
        } else if (s != NATS_TIMEOUT) {
            if (pause_or_stop(k, 1000)) {
                break;
            }
        }
    }
    return NULL;
}

/* ------------------------------------------------------------ start, stop */

static natsStatus
open_bucket(dsp_t *d, kvStore **kv, const char *bucket, int create)
{
    kvConfig    cfg;
    natsStatus  s;

    s = js_KeyValue(kv, d->nats.js, bucket);
    if (s != NATS_NOT_FOUND || !create) {
        return s;
    }
    kvConfig_Init(&cfg);
    cfg.Bucket = bucket;
    cfg.History = 5;                  /* who paused what, recently */
    cfg.StorageType = js_FileStorage;
    cfg.Replicas = d->conf->prov.replicas;
    s = js_CreateKeyValue(kv, d->nats.js, &cfg);
    if (s == NATS_OK) {
        gift_log(GIFT_LOG_INFO, "created KV bucket %s", bucket);
    } else {
        /* another dispatcher may have created it meanwhile */
        s = js_KeyValue(kv, d->nats.js, bucket);
    }
    return s;
}

static void
sleep_ms(int ms)
{
    struct timespec ts;
    sigset_t        none;

    sigemptyset(&none);
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long) (ms % 1000) * 1000000L;
    ppoll(NULL, 0, &ts, &none);       /* SIGTERM ends the wait */
}

int
kv_start(dsp_t *d)
{
    dkv_t      *k = &d->kv;
    kvEntry    *e;
    dctl_t     *c;
    natsStatus  s;
    sigset_t    all, old;
    int         rc, logged = 0, ms = 100;

    if (pthread_mutex_init(&k->mu, NULL) != 0
        || pthread_cond_init(&k->cond, NULL) != 0
        || dchan_init(&k->out, d->wake_fd) != 0
        || dchan_init(&k->ctl, d->wake_fd) != 0)
    {
        gift_log(GIFT_LOG_ERR, "cannot create the KV queues");
        return -1;
    }
    k->inited = 1;
    k->js = d->nats.js;

    while (!dsp_sig_term) {
        s = NATS_OK;
        if (k->streaks == NULL) {
            s = open_bucket(d, &k->streaks, GIFT_KV_STREAKS, 0);
        }
        if (s == NATS_OK && k->done == NULL) {
            s = open_bucket(d, &k->done, GIFT_KV_DONE, 0);
        }
        if (s == NATS_OK && (d->conf->control || d->conf->nmqtt_tokens > 0
                             || d->conf->lease_ms > 0)
            && k->devices == NULL)
        {
            s = open_bucket(d, &k->devices, GIFT_KV_DEVICES,
                            d->conf->provision);
        }
        if (s == NATS_OK && d->conf->control && k->devices != NULL
            && k->watch == NULL)
        {
            s = kvStore_WatchAll(&k->watch, k->devices, NULL);
            /* the current switches, before any gift is dispatched; a NULL
             * entry marks the end of what exists now */
            while (s == NATS_OK) {
                e = NULL;
                s = kvWatcher_Next(&e, k->watch, 5000);
                if (s != NATS_OK || e == NULL) {
                    break;
                }
                if ((c = ctl_parse(e)) != NULL) {
                    dispatch_ctl(d, c);
                }
                kvEntry_Destroy(e);
            }
            if (s != NATS_OK) {
                kvWatcher_Destroy(k->watch);
                k->watch = NULL;
            }
        }
        if (s == NATS_OK) {
            break;
        }
        if (logged++ % 10 == 0) {
            gift_log(GIFT_LOG_WARN, "KV buckets %s, %s%s%s: %s (%s); retrying"
                     "%s", GIFT_KV_STREAKS, GIFT_KV_DONE,
                     d->conf->control ? ", " : "",
                     d->conf->control ? GIFT_KV_DEVICES : "",
                     natsStatus_GetText(s), nats_GetLastError(NULL),
                     d->conf->provision ? ""
                                        : " (nats.provision is off: run "
                                          "`giftctl setup`)");
        }
        sleep_ms(ms);
        ms = backoff_next(ms);
    }
    if (dsp_sig_term) {
        return -1;
    }

    if (d->conf->instance_id < 0) {
        kv_claim_tag(d);
    }
    if (identity_claim(d) != 0) {
        return -1;
    }

    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = pthread_create(&k->tid, NULL, kv_main, d);
    if (rc == 0) {
        k->started = 1;
        if (k->watch != NULL) {
            rc = pthread_create(&k->ctl_tid, NULL, watch_main, d);
            k->ctl_started = rc == 0;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        gift_log(GIFT_LOG_ERR, "cannot start the KV threads: %s",
                 strerror(rc));
        return -1;
    }
    return 0;
}

/*
 * The RPC id tag must differ between the dispatchers sharing a broker
 * topic (a reply is routed by its id).  Unless mqtt.instance_id fixes it,
 * take a tag no live dispatcher holds: a lease "_rpc_tag.<tag>" in
 * GIFT_DEVICES, created with compare-and-set, refreshed every minute by
 * the kv thread, deleted at exit; one not refreshed for KV_LEASE_STALE_S
 * (its holder died) may be taken over.  Starts at the random tag and
 * probes others; 0, or -1 when none could be had (the random tag stays).
 */
int
kv_claim_tag(dsp_t *d)
{
    dkv_t      *k = &d->kv;
    drpc_ids_t *ids = &d->mqtt.ids;
    uint64_t    ntags = 1ULL << ((d->conf->rpc_id_bits == 63 ? 63 : 31)
                                 - ids->counter_bits);
    uint64_t    tag = ids->tag, i;
    kvEntry    *e;
    natsStatus  s;
    int64_t     age_s;
    char        host[64];

    if (k->devices == NULL) {
        return -1;
    }
    if (gethostname(host, sizeof(host)) != 0) {
        snprintf(host, sizeof(host), "?");
    }
    host[sizeof(host) - 1] = '\0';
    snprintf(k->lease_val, sizeof(k->lease_val), "%s pid %ld on %s",
             d->mqtt.client_id, (long) getpid(), host);
    for (i = 0; i < 64 && i < ntags; i++) {
        /* an odd stride visits distinct tags */
        tag = (ids->tag + i * 0x9E3779B1ULL) & (ntags - 1);
        snprintf(k->lease_key, sizeof(k->lease_key), "_rpc_tag.%" PRIu64,
                 tag);
        e = NULL;
        s = kvStore_Get(&e, k->devices, k->lease_key);
        if (s == NATS_NOT_FOUND) {
            s = kvStore_CreateString(NULL, k->devices, k->lease_key,
                                     k->lease_val);
        } else if (s == NATS_OK) {
            age_s = (int64_t) (gift_now_ms() / 1000)
                    - kvEntry_Created(e) / 1000000000LL;
            s = age_s > KV_LEASE_STALE_S
                ? kvStore_UpdateString(NULL, k->devices, k->lease_key,
                                       k->lease_val, kvEntry_Revision(e))
                : NATS_ERR;                     /* live: try another */
            kvEntry_Destroy(e);
        }
        if (s == NATS_OK) {
            ids->tag = tag;
            gift_log(GIFT_LOG_INFO, "RPC ids: instance tag %" PRIu64
                     " (leased in KV %s)", tag, GIFT_KV_DEVICES);
            return 0;
        }
    }
    k->lease_key[0] = '\0';
    gift_log(GIFT_LOG_WARN, "RPC ids: no free instance tag found; keeping "
             "the random tag %" PRIu64 " (set mqtt.instance_id)", ids->tag);
    return -1;
}

void
kv_stop(dsp_t *d)
{
    dkv_t *k = &d->kv;

    if (!k->inited) {
        return;
    }
    pthread_mutex_lock(&k->mu);
    k->stop = 1;
    pthread_cond_broadcast(&k->cond);
    pthread_mutex_unlock(&k->mu);
    if (k->watch != NULL) {
        kvWatcher_Stop(k->watch);
    }
    if (k->ctl_started) {
        pthread_join(k->ctl_tid, NULL);
        k->ctl_started = 0;
    }
    if (k->started) {
        pthread_join(k->tid, NULL);    /* it answers what is queued */
        k->started = 0;
    }
}

void
kv_destroy(dsp_t *d)
{
    dkv_t     *k = &d->kv;
    void     **items;
    size_t     n, i;
    dkvjob_t  *j;

    if (!k->inited) {
        return;
    }
    if (k->lease_key[0] != '\0' && k->devices != NULL) {
        kvStore_Delete(k->devices, k->lease_key);      /* free it for others */
    }
    identity_release(d);
    kvWatcher_Destroy(k->watch);
    k->watch = NULL;
    kvStore_Destroy(k->streaks);
    kvStore_Destroy(k->done);
    kvStore_Destroy(k->devices);
    k->streaks = k->done = k->devices = NULL;
    while ((j = k->head) != NULL) {          /* never started */
        k->head = j->next;
        kv_job_free(j);
    }
    k->tail = NULL;
    dchan_take(&k->out, &items, &n);
    for (i = 0; i < n; i++) {
        kv_job_free(items[i]);
    }
    free(items);
    dchan_take(&k->ctl, &items, &n);
    for (i = 0; i < n; i++) {
        free(items[i]);
    }
    free(items);
    dchan_destroy(&k->out);
    dchan_destroy(&k->ctl);
    pthread_cond_destroy(&k->cond);
    pthread_mutex_destroy(&k->mu);
    k->inited = 0;
}
