/*
 * gift-dispatcher: pulls gifts from JetStream (stream GIFTS, durable pull
 * consumer "dispatcher"), turns each into rounds for a device by the
 * operator's rules, asks the device to rotate through ThingsBoard's MQTT
 * RPC, records the outcome as a GiftAck in GIFT_ACKS, and only then acks
 * the gift.
 *
 * Threads (decided, not inherited):
 *
 *   main      owns every gift, device, RPC and counter.  One ppoll() loop
 *             over: the wake eventfd (the KV queues, and wake-ups from
 *             cnats's threads), the MQTT socket (libmosquitto driven with
 *             mosquitto_loop_read/write/misc, so its callbacks run here),
 *             the hot NATS connection's socket (cnats's external event loop
 *             API: natsConnection_ProcessReadEvent/WriteEvent here, its
 *             synchronous subscriptions -- the pull inbox, the PubAck inbox
 *             -- drained here every pass), and timers (RPC timeouts, publish
 *             retries and PubAck timeouts, InProgress, MQTT keepalive and
 *             reconnect, the stop deadline).  Signals are blocked in every
 *             thread and unblocked only inside this ppoll(): handlers set
 *             flags, the loop acts.  It also keeps the pull window topped
 *             up (nats_in_pull(): pull requests of its own within a credit
 *             of free slots, nats.max_inflight minus gifts held).
 *   kv        ours (kv.c): the synchronous KV calls -- GIFT_DONE lookups
 *             for redeliveries, GIFT_STREAKS compare-and-set for streak
 *             frames -- taken from a queue, answered through another.
 *   watch     ours (kv.c): follows KV GIFT_DEVICES (pause, rate limits).
 *   metrics   libmicrohttpd's: serves /metrics from atomic counters and a
 *             snapshot main refreshes with a trylock (metrics.c).
 *   cnats     the library's own: the control connection's reader (start-
 *             up, provisioning, KV, the lease: calls that block on a reply
 *             use it), timers (PINGs of both connections: a write on the
 *             hot one wakes main), connection callbacks (the hot one's
 *             reconnect sets a flag and wakes main), the garbage collector
 *             (messages are destroyed in batches so that it rarely wakes),
 *             and a reconnect thread while one runs (it hands the hot
 *             connection's new socket to main under a mutex).  No gift and
 *             no PubAck crosses a thread.
 *
 *   hot socket --gift--> main --MQTT publish--> broker
 *   main <--MQTT reply (same thread, via mosquitto_loop_read)
 *   main --GiftAck (reply <inbox>.a.<n>)--> hot socket --PubAck--> main
 *   main --"+ACK" to the reply subject  (asynchronous: never a round trip)
 *   main --pull request (half a window at a time)--> NATS
 *   (what one loop pass buffers leaves in one write at its end)
 *
 * What main owns, file by file: the gift in dispatch.c (its life, the one
 * owner of gift state), publish.c (its publishes in flight and their
 * retries) and timers.c (held gifts over time, the orderly stop); the
 * devices and RPCs in scheduler.c.  The I/O modules (nats_in.c, kv.c,
 * mqtt_out.c) write none of it: they return results, post them to the
 * queues drained here, or hand them to the dispatch_*() entry points.
 *
 * Start-up follows mosquitto's order (config, logging, signals,
 * connections, loop, orderly teardown), with one change: signals come
 * before the connections, because connecting waits for NATS (it may start
 * after us) and SIGTERM must still end that wait with exit status 0.
 *
 * Stop (SIGTERM/SIGINT): stop pulling, nak what waits in device queues,
 * let RPCs in flight finish and their GiftAcks be stored, then flush the
 * hot NATS connection (driven by the stopping thread until a message to
 * itself comes back) and drain the control one; after
 * nats.shutdown_timeout_ms whatever is left is naked (redelivered to the
 * next dispatcher).  SIGHUP reloads the rules;
 * a bad file keeps the old rules.  SIGUSR1 logs counters.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <libconfig.h>
#include <mosquitto.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "dispatcher.h"
#include "gift_util.h"

#ifndef GIFT_VERSION
#define GIFT_VERSION "dev"
#endif

volatile sig_atomic_t dsp_sig_term, dsp_sig_hup, dsp_sig_usr1;

static int verbose;                     /* -v: debug level, over reloads */

