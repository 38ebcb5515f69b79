/*
 * ctl.c: the operator's switches, `gift-dispatcher -c FILE ctl ...`.
 *
 *   ctl pause DEVICE          hold DEVICE's gifts (every dispatcher)
 *   ctl resume DEVICE         send them again: the backlog turns
 *   ctl resume DEVICE --drop-backlog
 *                             ... but the gifts received before now are
 *                             dead-lettered "dropped" instead of turning
 *   ctl stop DEVICE           emergency stop: pause, and send DEVICE the
 *                             method "stop" (a command it accepted may
 *                             still be turning)
 *   ctl stop-all              the same for every device of the rules
 *   ctl rate DEVICE N         at most N rounds per minute (N >= 1)
 *   ctl rate DEVICE unlimited no limit
 *   ctl rate DEVICE stopped   nothing at all (0 is refused: say which)
 *   ctl rate DEVICE default   back to the configuration's limit
 *   ctl clear DEVICE          both back to the configuration
 *   ctl show                  the switches set in KV
 *
 * They are keys of the KV bucket GIFT_DEVICES ("<device>.paused",
 * "<device>.rounds_per_minute"), which every running dispatcher watches
 * (kv.c): one command reaches all instances within milliseconds, and a
 * dispatcher started later reads them before its first gift.  A key
 * deleted (clear, rate default) gives the device back to the
 * configuration file (devices.device).  Any KV client can set them too (`nats kv put
 * GIFT_DEVICES motor_03.paused true`).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"
#include "gift_natsconn.h"
#include "gift_util.h"

static int
usage(void)
{
    fprintf(stderr,
        "usage: " DSP_PROGRAM " -c FILE ctl pause DEVICE\n"
        "       " DSP_PROGRAM " -c FILE ctl resume DEVICE [--drop-backlog]\n"
        "       " DSP_PROGRAM " -c FILE ctl stop DEVICE\n"
        "       " DSP_PROGRAM " -c FILE ctl stop-all\n"
        "       " DSP_PROGRAM " -c FILE ctl rate DEVICE N|unlimited|stopped|default\n"
        "       " DSP_PROGRAM " -c FILE ctl clear DEVICE\n"
        "       " DSP_PROGRAM " -c FILE ctl show\n");
    return 2;
}

static int
fail(const char *what, natsStatus s)
{
    fprintf(stderr, DSP_PROGRAM " ctl: %s: %s (%s)\n", what,
            natsStatus_GetText(s), nats_GetLastError(NULL));
    return 1;
}

int
ctl_main(const dconf_t *c, int argc, char **argv)
{
    natsOptions    *o = NULL;
    natsConnection *nc = NULL;
    jsCtx          *js = NULL;
    kvStore        *kv = NULL;
    kvConfig        cfg;
    kvKeysList      keys;
    kvEntry        *e;
    natsStatus      s;
    char            key[DSP_DEVICE_MAX + 32], now[24];
    int             rc = 0, i, drop = 0;

    if (argc < 1) {
        return usage();
    }
    if (strcmp(argv[0], "show") != 0 && strcmp(argv[0], "stop-all") != 0) {
        if (argc < 2 || !rules_device_valid(argv[1])) {
            if (argc >= 2) {
                fprintf(stderr, DSP_PROGRAM " ctl: \"%s\" is not a device id"
                        " (1-64 of A-Z a-z 0-9 _ -)\n", argv[1]);
            }
            return usage();
        }
        if (strcmp(argv[0], "resume") == 0 && argc == 3
            && strcmp(argv[2], "--drop-backlog") == 0)
        {
            drop = 1;
        } else if ((strcmp(argv[0], "pause") == 0
                    || strcmp(argv[0], "resume") == 0
                    || strcmp(argv[0], "stop") == 0
                    || strcmp(argv[0], "clear") == 0)
                   ? argc != 2
                   : (strcmp(argv[0], "rate") != 0 || argc != 3))
        {
            return usage();
        }
        if (strcmp(argv[0], "rate") == 0 && strcmp(argv[2], "default") != 0
            && strcmp(argv[2], "unlimited") != 0
            && strcmp(argv[2], "stopped") != 0)
        {
            char               *end;
            unsigned long long  v = strtoull(argv[2], &end, 10);

            if (argv[2][0] < '0' || argv[2][0] > '9' || *end != '\0'
                || v > DSP_ROUNDS_JSON_MAX || v == 0)
            {
                fprintf(stderr, DSP_PROGRAM " ctl: \"%s\" is not a number of "
                        "rounds per minute >= 1; say \"unlimited\" or "
                        "\"stopped\"\n", argv[2]);
                return 2;
            }
        }
    } else if (argc != 1) {
        return usage();
    }

    s = nats_options_base(c, &o);
    if (s == NATS_OK) {
        s = natsOptions_SetTimeout(o, 5000);
    }
    if (s == NATS_OK) {
        s = gift_nats_connect(&nc, o, nats_signs(c));
    }
    if (s != NATS_OK) {
        rc = fail(c->nats_urls[0], s);
        goto out;
    }
    s = natsConnection_JetStream(&js, nc, NULL);
    if (s == NATS_OK) {
        s = js_KeyValue(&kv, js, GIFT_KV_DEVICES);
        if (s == NATS_NOT_FOUND) {
            kvConfig_Init(&cfg);
            cfg.Bucket = GIFT_KV_DEVICES;
            cfg.History = 5;
            cfg.StorageType = js_FileStorage;
            cfg.Replicas = c->prov.replicas;
            s = js_CreateKeyValue(&kv, js, &cfg);
        }
    }
    if (s != NATS_OK) {
        rc = fail("KV bucket " GIFT_KV_DEVICES, s);
        goto out;
    }

    if (strcmp(argv[0], "show") == 0) {
        memset(&keys, 0, sizeof(keys));
        s = kvStore_Keys(&keys, kv, NULL);
        if (s == NATS_NOT_FOUND) {
            printf("no switches set: every device follows %s\n", c->path);
            goto out;
        }
        if (s != NATS_OK) {
            rc = fail("keys", s);
            goto out;
        }
        for (i = 0; i < keys.Count; i++) {
            if (kvStore_Get(&e, kv, keys.Keys[i]) == NATS_OK) {
                const char *v = (const char *) kvEntry_Value(e);
                int         n = kvEntry_ValueLen(e);

                if (strcmp(keys.Keys[i], GIFT_LEASE_KEY) == 0) {
                    /* the owner lease: who, not its rate windows */
                    const char *nl = memchr(v, '\n', (size_t) n);

                    n = nl != NULL ? (int) (nl - v) : n;
                }
                printf("%s = %.*s\n", keys.Keys[i], n, v);
                kvEntry_Destroy(e);
            }
        }
        kvKeysList_Destroy(&keys);
        goto out;
    }

    if (strcmp(argv[0], "stop") == 0 || strcmp(argv[0], "stop-all") == 0) {
        const drules_t *ru = c->rules;
        size_t          k, n = 0;
        const char     *dev;

        snprintf(now, sizeof(now), "%" PRId64, gift_now_ms());
        /* every device the configuration names, or the one given */
        for (k = 0; k < ru->nrule + c->ndevconf + 2; k++) {
            if (strcmp(argv[0], "stop") == 0) {
                dev = k == 0 ? argv[1] : NULL;
            } else {
                dev = k < ru->nrule ? ru->rule[k].device
                      : k < ru->nrule + c->ndevconf
                        ? c->devconf[k - ru->nrule].id
                      : k == ru->nrule + c->ndevconf ? ru->default_device
                      : NULL;
            }
            if (dev == NULL) {
                continue;
            }
            snprintf(key, sizeof(key), "%s.paused", dev);
            s = kvStore_PutString(NULL, kv, key, "true");
            if (s == NATS_OK) {
                snprintf(key, sizeof(key), "%s.stop", dev);
                s = kvStore_PutString(NULL, kv, key, now);
            }
            if (s != NATS_OK) {
                rc = fail(key, s);
                goto out;
            }
            printf("%s: paused, stop sent\n", dev);
            n++;
        }
        printf("%zu devices stopped; resume each with: ctl resume DEVICE "
               "(its backlog turns) or ctl resume DEVICE --drop-backlog\n", n);
        goto out;
    }

    if (drop) {
        /* first the bound, then the resume: watchers apply them in order */
        snprintf(now, sizeof(now), "%" PRId64, gift_now_ms());
        snprintf(key, sizeof(key), "%s.drop_before", argv[1]);
        s = kvStore_PutString(NULL, kv, key, now);
        if (s != NATS_OK) {
            rc = fail(key, s);
            goto out;
        }
    }

    if (strcmp(argv[0], "rate") == 0) {
        snprintf(key, sizeof(key), "%s.rounds_per_minute", argv[1]);
        s = strcmp(argv[2], "default") == 0
            ? kvStore_Delete(kv, key)
            : kvStore_PutString(NULL, kv, key, argv[2]);
    } else if (strcmp(argv[0], "clear") == 0) {
        snprintf(key, sizeof(key), "%s.rounds_per_minute", argv[1]);
        s = kvStore_Delete(kv, key);
        if (s == NATS_OK) {
            snprintf(key, sizeof(key), "%s.paused", argv[1]);
            s = kvStore_Delete(kv, key);
        }
    } else {
        /* an explicit false: resume wins over a configuration's pause */
        snprintf(key, sizeof(key), "%s.paused", argv[1]);
        s = kvStore_PutString(NULL, kv, key,
                              strcmp(argv[0], "pause") == 0 ? "true"
                                                            : "false");
    }
    if (s != NATS_OK) {
        rc = fail(key, s);
        goto out;
    }
    printf("%s: %s %s\n", argv[1], argv[0],
           strcmp(argv[0], "rate") == 0 ? argv[2]
           : drop ? "(backlog dropped)" : "");
    if (strcmp(argv[0], "pause") == 0) {
        printf("resume with: ctl resume %s (its backlog turns), or ctl resume "
               "%s --drop-backlog (gifts received until then are dead-"
               "lettered \"dropped\"); gifts older than nats.max_gift_age "
               "are dead-lettered \"expired\" anyway\n", argv[1], argv[1]);
    }

out:
    kvStore_Destroy(kv);
    jsCtx_Destroy(js);
    natsConnection_Destroy(nc);
    natsOptions_Destroy(o);
    nats_Close();
    return rc;
}
