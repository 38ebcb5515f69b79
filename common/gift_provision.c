/*
 * gift_provision: create the streams, the consumer and the KV buckets of
 * docs/design.md when they are missing; report, and leave alone, those that
 * exist with other settings.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "gift_provision.h"
#include "gift_util.h"

#define NS_PER_S  ((int64_t) 1000000000)

typedef struct {
    const char  *name;
    const char  *subject;
    int64_t      max_age_s;
    int          events;        /* the GIFTS stream: dup window, limits */
} stream_spec_t;

void
gift_provision_defaults(gift_provision_opts_t *o)
{
    memset(o, 0, sizeof(*o));
    o->replicas = 1;
    o->events_max_msgs = -1;
    o->events_max_bytes = -1;
    o->ack_wait_ms = GIFT_ACK_WAIT_S * 1000;
    o->max_deliver = GIFT_MAX_DELIVER;
    /* well above nats.max_inflight: a device's backlog released with a
     * delay (devices.max_held) stays pending on the server meanwhile */
    o->max_ack_pending = GIFT_MAX_ACK_PENDING;
    o->state_ttl_s = GIFT_DONE_TTL_S;
}

static const char *
jerr_text(natsStatus s, jsErrCode jerr)
{
    static __thread char buf[256];

    snprintf(buf, sizeof(buf), "%s (js error %d): %s", natsStatus_GetText(s),
             (int) jerr, nats_GetLastError(NULL));
    return buf;
}

/* Compare one setting; warn when it differs from what docs/design.md asks. */
static int
differs_i64(const char *what, const char *key, int64_t have, int64_t want)
{
    if (have == want) {
        return 0;
    }
    gift_log(GIFT_LOG_WARN, "%s exists with %s %" PRId64 " (expected %" PRId64
             "); leaving it as it is", what, key, have, want);
    return 1;
}

static int
check_stream(const jsStreamConfig *have, const jsStreamConfig *want)
{
    int         d = 0;
    const char *n = want->Name;

    if (have->SubjectsLen != 1 || strcmp(have->Subjects[0], want->Subjects[0]))
    {
        gift_log(GIFT_LOG_WARN, "stream %s exists with other subjects "
                 "(expected %s); leaving it as it is", n, want->Subjects[0]);
        d++;
    }
    d += differs_i64(n, "storage (0 file, 1 memory)", have->Storage,
                     want->Storage);
    d += differs_i64(n, "retention (0 limits)", have->Retention,
                     want->Retention);
    d += differs_i64(n, "discard policy (1 new)", have->Discard,
                     want->Discard);
    d += differs_i64(n, "max_age_ns", have->MaxAge, want->MaxAge);
    d += differs_i64(n, "max_msgs", have->MaxMsgs, want->MaxMsgs);
    d += differs_i64(n, "max_bytes", have->MaxBytes, want->MaxBytes);
    if (want->Duplicates) {
        d += differs_i64(n, "duplicate_window_ns", have->Duplicates,
                         want->Duplicates);
        if (have->Duplicates < want->Duplicates
            && strcmp(n, GIFT_STREAM_EVENTS) == 0)
        {
            /* what signed webhooks rely on: say it in their words */
            gift_log(GIFT_LOG_WARN, "stream %s: its duplicate window (%"
                     PRId64 " s) is shorter than the %d s that nginx's "
                     "gift_webhook_signature_window + "
                     "gift_webhook_signature_skew may span: a replayed "
                     "signed webhook could be stored twice; raise it "
                     "(nats stream edit %s --dupe-window 10m)", n,
                     (int64_t) (have->Duplicates / NS_PER_S),
                     GIFT_DUP_WINDOW_S, n);
        }
    }
    if (have->Replicas < want->Replicas) {
        d += differs_i64(n, "replicas", have->Replicas, want->Replicas);
    }
    return d;
}