static void
on_signal(int sig)
{
    switch (sig) {
    case SIGTERM:
    case SIGINT:
        dsp_sig_term = 1;
        break;
    case SIGHUP:
        dsp_sig_hup = 1;
        break;
    case SIGUSR1:
        dsp_sig_usr1 = 1;
        break;
    }
}

/* Handlers for the four signals, which stay blocked except in ppoll(). */
static void
signals_install(sigset_t *unblocked)
{
    struct sigaction sa;
    sigset_t         block;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);

    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGHUP);
    sigaddset(&block, SIGUSR1);
    /* threads created from now on inherit the block */
    pthread_sigmask(SIG_BLOCK, &block, unblocked);
    sigdelset(unblocked, SIGTERM);
    sigdelset(unblocked, SIGINT);
    sigdelset(unblocked, SIGHUP);
    sigdelset(unblocked, SIGUSR1);
}

static void
usage(FILE *f)
{
    fprintf(f,
        "usage: " DSP_PROGRAM " [-c FILE] [-t] [-v]\n"
        "       " DSP_PROGRAM " [-c FILE] ctl pause|resume|clear DEVICE\n"
        "       " DSP_PROGRAM " [-c FILE] ctl rate DEVICE N|default\n"
        "       " DSP_PROGRAM " [-c FILE] ctl show\n"
        "       " DSP_PROGRAM " --version\n"
        "  -c FILE    configuration file (default /etc/gift/gift-dispatcher.conf)\n"
        "  -t         check the configuration and exit (0: valid)\n"
        "  -v         log at debug level (overrides log_level)\n"
        "  --version  print the version and exit\n"
        "  ctl ...    set the device switches in KV " GIFT_KV_DEVICES " (every\n"
        "             dispatcher follows them): pause, resume, rate limit\n"
        "Signals: TERM/INT stop (drain), HUP reloads the rules and device\n"
        "limits, USR1 logs counters.\n");
}

static void
print_version(void)
{
    int maj, min, rev;

    mosquitto_lib_version(&maj, &min, &rev);
    printf(DSP_PROGRAM " %s (cnats %s, libmosquitto %d.%d.%d, libconfig %d.%d.%d)\n",
           GIFT_VERSION, nats_GetVersion(), maj, min, rev,
           LIBCONFIG_VER_MAJOR, LIBCONFIG_VER_MINOR, LIBCONFIG_VER_REVISION);
}

/* Log every line of a dconf_load() error text. */
static void
log_lines(gift_log_level_t lvl, const char *prefix, const char *text)
{
    const char *p = text, *nl;

    while (*p) {
        nl = strchr(p, '\n');
        gift_log(lvl, "%s%.*s", prefix, (int) (nl ? nl - p : (long) strlen(p)),
                 p);
        if (nl == NULL) {
            break;
        }
        p = nl + 1;
    }
}

/*
 * SIGHUP: read the whole file again; on success take its rules, its
 * device limits (devices.rounds_per_minute, devices.device) and its log
 * level; on failure keep everything and say why.  Gifts already
 * routed keep their device; the new rules apply to the next delivery.
 * Other settings need a restart (they shape connections and threads).
 */
static void
reload(dsp_t *d)
{
    dconf_t  *nc = NULL;
    drules_t *old;
    char      err[8192];

    if (dconf_load(d->conf->path, &nc, err, sizeof(err)) != 0) {
        log_lines(GIFT_LOG_ERR, "reload failed, keeping the old rules: ", err);
        return;
    }
    old = d->conf->rules;
    d->conf->rules = nc->rules;
    nc->rules = old;
    {
        ddevconf_t *dc = d->conf->devconf;
        size_t      n = d->conf->ndevconf;

        d->conf->devconf = nc->devconf;
        d->conf->ndevconf = nc->ndevconf;
        nc->devconf = dc;
        nc->ndevconf = n;
        d->conf->rounds_per_minute = nc->rounds_per_minute;
    }
    d->conf->log_level = verbose ? GIFT_LOG_DEBUG : nc->log_level;
    gift_log_set_level(d->conf->log_level);
    gift_log(GIFT_LOG_INFO, "reloaded %s: %zu rules, %zu catalogue entries,"
             " default device %s (other settings apply at restart)",
             d->conf->path, d->conf->rules->nrule, d->conf->rules->ncat,
             d->conf->rules->default_device ? d->conf->rules->default_device
                                            : "none");
    dconf_free(nc);
    dispatch_limits_reload(d);
}

