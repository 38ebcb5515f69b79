/*
 * nats_in.c: everything that talks to NATS.
 *
 * - the connection (reconnecting forever with capped exponential back-off),
 * - provisioning at start (gift_provision(): the code `giftctl setup` runs),
 * - the fetch thread: cnats 3.4.1 has no asynchronous pull, so one thread
 *   of ours blocks in natsSubscription_FetchRequest() and hands messages to
 *   the main thread through d->nats.inbox, within a credit that the main
 *   thread gives back as gifts finish (the in-flight bound),
 * - JetStream publishes (GiftAck, DLQ) with js_PublishMsgAsync(): sent or
 *   not, said by the return value; the PubAck handler runs on a cnats
 *   thread and only posts to d->nats.acks.  Which gift a publish belongs
 *   to, and its retries, are publish.c's: this file writes no gift state.
 *
 * Fetch strategy.  A fetch for a batch of N waits until N messages came or
 * the request expired, so a lone gift would wait the whole expiry.  Hence:
 * while messages flow, ask for up to the credit with no_wait (the server
 * answers at once with what it has); when that finds nothing, wait for one
 * message with a long poll (expires = fetch_wait_ms), then go back to
 * no_wait batches.  Low latency when idle, batches of 256 under load.
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
#include "gift_nkey.h"
#include "gift_util.h"

/* ------------------------------------------------------------ callbacks */

static int64_t
reconnect_delay(natsConnection *nc, int attempts, void *closure)
{
    dsp_t   *d = closure;
    int64_t  ms = d->conf->nats_reconnect_min_ms;

    (void) nc;
    while (attempts-- > 0 && ms < d->conf->nats_reconnect_max_ms) {
        ms *= 2;
    }
    if (ms > d->conf->nats_reconnect_max_ms) {
        ms = d->conf->nats_reconnect_max_ms;
    }
    /* +-20% jitter, so that many dispatchers do not reconnect in step */
    return ms - ms / 5 + (int64_t) (rand() % (int) (ms / 2.5 + 1));
}

static void
on_disconnected(natsConnection *nc, void *closure)
{
    dsp_t *d = closure;

    (void) nc;
    /* `closing` is set by the main thread at exit; a stale read only
     * picks the log level */
    gift_log(d->nats.closing ? GIFT_LOG_DEBUG : GIFT_LOG_WARN,
             "NATS: disconnected%s", d->nats.closing ? "" : "; reconnecting");
}

static void
on_reconnected(natsConnection *nc, void *closure)
{
    char url[256];

    (void) closure;
    if (natsConnection_GetConnectedUrl(nc, url, sizeof(url)) != NATS_OK) {
        url[0] = '\0';
    }
    gift_log(GIFT_LOG_INFO, "NATS: reconnected to %s", url);
}

static void
on_closed(natsConnection *nc, void *closure)
{
    (void) nc;
    (void) closure;
    gift_log(GIFT_LOG_DEBUG, "NATS: connection closed");
}

static void
on_async_error(natsConnection *nc, natsSubscription *sub, natsStatus err,
    void *closure)
{
    (void) nc;
    (void) sub;
    (void) closure;
    gift_log(GIFT_LOG_WARN, "NATS: asynchronous error: %s",
             natsStatus_GetText(err));
}

/*
 * The PubAck handler (a cnats thread).  It touches nothing of the main
 * thread's state: it posts the message and the result to d->nats.acks,
 * and the main thread finds the gift from the message pointer.  The main
 * thread frees the message (so its address cannot be reused while the
 * post is in the queue).
 */
static void
on_puback(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae,
    void *closure)
{
    dsp_t      *d = closure;
    dpuback_t  *p;

    (void) js;
    if (pa != NULL) {
        /* the common case: the message pointer alone, tagged (messages
         * are aligned), spares an allocation per publish */
        if (dchan_push(&d->nats.acks, PUBACK_OK(msg)) != 0) {
            gift_log(GIFT_LOG_ERR, "out of memory in the PubAck handler");
            abort();
        }
        return;
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL) {
        gift_log(GIFT_LOG_ERR, "out of memory in the PubAck handler");
        abort();      /* nothing was acked: every gift will be redelivered */
    }
    p->m = msg;
    p->err = pae ? pae->Err : NATS_ERR;
    p->jerr = pae ? (int) pae->ErrCode : 0;
    snprintf(p->text, sizeof(p->text), "%s",
             pae && pae->ErrText ? pae->ErrText : natsStatus_GetText(p->err));
    if (dchan_push(&d->nats.acks, p) != 0) {
        gift_log(GIFT_LOG_ERR, "out of memory in the PubAck handler");
        abort();
    }
}

