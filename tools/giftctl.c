/*
 * giftctl: provision and inspect the gift pipeline's NATS streams.
 *
 *   giftctl [-s URL] setup [--replicas N] [--events-max-msgs N] [--upgrade]
 *                          [--state-ttl S]
 *   giftctl [-s URL] info
 *   giftctl [-s URL] get STREAM SEQ[-LAST]
 *   giftctl [-s URL] sub SUBJECT [--count N] [--timeout S]
 *   giftctl [-s URL] dlq list
 *   giftctl [-s URL] dlq replay [--max-age S] (SEQ ... | --all)
 *
 * Messages are printed as one JSON object a line, decoded from protobuf:
 * GiftEvent for gift.events.* and gift.dlq.*, GiftAck for gift.acks.*.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nats/nats.h>

#include "gift.pb-c.h"
#include "gift_json.h"
#include "gift_natsconn.h"
#include "gift_nkey.h"
#include "gift_provision.h"
#include "gift_util.h"

#define DEFAULT_URL  "nats://127.0.0.1:14222"

static volatile sig_atomic_t  stop;

/* credentials and TLS, as the dispatcher and nginx take them */
static struct {
    const char  *creds;
    const char  *nkey;
    const char  *token;
    const char  *tls_ca;
    const char  *tls_cert;
    const char  *tls_key;
    const char  *tls_name;
} auth;

static void
usage(FILE *f)
{
    fprintf(f,
        "usage: giftctl [-s URL] COMMAND [ARGS]\n"
        "\n"
        "  setup [--replicas N] [--events-max-msgs N] [--upgrade] [--state-ttl S]\n"
        "                       create the streams, consumer and KV buckets\n"
        "                       that are missing (never changes existing ones);\n"
        "                       --upgrade also raises what an older setup left\n"
        "                       short: the consumer's max_deliver to -1 and the\n"
        "                       TTL of GIFT_STREAKS and GIFT_DONE to --state-ttl\n"
        "                       (default 4200 s: max_gift_age 1 h + 10 min)\n"
        "  info                 streams, message counts, consumer lag, DLQ depth\n"
        "  get STREAM SEQ[-LAST]\n"
        "                       stored messages, decoded, one JSON a line\n"
        "                       (deleted ones in a range are skipped)\n"
        "  sub SUBJECT [--count N] [--timeout S]\n"
        "                       print messages on SUBJECT as they arrive\n"
        "  dlq list             the dead-lettered gifts, with their reasons\n"
        "  dlq replay [--max-age S] SEQ...|--all\n"
        "                       publish dead-lettered gifts to GIFTS again and\n"
        "                       remove them from the DLQ; gifts received more\n"
        "                       than S seconds ago (default 3600, the\n"
        "                       dispatcher's max_gift_age) stay in the DLQ\n"
        "\n"
        "  -s URL   NATS server, or several separated by commas\n"
        "           (default $NATS_URL or " DEFAULT_URL "); nats://, or\n"
        "           tls:// for TLS; user:password@ or token@ before the host\n"
        "  --creds FILE       a .creds file (user JWT and NKey seed)\n"
        "  --nkey FILE        an NKey seed file (\"SU...\")\n"
        "  --token TOKEN      token authentication\n"
        "  --tls-ca FILE      CA certificates to verify the server with\n"
        "  --tls-cert FILE    client certificate (mutual TLS), with --tls-key\n"
        "  --tls-key FILE     its private key\n"
        "  --tls-name NAME    the name expected in the server's certificate\n");
}

static void
on_signal(int sig)
{
    (void) sig;
    stop = 1;
}

/* An NKey seed file: cnats wants the public key beside it. */
static natsStatus
set_nkey(natsOptions *opts, const char *file)
{
    const char  *err;
    gift_nkey_t  k;

    if (gift_nkey_read_file(file, &k, &err) != 0) {
        fprintf(stderr, "giftctl: --nkey %s: %s\n", file, err);
        return NATS_ERR;
    }
    return natsOptions_SetNKeyFromSeed(opts, k.public_key, file);
}

