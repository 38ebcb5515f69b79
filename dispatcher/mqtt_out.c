/*
 * mqtt_out.c: the MQTT client (libmosquitto), driven by the main loop.
 *
 * No mosquitto_loop_start(): its thread would call our callbacks on another
 * thread and every gift structure would need a lock.  The main loop polls
 * mosquitto_socket() and calls mosquitto_loop_read/write/misc; callbacks
 * therefore run on the main thread, inside those calls.  Reconnecting is
 * ours too (capped exponential back-off), since mosquitto's own lives in
 * mosquitto_loop_forever().
 *
 * The session is ThingsBoard's device API: the access token is the user
 * name, requests go to v1/devices/me/rpc/request/<n> at QoS 1 and replies
 * come on v1/devices/me/rpc/response/<n>, subscribed once per connection.
 * Requests are sent only once that subscription is acknowledged, so that
 * no reply can be routed before we listen.
 */
#include <errno.h>
#include <inttypes.h>
#include <mosquitto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "dispatcher.h"
#include "gift_util.h"

static void
schedule_reconnect(dsp_t *d)
{
    dmqtt_t *m = &d->mqtt;

    m->reconnect_at_us = gift_mono_us() + (int64_t) m->backoff_ms * 1000;
    m->backoff_ms *= 2;
    if (m->backoff_ms > d->conf->mqtt_reconnect_max_ms) {
        m->backoff_ms = d->conf->mqtt_reconnect_max_ms;
    }
}

static void
on_connect(struct mosquitto *mosq, void *obj, int rc)
{
    dsp_t   *d = obj;
    dmqtt_t *m = &d->mqtt;
    int      s;

    if (rc != 0) {
        gift_log(GIFT_LOG_ERR, "MQTT: %s:%d refused the connection: %s",
                 d->conf->mqtt_host, d->conf->mqtt_port,
                 mosquitto_connack_string(rc));
        return;                         /* the broker closes; we retry */
    }
    gift_log(GIFT_LOG_INFO, "MQTT: connected to %s:%d as %s",
             d->conf->mqtt_host, d->conf->mqtt_port, m->client_id);
    s = mosquitto_subscribe(mosq, &m->sub_mid, m->filter, d->conf->mqtt_qos);
    if (s != MOSQ_ERR_SUCCESS) {
        gift_log(GIFT_LOG_ERR, "MQTT: subscribe to %s: %s", m->filter,
                 mosquitto_strerror(s));
        mosquitto_disconnect(mosq);
    }
}

static void
on_subscribe(struct mosquitto *mosq, void *obj, int mid, int qos_count,
    const int *granted)
{
    dsp_t   *d = obj;
    dmqtt_t *m = &d->mqtt;

    if (mid != m->sub_mid) {
        return;
    }
    if (qos_count < 1 || granted[0] > 2) {
        gift_log(GIFT_LOG_ERR, "MQTT: the broker refused the subscription to"
                 " %s (access control?)", m->filter);
        mosquitto_disconnect(mosq);
        return;
    }
    m->ready = 1;
    m->backoff_ms = d->conf->mqtt_reconnect_min_ms;
    gift_log(GIFT_LOG_INFO, "MQTT: listening on %s", m->filter);
    dispatch_kick_all(d);
}

static void
on_disconnect(struct mosquitto *mosq, void *obj, int rc)
{
    dsp_t   *d = obj;
    dmqtt_t *m = &d->mqtt;

    (void) mosq;
    m->ready = 0;
    m->connecting = 0;
    if (rc != 0) {
        gift_log(GIFT_LOG_WARN, "MQTT: connection lost (%s); reconnecting in"
                 " %d ms", mosquitto_strerror(rc), m->backoff_ms);
    }
    schedule_reconnect(d);
}

static void
on_message(struct mosquitto *mosq, void *obj,
    const struct mosquitto_message *msg)
{
    dsp_t    *d = obj;
    uint64_t  n;

    (void) mosq;
    if (rpc_topic_match(d->conf->mqtt_response_topic, msg->topic, &n) != 0) {
        return;
    }
    dispatch_reply(d, n, msg->payload ? msg->payload : "",
                   (size_t) msg->payloadlen);
}

static void
on_log(struct mosquitto *mosq, void *obj, int level, const char *str)
{
    (void) mosq;
    (void) obj;
    if (level & (MOSQ_LOG_ERR | MOSQ_LOG_WARNING)) {
        gift_log(GIFT_LOG_DEBUG, "libmosquitto: %s", str);
    }
}