/* ------------------------------------------------------------ start-up */

/* Sleep up to ms, waking early for SIGTERM/SIGINT (ppoll on no fd with the
 * signals unblocked: they are blocked everywhere else). */
static void
pause_ms(int ms)
{
    struct timespec ts;
    sigset_t        none;

    sigemptyset(&none);
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long) (ms % 1000) * 1000000L;
    ppoll(NULL, 0, &ts, &none);
}

/* An NKey seed file: cnats wants the public key beside it. */
static natsStatus
set_nkey(natsOptions *o, const char *file)
{
    const char  *err;
    gift_nkey_t  k;

    if (gift_nkey_read_file(file, &k, &err) != 0) {
        gift_log(GIFT_LOG_ERR, "nats.nkey %s: %s", file, err);
        return NATS_ERR;
    }
    return natsOptions_SetNKeyFromSeed(o, k.public_key, file);
}

natsStatus
nats_options_base(const dconf_t *c, natsOptions **out)
{
    natsOptions *o = NULL;
    natsStatus   s;

    s = natsOptions_Create(&o);
    if (s == NATS_OK) {
        s = natsOptions_SetServers(o, (const char **) c->nats_urls,
                                   (int) c->nnats_urls);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetName(o, c->nats_name);
    }
    if (s == NATS_OK && c->nats_user != NULL) {
        s = natsOptions_SetUserInfo(o, c->nats_user, c->nats_password);
    }
    if (s == NATS_OK && c->nats_token != NULL) {
        s = natsOptions_SetToken(o, c->nats_token);
    }
    if (s == NATS_OK && c->nats_creds != NULL) {
        s = natsOptions_SetUserCredentialsFromFiles(o, c->nats_creds, NULL);
    }
    if (s == NATS_OK && c->nats_nkey != NULL) {
        s = set_nkey(o, c->nats_nkey);
    }
    if (s == NATS_OK && (c->nats_tls_ca != NULL || c->nats_tls_cert != NULL)) {
        s = natsOptions_SetSecure(o, true);
        if (s == NATS_OK && c->nats_tls_ca != NULL) {
            s = natsOptions_LoadCATrustedCertificates(o, c->nats_tls_ca);
        }
        if (s == NATS_OK && c->nats_tls_cert != NULL) {
            s = natsOptions_LoadCertificatesChain(o, c->nats_tls_cert,
                                                  c->nats_tls_key);
        }
    }
    if (s != NATS_OK) {
        natsOptions_Destroy(o);
        return s;
    }
    *out = o;
    return NATS_OK;
}

static int
build_options(dsp_t *d)
{
    natsOptions *o = NULL;
    natsStatus   s;

    s = nats_options_base(d->conf, &o);
    /*
     * Write each publish (GiftAck, marker, ack, pull request) at once:
     * cnats's flusher thread would sleep a millisecond before writing,
     * which a gift would pay two or three times on its way.
     */
    if (s == NATS_OK) {
        s = natsOptions_SetSendAsap(o, true);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetMaxReconnect(o, -1);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetCustomReconnectDelay(o, reconnect_delay, d);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetPingInterval(o, 10000);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetMaxPingsOut(o, 3);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetDisconnectedCB(o, on_disconnected, d);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetReconnectedCB(o, on_reconnected, d);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetClosedCB(o, on_closed, d);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetErrorHandler(o, on_async_error, d);
    }
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_ERR, "NATS options: %s", nats_GetLastError(NULL));
        natsOptions_Destroy(o);
        return -1;
    }
    d->nats.opts = o;
    return 0;
}

/* Read ack wait and max deliver from the consumer (they may differ from
 * our defaults when the operator created it). */