static int
ensure_stream(jsCtx *js, const stream_spec_t *spec,
    const gift_provision_opts_t *o)
{
    jsStreamConfig  cfg;
    jsStreamInfo   *si = NULL;
    jsErrCode       jerr = 0;
    natsStatus      s;
    const char     *subjects[1];

    subjects[0] = spec->subject;

    jsStreamConfig_Init(&cfg);
    cfg.Name = spec->name;
    cfg.Subjects = subjects;
    cfg.SubjectsLen = 1;
    cfg.Storage = js_FileStorage;
    cfg.Retention = js_LimitsPolicy;
    cfg.Discard = js_DiscardNew;
    cfg.MaxAge = spec->max_age_s * NS_PER_S;
    cfg.Replicas = o->replicas;
    cfg.MaxMsgs = -1;
    cfg.MaxBytes = -1;
    if (spec->events) {
        cfg.Duplicates = (int64_t) GIFT_DUP_WINDOW_S * NS_PER_S;
        cfg.MaxMsgs = o->events_max_msgs;
        cfg.MaxBytes = o->events_max_bytes;
    } else {
        /* acknowledgements are deduplicated by "<event id>:ack" too */
        cfg.Duplicates = (int64_t) GIFT_DUP_WINDOW_S * NS_PER_S;
    }

    s = js_GetStreamInfo(&si, js, spec->name, NULL, &jerr);
    if (s == NATS_OK) {
        if (check_stream(si->Config, &cfg) == 0
            && !o->quiet)
        {
            gift_log(GIFT_LOG_INFO, "stream %s exists (%" PRIu64 " messages)",
                     spec->name, si->State.Msgs);
        }
        jsStreamInfo_Destroy(si);
        return 0;
    }
    if (s != NATS_NOT_FOUND) {
        gift_log(GIFT_LOG_ERR, "looking up stream %s: %s", spec->name,
                 jerr_text(s, jerr));
        return -1;
    }

    jerr = 0;
    s = js_AddStream(&si, js, &cfg, NULL, &jerr);
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_ERR, "creating stream %s: %s", spec->name,
                 jerr_text(s, jerr));
        return -1;
    }
    jsStreamInfo_Destroy(si);
    if (!o->quiet) {
        gift_log(GIFT_LOG_INFO, "created stream %s (%s)", spec->name,
                 spec->subject);
    }
    return 0;
}

static int
ensure_consumer(jsCtx *js, const gift_provision_opts_t *o)
{
    jsConsumerConfig  cfg;
    jsConsumerInfo   *ci = NULL;
    jsErrCode         jerr = 0;
    natsStatus        s;
    int               d;

    jsConsumerConfig_Init(&cfg);
    cfg.Durable = GIFT_CONSUMER;
    cfg.AckPolicy = js_AckExplicit;
    cfg.DeliverPolicy = js_DeliverAll;
    cfg.AckWait = o->ack_wait_ms * 1000000LL;
    cfg.MaxDeliver = o->max_deliver;
    cfg.Replicas = 0;   /* as the stream */
    if (o->max_ack_pending > 0) {
        cfg.MaxAckPending = o->max_ack_pending;
    }

    s = js_GetConsumerInfo(&ci, js, GIFT_STREAM_EVENTS, GIFT_CONSUMER, NULL,
                           &jerr);
    if (s == NATS_OK) {
        d = 0;
        if (ci->Config->AckPolicy != js_AckExplicit) {
            gift_log(GIFT_LOG_WARN, "consumer %s exists without explicit acks;"
                     " leaving it as it is", GIFT_CONSUMER);
            d++;
        }
        if (ci->Config->DeliverSubject != NULL
            && ci->Config->DeliverSubject[0] != '\0')
        {
            gift_log(GIFT_LOG_WARN, "consumer %s exists as a push consumer; "
                     "the dispatcher needs a pull consumer", GIFT_CONSUMER);
            d++;
        }
        if (o->upgrade && ci->Config->MaxDeliver > 0 && cfg.MaxDeliver <= 0)
        {
            jsConsumerInfo *ui = NULL;
            jsConsumerConfig up = *ci->Config;
            int64_t         was = ci->Config->MaxDeliver;

            up.MaxDeliver = -1;
            jerr = 0;
            s = js_UpdateConsumer(&ui, js, GIFT_STREAM_EVENTS, &up, NULL,
                                  &jerr);
            if (s != NATS_OK) {
                gift_log(GIFT_LOG_ERR, "upgrading consumer %s: %s",
                         GIFT_CONSUMER, jerr_text(s, jerr));
                jsConsumerInfo_Destroy(ci);
                return -1;
            }
            gift_log(GIFT_LOG_INFO, "upgraded consumer %s: max_deliver %"
                     PRId64 " -> -1 (the dispatcher counts attempts)",
                     GIFT_CONSUMER, was);
            jsConsumerInfo_Destroy(ci);
            ci = ui;
        }
        d += differs_i64("consumer " GIFT_CONSUMER, "max_deliver",
                         ci->Config->MaxDeliver, cfg.MaxDeliver);
        d += differs_i64("consumer " GIFT_CONSUMER, "ack_wait_ns",
                         ci->Config->AckWait, cfg.AckWait);
        if (d == 0 && !o->quiet) {
            gift_log(GIFT_LOG_INFO, "consumer %s exists (%" PRIu64
                     " pending)", GIFT_CONSUMER, ci->NumPending);
        }
        jsConsumerInfo_Destroy(ci);
        return 0;
    }
    if (s != NATS_NOT_FOUND) {
        gift_log(GIFT_LOG_ERR, "looking up consumer %s: %s", GIFT_CONSUMER,
                 jerr_text(s, jerr));
        return -1;
    }

    jerr = 0;
    s = js_AddConsumer(&ci, js, GIFT_STREAM_EVENTS, &cfg, NULL, &jerr);
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_ERR, "creating consumer %s: %s", GIFT_CONSUMER,
                 jerr_text(s, jerr));
        return -1;
    }
    jsConsumerInfo_Destroy(ci);
    if (!o->quiet) {
        gift_log(GIFT_LOG_INFO, "created consumer %s on %s", GIFT_CONSUMER,
                 GIFT_STREAM_EVENTS);
    }
    return 0;
}