static natsStatus
set_auth(natsOptions *opts)
{
    natsStatus  s = NATS_OK;

    if (auth.creds != NULL) {
        s = natsOptions_SetUserCredentialsFromFiles(opts, auth.creds, NULL);
    }
    if (s == NATS_OK && auth.nkey != NULL) {
        s = set_nkey(opts, auth.nkey);
    }
    if (s == NATS_OK && auth.token != NULL) {
        s = natsOptions_SetToken(opts, auth.token);
    }
    if (s == NATS_OK && (auth.tls_ca || auth.tls_cert || auth.tls_name)) {
        s = natsOptions_SetSecure(opts, true);
    }
    if (s == NATS_OK && auth.tls_ca != NULL) {
        s = natsOptions_LoadCATrustedCertificates(opts, auth.tls_ca);
    }
    if (s == NATS_OK && auth.tls_cert != NULL) {
        s = natsOptions_LoadCertificatesChain(opts, auth.tls_cert,
                                              auth.tls_key);
    }
    if (s == NATS_OK && auth.tls_name != NULL) {
        s = natsOptions_SetExpectedHostname(opts, auth.tls_name);
    }

    return s;
}

static int
connect_nats(const char *url, natsConnection **nc, jsCtx **js)
{
    natsOptions *opts = NULL;
    natsStatus   s;
    char        *list, *tok, *save;
    const char  *servers[16];
    int          n = 0;

    /* "nats://a:4222,nats://b:4222": the servers of a cluster */
    list = strdup(url);
    if (list == NULL) {
        return -1;
    }
    for (tok = strtok_r(list, ",", &save); tok != NULL && n < 16;
         tok = strtok_r(NULL, ",", &save))
    {
        servers[n++] = tok;
    }

    s = natsOptions_Create(&opts);
    if (s == NATS_OK) {
        s = natsOptions_SetServers(opts, servers, n);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetTimeout(opts, 3000);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetMaxReconnect(opts, 0);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetName(opts, "giftctl");
    }
    if (s == NATS_OK) {
        s = set_auth(opts);
    }
    if (s == NATS_OK) {
        s = gift_nats_connect(nc, opts,
                              auth.creds != NULL || auth.nkey != NULL);
    }
    natsOptions_Destroy(opts);
    free(list);
    if (s != NATS_OK) {
        fprintf(stderr, "giftctl: cannot connect to %s: %s\n", url,
                natsStatus_GetText(s));
        return -1;
    }
    s = natsConnection_JetStream(js, *nc, NULL);
    if (s != NATS_OK) {
        fprintf(stderr, "giftctl: JetStream: %s\n", natsStatus_GetText(s));
        natsConnection_Destroy(*nc);
        return -1;
    }
    return 0;
}

/* Decode `data` by the subject it was published on; print JSON to `out`. */
static int
print_decoded(FILE *out, const char *subject, uint64_t seq,
    const char *data, int len)
{
    char                  buf[GIFT_JSON_MAX];
    size_t                n = 0;
    Gift__V1__GiftEvent  *ev;
    Gift__V1__GiftAck    *ack;

    if (strncmp(subject, GIFT_SUBJ_ACKS_PREFIX,
                sizeof(GIFT_SUBJ_ACKS_PREFIX) - 1) == 0)
    {
        ack = gift__v1__gift_ack__unpack(NULL, (size_t) len,
                                         (const uint8_t *) data);
        if (ack != NULL) {
            n = gift_ack_json(ack, seq, buf, sizeof(buf));
            gift__v1__gift_ack__free_unpacked(ack, NULL);
        }
    } else {
        ev = gift__v1__gift_event__unpack(NULL, (size_t) len,
                                          (const uint8_t *) data);
        if (ev != NULL) {
            n = gift_event_json(ev, buf, sizeof(buf));
            gift__v1__gift_event__free_unpacked(ev, NULL);
        }
    }
    if (n == 0) {
        fprintf(out, "null");
        return -1;
    }
    fwrite(buf, 1, n, out);
    return 0;
}