/* The lease was taken or lost (lease.c): a standby holds nothing; a new
 * owner goes on with the last owner's sliding minutes, then sends. */
static void
lease_check(dsp_t *d)
{
    if (lease_active(d) == d->lease.seen_active) {
        return;
    }
    d->lease.seen_active = !d->lease.seen_active;
    if (!d->lease.seen_active) {
        d->lease.fenced_us = gift_mono_us();
        dispatch_standby(d);
        return;
    }
    if (d->lease.fenced_us != 0) {
        gift_log(GIFT_LOG_WARN, "the active dispatcher again after %" PRId64
                 " ms: sending", (gift_mono_us() - d->lease.fenced_us) / 1000);
        d->lease.fenced_us = 0;
    }
    {
        /* nats-server 2.9 may send a message delivered before as a new
         * one, delivery count 1 (lease.c, note_delivered): what the last
         * owner was given counts as delivered before */
        uint64_t h = __atomic_load_n(&d->lease.seq_floor, __ATOMIC_ACQUIRE);

        if (h > d->seq_hwm) {
            d->seq_hwm = h;
        }
    }
    lease_take_over_rates(d);
    d->lease.rates_us = 0;
    if (!d->stopping) {
        dispatch_kick_all(d);
    }
}

/* What came in: PubAcks, KV results, gifts.  Every loop pass (the hot
 * connection's subscriptions are drained here, they have no fd). */
static void
drain_queues(dsp_t *d)
{
    void     **items;
    void      *item;
    natsMsg   *m;
    size_t     n, i;
    int64_t    now = gift_mono_us();

    lease_check(d);         /* before any gift of a new owner is sent */
    /* PubAcks first: they free slots and devices */
    while ((item = nats_in_puback(d, now)) != NULL) {
        dispatch_puback(d, item);
    }
    if (d->kv.inited) {
        dchan_take(&d->kv.ctl, &items, &n);
        for (i = 0; i < n; i++) {
            dispatch_ctl(d, items[i]);
        }
        dchan_done(&d->kv.ctl, items);
        dchan_take(&d->kv.out, &items, &n);
        for (i = 0; i < n; i++) {
            dispatch_kv(d, items[i]);
        }
        dchan_done(&d->kv.out, items);
    }
    while ((m = nats_in_next(d)) != NULL) {
        if (nats_in_arrived(d, m)) {
            dispatch_msg(d, m);
        }
    }
}

