/*
 * util.c: two small containers the main loop needs.
 *
 * dmap  uint64 -> pointer, open addressing with linear probing and
 *       backward-shift deletion (no tombstones, so a map that churns
 *       millions of RPC ids never degrades).
 * dchan a mutex-protected vector of pointers that other threads fill and
 *       the main thread swaps out whole; the push that makes it non-empty
 *       writes the main loop's eventfd, so a burst costs one wake-up.
 * js_ack_meta  a delivery's numbers from its ack subject, without the
 *       allocations of natsMsg_GetMetaData() (per gift, on the hot path).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dispatcher.h"

static inline size_t
mix(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return (size_t) k;
}

int
dmap_init(dmap_t *m, size_t hint)
{
    size_t cap = 16;

    while (cap < hint * 2) {
        cap <<= 1;
    }
    m->keys = calloc(cap, sizeof(uint64_t));
    m->vals = calloc(cap, sizeof(void *));
    m->cap = cap;
    m->n = 0;
    if (m->keys == NULL || m->vals == NULL) {
        dmap_free(m);
        return -1;
    }
    return 0;
}

void
dmap_free(dmap_t *m)
{
    free(m->keys);
    free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
    m->cap = m->n = 0;
}

/* A slot is used when its value is non-NULL (NULL values are refused). */
void *
dmap_get(const dmap_t *m, uint64_t key)
{
    size_t mask = m->cap - 1, i;

    if (m->cap == 0) {
        return NULL;
    }
    for (i = mix(key) & mask; m->vals[i] != NULL; i = (i + 1) & mask) {
        if (m->keys[i] == key) {
            return m->vals[i];
        }
    }
    return NULL;
}

static int
grow(dmap_t *m)
{
    dmap_t  nm;
    size_t  i;

    if (dmap_init(&nm, m->cap) != 0) {      /* twice the slots */
        return -1;
    }
    for (i = 0; i < m->cap; i++) {
        if (m->vals[i] != NULL) {
            dmap_put(&nm, m->keys[i], m->vals[i]);
        }
    }
    dmap_free(m);
    *m = nm;
    return 0;
}

int
dmap_put(dmap_t *m, uint64_t key, void *val)
{
    size_t mask, i;

    if (val == NULL) {
        return -1;
    }
    if ((m->n + 1) * 4 > m->cap * 3 && grow(m) != 0) {
        return -1;
    }
    mask = m->cap - 1;
    for (i = mix(key) & mask; m->vals[i] != NULL; i = (i + 1) & mask) {
        if (m->keys[i] == key) {
            m->vals[i] = val;
            return 0;
        }
    }
    m->keys[i] = key;
    m->vals[i] = val;
    m->n++;
    return 0;
}

void *
dmap_del(dmap_t *m, uint64_t key)
{
    size_t  mask = m->cap - 1, i, j, h;
    void   *val;

    if (m->cap == 0) {
        return NULL;
    }
    for (i = mix(key) & mask; m->vals[i] != NULL; i = (i + 1) & mask) {
        if (m->keys[i] == key) {
            break;
        }
    }
    if (m->vals[i] == NULL) {
        return NULL;
    }
    val = m->vals[i];
    m->vals[i] = NULL;
    m->n--;

    /* backward shift: move later entries of the cluster into the hole
     * when their home slot is not between the hole and them */
    for (j = (i + 1) & mask; m->vals[j] != NULL; j = (j + 1) & mask) {
        h = mix(m->keys[j]) & mask;
        if (((j - h) & mask) >= ((j - i) & mask)) {
            m->keys[i] = m->keys[j];
            m->vals[i] = m->vals[j];
            m->vals[j] = NULL;
            i = j;
        }
    }
    return val;
}

int
dchan_init(dchan_t *c, int wake_fd)
{
    memset(c, 0, sizeof(*c));
    c->wake_fd = wake_fd;
    return pthread_mutex_init(&c->mu, NULL) == 0 ? 0 : -1;
}