static int
consumer_info(dsp_t *d)
{
    jsConsumerInfo *ci = NULL;
    jsErrCode       jerr = 0;
    natsStatus      s;

    s = js_GetConsumerInfo(&ci, d->nats.js, GIFT_STREAM_EVENTS, GIFT_CONSUMER,
                           NULL, &jerr);
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_ERR, "NATS: consumer %s on %s: %s (js error %d)",
                 GIFT_CONSUMER, GIFT_STREAM_EVENTS, natsStatus_GetText(s),
                 (int) jerr);
        return -1;
    }
    d->nats.ack_wait_us = ci->Config->AckWait / 1000;
    d->nats.max_deliver = (int) ci->Config->MaxDeliver;    /* -1: checked */
    if (d->nats.ack_wait_us <= 0) {
        d->nats.ack_wait_us = 30000000;      /* the server's default */
    }
    if (d->nats.max_deliver <= 0) {
        d->nats.max_deliver = INT32_MAX;     /* unlimited: never dead-letter */
    }
    if (ci->Config->MaxAckPending > 0
        && ci->Config->MaxAckPending < d->conf->max_inflight)
    {
        gift_log(GIFT_LOG_WARN, "consumer %s allows %" PRId64 " unacknowledged"
                 " messages, below nats.max_inflight %d: that is the bound",
                 GIFT_CONSUMER, ci->Config->MaxAckPending,
                 d->conf->max_inflight);
    }
    if ((int64_t) d->conf->rpc_timeout_ms * 1000 >= d->nats.ack_wait_us) {
        gift_log(GIFT_LOG_WARN, "mqtt.rpc_timeout_ms %d is not below the "
                 "consumer's ack wait (%" PRId64 " ms): gifts may be "
                 "redelivered while their RPC is in flight",
                 d->conf->rpc_timeout_ms, d->nats.ack_wait_us / 1000);
    }
    gift_log(GIFT_LOG_INFO, "consumer %s: ack wait %" PRId64 " ms, max "
             "deliver %d, %" PRIu64 " pending", GIFT_CONSUMER,
             d->nats.ack_wait_us / 1000, d->nats.max_deliver, ci->NumPending);
    jsConsumerInfo_Destroy(ci);
    return 0;
}