static void
print_headers(FILE *out, natsMsg *m)
{
    const char **keys = NULL;
    const char  *v;
    int          count = 0, i;
    size_t       n;
    char         buf[1024];

    fputs(",\"headers\":{", out);
    if (natsMsgHeader_Keys(m, &keys, &count) == NATS_OK) {
        for (i = 0; i < count; i++) {
            v = NULL;
            natsMsgHeader_Get(m, keys[i], &v);
            n = 0;
            gift_json_str(buf, sizeof(buf), &n, keys[i]);
            fprintf(out, "%s%.*s:", i ? "," : "", (int) n, buf);
            n = 0;
            gift_json_str(buf, sizeof(buf), &n, v ? v : "");
            fprintf(out, "%.*s", (int) n, buf);
        }
        free((void *) keys);
    }
    fputc('}', out);
}

/* {"stream","seq","subject","time","headers",("ack"|"event")} */
static int
print_stored(FILE *out, const char *stream, natsMsg *m)
{
    const char *subj = natsMsg_GetSubject(m);
    uint64_t    seq = natsMsg_GetSequence(m);
    int         rc;
    size_t      n = 0;
    char        sbuf[512];

    gift_json_str(sbuf, sizeof(sbuf), &n, subj);
    fprintf(out, "{\"stream\":\"%s\",\"seq\":%" PRIu64 ",\"subject\":%.*s,"
            "\"time\":%" PRId64, stream, seq, (int) n, sbuf,
            natsMsg_GetTime(m) / 1000000);
    print_headers(out, m);
    fprintf(out, ",\"%s\":", strncmp(subj, GIFT_SUBJ_ACKS_PREFIX,
            sizeof(GIFT_SUBJ_ACKS_PREFIX) - 1) == 0 ? "ack" : "event");
    rc = print_decoded(out, subj, seq, natsMsg_GetData(m),
                       natsMsg_GetDataLength(m));
    fputs("}\n", out);
    return rc;
}

/*
 * A GIFTS stream that already existed keeps its settings (provisioning only
 * warns).  Its duplicate window is what makes a replayed, still-valid signed
 * webhook harmless (gift_webhook_signature_window + _skew <= 600 s): a
 * shorter one is an error, named, and setup fails.
 */
static int
check_dup_window(jsCtx *js)
{
    jsStreamInfo  *si = NULL;
    jsErrCode      jerr = 0;
    int64_t        have;

    if (js_GetStreamInfo(&si, js, GIFT_STREAM_EVENTS, NULL, &jerr)
        != NATS_OK)
    {
        return 0;               /* provisioning reported it already */
    }
    have = si->Config->Duplicates;
    jsStreamInfo_Destroy(si);

    if (have < (int64_t) GIFT_DUP_WINDOW_S * 1000000000LL) {
        fprintf(stderr, "giftctl setup: stream %s has a duplicate window "
                "(duplicate_window) of %" PRId64 " s, shorter than %d s: a "
                "replayed signed webhook could be stored twice; raise it "
                "(nats stream edit %s --dupe-window 10m) or lower "
                "gift_webhook_signature_window + gift_webhook_signature_skew "
                "below it\n", GIFT_STREAM_EVENTS,
                (int64_t) (have / 1000000000LL), GIFT_DUP_WINDOW_S,
                GIFT_STREAM_EVENTS);
        return 1;
    }
    return 0;
}

