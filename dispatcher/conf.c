/*
 * conf.c: the configuration file, read with libconfig (Debian's
 * libconfig9: hand-written files with comments, @include, and the source
 * line of every setting).
 *
 * Every setting is checked here, once, so that the rest of the daemon
 * trusts dconf_t.  Each problem is reported as "FILE:LINE: KEY: why" and
 * all of them are reported, not only the first; unknown keys are errors
 * too (a misspelt key silently ignored is a bug found in production).
 */
#include <errno.h>
#include <inttypes.h>
#include <libconfig.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dispatcher.h"
#include "gift_normalize.h"
#include "gift_util.h"

typedef struct {
    char        *buf;
    size_t       cap, len;
    int          count;
    const char  *path;       /* the main file, when a setting has none */
    const char  *dir;        /* its directory: @include names are relative */
} errs_t;

/* Append "FILE:LINE: KEY: why" (KEY from the setting's path). */
static void errf(errs_t *e, const config_setting_t *s, const char *key,
    const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void
setting_path(const config_setting_t *s, char *out, size_t cap)
{
    const config_setting_t *chain[32];
    size_t                  n = 0, len = 0;
    int                     w;

    out[0] = '\0';
    for (; s != NULL && !config_setting_is_root(s) && n < 32; s = s->parent) {
        chain[n++] = s;
    }
    while (n-- > 0) {
        s = chain[n];
        if (s->name != NULL) {
            w = snprintf(out + len, cap - len, "%s%s", len ? "." : "",
                         s->name);
        } else {
            w = snprintf(out + len, cap - len, "[%d]",
                         config_setting_index(s));
        }
        if (w < 0 || (size_t) w >= cap - len) {
            return;
        }
        len += (size_t) w;
    }
}

static void
errf(errs_t *e, const config_setting_t *s, const char *key,
    const char *fmt, ...)
{
    char         path[256], full[320];
    const char  *file = NULL;
    unsigned     line = 0;
    va_list      ap;
    int          w;

    e->count++;
    if (e->len + 1 >= e->cap) {
        return;
    }
    path[0] = '\0';
    if (s != NULL) {
        setting_path(s, path, sizeof(path));
        file = config_setting_source_file(s);
        line = config_setting_source_line(s);
    }
    if (key != NULL) {
        snprintf(full, sizeof(full), "%s%s%s", path, path[0] ? "." : "", key);
    } else {
        snprintf(full, sizeof(full), "%s", path[0] ? path : "(top level)");
    }
    if (file == NULL) {
        file = e->path;
    }
    w = snprintf(e->buf + e->len, e->cap - e->len, "%s%s%s:%u: %s: ",
                 file[0] != '/' && strcmp(file, e->path) != 0 && e->dir
                 ? e->dir : "",
                 file[0] != '/' && strcmp(file, e->path) != 0 && e->dir
                 ? "/" : "", file, line, full);
    if (w < 0 || (size_t) w >= e->cap - e->len) {
        e->len = e->cap - 1;
        return;
    }
    e->len += (size_t) w;
    va_start(ap, fmt);
    w = vsnprintf(e->buf + e->len, e->cap - e->len, fmt, ap);
    va_end(ap);
    if (w < 0 || (size_t) w >= e->cap - e->len) {
        e->len = e->cap - 1;
        return;
    }
    e->len += (size_t) w;
    if (e->len + 1 < e->cap) {
        e->buf[e->len++] = '\n';
        e->buf[e->len] = '\0';
    }
}

/* Unknown keys of a group are errors: `known` is NULL-terminated. */
static void
check_keys(errs_t *e, const config_setting_t *g, const char *const *known)
{
    int i, n = config_setting_length(g);

    for (i = 0; i < n; i++) {
        const config_setting_t *c = config_setting_get_elem(g, (unsigned) i);
        const char *const      *k;

        for (k = known; *k; k++) {
            if (strcmp(*k, c->name) == 0) {
                break;
            }
        }
        if (*k == NULL) {
            errf(e, c, NULL, "unknown setting");
        }
    }
}

static const config_setting_t *
group(errs_t *e, const config_setting_t *parent, const char *name)
{
    config_setting_t *g = config_setting_get_member(parent, name);

    if (g != NULL && !config_setting_is_group(g)) {
        errf(e, g, NULL, "expected a group { ... }");
        return NULL;
    }
    return g;
}

/* Integers: INT or INT64 in [min, max]; absent leaves *dst. */
static int
get_i64(errs_t *e, const config_setting_t *g, const char *key, int64_t min,
    int64_t max, int64_t *dst)
{
    config_setting_t *s;
    long long         v;

    if (g == NULL || (s = config_setting_get_member(g, key)) == NULL) {
        return 0;
    }
    if (s->type != CONFIG_TYPE_INT && s->type != CONFIG_TYPE_INT64) {
        errf(e, s, NULL, "expected an integer between %" PRId64 " and %"
             PRId64, min, max);
        return -1;
    }
    v = config_setting_get_int64(s);
    if (v < min || v > max) {
        errf(e, s, NULL, "%lld is out of range (%" PRId64 " to %" PRId64 ")",
             v, min, max);
        return -1;
    }
    *dst = v;
    return 1;
}

static int
get_int(errs_t *e, const config_setting_t *g, const char *key, int min,
    int max, int *dst)
{
    int64_t v;
    int     rc = get_i64(e, g, key, min, max, &v);

    if (rc == 1) {
        *dst = (int) v;
    }
    return rc;
}

static int
get_bool(errs_t *e, const config_setting_t *g, const char *key, int *dst)
{
    config_setting_t *s;

    if (g == NULL || (s = config_setting_get_member(g, key)) == NULL) {
        return 0;
    }
    if (s->type != CONFIG_TYPE_BOOL) {
        errf(e, s, NULL, "expected true or false");
        return -1;
    }
    *dst = config_setting_get_bool(s);
    return 1;
}

/* Strings: replaces *dst (freeing it); empty strings are refused unless
 * allow_empty, in which case "" means unset (NULL). */
static int
get_str(errs_t *e, const config_setting_t *g, const char *key,
    int allow_empty, char **dst)
{
    config_setting_t *s;
    const char       *v;

    if (g == NULL || (s = config_setting_get_member(g, key)) == NULL) {
        return 0;
    }
    if (s->type != CONFIG_TYPE_STRING) {
        errf(e, s, NULL, "expected a string");
        return -1;
    }
    v = config_setting_get_string(s);
    if (v[0] == '\0' && !allow_empty) {
        errf(e, s, NULL, "must not be empty");
        return -1;
    }
    free(*dst);
    *dst = v[0] ? strdup(v) : NULL;
    return 1;
}

/* A readable file, when set. */
static void
get_file(errs_t *e, const config_setting_t *g, const char *key, char **dst)
{
    config_setting_t *s;

    if (get_str(e, g, key, 1, dst) == 1 && *dst != NULL) {
        s = config_setting_get_member(g, key);
        if (access(*dst, R_OK) != 0) {
            errf(e, s, NULL, "cannot read %s: %s", *dst, strerror(errno));
        }
    }
}

/* A string or a list/array of strings, into a set. */
static int
get_set(errs_t *e, const config_setting_t *g, const char *key, dstrset_t *dst)
{
    config_setting_t *s;
    int               i, n;

    if ((s = config_setting_get_member(g, key)) == NULL) {
        return 0;
    }
    if (s->type == CONFIG_TYPE_STRING) {
        n = 1;
    } else if (s->type == CONFIG_TYPE_ARRAY || s->type == CONFIG_TYPE_LIST) {
        n = config_setting_length(s);
        if (n == 0) {
            errf(e, s, NULL, "must not be an empty list");
            return -1;
        }
    } else {
        errf(e, s, NULL, "expected a string or a list of strings");
        return -1;
    }
    dst->v = calloc((size_t) n, sizeof(char *));
    if (dst->v == NULL) {
        errf(e, s, NULL, "out of memory");
        return -1;
    }
    for (i = 0; i < n; i++) {
        const config_setting_t *c = s->type == CONFIG_TYPE_STRING
                                    ? s : config_setting_get_elem(s, (unsigned) i);
        const char             *v;

        if (c->type != CONFIG_TYPE_STRING) {
            errf(e, c, NULL, "expected a string");
            return -1;
        }
        v = config_setting_get_string(c);
        if (v[0] == '\0') {
            errf(e, c, NULL, "must not be empty");
            return -1;
        }
        if ((dst->v[dst->n] = strdup(v)) == NULL) {
            return -1;
        }
        dst->n++;
    }
    return 1;
}

static const char *const k_top[] = {
    "log_level", "nats", "mqtt", "devices", "rules", "metrics", NULL
};
static const char *const k_metrics[] = {
    "listen", "enabled", NULL
};
static const char *const k_devone[] = {
    "id", "rounds_per_minute", "paused", NULL
};
static const char *const k_nats[] = {
    "url", "urls", "name", "user", "password", "token", "creds", "nkey",
    "tls_ca",
    "tls_cert", "tls_key", "reconnect_min_ms", "reconnect_max_ms",
    "provision", "replicas", "ack_wait_ms", "max_ack_pending", "fetch_batch",
    "fetch_wait_ms", "max_inflight", "publish_timeout_ms", "publish_retry_ms",
    "ack_linger_ms", "retry_delays_ms", "shutdown_timeout_ms", "done_markers",
    "max_attempts", "max_gift_age", "lease_ms", NULL
};
static const char *const k_mqtt[] = {
    "host", "port", "client_id", "access_token", "password", "keepalive",
    "qos", "request_topic", "response_topic", "method", "rpc_timeout_ms",
    "late_reply_ms",
    "reconnect_min_ms", "reconnect_max_ms", "send_maximum", "rpc_id_bits",
    "instance_id", "tls", "max_payload", "access_tokens", NULL
};
static const char *const k_tls[] = {
    "ca_file", "ca_path", "cert_file", "key_file", "version", "insecure", NULL
};
static const char *const k_dev[] = {
    "max_inflight", "coalesce_max_events", "coalesce_max_rounds",
    "rounds_per_minute", "control", "device", "offline_grace_ms",
    "offline_retry_ms", "max_held", "busy_retry_ms", NULL
};
static const char *const k_rules[] = {
    "default_device", "default_multiplier", "max_rounds", "over_max_rounds",
    "catalogue",
    "catalogue_override", "rule", NULL
};
static const char *const k_rule[] = {
    "gift", "gift_id", "platform", "room", "device", "multiplier", NULL
};
static const char *const k_cat[] = {
    "gift_id", "diamond", "name", NULL
};

static void
defaults(dconf_t *c)
{
    c->log_level = GIFT_LOG_INFO;
    c->nats_reconnect_min_ms = 100;
    c->nats_reconnect_max_ms = 5000;
    c->provision = 1;
    gift_provision_defaults(&c->prov);
    c->prov.quiet = 0;
    c->fetch_batch = 256;
    c->fetch_wait_ms = 30000;
    c->max_inflight = 1000;
    c->publish_timeout_ms = 5000;
    c->ack_linger_ms = 50;
    c->publish_retry_ms = 1000;
    c->shutdown_timeout_ms = 10000;
    c->done_markers = 1;
    c->max_attempts = GIFT_MAX_ATTEMPTS;
    c->max_gift_age_s = GIFT_MAX_GIFT_AGE_S;
    c->lease_ms = 5000;

    c->mqtt_port = 1883;
    c->mqtt_keepalive = 30;
    c->mqtt_qos = 1;
    c->rpc_timeout_ms = 5000;
    c->late_reply_ms = 600000;
    c->mqtt_reconnect_min_ms = 100;
    c->mqtt_reconnect_max_ms = 10000;
    c->mqtt_send_maximum = 1024;
    c->rpc_id_bits = 31;
    c->instance_id = -1;

    c->dev_max_inflight = 1;
    c->coalesce_max_events = 64;
    /* finite by default: motors are physical (see the example) */
    c->coalesce_max_rounds = DSP_DEF_CMD_ROUNDS;
    c->rounds_per_minute = DSP_DEF_RPM;
    c->offline_grace_ms = 60000;
    c->offline_retry_ms = 1000;
    c->max_held = 0;                    /* a quarter of nats.max_inflight */
    c->busy_retry_ms = 2000;
    c->mqtt_max_payload = 65536;         /* ThingsBoard's NETTY_MAX_PAYLOAD_SIZE */
    c->control = 1;
}

static void
load_nats(errs_t *e, const config_setting_t *g, dconf_t *c)
{
    config_setting_t *s;
    int               i, n;
    int64_t           v;

    if (g == NULL) {
        return;
    }
    check_keys(e, g, k_nats);

    if ((s = config_setting_get_member(g, "url")) != NULL
        && config_setting_get_member(g, "urls") != NULL)
    {
        errf(e, s, NULL, "give url or urls, not both");
    }
    if (s != NULL) {
        char *u = NULL;

        if (get_str(e, g, "url", 0, &u) == 1) {
            c->nats_urls = calloc(1, sizeof(char *));
            if (c->nats_urls == NULL) {
                free(u);
                return;
            }
            c->nats_urls[0] = u;
            c->nnats_urls = 1;
        }
    } else if ((s = config_setting_get_member(g, "urls")) != NULL) {
        dstrset_t set = { NULL, 0 };

        if (get_set(e, g, "urls", &set) == 1) {
            c->nats_urls = set.v;
            c->nnats_urls = set.n;
        } else {
            for (i = 0; i < (int) set.n; i++) {
                free(set.v[i]);
            }
            free(set.v);
        }
    }
    get_str(e, g, "name", 0, &c->nats_name);
    get_str(e, g, "user", 1, &c->nats_user);
    get_str(e, g, "password", 1, &c->nats_password);
    get_str(e, g, "token", 1, &c->nats_token);
    get_file(e, g, "creds", &c->nats_creds);
    get_file(e, g, "nkey", &c->nats_nkey);
    if (c->nats_creds != NULL && c->nats_nkey != NULL) {
        errf(e, g, "nkey", "creds and nkey exclude each other");
    }
    get_file(e, g, "tls_ca", &c->nats_tls_ca);
    get_file(e, g, "tls_cert", &c->nats_tls_cert);
    get_file(e, g, "tls_key", &c->nats_tls_key);
    if ((c->nats_tls_cert == NULL) != (c->nats_tls_key == NULL)) {
        errf(e, g, "tls_cert", "tls_cert and tls_key go together");
    }
    get_int(e, g, "reconnect_min_ms", 1, 600000, &c->nats_reconnect_min_ms);
    get_int(e, g, "reconnect_max_ms", 1, 600000, &c->nats_reconnect_max_ms);
    if (c->nats_reconnect_max_ms < c->nats_reconnect_min_ms) {
        errf(e, g, "reconnect_max_ms", "must be >= reconnect_min_ms");
    }
    get_bool(e, g, "provision", &c->provision);
    get_int(e, g, "replicas", 1, 5, &c->prov.replicas);
    if (get_i64(e, g, "ack_wait_ms", 1000, 3600000, &v) == 1) {
        c->prov.ack_wait_ms = v;
    }
    get_int(e, g, "max_ack_pending", -1, 1000000, &c->prov.max_ack_pending);
    get_int(e, g, "fetch_batch", 1, 4096, &c->fetch_batch);
    get_int(e, g, "fetch_wait_ms", 10, 60000, &c->fetch_wait_ms);
    get_int(e, g, "max_inflight", 1, 1000000, &c->max_inflight);
    get_int(e, g, "publish_timeout_ms", 100, 600000, &c->publish_timeout_ms);
    get_int(e, g, "publish_retry_ms", 10, 600000, &c->publish_retry_ms);
    get_int(e, g, "ack_linger_ms", 0, 1000, &c->ack_linger_ms);
    get_int(e, g, "shutdown_timeout_ms", 0, 3600000, &c->shutdown_timeout_ms);
    get_bool(e, g, "done_markers", &c->done_markers);
    get_int(e, g, "max_attempts", 1, 1000, &c->max_attempts);
    get_i64(e, g, "max_gift_age", 10, 7 * 86400, &c->max_gift_age_s);
    if (get_int(e, g, "lease_ms", 0, 600000, &c->lease_ms) == 1
        && c->lease_ms > 0 && c->lease_ms < 1000)
    {
        errf(e, g, "lease_ms", "must be 0 (every dispatcher active) or at "
             "least 1000");
    }
    /* streak and completion state outlive the oldest gift that may come */
    c->prov.state_ttl_s = c->max_gift_age_s + GIFT_STATE_MARGIN_S;

    if ((s = config_setting_get_member(g, "retry_delays_ms")) != NULL) {
        if (s->type != CONFIG_TYPE_ARRAY && s->type != CONFIG_TYPE_LIST) {
            errf(e, s, NULL, "expected a list of integers [ ... ]");
            return;
        }
        n = config_setting_length(s);
        if (n == 0) {
            errf(e, s, NULL, "must not be an empty list");
            return;
        }
        c->retry_delays_ms = calloc((size_t) n, sizeof(int64_t));
        if (c->retry_delays_ms == NULL) {
            return;
        }
        for (i = 0; i < n; i++) {
            config_setting_t *x = config_setting_get_elem(s, (unsigned) i);

            if ((x->type != CONFIG_TYPE_INT && x->type != CONFIG_TYPE_INT64)
                || config_setting_get_int64(x) < 0
                || config_setting_get_int64(x) > 3600000)
            {
                errf(e, x, NULL, "expected an integer between 0 and 3600000");
                continue;
            }
            c->retry_delays_ms[i] = config_setting_get_int64(x);
        }
        c->nretry_delays = (size_t) n;
    }
}

static void
load_mqtt(errs_t *e, const config_setting_t *g, dconf_t *c)
{
    const config_setting_t *t;
    const char             *why;
    int64_t                 tagmax;

    if (g != NULL) {
        check_keys(e, g, k_mqtt);
        get_str(e, g, "host", 0, &c->mqtt_host);
        get_int(e, g, "port", 1, 65535, &c->mqtt_port);
        get_str(e, g, "client_id", 1, &c->mqtt_client_id);
        get_str(e, g, "access_token", 1, &c->mqtt_token);
        if (config_setting_get_member(g, "access_tokens") != NULL) {
            dstrset_t set = { NULL, 0 };

            if (c->mqtt_token != NULL) {
                errf(e, config_setting_get_member(g, "access_tokens"), NULL,
                     "give access_token or access_tokens, not both");
            }
            if (get_set(e, g, "access_tokens", &set) == 1) {
                c->mqtt_tokens = set.v;
                c->nmqtt_tokens = set.n;
            }
        }
        get_str(e, g, "password", 1, &c->mqtt_password);
        get_int(e, g, "keepalive", 5, 65535, &c->mqtt_keepalive);
        get_int(e, g, "qos", 0, 1, &c->mqtt_qos);
        get_str(e, g, "request_topic", 0, &c->mqtt_request_topic);
        get_str(e, g, "response_topic", 0, &c->mqtt_response_topic);
        get_str(e, g, "method", 0, &c->mqtt_method);
        if (get_int(e, g, "max_payload", 1, 268435455, &c->mqtt_max_payload)
            == 1)
        {
            /* one gift of the longest id to a device of the longest name
             * must fit: commands are split below it, never above */
            size_t one = rpc_payload_max(c->mqtt_method ? c->mqtt_method
                                                        : "rotate",
                                         "0123456789012345678901234567890"
                                         "123456789012345678901234567890123",
                                         NULL, 0)
                         + GIFT_ID_MAX + 42;

            if ((size_t) c->mqtt_max_payload < one) {
                errf(e, config_setting_get_member(g, "max_payload"), NULL,
                     "%d cannot hold one command (at least %zu bytes)",
                     c->mqtt_max_payload, one);
                c->mqtt_max_payload = 65536;
            }
        }
        get_int(e, g, "rpc_timeout_ms", 10, 600000, &c->rpc_timeout_ms);
    get_int(e, g, "late_reply_ms", 0, 86400000, &c->late_reply_ms);
        get_int(e, g, "reconnect_min_ms", 1, 600000,
                &c->mqtt_reconnect_min_ms);
        get_int(e, g, "reconnect_max_ms", 1, 600000,
                &c->mqtt_reconnect_max_ms);
        if (c->mqtt_reconnect_max_ms < c->mqtt_reconnect_min_ms) {
            errf(e, g, "reconnect_max_ms", "must be >= reconnect_min_ms");
        }
        get_int(e, g, "send_maximum", 1, 65535, &c->mqtt_send_maximum);
        if (get_int(e, g, "rpc_id_bits", 31, 63, &c->rpc_id_bits) == 1
            && c->rpc_id_bits != 31 && c->rpc_id_bits != 63)
        {
            errf(e, config_setting_get_member(g, "rpc_id_bits"), NULL,
                 "must be 31 (ThingsBoard) or 63");
            c->rpc_id_bits = 31;
        }
        tagmax = c->rpc_id_bits == 31 ? 2047 : 4294967295LL;
        get_i64(e, g, "instance_id", 0, tagmax, &c->instance_id);

        if ((t = group(e, g, "tls")) != NULL) {
            check_keys(e, t, k_tls);
            get_file(e, t, "ca_file", &c->tls_ca_file);
            get_str(e, t, "ca_path", 1, &c->tls_ca_path);
            get_file(e, t, "cert_file", &c->tls_cert_file);
            get_file(e, t, "key_file", &c->tls_key_file);
            get_str(e, t, "version", 1, &c->tls_version);
            get_bool(e, t, "insecure", &c->tls_insecure);
            if ((c->tls_cert_file == NULL) != (c->tls_key_file == NULL)) {
                errf(e, t, "cert_file", "cert_file and key_file go together");
            }
            if (c->tls_ca_file == NULL && c->tls_ca_path == NULL) {
                errf(e, t, "ca_file", "TLS needs ca_file or ca_path");
            }
            if (c->tls_version != NULL
                && strcmp(c->tls_version, "tlsv1.2") != 0
                && strcmp(c->tls_version, "tlsv1.3") != 0)
            {
                errf(e, t, "version", "must be \"tlsv1.2\" or \"tlsv1.3\"");
            }
        }
    }

    /* defaults that allocate */
    if (c->mqtt_host == NULL) {
        c->mqtt_host = strdup("127.0.0.1");
    }
    if (c->mqtt_request_topic == NULL) {
        c->mqtt_request_topic = strdup("v1/devices/me/rpc/request/{n}");
    }
    if (c->mqtt_response_topic == NULL) {
        c->mqtt_response_topic = strdup("v1/devices/me/rpc/response/{n}");
    }
    if (c->mqtt_method == NULL) {
        c->mqtt_method = strdup("rotate");
    }
    if ((why = rpc_topic_check(c->mqtt_request_topic, 1)) != NULL) {
        errf(e, g ? config_setting_get_member(g, "request_topic") : NULL,
             g ? NULL : "mqtt.request_topic", "%s", why);
    }
    if ((why = rpc_topic_check(c->mqtt_response_topic, 1)) != NULL) {
        errf(e, g ? config_setting_get_member(g, "response_topic") : NULL,
             g ? NULL : "mqtt.response_topic", "%s", why);
    }
}

static void load_device_name(errs_t *e, const config_setting_t *g,
    const char *key, char **dst);

/*
 * rounds_per_minute: a number >= 1, "unlimited" (*dst -1) or "stopped"
 * (*dst 0).  0 is refused: it used to mean "no limit", the opposite of
 * what an operator stopping a motor means.
 */
static int
get_rpm(errs_t *e, const config_setting_t *g, int64_t *dst)
{
    config_setting_t *s;
    const char       *v;

    if (g == NULL
        || (s = config_setting_get_member(g, "rounds_per_minute")) == NULL)
    {
        return 0;
    }
    if (s->type == CONFIG_TYPE_STRING) {
        v = config_setting_get_string(s);
        if (strcmp(v, "unlimited") == 0) {
            *dst = -1;
            return 1;
        }
        if (strcmp(v, "stopped") == 0) {
            *dst = 0;
            return 1;
        }
    } else if ((s->type == CONFIG_TYPE_INT || s->type == CONFIG_TYPE_INT64)
               && config_setting_get_int64(s) >= 1
               && config_setting_get_int64(s) <= (long long) DSP_ROUNDS_JSON_MAX)
    {
        *dst = config_setting_get_int64(s);
        return 1;
    }
    errf(e, s, NULL, "expected a number of rounds >= 1, \"unlimited\" or "
         "\"stopped\" (0 is refused: say which you mean)");
    return -1;
}

static void
load_devices(errs_t *e, const config_setting_t *g, dconf_t *c)
{
    config_setting_t *s;
    int64_t           v;
    int               i, n;

    if (g == NULL) {
        return;
    }
    check_keys(e, g, k_dev);
    get_int(e, g, "max_inflight", 1, 1024, &c->dev_max_inflight);
    get_int(e, g, "coalesce_max_events", 1, 1024, &c->coalesce_max_events);
    if (get_i64(e, g, "coalesce_max_rounds", 1,
                (int64_t) DSP_ROUNDS_JSON_MAX, &v) == 1)
    {
        c->coalesce_max_rounds = (uint64_t) v;
    }
    if (get_rpm(e, g, &v) == 1) {
        c->rounds_per_minute = v == 0 ? DSP_RPM_STOPPED
                               : v < 0 ? 0 : (uint64_t) v;
    }
    get_bool(e, g, "control", &c->control);
    get_int(e, g, "offline_grace_ms", 0, 3600000, &c->offline_grace_ms);
    get_int(e, g, "offline_retry_ms", 10, 600000, &c->offline_retry_ms);
    get_int(e, g, "max_held", 0, 1000000, &c->max_held);
    get_int(e, g, "busy_retry_ms", 10, 600000, &c->busy_retry_ms);

    if ((s = config_setting_get_member(g, "device")) != NULL) {
        if (!config_setting_is_list(s)) {
            errf(e, s, NULL, "expected a list ( { id = ...; "
                 "rounds_per_minute = ...; paused = ...; }, ... )");
            return;
        }
        n = config_setting_length(s);
        c->devconf = calloc((size_t) n + 1, sizeof(ddevconf_t));
        for (i = 0; c->devconf != NULL && i < n; i++) {
            config_setting_t *x = config_setting_get_elem(s, (unsigned) i);
            ddevconf_t       *dc = &c->devconf[c->ndevconf];
            size_t            k;

            if (!config_setting_is_group(x)) {
                errf(e, x, NULL, "expected a group { ... }");
                continue;
            }
            check_keys(e, x, k_devone);
            dc->rounds_per_minute = -1;
            if (config_setting_get_member(x, "id") == NULL) {
                errf(e, x, NULL, "missing id");
                continue;
            }
            load_device_name(e, x, "id", &dc->id);
            if (dc->id == NULL) {
                continue;
            }
            for (k = 0; k < c->ndevconf; k++) {
                if (strcmp(c->devconf[k].id, dc->id) == 0) {
                    errf(e, config_setting_get_member(x, "id"), NULL,
                         "device \"%s\" is listed twice", dc->id);
                }
            }
            if (get_rpm(e, x, &v) == 1) {
                /* -2: stopped; 0: unlimited; -1: the default */
                dc->rounds_per_minute = v == 0 ? -2 : v < 0 ? 0 : v;
            }
            get_bool(e, x, "paused", &dc->paused);
            c->ndevconf++;
        }
    }
}

static void
load_metrics(errs_t *e, const config_setting_t *g, dconf_t *c)
{
    const char *colon;
    int         on = 1;
    char       *end;
    long        port;

    if (g != NULL) {
        check_keys(e, g, k_metrics);
        get_bool(e, g, "enabled", &on);
        get_str(e, g, "listen", 0, &c->metrics_listen);
    }
    if (!on) {
        free(c->metrics_listen);
        c->metrics_listen = NULL;
        return;
    }
    if (c->metrics_listen == NULL) {
        c->metrics_listen = strdup("127.0.0.1:19464");
        return;
    }
    colon = strrchr(c->metrics_listen, ':');
    port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (colon == NULL || colon == c->metrics_listen || *end != '\0'
        || port < 1 || port > 65535)
    {
        errf(e, config_setting_get_member(g, "listen"), NULL,
             "\"%s\" is not ADDRESS:PORT (for instance 127.0.0.1:19464)",
             c->metrics_listen);
    }
}

static void
load_device_name(errs_t *e, const config_setting_t *g, const char *key,
    char **dst)
{
    if (get_str(e, g, key, 0, dst) == 1 && !rules_device_valid(*dst)) {
        errf(e, config_setting_get_member(g, key), NULL,
             "\"%s\" is not a device id (1-64 of A-Z a-z 0-9 _ -)", *dst);
    }
}

static void
load_rules(errs_t *e, const config_setting_t *g, drules_t *r)
{
    config_setting_t *s;
    int               i, n;
    int64_t           v;
    long              dup;

    r->default_multiplier = 1;
    r->cat_override = 1;
    r->max_rounds = DSP_DEF_GIFT_ROUNDS;
    if (g == NULL) {
        return;
    }
    check_keys(e, g, k_rules);
    load_device_name(e, g, "default_device", &r->default_device);
    if (get_i64(e, g, "default_multiplier", 0, 1000000, &v) == 1) {
        r->default_multiplier = (uint32_t) v;
    }
    if (get_i64(e, g, "max_rounds", 1, (int64_t) DSP_ROUNDS_JSON_MAX, &v)
        == 1)
    {
        r->max_rounds = (uint64_t) v;
    }
    {
        char *ov = NULL;

        if (get_str(e, g, "over_max_rounds", 0, &ov) == 1) {
            if (strcmp(ov, "clamp") == 0) {
                r->over_dead_letter = 0;
            } else if (strcmp(ov, "dead_letter") == 0) {
                r->over_dead_letter = 1;
            } else {
                errf(e, config_setting_get_member(g, "over_max_rounds"), NULL,
                     "expected \"clamp\" or \"dead_letter\"");
            }
        }
        free(ov);
    }
    get_bool(e, g, "catalogue_override", &r->cat_override);

    if ((s = config_setting_get_member(g, "catalogue")) != NULL) {
        if (!config_setting_is_list(s)) {
            errf(e, s, NULL, "expected a list ( { gift_id = ...; diamond = ...; }, ... )");
        } else {
            n = config_setting_length(s);
            r->cat = calloc((size_t) n + 1, sizeof(dcat_entry_t));
            for (i = 0; r->cat != NULL && i < n; i++) {
                config_setting_t *x = config_setting_get_elem(s, (unsigned) i);
                dcat_entry_t     *ce = &r->cat[r->ncat];
                char             *name = NULL;

                if (!config_setting_is_group(x)) {
                    errf(e, x, NULL, "expected a group { ... }");
                    continue;
                }
                check_keys(e, x, k_cat);
                get_str(e, x, "name", 1, &name);     /* a comment for humans */
                free(name);
                if (get_str(e, x, "gift_id", 0, &ce->gift_id) == 0) {
                    errf(e, x, NULL, "missing gift_id");
                }
                if (get_i64(e, x, "diamond", 0, GIFT_DIAMOND_MAX, &v)
                    == 1)
                {
                    ce->diamond = (uint32_t) v;
                } else if (config_setting_get_member(x, "diamond") == NULL) {
                    errf(e, x, NULL, "missing diamond");
                }
                if (ce->gift_id != NULL) {
                    r->ncat++;
                }
            }
            if ((dup = rules_prepare(r)) >= 0) {
                errf(e, s, NULL, "gift_id \"%s\" is listed twice",
                     r->cat[dup].gift_id);
            }
        }
    }

    if ((s = config_setting_get_member(g, "rule")) != NULL) {
        if (!config_setting_is_list(s)) {
            errf(e, s, NULL, "expected a list ( { gift = ...; device = ...; }, ... )");
            return;
        }
        n = config_setting_length(s);
        r->rule = calloc((size_t) n + 1, sizeof(drule_t));
        for (i = 0; r->rule != NULL && i < n; i++) {
            config_setting_t *x = config_setting_get_elem(s, (unsigned) i);
            drule_t          *ru = &r->rule[r->nrule++];
            const char       *f;

            ru->multiplier = 1;
            ru->line = config_setting_source_line(x);
            f = config_setting_source_file(x);
            ru->file = strdup(f ? f : e->path);
            if (!config_setting_is_group(x)) {
                errf(e, x, NULL, "expected a group { ... }");
                continue;
            }
            check_keys(e, x, k_rule);
            get_set(e, x, "gift", &ru->gift);
            get_set(e, x, "gift_id", &ru->gift_id);
            get_set(e, x, "platform", &ru->platform);
            get_set(e, x, "room", &ru->room);
            if (config_setting_get_member(x, "gift") == NULL
                && config_setting_get_member(x, "gift_id") == NULL
                && config_setting_get_member(x, "platform") == NULL
                && config_setting_get_member(x, "room") == NULL)
            {
                errf(e, x, NULL, "a rule needs gift, gift_id, platform or "
                     "room (use rules.default_device for every gift)");
            }
            load_device_name(e, x, "device", &ru->device);
            if (config_setting_get_member(x, "device") == NULL) {
                errf(e, x, NULL, "missing device");
            }
            if (get_i64(e, x, "multiplier", 0, 1000000, &v) == 1) {
                ru->multiplier = (uint32_t) v;
            }
        }
    }
}

int
dconf_load(const char *path, dconf_t **out, char *err, size_t cap)
{
    config_t                cfg;
    const config_setting_t *root;
    dconf_t                *c;
    errs_t                  e;
    char                   *dir, *slash;
    char                   *lvl = NULL;
    int                     l;

    *out = NULL;
    err[0] = '\0';
    e.buf = err;
    e.cap = cap;
    e.len = 0;
    e.count = 0;
    e.path = path;

    c = calloc(1, sizeof(*c));
    if (c == NULL || (c->rules = calloc(1, sizeof(drules_t))) == NULL
        || (c->path = strdup(path)) == NULL)
    {
        snprintf(err, cap, "%s: out of memory\n", path);
        dconf_free(c);
        return -1;
    }
    defaults(c);

    config_init(&cfg);
    /* @include "x" is relative to the directory of the main file */
    e.dir = NULL;
    dir = strdup(path);
    if (dir != NULL && (slash = strrchr(dir, '/')) != NULL) {
        *slash = '\0';
        e.dir = dir[0] ? dir : "/";
        config_set_include_dir(&cfg, e.dir);
    }

    if (config_read_file(&cfg, path) != CONFIG_TRUE) {
        if (config_error_type(&cfg) == CONFIG_ERR_FILE_IO) {
            snprintf(err, cap, "%s: cannot read: %s\n", path,
                     strerror(errno ? errno : ENOENT));
        } else {
            const char *ef = config_error_file(&cfg);
            int         rel;

            ef = ef ? ef : path;
            rel = ef[0] != '/' && strcmp(ef, path) != 0 && e.dir != NULL;
            snprintf(err, cap, "%s%s%s:%d: %s\n", rel ? e.dir : "",
                     rel ? "/" : "", ef, config_error_line(&cfg),
                     config_error_text(&cfg));
        }
        config_destroy(&cfg);
        dconf_free(c);
        free(dir);
        return -1;
    }

    root = config_root_setting(&cfg);
    check_keys(&e, root, k_top);
    if (get_str(&e, root, "log_level", 0, &lvl) == 1) {
        if ((l = gift_log_level_parse(lvl)) < 0) {
            errf(&e, config_setting_get_member(root, "log_level"), NULL,
                 "\"%s\" is not error, warning, info or debug", lvl);
        } else {
            c->log_level = l;
        }
    }
    free(lvl);

    load_nats(&e, group(&e, root, "nats"), c);
    load_mqtt(&e, group(&e, root, "mqtt"), c);
    load_devices(&e, group(&e, root, "devices"), c);
    load_rules(&e, group(&e, root, "rules"), c->rules);
    load_metrics(&e, group(&e, root, "metrics"), c);

    if (c->nats_urls == NULL) {
        c->nats_urls = calloc(1, sizeof(char *));
        if (c->nats_urls != NULL) {
            c->nats_urls[0] = strdup("nats://127.0.0.1:4222");
            c->nnats_urls = 1;
        }
    }
    if (c->nats_name == NULL) {
        c->nats_name = strdup(DSP_PROGRAM);
    }
    if (c->max_held == 0) {
        /* one slow device holds at most a quarter of the in-flight credit */
        c->max_held = c->max_inflight / 4 > 0 ? c->max_inflight / 4 : 1;
    }
    if (c->retry_delays_ms == NULL) {
        static const int64_t d[] = { 1000, 2000, 5000, 10000 };

        c->retry_delays_ms = malloc(sizeof(d));
        if (c->retry_delays_ms != NULL) {
            memcpy(c->retry_delays_ms, d, sizeof(d));
            c->nretry_delays = sizeof(d) / sizeof(d[0]);
        }
    }
    if (c->nats_urls == NULL || c->nats_urls[0] == NULL
        || c->nats_name == NULL || c->mqtt_host == NULL
        || c->mqtt_request_topic == NULL || c->mqtt_response_topic == NULL
        || c->mqtt_method == NULL || c->retry_delays_ms == NULL)
    {
        errf(&e, NULL, "(memory)", "out of memory");
    }

    config_destroy(&cfg);
    free(dir);
    if (e.count > 0) {
        dconf_free(c);
        return -1;
    }
    *out = c;
    return 0;
}

void
dconf_free(dconf_t *c)
{
    size_t i;

    if (c == NULL) {
        return;
    }
    for (i = 0; i < c->nmqtt_tokens; i++) {
        free(c->mqtt_tokens[i]);
    }
    free(c->mqtt_tokens);
    for (i = 0; i < c->nnats_urls; i++) {
        free(c->nats_urls[i]);
    }
    free(c->nats_urls);
    free(c->path);
    free(c->nats_name);
    free(c->nats_user);
    free(c->nats_password);
    free(c->nats_token);
    free(c->nats_creds);
    free(c->nats_nkey);
    free(c->nats_tls_ca);
    free(c->nats_tls_cert);
    free(c->nats_tls_key);
    free(c->retry_delays_ms);
    free(c->mqtt_host);
    free(c->mqtt_client_id);
    free(c->mqtt_token);
    free(c->mqtt_password);
    free(c->mqtt_request_topic);
    free(c->mqtt_response_topic);
    free(c->mqtt_method);
    free(c->tls_ca_file);
    free(c->tls_ca_path);
    free(c->tls_cert_file);
    free(c->tls_key_file);
    free(c->tls_version);
    for (i = 0; i < c->ndevconf; i++) {
        free(c->devconf[i].id);
    }
    free(c->devconf);
    free(c->metrics_listen);
    rules_free(c->rules);
    free(c);
}