static int
run(dsp_t *d, const sigset_t *unblocked)
{
    struct pollfd    pfd[3];
    struct timespec  ts;
    int64_t          now, next, t, hard_deadline = 0;
    uint64_t         cnt;
    int              nfd, fd, rc, mq, hot;
    short            ev;
    ssize_t          r;

    for (;;) {
        now = gift_mono_us();

        if ((dsp_sig_term || __atomic_load_n(&d->nats.lost, __ATOMIC_ACQUIRE))
            && !d->stopping)
        {
            dispatch_stop(d);
            d->stop_deadline_us = now
                + (int64_t) d->conf->shutdown_timeout_ms * 1000;
        }
        if (dsp_sig_hup) {
            dsp_sig_hup = 0;
            reload(d);
        }
        if (dsp_sig_usr1) {
            dsp_sig_usr1 = 0;
            dispatch_log_stats(d);
        }
        if (d->stopping) {
            if (nats_in_fetch_done(d)) {
                drain_queues(d);            /* naks late arrivals */
                if (dispatch_idle(d)) {
                    return 0;
                }
            }
            if (d->stopping == 1 && now >= d->stop_deadline_us) {
                dispatch_abandon(d);
                hard_deadline = now + 2000000;   /* PubAcks still coming */
            }
            if (d->stopping > 1 && now >= hard_deadline
                && nats_in_fetch_done(d))
            {
                return 0;
            }
        }

        lease_check(d);
        lease_rates_tick(d, now);
        next = dispatch_timers(d, now);
        metrics_tick(d, now);
        t = mqtt_out_misc(d, now);
        if (t < next) {
            next = t;
        }
        if (d->stopping == 1 && d->stop_deadline_us < next) {
            next = d->stop_deadline_us;
        }
        t = __atomic_load_n(&d->lease.until_us, __ATOMIC_ACQUIRE);
        if (d->lease.seen_active && t < next) {
            next = t;                      /* fencing: act on time */
        }
        /* top the pull window up with the slots freed (and arrivals
         * counted) so far: one request per half window, not per gift */
        t = nats_in_pull(d, gift_mono_us());
        if (t < next) {
            next = t;
        }

        /* everything this pass buffered for NATS (acks, publishes, the
         * pull request) in one write; acks held back alone wake us when
         * their linger is over */
        nats_in_write(d);
        t = nats_in_acks_due(d);
        if (t < next) {
            next = t;
        }

        nfd = 0;
        mq = hot = -1;
        pfd[nfd].fd = d->wake_fd;
        pfd[nfd].events = POLLIN;
        nfd++;
        fd = mqtt_out_fd(d);
        if (fd >= 0) {
            mq = nfd;
            pfd[nfd].fd = fd;
            pfd[nfd].events = POLLIN
                              | (mqtt_out_want_write(d) ? POLLOUT : 0);
            nfd++;
        }
        fd = nats_in_fd(d, &ev);
        if (fd >= 0) {
            hot = nfd;
            pfd[nfd].fd = fd;
            pfd[nfd].events = ev;
            nfd++;
        }
        now = gift_mono_us();
        next -= now;
        if (next < 0) {
            next = 0;
        }
        if (next > 1000000) {
            next = 1000000;
        }
        ts.tv_sec = next / 1000000;
        ts.tv_nsec = (long) (next % 1000000) * 1000L;

        rc = ppoll(pfd, (nfds_t) nfd, &ts, unblocked);
        if (rc < 0) {
            if (errno == EINTR) {
                continue;                    /* a signal: flags set */
            }
            gift_log(GIFT_LOG_ERR, "ppoll: %s", strerror(errno));
            return -1;
        }
        if (pfd[0].revents & POLLIN) {
            r = read(d->wake_fd, &cnt, sizeof(cnt));
            (void) r;
        }
        if (hot >= 0 && pfd[hot].revents) {
            nats_in_io(d, pfd[hot].revents);
        }
        drain_queues(d);
        if (mq >= 0 && pfd[mq].revents) {
            if (pfd[mq].revents & (POLLIN | POLLERR | POLLHUP)) {
                mqtt_out_read(d);
            }
            if ((pfd[mq].revents & POLLOUT) && mqtt_out_fd(d) >= 0) {
                mqtt_out_write(d);
            }
        }
        /* what callbacks queued (replies -> next RPCs) goes out now, not
         * after another trip through ppoll() */
        if (mqtt_out_fd(d) >= 0 && mqtt_out_want_write(d)) {
            mqtt_out_write(d);
        }
    }
}