static int
cmd_setup(natsConnection *nc, jsCtx *js, int argc, char **argv)
{
    gift_provision_opts_t o;
    int                   i;

    gift_provision_defaults(&o);
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--replicas") == 0 && i + 1 < argc) {
            o.replicas = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--events-max-msgs") == 0 && i + 1 < argc) {
            o.events_max_msgs = strtoll(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--upgrade") == 0) {
            o.upgrade = 1;
        } else if (strcmp(argv[i], "--state-ttl") == 0 && i + 1 < argc) {
            o.state_ttl_s = strtoll(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "giftctl setup: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (o.replicas < 1 || o.replicas > 5) {
        fprintf(stderr, "giftctl setup: --replicas must be 1..5\n");
        return 2;
    }
    if (o.state_ttl_s < 60) {
        fprintf(stderr, "giftctl setup: --state-ttl is seconds, >= 60\n");
        return 2;
    }
    if (gift_provision(nc, js, &o) != 0) {
        return 1;
    }
    return check_dup_window(js);
}

static int
cmd_info(jsCtx *js)
{
    static const char *streams[] = { GIFT_STREAM_EVENTS, GIFT_STREAM_ACKS,
                                     GIFT_STREAM_DLQ };
    jsStreamInfo   *si;
    jsConsumerInfo *ci;
    jsErrCode       jerr;
    natsStatus      s;
    size_t          i;
    int             rc = 0;

    printf("%-10s %12s %14s %12s %12s\n", "stream", "messages", "bytes",
           "first_seq", "last_seq");
    for (i = 0; i < sizeof(streams) / sizeof(streams[0]); i++) {
        si = NULL;
        s = js_GetStreamInfo(&si, js, streams[i], NULL, &jerr);
        if (s != NATS_OK) {
            printf("%-10s %s\n", streams[i], s == NATS_NOT_FOUND
                   ? "missing (run giftctl setup)" : natsStatus_GetText(s));
            rc = 1;
            continue;
        }
        printf("%-10s %12" PRIu64 " %14" PRIu64 " %12" PRIu64 " %12" PRIu64
               "\n", streams[i], si->State.Msgs, si->State.Bytes,
               si->State.FirstSeq, si->State.LastSeq);
        jsStreamInfo_Destroy(si);
    }

    ci = NULL;
    s = js_GetConsumerInfo(&ci, js, GIFT_STREAM_EVENTS, GIFT_CONSUMER, NULL,
                           &jerr);
    if (s == NATS_OK) {
        printf("\nconsumer %s on %s: lag %" PRIu64 ", ack pending %" PRId64
               ", redelivered %" PRId64 ", waiting pulls %" PRId64 "\n",
               GIFT_CONSUMER, GIFT_STREAM_EVENTS, ci->NumPending,
               ci->NumAckPending, ci->NumRedelivered, ci->NumWaiting);
        jsConsumerInfo_Destroy(ci);
    } else {
        printf("\nconsumer %s: %s\n", GIFT_CONSUMER, natsStatus_GetText(s));
        rc = 1;
    }
    return rc;
}

static int
cmd_get(jsCtx *js, const char *stream, const char *seqs)
{
    natsMsg    *m;
    jsErrCode   jerr = 0;
    natsStatus  s;
    char       *end;
    uint64_t    seq, last;
    int         rc = 0, range;

    errno = 0;
    seq = strtoull(seqs, &end, 10);
    last = seq;
    range = (*end == '-');
    if (range) {
        last = strtoull(end + 1, &end, 10);
    }
    if (errno || *end || seq == 0 || last < seq) {
        fprintf(stderr, "giftctl get: bad sequence %s\n", seqs);
        return 2;
    }

    for (; seq <= last && !stop; seq++) {
        m = NULL;
        s = js_GetMsg(&m, js, stream, seq, NULL, &jerr);
        if (s == NATS_NOT_FOUND && range) {
            continue;
        }
        if (s != NATS_OK) {
            fprintf(stderr, "giftctl get: %s #%" PRIu64 ": %s\n", stream, seq,
                    s == NATS_NOT_FOUND ? "no such message"
                                        : natsStatus_GetText(s));
            return 1;
        }
        if (print_stored(stdout, stream, m) != 0) {
            rc = 1;
        }
        natsMsg_Destroy(m);
    }
    return rc;
}


static int
cmd_sub(natsConnection *nc, int argc, char **argv)
{
    natsSubscription *sub = NULL;
    natsMsg          *m;
    natsStatus        s;
    long              count = -1, seen = 0;
    int64_t           timeout_ms = -1, deadline = 0, wait;
    int               i;

    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    for (i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--count") == 0 && i + 1 < argc) {
            count = atol(argv[++i]);
        } else if (strcmp(argv[i], "--timeout") == 0 && i + 1 < argc) {
            timeout_ms = (int64_t) (atof(argv[++i]) * 1000);
        } else {
            fprintf(stderr, "giftctl sub: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    s = natsConnection_SubscribeSync(&sub, nc, argv[1]);
    if (s != NATS_OK) {
        fprintf(stderr, "giftctl sub: %s\n", natsStatus_GetText(s));
        return 1;
    }
    natsConnection_Flush(nc);
    if (timeout_ms >= 0) {
        deadline = gift_now_ms() + timeout_ms;
    }
    while (!stop && (count < 0 || seen < count)) {
        wait = 200;
        if (timeout_ms >= 0) {
            wait = deadline - gift_now_ms();
            if (wait <= 0) {
                break;
            }
            wait = wait < 200 ? wait : 200;
        }
        s = natsSubscription_NextMsg(&m, sub, wait);
        if (s == NATS_TIMEOUT) {
            continue;
        }
        if (s != NATS_OK) {
            fprintf(stderr, "giftctl sub: %s\n", natsStatus_GetText(s));
            break;
        }
        print_decoded(stdout, natsMsg_GetSubject(m), 0, natsMsg_GetData(m),
                      natsMsg_GetDataLength(m));
        fputc('\n', stdout);
        fflush(stdout);
        natsMsg_Destroy(m);
        seen++;
    }
    natsSubscription_Destroy(sub);
    return (count < 0 || seen >= count) ? 0 : 1;
}

/* Visit every message in `stream`, in order; stop when `fn` returns non-0. */
static int
walk_stream(jsCtx *js, const char *stream,
    int (*fn)(jsCtx *js, natsMsg *m, void *ud), void *ud)
{
    jsStreamInfo *si = NULL;
    jsErrCode     jerr;
    natsMsg      *m;
    uint64_t      seq, last;
    natsStatus    s;
    int           rc = 0;

    s = js_GetStreamInfo(&si, js, stream, NULL, &jerr);
    if (s != NATS_OK) {
        fprintf(stderr, "giftctl: stream %s: %s\n", stream,
                natsStatus_GetText(s));
        return -1;
    }
    seq = si->State.FirstSeq;
    last = si->State.LastSeq;
    jsStreamInfo_Destroy(si);

    for (; seq != 0 && seq <= last && rc == 0 && !stop; seq++) {
        m = NULL;
        s = js_GetMsg(&m, js, stream, seq, NULL, &jerr);
        if (s == NATS_NOT_FOUND) {
            continue;       /* deleted (replayed) */
        }
        if (s != NATS_OK) {
            fprintf(stderr, "giftctl: %s #%" PRIu64 ": %s\n", stream, seq,
                    natsStatus_GetText(s));
            return -1;
        }
        rc = fn(js, m, ud);
        natsMsg_Destroy(m);
    }
    return rc;
}

static int
dlq_print(jsCtx *js, natsMsg *m, void *ud)
{
    (void) js;
    (void) ud;
    print_stored(stdout, GIFT_STREAM_DLQ, m);
    return 0;
}

/*
 * Replay one dead-lettered gift: publish its original GiftEvent bytes to
 * gift.events.<platform> under a new message id (the original id is still
 * inside GIFTS' duplicate window, and would be dropped as a duplicate), wait
 * for the PubAck, then delete it from the DLQ.  A crash in between leaves it
 * in both places; replaying it again is deduplicated by the same id.
 */
/* dlq replay refuses gifts older than this (the dispatcher's
 * max_gift_age: it would dead-letter them "expired" anyway) */
static int64_t dlq_max_age_s = GIFT_MAX_GIFT_AGE_S;

static int
dlq_replay_one(jsCtx *js, natsMsg *m)
{
    Gift__V1__GiftEvent *ev;
    natsMsg             *out = NULL;
    jsPubAck            *pa = NULL;
    jsErrCode            jerr = 0;
    natsStatus           s;
    char                 subject[256], msgid[256];
    uint64_t             seq = natsMsg_GetSequence(m);

    ev = gift__v1__gift_event__unpack(NULL, (size_t) natsMsg_GetDataLength(m),
                                      (const uint8_t *) natsMsg_GetData(m));
    if (ev == NULL) {
        fprintf(stderr, "giftctl dlq replay: #%" PRIu64 " does not decode as"
                " a GiftEvent; left in the DLQ\n", seq);
        return -1;
    }
    if (ev->received_at_ms > 0 && dlq_max_age_s > 0
        && gift_now_ms() - ev->received_at_ms > dlq_max_age_s * 1000)
    {
        fprintf(stderr, "giftctl dlq replay: #%" PRIu64 " (%s) was received "
                "%" PRId64 " s ago, past max_gift_age (%" PRId64 " s): the "
                "stream it belonged to is over; left in the DLQ\n", seq,
                ev->event_id, (gift_now_ms() - ev->received_at_ms) / 1000,
                dlq_max_age_s);
        gift__v1__gift_event__free_unpacked(ev, NULL);
        return -1;
    }
    snprintf(subject, sizeof(subject), "%s%s", GIFT_SUBJ_EVENTS_PREFIX,
             ev->platform[0] ? ev->platform : "unknown");
    snprintf(msgid, sizeof(msgid), "%s:replay:%" PRIu64, ev->event_id, seq);

    s = natsMsg_Create(&out, subject, NULL, natsMsg_GetData(m),
                       natsMsg_GetDataLength(m));
    if (s == NATS_OK) {
        s = natsMsgHeader_Set(out, "Nats-Msg-Id", msgid);
    }
    if (s == NATS_OK) {
        s = js_PublishMsg(&pa, js, out, NULL, &jerr);
    }
    natsMsg_Destroy(out);
    if (s != NATS_OK) {
        fprintf(stderr, "giftctl dlq replay: #%" PRIu64 " (%s): %s\n", seq,
                ev->event_id, natsStatus_GetText(s));
        gift__v1__gift_event__free_unpacked(ev, NULL);
        return -1;
    }
    printf("replayed DLQ #%" PRIu64 " event %s as %s #%" PRIu64 "%s\n", seq,
           ev->event_id, GIFT_STREAM_EVENTS, pa->Sequence,
           pa->Duplicate ? " (already replayed)" : "");
    jsPubAck_Destroy(pa);
    gift__v1__gift_event__free_unpacked(ev, NULL);

    s = js_DeleteMsg(js, GIFT_STREAM_DLQ, seq, NULL, &jerr);
    if (s != NATS_OK) {
        fprintf(stderr, "giftctl dlq replay: could not remove #%" PRIu64
                " from the DLQ: %s\n", seq, natsStatus_GetText(s));
        return -1;
    }
    return 0;
}

static int
dlq_replay_cb(jsCtx *js, natsMsg *m, void *ud)
{
    int *failed = ud;

    if (dlq_replay_one(js, m) != 0) {
        (*failed)++;
    }
    return 0;
}

static int
cmd_dlq(jsCtx *js, int argc, char **argv)
{
    natsMsg    *m;
    jsErrCode   jerr;
    natsStatus  s;
    int         i, failed = 0;
    uint64_t    seq;

    if (argc >= 2 && strcmp(argv[1], "list") == 0) {
        return walk_stream(js, GIFT_STREAM_DLQ, dlq_print, NULL) == 0 ? 0 : 1;
    }
    if (argc >= 5 && strcmp(argv[1], "replay") == 0
        && strcmp(argv[2], "--max-age") == 0)
    {
        dlq_max_age_s = strtoll(argv[3], NULL, 10);
        argv[3] = argv[1];
        argv += 2;
        argc -= 2;
    }
    if (argc >= 3 && strcmp(argv[1], "replay") == 0) {
        if (strcmp(argv[2], "--all") == 0) {
            if (walk_stream(js, GIFT_STREAM_DLQ, dlq_replay_cb, &failed) != 0)
            {
                return 1;
            }
            return failed ? 1 : 0;
        }
        for (i = 2; i < argc; i++) {
            seq = strtoull(argv[i], NULL, 10);
            m = NULL;
            s = js_GetMsg(&m, js, GIFT_STREAM_DLQ, seq, NULL, &jerr);
            if (s != NATS_OK) {
                fprintf(stderr, "giftctl dlq replay: #%s: %s\n", argv[i],
                        s == NATS_NOT_FOUND ? "no such message"
                                            : natsStatus_GetText(s));
                failed++;
                continue;
            }
            if (dlq_replay_one(js, m) != 0) {
                failed++;
            }
            natsMsg_Destroy(m);
        }
        return failed ? 1 : 0;
    }
    usage(stderr);
    return 2;
}

int
main(int argc, char **argv)
{
    const char     *url = getenv("NATS_URL");
    natsConnection *nc = NULL;
    jsCtx          *js = NULL;
    const char     *cmd;
    int             rc, i = 1;

    gift_log_set_program("giftctl");
    if (url == NULL || *url == '\0') {
        url = DEFAULT_URL;
    }
    while (i < argc && argv[i][0] == '-') {
        if (strcmp(argv[i], "-s") == 0 && i + 1 < argc) {
            url = argv[i + 1];
            i += 2;
        } else if (i + 1 < argc && (strcmp(argv[i], "--creds") == 0
                                    || strcmp(argv[i], "--nkey") == 0
                                    || strcmp(argv[i], "--token") == 0
                                    || strncmp(argv[i], "--tls-", 6) == 0))
        {
            const char  **opt = NULL;

            if (strcmp(argv[i], "--creds") == 0) {
                opt = &auth.creds;
            } else if (strcmp(argv[i], "--nkey") == 0) {
                opt = &auth.nkey;
            } else if (strcmp(argv[i], "--token") == 0) {
                opt = &auth.token;
            } else if (strcmp(argv[i], "--tls-ca") == 0) {
                opt = &auth.tls_ca;
            } else if (strcmp(argv[i], "--tls-cert") == 0) {
                opt = &auth.tls_cert;
            } else if (strcmp(argv[i], "--tls-key") == 0) {
                opt = &auth.tls_key;
            } else if (strcmp(argv[i], "--tls-name") == 0) {
                opt = &auth.tls_name;
            } else {
                usage(stderr);
                return 2;
            }
            *opt = argv[i + 1];
            i += 2;
        } else if (strcmp(argv[i], "-h") == 0
                   || strcmp(argv[i], "--help") == 0)
        {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--version") == 0) {
            printf("giftctl %s\n", GIFT_VERSION);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (i >= argc || (auth.tls_cert == NULL) != (auth.tls_key == NULL)) {
        usage(stderr);
        return 2;
    }
    cmd = argv[i];
    argc -= i;
    argv += i;

    if (strcmp(cmd, "setup") && strcmp(cmd, "info") && strcmp(cmd, "get")
        && strcmp(cmd, "sub") && strcmp(cmd, "dlq"))
    {
        fprintf(stderr, "giftctl: unknown command %s\n", cmd);
        usage(stderr);
        return 2;
    }
    if (strcmp(cmd, "get") == 0 && argc != 3) {
        usage(stderr);
        return 2;
    }

    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGPIPE, SIG_IGN);

    if (connect_nats(url, &nc, &js) != 0) {
        nats_Close();
        return 1;
    }

    if (strcmp(cmd, "setup") == 0) {
        rc = cmd_setup(nc, js, argc, argv);
    } else if (strcmp(cmd, "info") == 0) {
        rc = cmd_info(js);
    } else if (strcmp(cmd, "get") == 0) {
        rc = cmd_get(js, argv[1], argv[2]);
    } else if (strcmp(cmd, "sub") == 0) {
        rc = cmd_sub(nc, argc, argv);
    } else {
        rc = cmd_dlq(js, argc, argv);
    }

    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    nats_CloseAndWait(2000);
    return rc;
}