int
mqtt_out_init(dsp_t *d)
{
    const dconf_t *c = d->conf;
    dmqtt_t       *m = &d->mqtt;
    char           host[128];
    uint64_t       seed = 0;
    int            rc;

    mosquitto_lib_init();

    if (c->mqtt_client_id != NULL) {
        snprintf(m->client_id, sizeof(m->client_id), "%s", c->mqtt_client_id);
    } else {
        if (gethostname(host, sizeof(host)) != 0) {
            snprintf(host, sizeof(host), "localhost");
        }
        host[sizeof(host) - 1] = '\0';
        snprintf(m->client_id, sizeof(m->client_id), "gift-dispatcher-%s-%ld",
                 host, (long) getpid());
    }
    if (rpc_topic_filter(c->mqtt_response_topic, m->filter,
                         sizeof(m->filter)) < 0)
    {
        gift_log(GIFT_LOG_ERR, "MQTT: response topic too long");
        return -1;
    }
    if (getrandom(&seed, sizeof(seed), 0) != (ssize_t) sizeof(seed)) {
        seed = (uint64_t) gift_now_ms() ^ ((uint64_t) getpid() << 32);
    }
    rpc_ids_init(&m->ids, c->rpc_id_bits, c->instance_id, seed);
    gift_log(GIFT_LOG_INFO, "RPC ids: instance tag %" PRIu64 " (%d bits)",
             m->ids.tag, c->rpc_id_bits);

    m->mosq = mosquitto_new(m->client_id, true, d);
    if (m->mosq == NULL) {
        gift_log(GIFT_LOG_ERR, "MQTT: mosquitto_new: %s", strerror(errno));
        return -1;
    }
    mosquitto_int_option(m->mosq, MOSQ_OPT_PROTOCOL_VERSION,
                         MQTT_PROTOCOL_V311);
    mosquitto_int_option(m->mosq, MOSQ_OPT_TCP_NODELAY, 1);
    mosquitto_int_option(m->mosq, MOSQ_OPT_SEND_MAXIMUM, c->mqtt_send_maximum);
    if (c->mqtt_token != NULL) {
        rc = mosquitto_username_pw_set(m->mosq, c->mqtt_token,
                                       c->mqtt_password);
        if (rc != MOSQ_ERR_SUCCESS) {
            gift_log(GIFT_LOG_ERR, "MQTT: access token: %s",
                     mosquitto_strerror(rc));
            return -1;
        }
    }
    if (c->tls_ca_file != NULL || c->tls_ca_path != NULL) {
        rc = mosquitto_tls_set(m->mosq, c->tls_ca_file, c->tls_ca_path,
                               c->tls_cert_file, c->tls_key_file, NULL);
        if (rc == MOSQ_ERR_SUCCESS) {
            rc = mosquitto_tls_opts_set(m->mosq, 1, c->tls_version, NULL);
        }
        if (rc == MOSQ_ERR_SUCCESS) {
            rc = mosquitto_tls_insecure_set(m->mosq, c->tls_insecure != 0);
        }
        if (rc != MOSQ_ERR_SUCCESS) {
            gift_log(GIFT_LOG_ERR, "MQTT: TLS settings: %s",
                     mosquitto_strerror(rc));
            return -1;
        }
    }
    mosquitto_connect_callback_set(m->mosq, on_connect);
    mosquitto_subscribe_callback_set(m->mosq, on_subscribe);
    mosquitto_disconnect_callback_set(m->mosq, on_disconnect);
    mosquitto_message_callback_set(m->mosq, on_message);
    mosquitto_log_callback_set(m->mosq, on_log);

    m->bufcap = 4096;
    m->buf = malloc(m->bufcap);
    m->backoff_ms = c->mqtt_reconnect_min_ms;
    m->reconnect_at_us = 0;                 /* at once */
    return m->buf ? 0 : -1;
}

void
mqtt_out_connect(dsp_t *d, int64_t now)
{
    dmqtt_t *m = &d->mqtt;
    int      rc;

    if (m->connecting || now < m->reconnect_at_us || d->stopping) {
        return;
    }
    /* getaddrinfo() inside blocks; with an IP address (the default) it
     * returns at once */
    rc = mosquitto_connect_async(m->mosq, d->conf->mqtt_host,
                                 d->conf->mqtt_port, d->conf->mqtt_keepalive);
    if (rc != MOSQ_ERR_SUCCESS) {
        gift_log(GIFT_LOG_WARN, "MQTT: cannot connect to %s:%d: %s; retrying"
                 " in %d ms", d->conf->mqtt_host, d->conf->mqtt_port,
                 rc == MOSQ_ERR_ERRNO ? strerror(errno)
                                      : mosquitto_strerror(rc),
                 m->backoff_ms);
        schedule_reconnect(d);
        return;
    }
    m->connecting = 1;
}

int
mqtt_out_fd(dsp_t *d)
{
    return d->mqtt.mosq ? mosquitto_socket(d->mqtt.mosq) : -1;
}

int
mqtt_out_want_write(dsp_t *d)
{
    return mosquitto_want_write(d->mqtt.mosq);
}

static void
check_rc(dsp_t *d, int rc)
{
    /* on an error libmosquitto has closed the socket and called
     * on_disconnect (which scheduled the reconnect) */
    if (rc != MOSQ_ERR_SUCCESS && mosquitto_socket(d->mqtt.mosq) < 0
        && d->mqtt.connecting)
    {
        d->mqtt.connecting = 0;
        d->mqtt.ready = 0;
        schedule_reconnect(d);
    }
}