int
main(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "version", no_argument, NULL, 'V' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 }
    };
    const char *path = "/etc/gift/gift-dispatcher.conf";
    int         test = 0, opt, rc = 1;
    dsp_t       d;
    sigset_t    unblocked;
    char        err[8192];

    memset(&d, 0, sizeof(d));
    d.wake_fd = -1;
    gift_log_set_program(DSP_PROGRAM);

    /* "+": stop at the first non-option (ctl's arguments) */
    while ((opt = getopt_long(argc, argv, "+c:tvh", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            path = optarg;
            break;
        case 't':
            test = 1;
            break;
        case 'v':
            verbose = 1;
            break;
        case 'V':
            print_version();
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc && strcmp(argv[optind], "ctl") == 0 && !test) {
        if (dconf_load(path, &d.conf, err, sizeof(err)) != 0) {
            fputs(err, stderr);
            return 1;
        }
        rc = ctl_main(d.conf, argc - optind - 1, argv + optind + 1);
        dconf_free(d.conf);
        return rc;
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }

    /* 1. configuration */
    if (dconf_load(path, &d.conf, err, sizeof(err)) != 0) {
        if (test) {
            fputs(err, stderr);
            fprintf(stderr, DSP_PROGRAM ": configuration file %s test failed\n",
                    path);
        } else {
            log_lines(GIFT_LOG_ERR, "", err);
            gift_log(GIFT_LOG_ERR, "bad configuration; not starting");
        }
        return 1;
    }
    if (test) {
        printf(DSP_PROGRAM ": configuration file %s test is successful "
               "(%zu rules, %zu catalogue entries)\n", path,
               d.conf->rules->nrule, d.conf->rules->ncat);
        dconf_free(d.conf);
        return 0;
    }

    /* 2. logging */
    d.conf->log_level = verbose ? GIFT_LOG_DEBUG : d.conf->log_level;
    gift_log_set_level(d.conf->log_level);
    gift_log(GIFT_LOG_INFO, DSP_PROGRAM " %s starting (%s)", GIFT_VERSION,
             path);

    /* 3. signals (before connecting: see the top of this file) */
    signals_install(&unblocked);

    /* 4. connections */
    d.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (d.wake_fd < 0) {
        gift_log(GIFT_LOG_ERR, "eventfd: %s", strerror(errno));
        goto out;
    }
    if (dispatch_init(&d) != 0 || mqtt_out_init(&d) != 0) {
        gift_log(GIFT_LOG_ERR, "cannot initialise; not starting");
        goto out;
    }
    if (nats_in_start(&d) != 0) {
        if (dsp_sig_term) {
            gift_log(GIFT_LOG_INFO, "stopped before NATS was reachable");
            rc = 0;
        }
        goto out;
    }
    if (kv_start(&d) != 0) {
        if (dsp_sig_term) {
            gift_log(GIFT_LOG_INFO, "stopped before KV was reachable");
            rc = 0;
        }
        goto out;
    }
    if (metrics_start(&d) != 0) {
        /* gifts matter more than their metrics: run without */
        gift_log(GIFT_LOG_WARN, "running without /metrics");
    }
    if (lease_start(&d) != 0) {
        goto out;
    }
    mqtt_out_connect(&d, gift_mono_us());
    if (nats_in_fetch_start(&d) != 0) {
        goto out;
    }
    gift_log(GIFT_LOG_INFO, "running: up to %d gifts in flight, %d RPCs per "
             "device, %d gifts per RPC", d.conf->max_inflight,
             d.conf->dev_max_inflight, d.conf->coalesce_max_events);

    /* 5. the loop (a NATS connection closed for good ends it: exit 1) */
    rc = run(&d, &unblocked) == 0 && !__atomic_load_n(&d.nats.lost,
                                                      __ATOMIC_ACQUIRE)
         ? 0 : 1;
    dispatch_log_stats(&d);

out:
    /* 6. teardown, in reverse */
    nats_in_fetch_join(&d);
    if (d.nats.inited) {
        /* the naks of the released gifts reach the server before the
         * lease is released (on the other connection) */
        nats_in_flush(&d, 2000);
    }
    d.lease.rates_us = 0;
    lease_rates_tick(&d, gift_mono_us());   /* the minutes, handed over */
    lease_stop(&d, 1);               /* in-flight work is finished */
    metrics_stop(&d);
    kv_stop(&d);                     /* jobs still out come back failed */
    if (!d.stopping) {
        d.stopping = 1;              /* late arrivals are naked, not sent */
    }
    if (d.nats.inited) {
        drain_queues(&d);
    }
    mqtt_out_disconnect(&d);
    dispatch_destroy(&d);
    kv_destroy(&d);
    if (d.nats.inited) {
        nats_in_stop(&d);
    }
    mqtt_out_destroy(&d);
    if (d.wake_fd >= 0) {
        close(d.wake_fd);
    }
    gift_log(GIFT_LOG_INFO, "exiting (%d)", rc);
    dconf_free(d.conf);
    nats_CloseAndWait(2000);
    return rc;
}