int
nats_in_start(dsp_t *d)
{
    dnats_t     *n = &d->nats;
    jsOptions    jo;
    jsSubOptions so;
    jsErrCode    jerr = 0;
    natsStatus   s;
    int          backoff = d->conf->nats_reconnect_min_ms;
    int          logged = 0;

    if (pthread_mutex_init(&n->mu, NULL) != 0
        || pthread_cond_init(&n->cond, NULL) != 0
        || dchan_init(&n->inbox, d->wake_fd) != 0
        || dchan_init(&n->acks, d->wake_fd) != 0)
    {
        gift_log(GIFT_LOG_ERR, "cannot create the NATS queues");
        return -1;
    }
    n->inited = 1;
    n->done = 1;                              /* no fetch thread yet */
    if (build_options(d) != 0) {
        return -1;
    }

    /* Connect, provision and bind, retrying everything with back-off:
     * at start NATS may not be up yet (a system boot, `make run`). */
    while (!dsp_sig_term) {
        if (n->nc == NULL) {
            s = natsConnection_Connect(&n->nc, n->opts);
            if (s != NATS_OK) {
                n->nc = NULL;
                if (logged++ % 10 == 0) {
                    gift_log(GIFT_LOG_WARN, "NATS: cannot connect to %s: %s;"
                             " retrying", d->conf->nats_urls[0],
                             natsStatus_GetText(s));
                }
                goto retry;
            }
            gift_log(GIFT_LOG_INFO, "NATS: connected to %s",
                     d->conf->nats_urls[0]);
        }
        if (n->js == NULL) {
            jsOptions_Init(&jo);
            jo.PublishAsync.AckHandler = on_puback;
            jo.PublishAsync.AckHandlerClosure = d;
            /* never stall the main thread: pending publishes are bounded
             * by max_inflight (two per gift at most) */
            jo.PublishAsync.MaxPending = 2 * (int64_t) d->conf->max_inflight
                                         + 1024;
            s = natsConnection_JetStream(&n->js, n->nc, &jo);
            if (s != NATS_OK) {
                n->js = NULL;
                gift_log(GIFT_LOG_ERR, "NATS: JetStream context: %s",
                         nats_GetLastError(NULL));
                goto retry;
            }
        }
        if (d->conf->provision && gift_provision(n->nc, n->js,
                                                  &d->conf->prov) != 0)
        {
            gift_log(GIFT_LOG_WARN, "provisioning failed; retrying");
            goto retry;
        }
        if (consumer_info(d) != 0) {
            goto retry;
        }
        {
            char    why[1024];
            int64_t ttl = d->conf->max_gift_age_s + GIFT_STATE_MARGIN_S;
            int     bad = gift_provision_check(n->js, ttl, why, sizeof(why));

            if (bad < 0) {
                gift_log(GIFT_LOG_WARN, "checking the NATS setup: %s; "
                         "retrying", why);
                goto retry;
            }
            if (bad > 0) {
                /* an older setup: say what breaks and what to run */
                char *line = why, *nl;

                while (line[0] != '\0') {
                    nl = strchr(line, '\n');
                    if (nl != NULL) {
                        *nl = '\0';
                    }
                    gift_log(GIFT_LOG_ERR, "%s", line);
                    if (nl == NULL) {
                        break;
                    }
                    line = nl + 1;
                }
                gift_log(GIFT_LOG_ERR, "not starting: run `giftctl -s URL "
                         "setup --upgrade --state-ttl %" PRId64 "` once (it "
                         "only raises these settings), then start again",
                         ttl);
                return -1;
            }
        }
        jsSubOptions_Init(&so);
        so.Stream = GIFT_STREAM_EVENTS;
        so.Consumer = GIFT_CONSUMER;            /* bind; never create */
        s = js_PullSubscribe(&n->sub, n->js, NULL, NULL, NULL, &so, &jerr);
        if (s != NATS_OK) {
            n->sub = NULL;
            gift_log(GIFT_LOG_ERR, "NATS: pull subscription to %s/%s: %s "
                     "(js error %d)", GIFT_STREAM_EVENTS, GIFT_CONSUMER,
                     nats_GetLastError(NULL), (int) jerr);
            goto retry;
        }
        return 0;

    retry:
        pause_ms(backoff);
        backoff = backoff * 2 > d->conf->nats_reconnect_max_ms
                  ? d->conf->nats_reconnect_max_ms : backoff * 2;
    }
    return -1;
}

/* ------------------------------------------------------------ fetching */

static void
handover(dsp_t *d, natsMsgList *list)
{
    if (list->Count > 0
        && dchan_push_many(&d->nats.inbox, (void **) list->Msgs,
                           (size_t) list->Count) == 0)
    {
        memset(list->Msgs, 0, sizeof(natsMsg *) * (size_t) list->Count);
    }
    /* on failure (memory) the messages are destroyed unacknowledged and
     * redelivered after the ack wait */
    natsMsgList_Destroy(list);
}