/* A KV bucket is the stream KV_<bucket>: its MaxAge is the TTL. */
static int
kv_raise_ttl(jsCtx *js, const char *bucket, int64_t ttl_s)
{
    jsStreamInfo   *si = NULL, *ui = NULL;
    jsStreamConfig  cfg;
    jsErrCode       jerr = 0;
    natsStatus      s;
    char            name[128];

    snprintf(name, sizeof(name), "KV_%s", bucket);
    s = js_GetStreamInfo(&si, js, name, NULL, &jerr);
    if (s == NATS_OK) {
        cfg = *si->Config;
        cfg.MaxAge = ttl_s * NS_PER_S;
        jerr = 0;
        s = js_UpdateStream(&ui, js, &cfg, NULL, &jerr);
    }
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_ERR, "upgrading KV bucket %s: %s", bucket,
                 jerr_text(s, jerr));
    }
    jsStreamInfo_Destroy(ui);
    jsStreamInfo_Destroy(si);
    return s == NATS_OK ? 0 : -1;
}

static int
ensure_kv(jsCtx *js, const char *bucket, int64_t ttl_s,
    const gift_provision_opts_t *o)
{
    kvConfig     cfg;
    kvStore     *kv = NULL;
    kvStatus    *st = NULL;
    natsStatus   s;

    s = js_KeyValue(&kv, js, bucket);
    if (s == NATS_OK) {
        if (kvStore_Status(&st, kv) == NATS_OK) {
            int64_t have = kvStatus_TTL(st);

            kvStatus_Destroy(st);
            if (o->upgrade && have > 0 && have < ttl_s * NS_PER_S) {
                if (kv_raise_ttl(js, bucket, ttl_s) != 0) {
                    kvStore_Destroy(kv);
                    return -1;
                }
                gift_log(GIFT_LOG_INFO, "upgraded KV bucket %s: ttl %" PRId64
                         " s -> %" PRId64 " s", bucket, have / NS_PER_S,
                         ttl_s);
                have = ttl_s * NS_PER_S;
            }
            differs_i64(bucket, "ttl_ns", have, ttl_s * NS_PER_S);
        }
        kvStore_Destroy(kv);
        if (!o->quiet) {
            gift_log(GIFT_LOG_INFO, "KV bucket %s exists", bucket);
        }
        return 0;
    }
    if (s != NATS_NOT_FOUND) {
        gift_log(GIFT_LOG_ERR, "looking up KV bucket %s: %s", bucket,
                 jerr_text(s, 0));
        return -1;
    }

    kvConfig_Init(&cfg);
    cfg.Bucket = bucket;
    cfg.History = 1;
    cfg.TTL = ttl_s * NS_PER_S;
    cfg.StorageType = js_FileStorage;
    cfg.Replicas = o->replicas;

    s = js_CreateKeyValue(&kv, js, &cfg);
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_ERR, "creating KV bucket %s: %s", bucket,
                 jerr_text(s, 0));
        return -1;
    }
    kvStore_Destroy(kv);
    if (!o->quiet) {
        gift_log(GIFT_LOG_INFO, "created KV bucket %s", bucket);
    }
    return 0;
}

