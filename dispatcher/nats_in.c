/*
 * nats_in.c: everything that talks to NATS, on two connections.
 *
 * control (d->nats.nc, d->nats.js): cnats's own threads; reconnects
 *   forever with capped exponential back-off.  Start-up, provisioning
 *   (gift_provision(): the code `giftctl setup` runs), consumer info, and
 *   what other threads use: KV (kv.c), the lease (lease.c), /metrics.
 *   Those calls block on a reply, which a connection read by the main
 *   loop could not deliver while the main thread waits.
 *
 * hot (d->nats.hnc): the gifts' path, driven by the main loop through
 *   cnats's external event loop API (natsOptions_SetEventLoop): cnats
 *   starts no reader and (SendAsap) no flusher for it; the loop polls its
 *   socket, calls natsConnection_ProcessReadEvent/WriteEvent, and drains
 *   its synchronous subscriptions itself.  No thread hand-off per gift:
 *   - the continuous pull (below): a window of messages asked for from
 *     the durable pull consumer by requests we publish ourselves (cnats
 *     3.4.1 has no asynchronous pull), topped up by the main loop as gifts
 *     arrive and finish, within the credit (the in-flight bound); the
 *     inbox is a sync subscription (nats_in_next()),
 *   - acks, naks, in-progress and term of those messages: published to
 *     their reply subjects (nats_in_ack()),
 *   - JetStream publishes (GiftAck, DLQ): a plain publish with Nats-Msg-Id
 *     and a reply subject <inbox>.a.<n>; the PubAcks come to a sync
 *     subscription of <inbox>.a.* and are parsed here (jansson), with our
 *     own timeout (nats.publish_timeout_ms) for one that never comes
 *     (nats_in_puback()),
 *   - the GIFT_DONE markers (core publishes).
 *   The socket is handed over by callbacks, which cnats also calls from
 *   its reconnect and timer threads: they keep it under ev_mu and wake the
 *   main loop through the wake eventfd.
 *
 * Which gift a publish belongs to, and its retries, are publish.c's: this
 * file writes no gift state.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "dispatcher.h"
#include "gift_natsconn.h"
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

/* Which connection a callback is about (log lines say, after the text
 * they always had: "NATS: reconnected to URL (hot connection)"). */
static const char *
conn_name(dsp_t *d, natsConnection *nc)
{
    return nc == __atomic_load_n(&d->nats.hnc, __ATOMIC_ACQUIRE)
           ? "hot" : "control";
}

static void
wake_main(dsp_t *d)
{
    uint64_t one = 1;
    ssize_t  w;

    w = write(d->wake_fd, &one, sizeof(one));
    (void) w;
}

static void
on_disconnected(natsConnection *nc, void *closure)
{
    dsp_t *d = closure;

    /* `closing` is set by the main thread at exit; a stale read only
     * picks the log level */
    gift_log(d->nats.closing ? GIFT_LOG_DEBUG : GIFT_LOG_WARN,
             "NATS: disconnected (%s connection)%s", conn_name(d, nc),
             d->nats.closing ? "" : "; reconnecting");
    if (nc == __atomic_load_n(&d->nats.hnc, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&d->nats.hot_down, 1, __ATOMIC_RELEASE);
    }
}

static void
on_reconnected(natsConnection *nc, void *closure)
{
    dsp_t    *d = closure;
    char      url[256];

    if (natsConnection_GetConnectedUrl(nc, url, sizeof(url)) != NATS_OK) {
        url[0] = '\0';
    }
    gift_log(GIFT_LOG_INFO, "NATS: reconnected to %s (%s connection)", url,
             conn_name(d, nc));
    if (nc != __atomic_load_n(&d->nats.hnc, __ATOMIC_ACQUIRE)) {
        return;
    }
    /* the main loop asks for its window again and fails the PubAcks
     * outstanding (nats_in_pull) */
    __atomic_store_n(&d->nats.hot_down, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&d->nats.reconnected, 1, __ATOMIC_RELEASE);
    wake_main(d);
}

/*
 * cnats closes a connection for good when reconnecting cannot succeed
 * (the server refuses our credentials twice, say after they were
 * rotated): without it the dispatcher would idle forever.  Outside our own
 * exit, the main loop stops and the daemon exits 1, for its supervisor to
 * start it again (run(), main.c).
 */
static void
on_closed(natsConnection *nc, void *closure)
{
    dsp_t      *d = closure;
    const char *why = NULL;

    if (d->nats.closing) {
        gift_log(GIFT_LOG_DEBUG, "NATS: %s connection closed",
                 conn_name(d, nc));
        return;
    }
    (void) natsConnection_GetLastError(nc, &why);
    gift_log(GIFT_LOG_ERR, "NATS: the %s connection was closed for good "
             "(%s): stopping, to be started again", conn_name(d, nc),
             why != NULL && why[0] != '\0' ? why : "no reason given");
    __atomic_store_n(&d->nats.lost, 1, __ATOMIC_RELEASE);
    wake_main(d);
}

static void
on_async_error(natsConnection *nc, natsSubscription *sub, natsStatus err,
    void *closure)
{
    (void) sub;
    gift_log(GIFT_LOG_WARN, "NATS: asynchronous error (%s connection): %s",
             conn_name(closure, nc), natsStatus_GetText(err));
}

/*
 * The hot connection's event loop callbacks.  cnats calls them with its
 * connection lock held: from the main thread (a publish asks for a write,
 * ProcessWriteEvent says all is written, a read error stops the polling),
 * and from its reconnect thread (attach: the new socket) and timer thread
 * (a PING to write).  They only record what to poll under ev_mu, and wake
 * the main loop when another thread called.  The main thread never calls
 * cnats with ev_mu held.
 */
