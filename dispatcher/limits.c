/*
 * limits.c: "rounds per minute" for a device (pure; unit-tested).
 *
 * A sliding minute rather than a token bucket: the operator's number is
 * read as "no minute, wherever it starts, sees more than this many
 * rounds", which a bucket refilled at limit/60 per second does not
 * promise (it lets a full bucket and a minute of refill through in the
 * first minute).  Sends are kept as (time, rounds) in a ring; sends less
 * than RATE_MERGE_US apart share one entry, stamped with the later time
 * (stricter, never looser), so the ring holds at most about 600 entries
 * whatever the rate.
 *
 * Excess never drops anything: dispatch.c leaves the gifts queued and
 * kicks the device again at rate_next().
 *
 * Also here, pure so that they are unit-tested: which queued gifts the
 * next RPC takes (coalesce_more) and the retry back-off (retry_delay_ms).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"

static drate_ev_t *
at(drate_t *r, size_t i)
{
    return &r->ev[(r->head + i) % r->cap];
}

/* Forget what left the window. */
static void
expire(drate_t *r, int64_t now)
{
    while (r->n > 0 && r->ev[r->head].t_us + RATE_WINDOW_US <= now) {
        r->sum -= r->ev[r->head].rounds;
        r->head = (r->head + 1) % r->cap;
        r->n--;
    }
    if (r->n == 0) {
        r->head = 0;
        r->sum = 0;
    }
}

uint64_t
rate_sum(drate_t *r, int64_t now)
{
    expire(r, now);
    return r->sum;
}

int
rate_fits(drate_t *r, uint64_t limit, int64_t now, uint64_t rounds)
{
    if (limit == 0) {
        return 1;
    }
    expire(r, now);
    return r->sum == 0 || (rounds <= limit && r->sum <= limit - rounds);
}

int64_t
rate_next(drate_t *r, uint64_t limit, int64_t now, uint64_t rounds)
{
    uint64_t left;
    size_t   i;

    if (rate_fits(r, limit, now, rounds)) {
        return now;
    }
    /* drop entries oldest first until the rest leaves room */
    left = r->sum;
    for (i = 0; i < r->n; i++) {
        left -= at(r, i)->rounds;
        if (left == 0 || (rounds <= limit && left <= limit - rounds)) {
            return at(r, i)->t_us + RATE_WINDOW_US;
        }
    }
    return now + RATE_WINDOW_US;        /* not reached: left reaches 0 */
}

int
rate_add(drate_t *r, int64_t now, uint64_t rounds)
{
    drate_ev_t *last;

    expire(r, now);
    if (r->n > 0) {
        last = at(r, r->n - 1);
        if (now - last->t_us < RATE_MERGE_US) {
            last->t_us = now;
            last->rounds += rounds;
            r->sum += rounds;
            return 0;
        }
    }
    if (r->n == r->cap) {
        size_t      cap = r->cap ? r->cap * 2 : 16, i;
        drate_ev_t *ev = malloc(cap * sizeof(*ev));

        if (ev == NULL) {
            return -1;
        }
        for (i = 0; i < r->n; i++) {
            ev[i] = *at(r, i);
        }
        free(r->ev);
        r->ev = ev;
        r->cap = cap;
        r->head = 0;
    }
    last = at(r, r->n);
    last->t_us = now;
    last->rounds = rounds;
    r->n++;
    r->sum += rounds;
    return 0;
}

void
rate_free(drate_t *r)
{
    free(r->ev);
    memset(r, 0, sizeof(*r));
}

int
coalesce_more(size_t taken, uint64_t taken_rounds, uint64_t next_rounds,
    size_t max_events, uint64_t max_rounds, uint64_t room)
{
    if (taken == 0) {
        return 1;                   /* a gift is never split nor skipped */
    }
    return taken < max_events
           && taken_rounds + next_rounds <= max_rounds
           && taken_rounds + next_rounds <= room;
}

int64_t
retry_delay_ms(const int64_t *delays, size_t n, uint64_t delivered)
{
    size_t i;

    if (n == 0) {
        return 0;
    }
    i = delivered > 0 ? (size_t) (delivered - 1) : 0;
    return delays[i < n ? i : n - 1];
}

size_t
rate_format(drate_t *r, int64_t now_us, int64_t now_ms, char *out, size_t cap)
{
    size_t    o = 0, i;
    int64_t   b_end = 0, t_ms;
    uint64_t  b_rounds = 0;
    int       w;

    expire(r, now_us);
    for (i = 0; i <= r->n; i++) {
        t_ms = i < r->n ? now_ms - (now_us - at(r, i)->t_us) / 1000 : 0;
        if (i < r->n && b_rounds > 0 && t_ms - b_end < 1000 && t_ms >= b_end) {
            /* one entry a second: the later time (rounds leave the window
             * no earlier than they did) */
            b_end = t_ms;
            b_rounds += at(r, i)->rounds;
            continue;
        }
        if (b_rounds > 0) {
            w = snprintf(out + o, cap - o, "%s%" PRId64 ":%" PRIu64,
                         o ? "," : "", b_end, b_rounds);
            if (w < 0 || (size_t) w >= cap - o) {
                return 0;
            }
            o += (size_t) w;
        }
        if (i < r->n) {
            b_end = t_ms;
            b_rounds = at(r, i)->rounds;
        }
    }
    return o;
}