int
gift_provision(natsConnection *nc, jsCtx *js, const gift_provision_opts_t *o)
{
    static const stream_spec_t streams[] = {
        { GIFT_STREAM_EVENTS, GIFT_SUBJ_EVENTS, GIFT_EVENTS_MAX_AGE_S, 1 },
        { GIFT_STREAM_ACKS,   GIFT_SUBJ_ACKS,   GIFT_ACKS_MAX_AGE_S,   0 },
        { GIFT_STREAM_DLQ,    GIFT_SUBJ_DLQ,    GIFT_DLQ_MAX_AGE_S,    0 },
    };
    size_t i;
    int    rc = 0;

    (void) nc;

    for (i = 0; i < sizeof(streams) / sizeof(streams[0]); i++) {
        if (ensure_stream(js, &streams[i], o) != 0) {
            rc = -1;
        }
    }
    if (rc == 0 && ensure_consumer(js, o) != 0) {
        rc = -1;
    }
    if (ensure_kv(js, GIFT_KV_STREAKS, o->state_ttl_s, o) != 0) {
        rc = -1;
    }
    if (ensure_kv(js, GIFT_KV_DONE, o->state_ttl_s, o) != 0) {
        rc = -1;
    }
    return rc;
}

int
gift_provision_check(jsCtx *js, int64_t ttl_s, char *err, size_t cap)
{
    static const char *const buckets[] = { GIFT_KV_STREAKS, GIFT_KV_DONE };
    jsConsumerInfo *ci = NULL;
    jsStreamInfo   *si = NULL;
    jsErrCode       jerr = 0;
    natsStatus      s;
    size_t          o = 0, i;
    int             n = 0, w;
    char            name[128];

    err[0] = '\0';
    s = js_GetConsumerInfo(&ci, js, GIFT_STREAM_EVENTS, GIFT_CONSUMER, NULL,
                           &jerr);
    if (s != NATS_OK) {
        snprintf(err, cap, "consumer %s: %s", GIFT_CONSUMER,
                 jerr_text(s, jerr));
        return -1;
    }
    if (ci->Config->MaxDeliver > 0) {
        w = snprintf(err + o, cap - o, "consumer %s has max_deliver %" PRId64
                     ": a release or a crash on its last delivery would drop "
                     "a gift without a GiftAck (needs -1)\n", GIFT_CONSUMER,
                     ci->Config->MaxDeliver);
        o += w > 0 && (size_t) w < cap - o ? (size_t) w : 0;
        n++;
    }
    jsConsumerInfo_Destroy(ci);
    for (i = 0; i < 2; i++) {
        snprintf(name, sizeof(name), "KV_%s", buckets[i]);
        jerr = 0;
        s = js_GetStreamInfo(&si, js, name, NULL, &jerr);
        if (s != NATS_OK) {
            snprintf(err + o, cap - o, "KV bucket %s: %s", buckets[i],
                     jerr_text(s, jerr));
            return -1;
        }
        if (si->Config->MaxAge > 0 && si->Config->MaxAge < ttl_s * NS_PER_S)
        {
            w = snprintf(err + o, cap - o, "KV bucket %s keeps keys %" PRId64
                         " s, below max_gift_age + %d s margin = %" PRId64
                         " s\n", buckets[i], si->Config->MaxAge / NS_PER_S,
                         GIFT_STATE_MARGIN_S, ttl_s);
            o += w > 0 && (size_t) w < cap - o ? (size_t) w : 0;
            n++;
        }
        jsStreamInfo_Destroy(si);
        si = NULL;
    }
    return n;
}