static void *
fetch_main(void *arg)
{
    dsp_t          *d = arg;
    dnats_t        *n = &d->nats;
    const dconf_t  *c = d->conf;
    natsMsgList     list;
    jsFetchRequest  req;
    natsStatus      s;
    int             want, got, idle = 0, errors = 0, low;
    int64_t         last_log = 0;
    struct timespec until;

    /* A fetch for 1 message costs about a millisecond; wait until a
     * quarter of a batch is free before asking again, unless nothing at
     * all is held (then any gift is worth fetching at once). */
    low = c->fetch_batch / 4;
    if (low > c->max_inflight) {
        low = c->max_inflight;
    }
    if (low < 1) {
        low = 1;
    }
    pthread_mutex_lock(&n->mu);
    n->low = low;
    pthread_mutex_unlock(&n->mu);

    for (;;) {
        pthread_mutex_lock(&n->mu);
        while (!n->stop && n->credit < low && n->credit < c->max_inflight) {
            pthread_cond_wait(&n->cond, &n->mu);
        }
        if (n->stop) {
            pthread_mutex_unlock(&n->mu);
            break;
        }
        if (!lease_active(d)) {
            /* a standby pulls nothing (lease.c): look again shortly */
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_nsec += 50000000L;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&n->cond, &n->mu, &until);
            pthread_mutex_unlock(&n->mu);
            idle = 0;
            continue;
        }
        want = n->credit < c->fetch_batch ? n->credit : c->fetch_batch;
        n->credit -= want;
        pthread_mutex_unlock(&n->mu);

        memset(&list, 0, sizeof(list));
        jsFetchRequest_Init(&req);
        if (idle) {
            req.Batch = 1;
            req.NoWait = false;
        } else {
            req.Batch = want;
            req.NoWait = true;
        }
        req.Expires = (int64_t) c->fetch_wait_ms * 1000000LL;
        s = natsSubscription_FetchRequest(&list, n->sub, &req);
        got = s == NATS_OK ? list.Count : 0;

        if (s == NATS_OK) {
            idle = got == 0;
            errors = 0;
            handover(d, &list);
        } else if (s == NATS_NOT_FOUND || s == NATS_TIMEOUT) {
            idle = 1;              /* nothing there now: long-poll next */
            errors = 0;
        } else {
            int64_t now = gift_mono_us();

            if (errors++ == 0 || now - last_log > 10000000) {
                gift_log(GIFT_LOG_WARN, "NATS: fetch: %s (%s)",
                         natsStatus_GetText(s), nats_GetLastError(NULL));
                last_log = now;
            }
        }

        pthread_mutex_lock(&n->mu);
        n->credit += want - got;
        if (errors > 0 && !n->stop) {
            /* connection down or consumer gone: back off (woken by stop) */
            int ms = errors > 6 ? 2000 : 30 << errors;

            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_sec += ms / 1000;
            until.tv_nsec += (long) (ms % 1000) * 1000000L;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&n->cond, &n->mu, &until);
        }
        pthread_mutex_unlock(&n->mu);
    }

    pthread_mutex_lock(&n->mu);
    n->done = 1;
    pthread_mutex_unlock(&n->mu);
    /* wake the main loop so that it notices */
    {
        uint64_t one = 1;
        ssize_t  w = write(d->wake_fd, &one, sizeof(one));

        (void) w;
    }
    return NULL;
}

int
nats_in_fetch_start(dsp_t *d)
{
    dnats_t  *n = &d->nats;
    sigset_t  all, old;
    int       rc;

    n->credit = d->conf->max_inflight;
    n->stop = 0;
    n->done = 0;
    /* the thread must never take a signal: only the main loop's ppoll() */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = pthread_create(&n->fetch_tid, NULL, fetch_main, d);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        n->done = 1;
        gift_log(GIFT_LOG_ERR, "cannot start the fetch thread: %s",
                 strerror(rc));
        return -1;
    }
    n->fetch_started = 1;
    return 0;
}

void
nats_in_release(dsp_t *d, int k)
{
    dnats_t *n = &d->nats;

    int      before;

    pthread_mutex_lock(&n->mu);
    before = n->credit;
    n->credit += k;
    /* wake it only when it waits for this: every wake-up is a context
     * switch, and gifts finish by the thousand per second */
    if (before < n->low && n->credit >= n->low) {
        pthread_cond_signal(&n->cond);
    }
    pthread_mutex_unlock(&n->mu);
}

void
nats_in_fetch_stop(dsp_t *d)
{
    dnats_t *n = &d->nats;

    pthread_mutex_lock(&n->mu);
    n->stop = 1;
    pthread_cond_broadcast(&n->cond);
    pthread_mutex_unlock(&n->mu);
}

int
nats_in_fetch_done(dsp_t *d)
{
    dnats_t *n = &d->nats;
    int      done;

    pthread_mutex_lock(&n->mu);
    done = n->done;
    pthread_mutex_unlock(&n->mu);
    return done;
}

/* ------------------------------------------------------------ publishing */

/*
 * Only the sending: which gift a message is for, how many are in flight
 * and what to do when one fails are publish.c's.
 */

natsMsg *
nats_in_msg_new(const char *subject, const void *data, size_t len,
    const char **hdrs)
{
    natsMsg    *m = NULL;
    natsStatus  s;

    s = natsMsg_Create(&m, subject, NULL, data, (int) len);
    for (; s == NATS_OK && hdrs != NULL && hdrs[0] != NULL; hdrs += 2) {
        s = natsMsgHeader_Set(m, hdrs[0], hdrs[1]);
    }

    if (s != NATS_OK) {
        natsMsg_Destroy(m);
        gift_log(GIFT_LOG_ERR, "cannot build a message for %s", subject);
        return NULL;
    }
    return m;
}