static void
ev_set(dnats_t *n, int fd, int rd, int wr)
{
    dsp_t *d = (dsp_t *) ((char *) n - offsetof(dsp_t, nats));

    pthread_mutex_lock(&n->ev_mu);
    if (fd != -2) {
        n->ev_fd = fd;
        if (fd >= 0 && ++n->ev_gen == 0) {
            n->ev_gen = 1;              /* 0 stands for "no socket" */
        }
    }
    if (rd >= 0) {
        n->ev_rd = rd;
    }
    if (wr >= 0) {
        n->ev_wr = wr;
    }
    pthread_mutex_unlock(&n->ev_mu);
    if (!pthread_equal(pthread_self(), n->loop_tid)) {
        wake_main(d);
    }
}

static natsStatus
ev_attach(void **user, void *loop, natsConnection *nc, natsSock sock)
{
    (void) nc;
    *user = loop;
    ev_set(loop, (int) sock, 1, -1);
    return NATS_OK;
}

static natsStatus
ev_read(void *user, bool add)
{
    ev_set(user, -2, add ? 1 : 0, -1);
    return NATS_OK;
}

static natsStatus
ev_write(void *user, bool add)
{
    ev_set(user, -2, -1, add ? 1 : 0);
    return NATS_OK;
}

static natsStatus
ev_detach(void *user)
{
    ev_set(user, -1, 0, 0);
    return NATS_OK;
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

int
nats_signs(const dconf_t *c)
{
    return c->nats_creds != NULL || c->nats_nkey != NULL;
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

static natsOptions *
build_options(dsp_t *d, int hot)
{
    natsOptions *o = NULL;
    natsStatus   s;

    s = nats_options_base(d->conf, &o);
    /*
     * Write each publish at once.  On the control connection: cnats's
     * flusher thread would sleep a millisecond before writing.  On the hot
     * one: without SendAsap cnats starts a flusher thread even with an
     * event loop, and wakes it per publish; with it a publish only asks
     * the loop for a write, and the loop writes once per pass.
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
    if (s == NATS_OK && hot) {
        s = natsOptions_SetEventLoop(o, &d->nats, ev_attach, ev_read,
                                     ev_write, ev_detach);
    }
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_ERR, "NATS options: %s", nats_GetLastError(NULL));
        natsOptions_Destroy(o);
        return NULL;
    }
    return o;
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
    if (ci->Config->DeliverSubject != NULL
        && ci->Config->DeliverSubject[0] != '\0')
    {
        gift_log(GIFT_LOG_ERR, "NATS: consumer %s on %s is a push consumer; "
                 "the dispatcher pulls", GIFT_CONSUMER, GIFT_STREAM_EVENTS);
        jsConsumerInfo_Destroy(ci);
        return -1;
    }
    d->nats.max_req_batch = ci->Config->MaxRequestBatch;
    d->nats.max_req_expires_ns = ci->Config->MaxRequestExpires;
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

/* The hot connection and its PubAck inbox.  0, or -1 (retry). */
static int
hot_connect(dsp_t *d)
{
    dnats_t         *n = &d->nats;
    natsConnection  *nc = NULL;
    natsInbox       *inbox = NULL;
    natsStatus       s;
    char             subj[96];

    if (n->hnc == NULL) {
        s = gift_nats_connect(&nc, n->hopts, nats_signs(d->conf));
        if (s != NATS_OK) {
            gift_log(GIFT_LOG_WARN, "NATS: cannot connect to %s (hot "
                     "connection): %s; retrying", d->conf->nats_urls[0],
                     natsStatus_GetText(s));
            return -1;
        }
        __atomic_store_n(&n->hnc, nc, __ATOMIC_RELEASE);
        gift_log(GIFT_LOG_INFO, "NATS: connected to %s (hot connection)",
                 d->conf->nats_urls[0]);
    }
    if (n->asub != NULL) {
        return 0;
    }
    s = natsInbox_Create(&inbox);
    if (s == NATS_OK) {
        snprintf(n->inbox, sizeof(n->inbox), "%s", inbox);
        natsInbox_Destroy(inbox);
        snprintf(n->pub_prefix, sizeof(n->pub_prefix), "%s.a", n->inbox);
        snprintf(subj, sizeof(subj), "%s.*", n->pub_prefix);
        s = natsConnection_SubscribeSync(&n->asub, n->hnc, subj);
    }
    if (s != NATS_OK) {
        n->asub = NULL;
        gift_log(GIFT_LOG_WARN, "NATS: subscribing the PubAck inbox: %s",
                 nats_GetLastError(NULL));
        return -1;
    }
    /* in flight is bounded by max_inflight: never let cnats drop one */
    natsSubscription_SetPendingLimits(n->asub, -1, -1);
    return 0;
}

int
nats_in_start(dsp_t *d)
{
    dnats_t     *n = &d->nats;
    natsStatus   s;
    int          backoff = d->conf->nats_reconnect_min_ms;
    int          logged = 0;

    n->ev_fd = -1;
    n->loop_tid = pthread_self();
    if (pthread_mutex_init(&n->ev_mu, NULL) != 0
        || dmap_init(&n->pending, (size_t) d->conf->max_inflight) != 0)
    {
        gift_log(GIFT_LOG_ERR, "cannot create the NATS state");
        return -1;
    }
    n->inited = 1;
    n->opts = build_options(d, 0);
    n->hopts = build_options(d, 1);
    if (n->opts == NULL || n->hopts == NULL) {
        return -1;
    }

    /* Connect, provision and bind, retrying everything with back-off:
     * at start NATS may not be up yet (a system boot, `make run`). */
    while (!dsp_sig_term) {
        if (n->nc == NULL) {
            s = gift_nats_connect(&n->nc, n->opts, nats_signs(d->conf));
            if (s != NATS_OK) {
                n->nc = NULL;
                if (logged++ % 10 == 0) {
                    gift_log(GIFT_LOG_WARN, "NATS: cannot connect to %s: %s;"
                             " retrying", d->conf->nats_urls[0],
                             natsStatus_GetText(s));
                }
                goto retry;
            }
            gift_log(GIFT_LOG_INFO, "NATS: connected to %s (control "
                     "connection)", d->conf->nats_urls[0]);
        }
        if (n->js == NULL) {
            s = natsConnection_JetStream(&n->js, n->nc, NULL);
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
        if (hot_connect(d) != 0) {
            goto retry;
        }
        /* the consumer exists and pulls (consumer_info): the pull
         * itself starts with nats_in_fetch_start() */
        return 0;

    retry:
        pause_ms(backoff);
        backoff = backoff * 2 > d->conf->nats_reconnect_max_ms
                  ? d->conf->nats_reconnect_max_ms : backoff * 2;
    }
    return -1;
}

/* ------------------------------------------------------------ freeing */

#define DSP_GRAVE_MAX      256
#define DSP_GRAVE_AGE_US   100000

static void
grave_flush(dnats_t *n)
{
    int i;

    for (i = 0; i < n->ngrave; i++) {
        natsMsg_Destroy(n->grave[i]);
    }
    n->ngrave = 0;
}

void
nats_in_msg_free(dsp_t *d, natsMsg *m)
{
    dnats_t *n = &d->nats;

    if (m == NULL) {
        return;
    }
    if (n->grave == NULL) {
        n->grave = malloc(DSP_GRAVE_MAX * sizeof(*n->grave));
        if (n->grave == NULL) {
            natsMsg_Destroy(m);
            return;
        }
    }
    if (n->ngrave == 0) {
        n->grave_us = gift_mono_us();
    }
    n->grave[n->ngrave++] = m;
    if (n->ngrave == DSP_GRAVE_MAX) {
        grave_flush(n);
    }
}

/* ------------------------------------------------------------ pulling */

/*
 * The continuous pull.  Requests go to $JS.API.CONSUMER.MSG.NEXT.<stream>.
 * <consumer> with a reply inbox of ours ({"batch","expires",
 * "idle_heartbeat"}); the server sends the messages, and the status
 * messages of each request (100 idle heartbeat, 408 expired with
 * Nats-Pending-Messages, 409 refused or cut short), to that inbox: a
 * synchronous subscription on the hot connection, which the main thread
 * empties after reading the socket (nats_in_next()).
 *
 * outstanding = asked for - come - reported undelivered.  The main loop
 * tops it up to the window when at least `low` (half the window) is
 * missing and the credit allows: nats.max_inflight - held - outstanding.
 * Idle: one request per expiry, a heartbeat per hb_ns; a trickle: one
 * delivery per gift.
 *
 * A reset (reconnect, a refusal, silence past live_us) drains the inbox's
 * subscription -- the server drops requests whose reply subject lost its
 * interest, and what was already sent still arrives -- and takes a new
 * inbox, so that no old request can deliver past the credit.
 */

/* Destroy retired subscriptions whose drain is over; how many remain. */
static int
reap_retired(dnats_t *n)
{
    int i, k = 0;

    for (i = 0; i < n->nretired; i++) {
        /* a sync subscription whose queue was empty when the drain's
         * flush came back is complete yet still registered: Destroy
         * removes it */
        if (natsSubscription_IsValid(n->retired[i])
            && natsSubscription_DrainCompletionStatus(n->retired[i])
               == NATS_ILLEGAL_STATE)
        {
            n->retired[k++] = n->retired[i];
        } else {
            natsSubscription_Destroy(n->retired[i]);
        }
    }
    n->nretired = k;
    return k;
}

/* Let the current inbox go: its requests lapse on the server, what is on
 * its way still arrives (drain). */
static void
retire_inbox(dnats_t *n)
{
    natsSubscription *sub = n->psub;

    n->psub = NULL;
    n->outstanding = 0;
    n->reply[0] = '\0';
    if (sub == NULL) {
        return;
    }
    reap_retired(n);
    if (n->nretired < DSP_PULL_RETIRED
        && natsSubscription_DrainTimeout(sub, 5000) == NATS_OK)
    {
        n->retired[n->nretired++] = sub;
        return;
    }
    /* no room or no connection: drop what is queued (redelivered after
     * the ack wait) */
    natsSubscription_Unsubscribe(sub);
    natsSubscription_Destroy(sub);
}

static void
pull_reset(dsp_t *d, int backoff, const char *why)
{
    dnats_t *n = &d->nats;

    retire_inbox(n);
    if (!backoff) {
        n->backoff_ms = 0;
        gift_log(GIFT_LOG_INFO, "NATS: %s; asking for gifts again", why);
        return;
    }
    n->backoff_ms = n->backoff_ms == 0 ? 250
                    : n->backoff_ms * 2 > 5000 ? 5000 : n->backoff_ms * 2;
    n->retry_us = gift_mono_us() + (int64_t) n->backoff_ms * 1000;
    gift_log(GIFT_LOG_WARN, "NATS: pull request refused: %s; asking again in"
             " %d ms", why, n->backoff_ms);
}

static int
pull_subscribe(dsp_t *d)
{
    dnats_t    *n = &d->nats;
    natsInbox  *inbox = NULL;
    natsStatus  s;

    s = natsInbox_Create(&inbox);
    if (s == NATS_OK) {
        snprintf(n->reply, sizeof(n->reply), "%s", inbox);
        natsInbox_Destroy(inbox);
        s = natsConnection_SubscribeSync(&n->psub, n->hnc, n->reply);
    }
    if (s != NATS_OK) {
        n->psub = NULL;
        n->reply[0] = '\0';
        gift_log(GIFT_LOG_WARN, "NATS: subscribing the pull inbox: %s",
                 nats_GetLastError(NULL));
        return -1;
    }
    /* the window bounds what can queue; never let cnats drop a gift */
    natsSubscription_SetPendingLimits(n->psub, -1, -1);
    return 0;
}

int
nats_in_arrived(dsp_t *d, natsMsg *m)
{
    dnats_t     *n = &d->nats;
    const char  *st = NULL, *desc = NULL, *pend = NULL;
    char         why[160];
    long long    k;

    if (natsMsg_GetDataLength(m) > 0
        || natsMsgHeader_Get(m, "Status", &st) != NATS_OK || st == NULL)
    {
        /* a gift (possibly of a retired inbox: counted all the same, the
         * window only errs on the small side) */
        if (n->outstanding > 0) {
            n->outstanding--;
        }
        n->seen_us = gift_mono_us();
        n->backoff_ms = 0;
        return 1;
    }
    if (n->psub == NULL || strcmp(natsMsg_GetSubject(m), n->reply) != 0) {
        natsMsg_Destroy(m);          /* about a request of a retired inbox */
        return 0;
    }
    n->seen_us = gift_mono_us();
    if (strncmp(st, "100", 3) == 0) {
        n->backoff_ms = 0;
        nats_in_msg_free(d, m);      /* idle heartbeat: the request lives */
        return 0;
    }
    natsMsgHeader_Get(m, "Description", &desc);
    if ((strncmp(st, "404", 3) == 0 || strncmp(st, "408", 3) == 0)
        && natsMsgHeader_Get(m, "Nats-Pending-Messages", &pend) == NATS_OK
        && pend != NULL)
    {
        /* a request ended (expired): what it did not deliver */
        k = strtoll(pend, NULL, 10);
        n->outstanding -= k > n->outstanding ? n->outstanding : (int) k;
        natsMsg_Destroy(m);
        return 0;
    }
    /* 409 (consumer deleted, leadership change, a limit of the consumer
     * exceeded), 503 (no JetStream), 400, or an end without its count */
    snprintf(why, sizeof(why), "%.3s %s", st, desc != NULL ? desc : "");
    natsMsg_Destroy(m);
    pull_reset(d, 1, why);
    return 0;
}

/* The next message of sub, or NULL.  The pending count first: NextMsg
 * on an empty subscription sets cnats's per-thread error text. */
static natsMsg *
sub_next(natsSubscription *sub, natsStatus *st)
{
    natsMsg  *m = NULL;
    int       msgs = 0;

    *st = NATS_OK;
    if (natsSubscription_GetPending(sub, &msgs, NULL) != NATS_OK
        || msgs == 0)
    {
        return NULL;
    }
    *st = natsSubscription_NextMsg(&m, sub, 0);
    return *st == NATS_OK ? m : NULL;
}

natsMsg *
nats_in_next(dsp_t *d)
{
    dnats_t     *n = &d->nats;
    natsMsg     *m;
    natsStatus   st;
    int          i;

    while (n->psub != NULL) {
        m = sub_next(n->psub, &st);
        if (m != NULL) {
            return m;
        }
        if (st == NATS_NO_RESPONDERS) {
            /* a 503 status (no JetStream): cnats consumed the message */
            pull_reset(d, 1, "503 no responders");
            continue;
        }
        if (st != NATS_SLOW_CONSUMER) {
            break;
        }
    }
    for (i = 0; i < n->nretired; i++) {
        do {
            m = sub_next(n->retired[i], &st);
            if (m != NULL) {
                return m;
            }
        } while (st == NATS_NO_RESPONDERS || st == NATS_SLOW_CONSUMER);
    }
    return NULL;
}

static int
pull_request(dsp_t *d, int want)
{
    dnats_t    *n = &d->nats;
    char        body[128];
    natsStatus  s;

    if (n->hb_ns > 0) {
        snprintf(body, sizeof(body), "{\"batch\":%d,\"expires\":%" PRId64
                 ",\"idle_heartbeat\":%" PRId64 "}", want, n->expires_ns,
                 n->hb_ns);
    } else {
        snprintf(body, sizeof(body), "{\"batch\":%d,\"expires\":%" PRId64
                 "}", want, n->expires_ns);
    }
    s = natsConnection_PublishRequestString(n->hnc, n->next_subj, n->reply,
                                            body);
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_DEBUG, "NATS: pull request: %s",
                 natsStatus_GetText(s));
        return -1;
    }
    n->pulls++;
    return 0;
}

static int64_t pull_next(dsp_t *d, int64_t now);
static void pend_fail_all(dnats_t *n);

int64_t
nats_in_pull(dsp_t *d, int64_t now)
{
    dnats_t  *n = &d->nats;
    int64_t   t;

    if (__atomic_exchange_n(&n->reconnected, 0, __ATOMIC_ACQ_REL)) {
        /* what was written before the break may be lost: fail the PubAcks
         * outstanding (sent again with the same Nats-Msg-Id, which the
         * stream deduplicates) */
        pend_fail_all(n);
        if (n->on && n->psub != NULL) {
            /* the server may have lost the requests (a restart): start
             * over */
            pull_reset(d, 0, "reconnected");
        }
    }
    if (n->ngrave > 0 && now - n->grave_us >= DSP_GRAVE_AGE_US) {
        grave_flush(n);
    }
    t = n->on ? pull_next(d, now) : INT64_MAX;
    if (n->pend_head != NULL && n->pend_head->due_us < t) {
        t = n->pend_head->due_us;
    }
    if (n->ngrave > 0 && n->grave_us + DSP_GRAVE_AGE_US < t) {
        t = n->grave_us + DSP_GRAVE_AGE_US;
    }
    return t;
}

/* nats_in_pull() without the PubAcks: the pull window itself. */
static int64_t
pull_next(dsp_t *d, int64_t now)
{
    dnats_t  *n = &d->nats;
    int       want, avail;

    if (n->nretired > 0 && reap_retired(n) > 0 && n->stop) {
        return now + 20000;          /* until the drain is over */
    }
    if (n->stop || !lease_active(d)) {
        /* stopping, or a standby: nothing more comes */
        if (n->psub != NULL) {
            retire_inbox(n);
            return now + 20000;
        }
        return INT64_MAX;
    }
    if (now < n->retry_us) {
        return n->retry_us;
    }
    if (natsConnection_Status(n->hnc) != NATS_CONN_STATUS_CONNECTED) {
        return now + 1000000;        /* the reconnect callback wakes us */
    }
    if (n->outstanding > 0 && now - n->seen_us > n->live_us) {
        pull_reset(d, 0, "no heartbeat from the pull request");
    }
    if (n->outstanding > 0
        && now - n->asked_us > n->expires_ns / 1000 + 1000000)
    {
        /*
         * Every request sent has expired on the server by now, so what is
         * still counted will not come: nats-server drops a request that
         * expires as a message arrives without sending its 408.
         */
        n->outstanding = 0;
    }
    if (n->psub == NULL && pull_subscribe(d) != 0) {
        n->retry_us = now + 1000000;
        return n->retry_us;
    }

    avail = d->conf->max_inflight - (int) d->nheld - n->outstanding;
    want = n->window - n->outstanding;
    if (avail < want) {
        want = avail;
    }
    if (want >= n->low) {
        if (pull_request(d, want) == 0) {
            n->outstanding += want;
            n->seen_us = now;
            n->asked_us = now;
        } else {
            n->retry_us = now + 100000;
            return n->retry_us;
        }
    }
    if (n->outstanding == 0) {
        return INT64_MAX;
    }
    return n->seen_us + n->live_us
           < n->asked_us + n->expires_ns / 1000 + 1000000
           ? n->seen_us + n->live_us + 1000
           : n->asked_us + n->expires_ns / 1000 + 1001000;
}

int
nats_in_fetch_start(dsp_t *d)
{
    dnats_t        *n = &d->nats;
    const dconf_t  *c = d->conf;
    int64_t         exp_ms = c->fetch_wait_ms, hb_ms;

    n->window = c->fetch_batch < c->max_inflight ? c->fetch_batch
                                                 : c->max_inflight;
    if (n->max_req_batch > 0 && n->window > n->max_req_batch) {
        n->window = (int) n->max_req_batch;
    }
    n->low = (n->window + 1) / 2;
    if (n->max_req_expires_ns > 0 && exp_ms * 1000000 > n->max_req_expires_ns)
    {
        exp_ms = n->max_req_expires_ns / 1000000;
    }
    /* a heartbeat at most every 10 s and at least twice per request (the
     * server refuses more than half the expiry) */
    hb_ms = exp_ms / 2 < 10000 ? exp_ms / 2 : 10000;
    n->expires_ns = exp_ms * 1000000;
    n->hb_ns = hb_ms >= 10 ? hb_ms * 1000000 : 0;
    /* two heartbeats missed, or (none asked) the expiry's 408 */
    n->live_us = n->hb_ns > 0 ? 2 * hb_ms * 1000 : 2 * exp_ms * 1000;
    if (n->live_us < 1000000) {
        n->live_us = 1000000;
    }
    snprintf(n->next_subj, sizeof(n->next_subj),
             "$JS.API.CONSUMER.MSG.NEXT.%s.%s", GIFT_STREAM_EVENTS,
             GIFT_CONSUMER);
    n->outstanding = 0;
    n->stop = 0;
    n->on = 1;
    gift_log(GIFT_LOG_DEBUG, "pulling: window %d, top-up at %d, requests of "
             "%" PRId64 " ms, heartbeat %" PRId64 " ms", n->window, n->low,
             exp_ms, hb_ms);
    return 0;
}

void
nats_in_fetch_stop(dsp_t *d)
{
    dnats_t *n = &d->nats;

    n->stop = 1;
    if (n->psub != NULL) {
        retire_inbox(n);
    }
}

int
nats_in_fetch_done(dsp_t *d)
{
    dnats_t *n = &d->nats;

    return !n->on || (n->stop && n->psub == NULL && reap_retired(n) == 0);
}

/* ------------------------------------------------------------ acking */

/*
 * A +ACK is held back for up to nats.ack_linger_ms (a tenth of the ack
 * wait at most) and goes out with the next thing written on the hot
 * connection -- a GiftAck, a pull request -- or alone when the linger is
 * over: at a few hundred gifts a second the acks then cost the server no
 * read of their own (each read wakes its threads, which is most of its
 * CPU at such rates).  Held back only once the GiftAck's PubAck came and
 * with the completion markers on: an ack lost with a crash in that time
 * brings the gift back after the ack wait, found done by its marker (or
 * the probe), without a command.  nats_in_flush() sends them first: the
 * stop, the lease's release and the failpoint have them at the server.
 *
 * Held acks go only on the socket they were held on (the one their
 * PubAcks were read from, in the same pass).  When it breaks they are
 * dropped, never left to cnats's reconnect buffer or sent on the next
 * socket: a stopping nats-server stops its streams one by one before it
 * closes its connections, so a marker sent just before the GiftAck can
 * have found GIFT_DONE gone while GIFT_ACKS still answered; an ack that
 * then reaches the restarted server would leave that gift without a
 * marker for good.  Dropped, the gift comes back after the ack wait, and
 * the redelivery finds its GiftAck and writes the marker (kv.c).  A break
 * seen by cnats's timer thread (pings unanswered) between the check and
 * the publish still lets an ack into the reconnect buffer; a stopping
 * server closes its sockets, which the main thread sees.
 */
static int64_t
acks_linger_us(const dsp_t *d)
{
    int64_t us = (int64_t) d->conf->ack_linger_ms * 1000;

    return us < d->nats.ack_wait_us / 10 ? us : d->nats.ack_wait_us / 10;
}

/* The hot connection's socket: its generation; 0 while none is polled
 * (cnats stops polling a broken one at once, in the thread that saw it
 * break: here, the main thread, for a read or write error). */
static unsigned
hot_gen(dnats_t *n)
{
    unsigned g;

    pthread_mutex_lock(&n->ev_mu);
    g = n->ev_rd ? n->ev_gen : 0;      /* detached: ev_rd is 0 too */
    pthread_mutex_unlock(&n->ev_mu);
    return g;
}

static void
acks_send(dsp_t *d)
{
    dnats_t    *n = &d->nats;
    const char *r;
    size_t      off;
    natsStatus  s;

    if (hot_gen(n) != n->acks_gen) {
        gift_log(GIFT_LOG_WARN, "NATS: %d acks held back when the hot "
                 "connection broke not sent: their gifts come back after "
                 "the ack wait, found done", n->nacks);
        n->acks_len = 0;            /* nothing sent (the loop below) */
    }
    for (off = 0; off < n->acks_len; off += strlen(r) + 1) {
        r = n->acks + off;
        s = natsConnection_PublishString(n->hnc, r, "+ACK");
        if (s != NATS_OK) {
            /* redelivered after the ack wait, found done */
            gift_log(GIFT_LOG_WARN, "ack to %s: %s", r,
                     natsStatus_GetText(s));
        }
    }
    n->acks_len = 0;
    n->nacks = 0;
}

static int
acks_hold(dsp_t *d, const char *reply, unsigned gen)
{
    dnats_t *n = &d->nats;
    size_t   len = strlen(reply) + 1;
    char    *p;

    if (n->nacks >= DSP_ACKS_HELD_MAX
        || (n->nacks > 0 && gen != n->acks_gen))
    {
        acks_send(d);
    }
    if (n->acks_len + len > n->acks_cap) {
        p = realloc(n->acks, n->acks_cap * 2 + len + 1024);
        if (p == NULL) {
            return -1;
        }
        n->acks = p;
        n->acks_cap = n->acks_cap * 2 + len + 1024;
    }
    if (n->nacks == 0) {
        n->acks_us = gift_mono_us();
        n->acks_gen = gen;
    }
    memcpy(n->acks + n->acks_len, reply, len);
    n->acks_len += len;
    n->nacks++;
    return 0;
}

void
nats_in_break(dsp_t *d)
{
    dnats_t *n = &d->nats;
    int      fd, i;

    pthread_mutex_lock(&n->ev_mu);
    fd = n->ev_rd ? n->ev_fd : -1;      /* broken already: cnats closed it */
    pthread_mutex_unlock(&n->ev_mu);
    if (fd < 0 || shutdown(fd, SHUT_RDWR) != 0) {
        return;
    }
    /* what the server sent first is read, then end of file */
    for (i = 0; i < 1000 && hot_gen(n) != 0; i++) {
        natsConnection_ProcessReadEvent(n->hnc);
    }
}

int
nats_in_acks_held(const dsp_t *d)
{
    return d->nats.nacks;
}

int64_t
nats_in_acks_due(const dsp_t *d)
{
    return d->nats.nacks > 0 ? d->nats.acks_us + acks_linger_us(d)
                             : INT64_MAX;
}

natsStatus
nats_in_ack(dsp_t *d, natsMsg *m, dack_kind kind, int64_t delay_ms)
{
    const char  *reply = natsMsg_GetReply(m);
    const char  *body;
    char         buf[64];
    unsigned     gen;

    if (reply == NULL || reply[0] == '\0') {
        return NATS_ILLEGAL_STATE;
    }
    switch (kind) {
    case DACK_ACK:
        gen = hot_gen(&d->nats);
        if (gen == 0) {
            /* broken since its PubAck came: not through the reconnect
             * buffer either (acks_send) */
            gift_log(GIFT_LOG_DEBUG, "ack to %s not sent: the hot "
                     "connection broke", reply);
            return NATS_OK;
        }
        if (d->conf->done_markers && acks_linger_us(d) > 0
            && acks_hold(d, reply, gen) == 0)
        {
            return NATS_OK;
        }
        body = "+ACK";
        break;
    case DACK_NAK:
        if (delay_ms > 0) {
            snprintf(buf, sizeof(buf), "-NAK {\"delay\":%" PRId64 "}",
                     delay_ms * 1000000);
            body = buf;
        } else {
            body = "-NAK";
        }
        break;
    case DACK_WPI:
        body = "+WPI";
        break;
    default:
        body = "+TERM";
        break;
    }
    return natsConnection_PublishString(d->nats.hnc, reply, body);
}

/* ------------------------------------------------------------ publishing */

/*
 * Only the sending and the PubAcks: which gift a message is for, how many
 * are in flight and what to do when one fails are publish.c's.
 *
 * A JetStream publish is a core publish whose reply subject the stream
 * answers: each message gets <inbox>.a.<n> when built, kept for its
 * retries (a late PubAck of an earlier try then counts for the message,
 * which is right: the same Nats-Msg-Id, stored once).
 */

natsMsg *
nats_in_msg_new(dsp_t *d, const char *subject, const void *data, size_t len,
    const char **hdrs)
{
    dnats_t    *n = &d->nats;
    natsMsg    *m = NULL;
    natsStatus  s;
    char        reply[sizeof(n->pub_prefix) + 24];

    snprintf(reply, sizeof(reply), "%s.%" PRIu64, n->pub_prefix,
             ++n->pub_seq);
    s = natsMsg_Create(&m, subject, reply, data, (int) len);
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

/* The <n> of a reply subject <pub_prefix>.<n>; 0 if not one of ours. */
static uint64_t
reply_seq(const dnats_t *n, const char *subj)
{
    size_t  k = strlen(n->pub_prefix);
    char   *end;
    uint64_t v;

    if (subj == NULL || strncmp(subj, n->pub_prefix, k) != 0
        || subj[k] != '.')
    {
        return 0;
    }
    v = strtoull(subj + k + 1, &end, 10);
    return *end == '\0' ? v : 0;
}

static void
pend_unlink(dnats_t *n, dpend_t *p)
{
    if (p->prev != NULL) {
        p->prev->next = p->next;
    } else {
        n->pend_head = p->next;
    }
    if (p->next != NULL) {
        p->next->prev = p->prev;
    } else {
        n->pend_tail = p->prev;
    }
    p->prev = p->next = NULL;
}

/* The hot connection broke: what it had written may be lost.  Every
 * PubAck outstanding fails now (nats_in_puback hands them back). */
static void
pend_fail_all(dnats_t *n)
{
    dpend_t *p;

    for (p = n->pend_head; p != NULL; p = p->next) {
        p->due_us = 0;      /* the order by due_us holds: all at the head */
        p->lost = 1;
    }
}

int
nats_in_publish(dsp_t *d, natsMsg *m, const char *msg_id)
{
    dnats_t    *n = &d->nats;
    dpend_t    *p;
    natsStatus  s = NATS_OK;
    uint64_t    seq = reply_seq(n, natsMsg_GetReply(m));

    if (msg_id != NULL) {
        /* kept in the message: a retry sends it again (republish) */
        s = natsMsgHeader_Set(m, "Nats-Msg-Id", msg_id);
    }
    p = calloc(1, sizeof(*p));
    if (s != NATS_OK || p == NULL || seq == 0
        || dmap_put(&n->pending, seq, p) != 0)
    {
        free(p);
        gift_log(GIFT_LOG_DEBUG, "NATS: publish to %s: no memory",
                 natsMsg_GetSubject(m));
        return -1;
    }
    s = natsConnection_PublishMsg(n->hnc, m);
    if (s != NATS_OK) {
        dmap_del(&n->pending, seq);
        free(p);
        gift_log(GIFT_LOG_DEBUG, "NATS: publish to %s: %s",
                 natsMsg_GetSubject(m), natsStatus_GetText(s));
        return -1;
    }
    p->m = m;
    p->seq = seq;
    p->due_us = gift_mono_us() + (int64_t) d->conf->publish_timeout_ms * 1000;
    p->prev = n->pend_tail;
    if (n->pend_tail != NULL) {
        n->pend_tail->next = p;
    } else {
        n->pend_head = p;
    }
    n->pend_tail = p;
    return 0;
}

void
nats_in_publish_core(dsp_t *d, const char *subject, const void *data,
    size_t len)
{
    natsStatus s;

    s = natsConnection_Publish(d->nats.hnc, subject, data, (int) len);
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_DEBUG, "NATS: publish to %s: %s", subject,
                 natsStatus_GetText(s));
    }
}

int
nats_in_republish(dsp_t *d, natsMsg *m)
{
    return nats_in_publish(d, m, NULL);     /* its Nats-Msg-Id is set */
}

/* A failure for dispatch_puback, or NULL (memory: logged, aborts, as a
 * gift waiting for a result that never comes would be held forever). */
static void *
puback_failed(natsMsg *m, natsStatus err, int jerr, const char *text)
{
    dpuback_t *r = calloc(1, sizeof(*r));

    if (r == NULL) {
        gift_log(GIFT_LOG_ERR, "out of memory handling a PubAck");
        abort();            /* nothing was acked: every gift is redelivered */
    }
    r->m = m;
    r->err = err;
    r->jerr = jerr;
    snprintf(r->text, sizeof(r->text), "%s", text);
    return r;
}

/*
 * A PubAck's body: {"stream":..,"seq":..[,"duplicate":true]} is stored
 * (a duplicate too: an earlier try was); {"error":{"code":..,"err_code":
 * ..,"description":..}} is a failure, as is anything else.
 */
static void *
puback_parse(natsMsg *ack, natsMsg *m)
{
    json_t       *j, *e, *v;
    json_error_t  jerr;
    const char   *desc;
    char          text[96];
    int           code = 0;

    j = json_loadb(natsMsg_GetData(ack), (size_t) natsMsg_GetDataLength(ack),
                   0, &jerr);
    if (j != NULL && json_is_object(j)
        && (e = json_object_get(j, "error")) == NULL
        && json_is_string(json_object_get(j, "stream")))
    {
        json_decref(j);
        return PUBACK_OK(m);
    }
    if (j != NULL && (e = json_object_get(j, "error")) != NULL) {
        v = json_object_get(e, "err_code");
        code = json_is_integer(v) ? (int) json_integer_value(v) : 0;
        desc = json_string_value(json_object_get(e, "description"));
        v = json_object_get(e, "code");
        snprintf(text, sizeof(text), "%s (%d)", desc != NULL ? desc : "error",
                 json_is_integer(v) ? (int) json_integer_value(v) : 0);
    } else {
        snprintf(text, sizeof(text), "not a PubAck: %.60s",
                 natsMsg_GetDataLength(ack) > 0 ? natsMsg_GetData(ack)
                                                : "(empty)");
    }
    json_decref(j);
    return puback_failed(m, NATS_ERR, code, text);
}

void *
nats_in_puback(dsp_t *d, int64_t now)
{
    dnats_t     *n = &d->nats;
    natsMsg     *ack, *m;
    dpend_t     *p;
    void        *r;
    natsStatus   st;
    int          lost;

    while (n->asub != NULL) {
        ack = sub_next(n->asub, &st);
        if (ack == NULL) {
            if (st == NATS_NO_RESPONDERS || st == NATS_SLOW_CONSUMER) {
                /* a 503 (no stream for the subject): cnats consumed it,
                 * the publish times out and is retried */
                continue;
            }
            break;
        }
        p = dmap_del(&n->pending, reply_seq(n, natsMsg_GetSubject(ack)));
        if (p == NULL) {
            nats_in_msg_free(d, ack);   /* late: timed out, handed back */
            continue;
        }
        pend_unlink(n, p);
        m = p->m;
        free(p);
        r = puback_parse(ack, m);
        nats_in_msg_free(d, ack);
        return r;
    }
    p = n->pend_head;
    if (p == NULL || p->due_us > now) {
        return NULL;
    }
    dmap_del(&n->pending, p->seq);
    pend_unlink(n, p);
    m = p->m;
    lost = p->lost;
    free(p);
    return puback_failed(m, lost ? NATS_CONNECTION_DISCONNECTED : NATS_TIMEOUT,
                         0, lost ? "reconnected before the PubAck"
                                 : "no PubAck in time");
}

/* ------------------------------------------------------------ the socket */

int
nats_in_fd(dsp_t *d, short *events)
{
    dnats_t *n = &d->nats;
    int      fd;

    pthread_mutex_lock(&n->ev_mu);
    fd = n->ev_fd;
    *events = (short) ((n->ev_rd ? POLLIN : 0) | (n->ev_wr ? POLLOUT : 0));
    pthread_mutex_unlock(&n->ev_mu);
    return *events != 0 ? fd : -1;
}

void
nats_in_io(dsp_t *d, short revents)
{
    natsConnection *nc = d->nats.hnc;

    if (revents & (POLLIN | POLLERR | POLLHUP)) {
        /* an error too: the read finds it and cnats reconnects */
        natsConnection_ProcessReadEvent(nc);
    }
    if (revents & POLLOUT) {
        natsConnection_ProcessWriteEvent(nc);
    }
}

/* The hot connection is away (reconnecting): what is published now only
 * waits in cnats's reconnect buffer. */
int
nats_in_hot_down(dsp_t *d)
{
    return __atomic_load_n(&d->nats.hot_down, __ATOMIC_ACQUIRE);
}

void
nats_in_write(dsp_t *d)
{
    dnats_t *n = &d->nats;
    int      wr, fd;

    if (n->hnc == NULL) {
        return;
    }
    pthread_mutex_lock(&n->ev_mu);
    wr = n->ev_wr;
    fd = n->ev_fd;
    pthread_mutex_unlock(&n->ev_mu);
    if (n->nacks > 0
        && (wr || d->stopping
            || gift_mono_us() - n->acks_us >= acks_linger_us(d)))
    {
        acks_send(d);
        pthread_mutex_lock(&n->ev_mu);
        wr = n->ev_wr;
        fd = n->ev_fd;
        pthread_mutex_unlock(&n->ev_mu);
    }
    if (wr && fd >= 0) {
        /* what is left (a full socket buffer) waits for POLLOUT */
        natsConnection_ProcessWriteEvent(n->hnc);
    }
}

int
nats_in_flush(dsp_t *d, int timeout_ms)
{
    dnats_t           *n = &d->nats;
    natsSubscription  *fs = NULL;
    struct pollfd      pfd;
    char               subj[sizeof(n->inbox) + 4];
    int64_t            end = gift_mono_us() + (int64_t) timeout_ms * 1000;
    int                msgs = 0, rc = -1;

    if (n->hnc == NULL) {
        return -1;
    }
    if (n->nacks > 0) {
        acks_send(d);
    }
    if (natsConnection_Status(n->hnc) != NATS_CONN_STATUS_CONNECTED) {
        return -1;
    }
    /* the server handles a connection's messages in order: when ours
     * comes back, it has read everything written before */
    snprintf(subj, sizeof(subj), "%s.f", n->inbox);
    if (natsConnection_SubscribeSync(&fs, n->hnc, subj) != NATS_OK
        || natsConnection_Publish(n->hnc, subj, NULL, 0) != NATS_OK)
    {
        natsSubscription_Destroy(fs);
        return -1;
    }
    while (gift_mono_us() < end) {
        nats_in_write(d);
        if (natsSubscription_GetPending(fs, &msgs, NULL) == NATS_OK
            && msgs > 0)
        {
            rc = 0;
            break;
        }
        pfd.fd = nats_in_fd(d, &pfd.events);
        pfd.revents = 0;
        if (pfd.fd < 0) {
            struct timespec ts = { 0, 10000000L };

            nanosleep(&ts, NULL);       /* reconnecting */
            continue;
        }
        if (poll(&pfd, 1, 10) > 0) {
            nats_in_io(d, pfd.revents);
        }
    }
    natsSubscription_Unsubscribe(fs);
    natsSubscription_Destroy(fs);
    nats_in_write(d);
    return rc;
}

/* ------------------------------------------------------------ teardown */

void
nats_in_fetch_join(dsp_t *d)
{
    dnats_t *n = &d->nats;
    int      i;

    n->stop = 1;
    /* what the server sent and the loop did not take is dropped here,
     * unacknowledged: redelivered after the ack wait */
    if (n->psub != NULL) {
        natsSubscription_Unsubscribe(n->psub);
        natsSubscription_Destroy(n->psub);
        n->psub = NULL;
    }
    for (i = 0; i < n->nretired; i++) {
        natsSubscription_Unsubscribe(n->retired[i]);
        natsSubscription_Destroy(n->retired[i]);
    }
    n->nretired = 0;
}

void
nats_in_stop(dsp_t *d)
{
    dnats_t   *n = &d->nats;
    dpend_t   *p;
    int        waited;

    nats_in_fetch_join(d);
    n->closing = 1;
    if (n->hnc != NULL) {
        /* acks and naks are buffered publishes: the main loop is over,
         * so drive the socket here until the server has them */
        if (nats_in_flush(d, 2000) != 0) {
            gift_log(GIFT_LOG_WARN, "NATS: flush at exit (hot connection): "
                     "not confirmed");
        }
        if (n->asub != NULL) {
            natsSubscription_Unsubscribe(n->asub);
            natsSubscription_Destroy(n->asub);
            n->asub = NULL;
        }
        nats_in_write(d);
        natsConnection_Close(n->hnc);
    }
    if (n->nc != NULL) {
        if (natsConnection_FlushTimeout(n->nc, 2000) != NATS_OK) {
            gift_log(GIFT_LOG_WARN, "NATS: flush at exit (control "
                     "connection): %s",
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
    natsConnection_Destroy(n->hnc);
    __atomic_store_n(&n->hnc, NULL, __ATOMIC_RELEASE);
    natsOptions_Destroy(n->opts);
    n->opts = NULL;
    natsOptions_Destroy(n->hopts);
    n->hopts = NULL;

    /* publishes whose PubAck never came: the messages are ours */
    while ((p = n->pend_head) != NULL) {
        pend_unlink(n, p);
        natsMsg_Destroy(p->m);
        free(p);
    }
    dmap_free(&n->pending);
    grave_flush(n);
    free(n->grave);
    n->grave = NULL;
    free(n->acks);
    n->acks = NULL;
    n->acks_len = n->acks_cap = 0;
    n->nacks = 0;
    pthread_mutex_destroy(&n->ev_mu);
    n->inited = 0;
}
