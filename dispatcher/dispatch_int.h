/*
 * dispatch_int.h: between the files of the main thread's gift work.
 *
 *   dispatch.c   the life of a gift, and the owner of the gift itself:
 *                memory, the held list and map, decode, route, outcomes
 *                (GiftAck, dead letter, retry), attempts, ack and nak
 *   publish.c    its publishes in flight: which gift each belongs to
 *                (d->by_pub), g->pubs, the retry list, the GiftAck
 *                publish, the PubAcks (dispatch_puback)
 *   timers.c     what time does to held gifts (InProgress, expiry) and
 *                the orderly stop (stop, standby, abandon, idle)
 *   scheduler.c  the devices: their table, queues, limits (pause, rate,
 *                offline, share), RPCs in flight and their ids; it hands
 *                each gift of a finished RPC back with gift_answered()
 *
 * The I/O modules (nats_in.c, kv.c, mqtt_out.c) never include this: they
 * return results or hand them to the dispatch_*() entry points.
 *
 * Main thread only.  Not installed; dispatcher.h is the public face.
 */
#ifndef GIFT_DISPATCH_INT_H
#define GIFT_DISPATCH_INT_H

#include "dispatcher.h"
#include "gift_util.h"

/*
 * Outages fail thousands of gifts at once (every GiftAck publish during a
 * NATS restart, every RPC of a dead broker): log the first of a kind, then
 * at most one line a second saying how many were not logged.
 */
typedef struct {
    int64_t   next_us;
    uint64_t  quiet;
} rlimit_t;

static inline int
rlimit_ok(rlimit_t *r, int64_t now, uint64_t *quiet)
{
    if (now < r->next_us) {
        r->quiet++;
        return 0;
    }
    *quiet = r->quiet;
    r->quiet = 0;
    r->next_us = now + 1000000;
    return 1;
}

/* What g still has to turn (split gifts turn in parts). */
static inline uint64_t
gift_left(const dgift_t *g)
{
    return g->rounds > g->rounds_done ? g->rounds - g->rounds_done : 0;
}

/* scheduler.c ----------------------------------------------------------- */

/* The device named `name`, created on first use; NULL on memory. */
ddevice_t *device_get(dsp_t *d, const char *name);

void     queue_push_tail(ddevice_t *dev, dgift_t *g);
void     queue_push_head(ddevice_t *dev, dgift_t *g);
void     queue_unlink(ddevice_t *dev, dgift_t *g);
dgift_t *queue_pop(ddevice_t *dev);

/* Send what the device's slots and limits allow. */
void     device_kick(dsp_t *d, ddevice_t *dev);

/* Take an RPC off the in-flight list (dispatch_abandon). */
void     rpc_unlink(dsp_t *d, drpc_t *r);

/* Quarantine expiry, RPC deadlines, rate and probe wake-ups: the earlier
 * of `next` and the scheduler's own next time. */
int64_t  sched_timers(dsp_t *d, int64_t now, int64_t next);

/* dispatch.c ------------------------------------------------------------ */

const char *event_id(const dgift_t *g);

/* The stem of the Nats-Msg-Ids recording g's outcome (the event id, or a
 * DLQ replay's own id), into out (cap bytes). */
void        msg_id_stem(const dgift_t *g, char *out, size_t cap);

/* Move g to the tail of the held list (touched now). */
void        held_touch(dsp_t *d, dgift_t *g, int64_t now);
/* Past max_gift_age? */
int         gift_expired(const dsp_t *d, const dgift_t *g);

/* The end of g: acked (its outcome is stored), naked (released, back
 * after delay_ms), or only freed (its delivery was naked already). */
void        gift_ack_and_free(dsp_t *d, dgift_t *g);
void        gift_release(dsp_t *d, dgift_t *g, int64_t delay_ms);
void        gift_free(dsp_t *d, dgift_t *g);

void        gift_dead_letter(dsp_t *d, dgift_t *g, const char *reason,
    const char *detail);

/*
 * The end of an RPC, for one of its gifts: `rc` and `why` as the reply
 * said (why NULL and rc not OK: a timeout), `offline` when the device is
 * silent within its grace.  Returns 1 when g goes back to the head of its
 * device's queue (never unless `room`); the scheduler puts it there.
 */
int         gift_answered(dsp_t *d, dgift_t *g, const drpc_t *r,
    drpc_reply_rc rc, const char *why, int64_t lat, int offline, int room);

/* publish.c ------------------------------------------------------------- */

/*
 * Publish `data` to `subject` for g through JetStream (Nats-Msg-Id
 * `msg_id`, extra headers as nats_in_msg_new), counted in g->pubs until
 * its PubAck; a failed send is retried every publish_retry_ms.  0, or -1
 * when no message could be built (g->pubs unchanged: a caller that finds
 * it 0 releases g).
 */
int         gift_publish(dsp_t *d, dgift_t *g, const char *subject,
    const void *data, size_t len, const char *msg_id, const char **hdrs);

/* The completion marker of g: its GiftAck bytes, or empty ("done, its
 * GiftAck is stored"); a core publish. */
void        publish_marker(dsp_t *d, dgift_t *g, const void *data, size_t len);
/* The GiftAck `a` of g, and with `marker` the completion marker first. */
void        publish_ack(dsp_t *d, dgift_t *g, Gift__V1__GiftAck *a,
    int marker);

/* Send again the failed publishes that are due: the earlier of `next` and
 * the next due time. */
int64_t     publish_timers(dsp_t *d, int64_t now, int64_t next);

/* Nothing waits for a PubAck or a retry. */
int         publish_idle(const dsp_t *d);

int         publish_init(dsp_t *d);
/* Drop the retries (their gifts are freed by dispatch_destroy). */
void        publish_destroy(dsp_t *d);

#endif /* GIFT_DISPATCH_INT_H */
