/*
 * identity.c: which ThingsBoard device this dispatcher is.
 *
 * ThingsBoard keeps one session per device: a second connection with the
 * same access token closes the first, and the replies in flight of the
 * closed session are lost.  So every running dispatcher needs a device of
 * its own.  mqtt.access_tokens lists a pool of dispatcher devices' tokens;
 * at start each dispatcher leases one in KV GIFT_DEVICES with
 * compare-and-set (key "_mqtt_identity.<index in the list>": the token
 * itself is never written to KV), refreshes the lease every minute from the
 * kv thread, and deletes it at exit.  A lease not refreshed for
 * KV_LEASE_STALE_S (its holder died) may be taken over: the TTL.  With no
 * free token the dispatcher does not start.
 */
#include <inttypes.h>
#include <mosquitto.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dispatcher.h"
#include "gift_util.h"

int
identity_claim(dsp_t *d)
{
    const dconf_t *c = d->conf;
    dkv_t         *k = &d->kv;
    char           key[64], host[64], val[384];
    kvEntry       *e;
    natsStatus     s;
    int64_t        age_s;
    size_t         i, start;
    int            rc;

    d->identity = -1;
    if (c->nmqtt_tokens == 0) {
        return 0;
    }
    if (k->devices == NULL) {
        gift_log(GIFT_LOG_ERR, "mqtt.access_tokens: KV %s is needed to lease"
                 " one", GIFT_KV_DEVICES);
        return -1;
    }
    if (gethostname(host, sizeof(host)) != 0) {
        snprintf(host, sizeof(host), "?");
    }
    host[sizeof(host) - 1] = '\0';
    snprintf(val, sizeof(val), "%s pid %ld on %s", d->mqtt.client_id,
             (long) getpid(), host);
    /* start at a pid-dependent place: dispatchers starting together
     * collide less */
    start = (size_t) getpid() % c->nmqtt_tokens;
    for (i = 0; i < c->nmqtt_tokens; i++) {
        size_t j = (start + i) % c->nmqtt_tokens;

        snprintf(key, sizeof(key), "_mqtt_identity.%zu", j);
        e = NULL;
        s = kvStore_Get(&e, k->devices, key);
        if (s == NATS_NOT_FOUND) {
            s = kvStore_CreateString(NULL, k->devices, key, val);
        } else if (s == NATS_OK) {
            age_s = (int64_t) (gift_now_ms() / 1000)
                    - kvEntry_Created(e) / 1000000000LL;
            s = age_s > KV_LEASE_STALE_S
                ? kvStore_UpdateString(NULL, k->devices, key, val,
                                       kvEntry_Revision(e))
                : NATS_ERR;                     /* held: try the next */
            kvEntry_Destroy(e);
        }
        if (s != NATS_OK) {
            continue;
        }
        rc = mosquitto_username_pw_set(d->mqtt.mosq, c->mqtt_tokens[j],
                                       c->mqtt_password);
        if (rc != MOSQ_ERR_SUCCESS) {
            gift_log(GIFT_LOG_ERR, "MQTT: access token: %s",
                     mosquitto_strerror(rc));
            kvStore_Delete(k->devices, key);
            return -1;
        }
        d->identity = (int) j;
        snprintf(d->identity_key, sizeof(d->identity_key), "%s", key);
        snprintf(d->identity_val, sizeof(d->identity_val), "%s", val);
        gift_log(GIFT_LOG_INFO, "MQTT: access token %zu of %zu (leased in KV"
                 " %s)", j + 1, c->nmqtt_tokens, GIFT_KV_DEVICES);
        return 0;
    }
    gift_log(GIFT_LOG_ERR, "mqtt.access_tokens: all %zu are leased by running"
             " dispatchers (ThingsBoard allows one session per device: add a"
             " dispatcher device and its token)", c->nmqtt_tokens);
    return -1;
}

/* The kv thread, every minute. */
void
identity_refresh(dsp_t *d)
{
    natsStatus s;

    if (d->identity < 0 || d->identity_key[0] == '\0'
        || d->kv.devices == NULL)
    {
        return;
    }
    s = kvStore_PutString(NULL, d->kv.devices, d->identity_key,
                          d->identity_val);
    if (s != NATS_OK) {
        gift_log(GIFT_LOG_WARN, "KV %s: put %s: %s", GIFT_KV_DEVICES,
                 d->identity_key, natsStatus_GetText(s));
    }
}

/* At exit: free the token for another dispatcher. */
void
identity_release(dsp_t *d)
{
    if (d->identity < 0 || d->identity_key[0] == '\0'
        || d->kv.devices == NULL)
    {
        return;
    }
    kvStore_Delete(d->kv.devices, d->identity_key);
    d->identity = -1;
}