int
nats_in_publish(dsp_t *d, natsMsg *m, const char *msg_id)
{
    jsPubOptions po;
    natsStatus   s;
    natsMsg     *keep = m;

    jsPubOptions_Init(&po);
    po.MsgId = msg_id;
    po.MaxWait = d->conf->publish_timeout_ms;

    s = js_PublishMsgAsync(d->nats.js, &m, &po);
    if (s != NATS_OK) {
        if (msg_id != NULL) {
            /* cnats sets it from po.MsgId when it sends; a retry later
             * reads it back from the message */
            natsMsgHeader_Set(keep, "Nats-Msg-Id", msg_id);
        }
        gift_log(GIFT_LOG_DEBUG, "NATS: publish to %s: %s",
                 natsMsg_GetSubject(keep), nats_GetLastError(NULL));
        return -1;
    }
    return 0;
}

void
nats_in_publish_core(dsp_t *d, const char *subject, const void *data,
    size_t len)
{
    natsStatus s;

    s = natsConnection_Publish(d->nats.nc, subject, data, (int) len);
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_DEBUG, "NATS: publish to %s: %s", subject,
                 natsStatus_GetText(s));
    }
}

int
nats_in_republish(dsp_t *d, natsMsg *m)
{
    const char *id = NULL;

    natsMsgHeader_Get(m, "Nats-Msg-Id", &id);
    return nats_in_publish(d, m, id);
}

/* ------------------------------------------------------------ teardown */

void
nats_in_fetch_join(dsp_t *d)
{
    dnats_t *n = &d->nats;

    if (n->fetch_started) {
        nats_in_fetch_stop(d);
        pthread_join(n->fetch_tid, NULL);
        n->fetch_started = 0;
    }
}

void
nats_in_stop(dsp_t *d)
{
    dnats_t   *n = &d->nats;
    void     **items;
    size_t     k, i;
    int        waited;

    nats_in_fetch_join(d);
    if (n->sub != NULL) {
        /* what the server sent after the last fetch returned is dropped
         * here, unacknowledged: redelivered after the ack wait */
        natsSubscription_Unsubscribe(n->sub);
        natsSubscription_Destroy(n->sub);
        n->sub = NULL;
    }
    if (n->nc != NULL) {
        n->closing = 1;
        /* acks and naks are buffered publishes: push them out */
        if (natsConnection_FlushTimeout(n->nc, 2000) != NATS_OK) {
            gift_log(GIFT_LOG_WARN, "NATS: flush at exit: %s",
                     nats_GetLastError(NULL));
        }
        if (natsConnection_DrainTimeout(n->nc, 3000) == NATS_OK) {
            for (waited = 0; waited < 400 && !natsConnection_IsClosed(n->nc);
                 waited++)
            {
                struct timespec ts = { 0, 10000000L };

                nanosleep(&ts, NULL);
            }
        }
        natsConnection_Close(n->nc);
    }
    jsCtx_Destroy(n->js);
    n->js = NULL;
    natsConnection_Destroy(n->nc);
    n->nc = NULL;
    natsOptions_Destroy(n->opts);
    n->opts = NULL;

    /* nothing posts any more: free what is left in the queues */
    dchan_take(&n->inbox, &items, &k);
    for (i = 0; i < k; i++) {
        natsMsg_Destroy(items[i]);
    }
    free(items);
    dchan_take(&n->acks, &items, &k);
    for (i = 0; i < k; i++) {
        natsMsg *m;

        if ((uintptr_t) items[i] & 1) {
            m = (natsMsg *) ((uintptr_t) items[i] & ~(uintptr_t) 1);
        } else {
            m = ((dpuback_t *) items[i])->m;
            free(items[i]);
        }
        natsMsg_Destroy(m);
    }
    free(items);
    dchan_destroy(&n->inbox);
    dchan_destroy(&n->acks);
    pthread_cond_destroy(&n->cond);
    pthread_mutex_destroy(&n->mu);
    n->inited = 0;
}