void
dchan_destroy(dchan_t *c)
{
    pthread_mutex_destroy(&c->mu);
    free(c->items);
    free(c->spare);
    c->items = c->spare = NULL;
    c->n = c->cap = c->spare_cap = 0;
}

static void
wake(int fd)
{
    uint64_t one = 1;
    ssize_t  w;

    do {
        w = write(fd, &one, sizeof(one));
    } while (w < 0 && errno == EINTR);
    /* EAGAIN: the counter is saturated, the loop is awake anyway */
}

int
dchan_push_many(dchan_t *c, void **items, size_t n)
{
    int was_empty;

    pthread_mutex_lock(&c->mu);
    if (c->n + n > c->cap) {
        size_t  cap = c->cap ? c->cap : 64;
        void  **p;

        while (cap < c->n + n) {
            cap *= 2;
        }
        p = realloc(c->items, cap * sizeof(void *));
        if (p == NULL) {
            pthread_mutex_unlock(&c->mu);
            return -1;
        }
        c->items = p;
        c->cap = cap;
    }
    was_empty = c->n == 0;
    memcpy(c->items + c->n, items, n * sizeof(void *));
    c->n += n;
    pthread_mutex_unlock(&c->mu);

    if (was_empty && n > 0) {
        wake(c->wake_fd);
    }
    return 0;
}

int
dchan_push(dchan_t *c, void *item)
{
    return dchan_push_many(c, &item, 1);
}

/* Two arrays take turns (the spare one comes back through dchan_done), so
 * that a busy queue does not allocate a new one -- of kilobytes, which
 * makes glibc consolidate its fastbins -- for every batch. */
void
dchan_take(dchan_t *c, void ***items, size_t *n)
{
    pthread_mutex_lock(&c->mu);
    *items = c->items;
    *n = c->n;
    c->taken_cap = c->cap;
    c->items = c->spare;
    c->cap = c->spare_cap;
    c->spare = NULL;
    c->spare_cap = 0;
    c->n = 0;
    pthread_mutex_unlock(&c->mu);
}

void
dchan_done(dchan_t *c, void **items)
{
    if (items == NULL) {
        return;
    }
    pthread_mutex_lock(&c->mu);
    if (c->spare == NULL) {
        c->spare = items;
        c->spare_cap = c->taken_cap;
        items = NULL;
    }
    pthread_mutex_unlock(&c->mu);
    free(items);
}

/*
 * "$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>"
 * (9 tokens), or the newer form with domain and account hash after
 * "$JS.ACK." and a random token at the end (12 tokens; 11 accepted), as
 * cnats' own parser reads them.
 */
int
js_ack_meta(const char *reply, uint64_t *sseq, uint64_t *delivered,
    uint64_t *pending)
{
    const char *tok[16];
    size_t      n = 0;
    const char *p;
    int         off;
    uint64_t    v[3];
    int         i, k;
    static const int want[3] = { 4, 5, 8 };   /* delivered, sseq, pending */

    if (reply == NULL || strncmp(reply, "$JS.ACK.", 8) != 0) {
        return -1;
    }
    tok[n++] = reply;
    for (p = reply; *p && n < 16; p++) {
        if (*p == '.') {
            tok[n++] = p + 1;
        }
    }
    if (*p != '\0') {
        return -1;
    }
    if (n == 9) {
        off = 0;
    } else if (n == 11 || n == 12) {
        off = 2;
    } else {
        return -1;
    }
    for (i = 0; i < 3; i++) {
        const char *t = tok[want[i] + off];

        v[i] = 0;
        for (k = 0; t[k] >= '0' && t[k] <= '9'; k++) {
            v[i] = v[i] * 10 + (uint64_t) (t[k] - '0');
        }
        if (k == 0 || (t[k] != '.' && t[k] != '\0')) {
            return -1;
        }
    }
    *delivered = v[0];
    *sseq = v[1];
    *pending = v[2];
    return 0;
}