void
mqtt_out_read(dsp_t *d)
{
    check_rc(d, mosquitto_loop_read(d->mqtt.mosq, 1));
}

void
mqtt_out_write(dsp_t *d)
{
    check_rc(d, mosquitto_loop_write(d->mqtt.mosq, 1));
}

int64_t
mqtt_out_misc(dsp_t *d, int64_t now)
{
    dmqtt_t *m = &d->mqtt;

    if (mosquitto_socket(m->mosq) >= 0) {
        check_rc(d, mosquitto_loop_misc(m->mosq));
    } else {
        m->connecting = 0;
        mqtt_out_connect(d, now);
    }
    if (!m->connecting && m->reconnect_at_us > now
        && m->reconnect_at_us < now + 1000000)
    {
        return m->reconnect_at_us;
    }
    return now + 1000000;
}

int
mqtt_out_send(dsp_t *d, drpc_t *r)
{
    const dconf_t *c = d->conf;
    dmqtt_t       *m = &d->mqtt;
    drpc_event_t   evs[1024];
    dgift_t       *g;
    size_t         k = 0, need, len;
    char           topic[512];
    int            rc;

    if (!m->ready) {
        return -1;
    }
    for (g = r->gifts; g != NULL && k < 1024; g = g->qnext) {
        evs[k].id = r->part ? r->part_id : g->ev->event_id;
        evs[k].rounds = r->part ? r->rounds : g->rounds;
        k++;
    }
    need = rpc_payload_max(c->mqtt_method, r->dev->name, evs, k);
    if (need > m->bufcap) {
        char *nb = realloc(m->buf, need);

        if (nb == NULL) {
            return -1;
        }
        m->buf = nb;
        m->bufcap = need;
    }
    len = rpc_payload_build(m->buf, m->bufcap, c->mqtt_method, r->dev->name,
                            r->rounds, evs, k);
    if (len == 0
        || rpc_topic_expand(c->mqtt_request_topic, r->n, r->dev->name, topic,
                            sizeof(topic)) < 0)
    {
        gift_log(GIFT_LOG_ERR, "MQTT: cannot build the RPC for %s",
                 r->dev->name);
        return -1;
    }
    rc = mosquitto_publish(m->mosq, NULL, topic, (int) len, m->buf,
                           c->mqtt_qos, false);
    if (rc != MOSQ_ERR_SUCCESS) {
        gift_log(GIFT_LOG_WARN, "MQTT: publish to %s: %s", topic,
                 rc == MOSQ_ERR_ERRNO ? strerror(errno)
                                      : mosquitto_strerror(rc));
        return -1;
    }
    gift_log(GIFT_LOG_DEBUG, "RPC %" PRIu64 " -> %s: %zu gifts, %" PRIu64
             " rounds", r->n, r->dev->name, k, r->rounds);
    return 0;
}

int
mqtt_out_send_stop(dsp_t *d, const char *device)
{
    const dconf_t *c = d->conf;
    dmqtt_t       *m = &d->mqtt;
    char           buf[512], topic[512];
    size_t         len;
    uint64_t       n;
    int            rc;

    if (!m->ready) {
        return -1;
    }
    n = rpc_ids_next(&m->ids);
    len = rpc_payload_build(buf, sizeof(buf), "stop", device, 0, NULL, 0);
    if (len == 0
        || rpc_topic_expand(c->mqtt_request_topic, n, device, topic,
                            sizeof(topic)) < 0)
    {
        return -1;
    }
    rc = mosquitto_publish(m->mosq, NULL, topic, (int) len, buf, c->mqtt_qos,
                           false);
    if (rc != MOSQ_ERR_SUCCESS) {
        gift_log(GIFT_LOG_WARN, "MQTT: stop to %s: %s", device,
                 mosquitto_strerror(rc));
        return -1;
    }
    gift_log(GIFT_LOG_WARN, "device %s: emergency stop sent (RPC %" PRIu64
             ")", device, n);
    return 0;
}

void
mqtt_out_disconnect(dsp_t *d)
{
    dmqtt_t *m = &d->mqtt;
    int      i;

    if (m->mosq == NULL || mosquitto_socket(m->mosq) < 0) {
        return;
    }
    m->ready = 0;
    mosquitto_disconnect(m->mosq);
    for (i = 0; i < 100 && mosquitto_socket(m->mosq) >= 0; i++) {
        if (mosquitto_loop_write(m->mosq, 1) != MOSQ_ERR_SUCCESS) {
            break;
        }
        if (mosquitto_socket(m->mosq) >= 0) {
            usleep(10000);
        }
    }
}

void
mqtt_out_destroy(dsp_t *d)
{
    dmqtt_t *m = &d->mqtt;

    if (m->mosq != NULL) {
        mosquitto_destroy(m->mosq);
        m->mosq = NULL;
    }
    free(m->buf);
    m->buf = NULL;
    mosquitto_lib_cleanup();
}
