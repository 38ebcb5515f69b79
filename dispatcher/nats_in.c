/*
 * nats_in.c: everything that talks to NATS.
 *
 * - the connection (reconnecting forever with capped exponential back-off),
 * - provisioning at start (gift_provision(): the code `giftctl setup` runs),
 * - the continuous pull (below): a window of messages asked for from the
 *   durable pull consumer by requests we publish ourselves (cnats 3.4.1
 *   has no asynchronous pull), topped up by the main loop as gifts
 *   arrive and finish, within the credit (the in-flight bound); the
 *   inbox's callback (a cnats thread) posts messages to d->nats.inbox,
 * - acks, naks, in-progress and term of those messages: published to
 *   their reply subjects (nats_in_ack()),
 * - JetStream publishes (GiftAck, DLQ) with js_PublishMsgAsync(); the
 *   PubAck handler runs on a cnats thread and only posts to d->nats.acks.
 *   Which gift a publish belongs to, and its retries, are publish.c's:
 *   this file writes no gift state.
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
    dsp_t    *d = closure;
    char      url[256];
    uint64_t  one = 1;
    ssize_t   w;

    if (natsConnection_GetConnectedUrl(nc, url, sizeof(url)) != NATS_OK) {
        url[0] = '\0';
    }
    gift_log(GIFT_LOG_INFO, "NATS: reconnected to %s", url);
    /* the main loop asks for its window again (nats_in_pull) */
    __atomic_store_n(&d->nats.reconnected, 1, __ATOMIC_RELEASE);
    w = write(d->wake_fd, &one, sizeof(one));
    (void) w;
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

int
nats_in_start(dsp_t *d)
{
    dnats_t     *n = &d->nats;
    jsOptions    jo;
    natsStatus   s;
    int          backoff = d->conf->nats_reconnect_min_ms;
    int          logged = 0;

    if (dchan_init(&n->inbox, d->wake_fd) != 0
        || dchan_init(&n->acks, d->wake_fd) != 0)
    {
        gift_log(GIFT_LOG_ERR, "cannot create the NATS queues");
        return -1;
    }
    n->inited = 1;
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

/* ------------------------------------------------------------ pulling */

/*
 * The continuous pull.  Requests go to $JS.API.CONSUMER.MSG.NEXT.<stream>.
 * <consumer> with a reply inbox of ours ({"batch","expires",
 * "idle_heartbeat"}); the server sends the messages, and the status
 * messages of each request (100 idle heartbeat, 408 expired with
 * Nats-Pending-Messages, 409 refused or cut short), to that inbox.  The
 * subscription's callback (a cnats thread) only posts to d->nats.inbox;
 * the accounting is the main thread's.
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

static void
on_pull_msg(natsConnection *nc, natsSubscription *sub, natsMsg *m,
    void *closure)
{
    dsp_t *d = closure;

    (void) nc;
    (void) sub;
    if (dchan_push(&d->nats.inbox, m) != 0) {
        natsMsg_Destroy(m);         /* memory: redelivered after ack wait */
    }
}

/* Destroy retired subscriptions whose drain is over; how many remain. */
static int
reap_retired(dnats_t *n)
{
    int i, k = 0;

    for (i = 0; i < n->nretired; i++) {
        if (natsSubscription_IsValid(n->retired[i])) {
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
        s = natsConnection_Subscribe(&n->psub, n->nc, n->reply, on_pull_msg,
                                     d);
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
        natsMsg_Destroy(m);          /* idle heartbeat: the request lives */
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
    s = natsConnection_PublishRequestString(n->nc, n->next_subj, n->reply,
                                            body);
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_DEBUG, "NATS: pull request: %s",
                 natsStatus_GetText(s));
        return -1;
    }
    n->pulls++;
    return 0;
}

int64_t
nats_in_pull(dsp_t *d, int64_t now)
{
    dnats_t  *n = &d->nats;
    int       want, avail;

    if (!n->on) {
        return INT64_MAX;
    }
    if (__atomic_exchange_n(&n->reconnected, 0, __ATOMIC_ACQ_REL)
        && n->psub != NULL)
    {
        /* the server may have lost the requests (a restart): start over */
        pull_reset(d, 0, "reconnected");
    }
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
    if (natsConnection_Status(n->nc) != NATS_CONN_STATUS_CONNECTED) {
        return now + 1000000;        /* the reconnect callback wakes us */
    }
    if (n->outstanding > 0 && now - n->seen_us > n->live_us) {
        pull_reset(d, 0, "no heartbeat from the pull request");
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
        } else {
            n->retry_us = now + 100000;
            return n->retry_us;
        }
    }
    return n->outstanding > 0 ? n->seen_us + n->live_us + 1000 : INT64_MAX;
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

natsStatus
nats_in_ack(dsp_t *d, natsMsg *m, dack_kind kind, int64_t delay_ms)
{
    const char  *reply = natsMsg_GetReply(m);
    const char  *body;
    char         buf[64];

    if (reply == NULL || reply[0] == '\0') {
        return NATS_ILLEGAL_STATE;
    }
    switch (kind) {
    case DACK_ACK:
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
    return natsConnection_PublishString(d->nats.nc, reply, body);
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
    void     **items;
    size_t     k, i;
    int        waited;

    nats_in_fetch_join(d);
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
    n->inited = 0;
}
