/*
 * giftbench: load generator and observer of the gift pipeline (issue 9).
 *
 *   giftbench [run] -u http://127.0.0.1:8080 (-K GIFTS | -d SECONDS) [options]
 *       Opens S SSE clients on the acknowledgement stream (GET /gift/events)
 *       and waits until each is streaming; then posts gifts (unique event
 *       ids "<prefix>-<n>", optionally HMAC-signed) over C keep-alive
 *       connections, either as fast as they are answered (-R 0) or at a
 *       fixed rate R (open loop: gift n is due at t0 + n/R whatever happened
 *       before, and every latency counts from that intended time, so a
 *       queue anywhere, in giftbench too, shows in the figures).
 *       Every acknowledgement is matched to its gift by eventId at every
 *       client.  When the last answer is in, it waits (--grace) until every
 *       accepted gift has been acknowledged at every client, lingers a
 *       little to catch duplicates, and reports: HTTP status counts,
 *       accepted/s, acknowledged/s, end-to-end latency (intended send ->
 *       the acknowledgement's first arrival at any SSE client) p50 ... max,
 *       the 202's own latency, fan-out deliveries/s and completeness, lost
 *       gifts (accepted, never acknowledged), duplicate acknowledgements,
 *       and CPU seconds and peak RSS of each process given by --pids (and
 *       of giftbench itself).  A table on stderr, one JSON line on stdout.
 *       --max-unacked N bounds the gifts sent and not yet acknowledged (or
 *       refused): a closed loop on the acknowledgements rather than on the
 *       202s, so that it measures what the pipeline keeps up with instead
 *       of leaving a backlog behind the 202s.
 *
 *   giftbench echo -l 127.0.0.1:PORT [-T THREADS]
 *       The trivial server that gives giftbench's own ceiling: POST answers
 *       202 {"id","seq","duplicate":false} at once and pushes a matching
 *       acknowledgement (id: <seq>, event: ack, data: {...,"eventId",...})
 *       to every SSE subscriber of GET <sse path>, in the same event-loop
 *       round.  THREADS epoll threads on one listening socket, one fan-out
 *       thread; chunked SSE like nginx's.  Runs until SIGTERM/SIGINT.
 *
 * Threads of `run`: T sender threads (each an epoll loop over its share of
 * the C connections and a timerfd for the schedule; at most one request in
 * flight per connection, no pipelining) and U SSE threads (each an epoll
 * loop over its share of the S clients; chunked coding and SSE framing
 * parsed incrementally; reads as data comes).  Per gift: intended time,
 * send and answer times, status, first acknowledgement time (CAS), and the
 * number of clients that got it; per client a bitmap of gifts seen, so a
 * second delivery to one client is a duplicate.  Percentiles are exact
 * (sorted), not histogram buckets.
 */

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "gift_signature.h"

#define PROGRAM        "giftbench"
#define MAX_EVENTS     256
#define RBUF_SIZE      (256 * 1024)
#define REQ_MAX        2048
#define RESP_MAX       16384
#define MAX_KINDS      16
#define MAX_PIDS       32
#define ST_NONE        0
#define ST_CONN_ERROR  1

static int64_t
now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void
die(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fputs(PROGRAM ": ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void *
xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);

    if (p == NULL) {
        die("out of memory (%zu x %zu bytes)", n, size);
    }
    return p;
}

static void
set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);

    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void
set_nodelay(int fd)
{
    int one = 1;

    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* "host:port" or "http://host:port[/...]" (IPv4, numeric or localhost) */
static int
parse_addr(const char *s, struct sockaddr_in *sa, char *hostport, size_t cap)
{
    char        host[128];
    const char *p, *colon, *end;
    long        port;

    if (strncmp(s, "http://", 7) == 0) {
        s += 7;
    }
    end = strchr(s, '/');
    if (end == NULL) {
        end = s + strlen(s);
    }
    colon = memchr(s, ':', (size_t) (end - s));
    if (colon == NULL || (size_t) (colon - s) >= sizeof(host)) {
        return -1;
    }
    memcpy(host, s, (size_t) (colon - s));
    host[colon - s] = '\0';
    port = strtol(colon + 1, NULL, 10);
    if (port <= 0 || port > 65535) {
        return -1;
    }
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t) port);
    p = strcmp(host, "localhost") == 0 ? "127.0.0.1" : host;
    if (inet_pton(AF_INET, p, &sa->sin_addr) != 1) {
        return -1;
    }
    if (hostport) {
        snprintf(hostport, cap, "%.*s", (int) (end - s), s);
    }
    return 0;
}

/* ==================================================================== run */

typedef struct {
    int64_t           sched_ns;     /* intended send time (max mode: start) */
    int64_t           sent_ns;      /* the request's write */
    int64_t           resp_ns;      /* its answer, complete */
    _Atomic int64_t   ack_ns;       /* first arrival at any SSE client */
    _Atomic uint32_t  deliveries;   /* clients that got its ack */
    uint32_t          ack_rounds;   /* "rounds" of the first arrival */
    uint16_t          status;       /* HTTP status, 0 none, 1 conn error */
    uint8_t           dup202;       /* "duplicate":true */
    uint8_t           ack_status;   /* 1 ok, 2 dead_letter, 3 other */
    uint8_t           kind;
} gift_t;

typedef struct {
    char      name[64];
    unsigned  diamond;
} kind_t;

typedef struct {
    char      name[48];
    pid_t     pid;
    double    cpu0, cpu1;           /* seconds */
    long      hwm_kb, rss_kb, threads;
    int       ok;
} proc_t;

static struct {
    struct sockaddr_in  addr;
    char                hostport[160];
    const char         *post_path, *sse_path;
    int                 sse_clients, conns, threads, sse_threads;
    uint64_t            gifts, max_gifts;
    double              duration, rate, grace, linger;
    const char         *secret;
    const char         *label;
    char                prefix[64];
    kind_t              kinds[MAX_KINDS];
    int                 nkinds;
    const char         *json_path;
    int                 reset_hwm, quiet, users;
    uint64_t            max_unacked;
    double              ready_timeout;
} cfg = {
    .post_path = "/gift", .sse_path = "/gift/events", .sse_clients = 10,
    .conns = 64, .threads = 1, .sse_threads = 1, .max_gifts = 4000000,
    .grace = 10, .linger = 0.3, .label = "", .users = 5000,
    .ready_timeout = 10,
};

static gift_t           *gifts;
static uint64_t          ngifts;            /* K: the array's size */
static int64_t           t0;                /* first gift due */
static int64_t           t_stop;            /* max mode with -d: no new gift after */
static int64_t           period_ns;         /* rate mode */
static _Atomic uint64_t  next_gift;
static _Atomic uint64_t  n_accepted;        /* 202, not duplicate */
static _Atomic uint64_t  n_answered;        /* any answer or error */
static _Atomic uint64_t  n_first_acks;      /* gifts of this run acked once */
static _Atomic uint64_t  n_deliveries;
/* --max-unacked: gifts sent and not yet settled (acknowledged at an SSE
 * client, or answered with anything but a new 202) are
 * n_sent - n_first_acks - n_refused; senders stop at the bound and an SSE
 * thread wakes them (window_blocked, each sender's eventfd) once the
 * acknowledgements have brought it down by a sixteenth */
static _Atomic uint64_t  n_sent;
static _Atomic uint64_t  n_refused;
static _Atomic uint64_t  unacked_peak;
static _Atomic int       window_blocked;
static uint64_t          window_low;
static char              wake_tag;          /* epoll data of the eventfds */
static _Atomic int       sse_stop;
static _Atomic int       sse_ready;
static volatile sig_atomic_t interrupted;
static proc_t            procs[MAX_PIDS + 1];
static int               nprocs;
static size_t            prefix_len;

/* --------------------------------------------------------- senders */

enum { C_CLOSED = 0, C_IDLE, C_BUSY };

typedef struct sender sender_t;

typedef struct {
    int        fd;
    int        state;
    int        want_out;
    uint64_t   gift;
    size_t     out_len, out_off;
    size_t     in_len;
    int64_t    retry_at;
    sender_t  *s;
    char       out[REQ_MAX];
    char       in[RESP_MAX];
} hconn_t;

struct sender {
    int        id;
    int        ep, tfd, wfd;
    hconn_t   *conns;
    int        nconns;
    int       *idle;                  /* stack of idle connection indexes */
    int        nidle;
    int        busy;
    int        closed;
    uint64_t   claimed;               /* a gift claimed, not yet due */
    int        has_claim;
    int        exhausted;
    int64_t    timer_at;
    uint64_t   status[600];
    uint64_t   conn_errors, reconnects, dup202, window_waits;
    int64_t    blocked_since;         /* --max-unacked: the window full */
    int        stalled;
    int64_t    last_resp_ns;
    int64_t    max_lag_ns;
    pthread_t  th;
};

static sender_t *senders;

static int
hconn_open(hconn_t *c)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    if (fd < 0) {
        return -1;
    }
    /* loopback: a blocking connect is immediate (or refused) */
    if (connect(fd, (struct sockaddr *) &cfg.addr, sizeof(cfg.addr)) != 0) {
        close(fd);
        return -1;
    }
    set_nonblock(fd);
    set_nodelay(fd);
    c->fd = fd;
    c->state = C_IDLE;
    c->in_len = 0;
    c->want_out = 0;
    {
        struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP,
                                  .data.ptr = c };

        epoll_ctl(c->s->ep, EPOLL_CTL_ADD, fd, &ev);
    }
    c->s->idle[c->s->nidle++] = (int) (c - c->s->conns);
    return 0;
}

static void
hconn_close(hconn_t *c, int64_t now)
{
    sender_t *s = c->s;
    int       i, idx = (int) (c - s->conns);

    if (c->fd >= 0) {
        close(c->fd);               /* leaves the epoll set by itself */
        c->fd = -1;
    }
    if (c->state == C_BUSY) {
        gifts[c->gift].status = ST_CONN_ERROR;
        gifts[c->gift].resp_ns = now;
        s->conn_errors++;
        atomic_fetch_add(&n_refused, 1);
        s->busy--;
        atomic_fetch_add_explicit(&n_answered, 1, memory_order_relaxed);
    } else if (c->state == C_IDLE) {
        for (i = 0; i < s->nidle; i++) {
            if (s->idle[i] == idx) {
                s->idle[i] = s->idle[--s->nidle];
                break;
            }
        }
    }
    c->state = C_CLOSED;
    c->retry_at = now;                  /* at once; then every 100 ms */
    s->closed++;
}

static size_t
build_request(hconn_t *c, uint64_t n)
{
    char          body[768], sig[160];
    const kind_t *k = &cfg.kinds[n % (uint64_t) cfg.nkinds];
    int           blen, len;
    struct timespec wall;

    clock_gettime(CLOCK_REALTIME, &wall);
    blen = snprintf(body, sizeof(body),
        "{\"event\":\"gift\",\"platform\":\"tiktok\",\"userId\":\"user_%" PRIu64
        "\",\"userName\":\"Bench %" PRIu64 "\",\"giftName\":\"%s\","
        "\"diamond\":%u,\"quantity\":1,\"timestamp\":%" PRId64
        ",\"eventId\":\"%s-%" PRIu64 "\"}",
        n % (uint64_t) cfg.users, n % (uint64_t) cfg.users, k->name,
        k->diamond, (int64_t) wall.tv_sec * 1000 + wall.tv_nsec / 1000000,
        cfg.prefix, n);
    sig[0] = '\0';
    if (cfg.secret) {
        gift_secret_t sec = { (const unsigned char *) cfg.secret,
                              strlen(cfg.secret) };

        if (gift_signature_make(&sec, wall.tv_sec, (unsigned char *) body,
                                (size_t) blen, sig, sizeof(sig)) == 0)
        {
            die("cannot sign");
        }
    }
    len = snprintf(c->out, sizeof(c->out),
        "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        "Content-Length: %d\r\n%s%s%s\r\n%s",
        cfg.post_path, cfg.hostport, blen, sig[0] ? "X-Gift-Signature: " : "",
        sig, sig[0] ? "\r\n" : "", body);
    gifts[n].kind = (uint8_t) (n % (uint64_t) cfg.nkinds);
    return (size_t) len;
}

static void
hconn_want_out(hconn_t *c, int on)
{
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP
                                        | (on ? EPOLLOUT : 0),
                              .data.ptr = c };

    if (c->want_out != on) {
        epoll_ctl(c->s->ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = on;
    }
}

static void
hconn_flush(hconn_t *c, int64_t now)
{
    while (c->out_off < c->out_len) {
        ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);

        if (n > 0) {
            c->out_off += (size_t) n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (errno == EAGAIN) {
                hconn_want_out(c, 1);
                return;
            }
            continue;
        }
        hconn_close(c, now);
        return;
    }
    hconn_want_out(c, 0);
}

static void
hconn_send(hconn_t *c, uint64_t n, int64_t sched, int64_t now)
{
    sender_t *s = c->s;
    gift_t   *g = &gifts[n];

    g->sched_ns = sched;
    c->out_len = build_request(c, n);
    c->out_off = 0;
    c->gift = n;
    c->state = C_BUSY;
    s->busy++;
    now = now_ns();
    g->sent_ns = now;
    atomic_fetch_add(&n_sent, 1);
    if (now - sched > s->max_lag_ns) {
        s->max_lag_ns = now - sched;
    }
    hconn_flush(c, now);
}

/* An answer in c->in: complete?  Returns its length, 0 if more is needed,
 * -1 if malformed.  *status, *close_after, *dup set when complete. */
static ssize_t
parse_response(hconn_t *c, int *status, int *close_after, int *dup)
{
    char   *h = c->in, *end, *line, *eol, *body;
    size_t  hlen, clen = 0;
    int     have_clen = 0, chunked = 0;

    end = memmem(h, c->in_len, "\r\n\r\n", 4);
    if (end == NULL) {
        return c->in_len >= sizeof(c->in) - 1 ? -1 : 0;
    }
    hlen = (size_t) (end - h) + 4;
    if (c->in_len < 12 || memcmp(h, "HTTP/1.", 7) != 0) {
        return -1;
    }
    *status = atoi(h + 9);
    *close_after = h[7] == '0';
    line = memchr(h, '\n', hlen) + 1;
    while (line < end) {
        eol = memchr(line, '\n', (size_t) (end + 2 - line));
        if (eol == NULL) {
            break;
        }
        if (strncasecmp(line, "content-length:", 15) == 0) {
            clen = strtoul(line + 15, NULL, 10);
            have_clen = 1;
        } else if (strncasecmp(line, "transfer-encoding:", 18) == 0) {
            chunked = memmem(line, (size_t) (eol - line), "chunked", 7) != NULL;
        } else if (strncasecmp(line, "connection:", 11) == 0) {
            if (memmem(line, (size_t) (eol - line), "close", 5)) {
                *close_after = 1;
            } else if (memmem(line, (size_t) (eol - line), "keep-alive", 10)) {
                *close_after = 0;
            }
        }
        line = eol + 1;
    }
    body = h + hlen;
    if (chunked) {
        char *fin = memmem(body, c->in_len - hlen, "0\r\n\r\n", 5);

        if (fin == NULL || (fin != body && fin[-1] != '\n')) {
            return c->in_len >= sizeof(c->in) - 1 ? -1 : 0;
        }
        clen = (size_t) (fin + 5 - body);
    } else if (!have_clen) {
        if (*status == 204 || *status == 304 || *status / 100 == 1) {
            clen = 0;
        } else {
            return -1;  /* close-delimited bodies: not from these servers */
        }
    }
    if (hlen + clen > sizeof(c->in) - 1) {
        return -1;
    }
    if (c->in_len < hlen + clen) {
        return 0;
    }
    *dup = *status == 202
           && memmem(body, clen, "\"duplicate\":true", 16) != NULL;
    return (ssize_t) (hlen + clen);
}

static void
hconn_read(hconn_t *c, int64_t now)
{
    sender_t *s = c->s;

    for (;;) {
        ssize_t n = read(c->fd, c->in + c->in_len, sizeof(c->in) - 1 - c->in_len);
        ssize_t used;
        int     status = 0, close_after = 0, dup = 0;

        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            hconn_close(c, now);
            return;
        }
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return;
        }
        c->in_len += (size_t) n;
        used = parse_response(c, &status, &close_after, &dup);
        if (used == 0) {
            continue;
        }
        if (used < 0 || c->state != C_BUSY) {
            if (!cfg.quiet) {
                fprintf(stderr, PROGRAM ": bad or unexpected answer on a "
                        "connection: %.*s\n", (int) (c->in_len > 120 ? 120
                        : c->in_len), c->in);
            }
            hconn_close(c, now);
            return;
        }
        {
            gift_t *g = &gifts[c->gift];

            g->status = (uint16_t) (status > 0 && status < 600 ? status : 599);
            g->dup202 = (uint8_t) dup;
            g->resp_ns = now;
            s->status[g->status]++;
            if (status == 202 && !dup) {
                atomic_fetch_add_explicit(&n_accepted, 1,
                                          memory_order_relaxed);
            } else {
                s->dup202 += status == 202;
                atomic_fetch_add(&n_refused, 1);
            }
            atomic_fetch_add_explicit(&n_answered, 1, memory_order_relaxed);
            s->last_resp_ns = now;
        }
        s->busy--;
        c->state = C_IDLE;
        memmove(c->in, c->in + used, c->in_len - (size_t) used);
        c->in_len -= (size_t) used;
        if (close_after) {
            c->state = C_IDLE;
            hconn_close(c, now);
            return;
        }
        s->idle[s->nidle++] = (int) (c - s->conns);
        return;
    }
}

static void
arm_timer(sender_t *s, int64_t at)
{
    struct itimerspec its;

    if (s->timer_at == at) {
        return;
    }
    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = at / 1000000000LL;
    its.it_value.tv_nsec = at % 1000000000LL;
    timerfd_settime(s->tfd, TFD_TIMER_ABSTIME, &its, NULL);
    s->timer_at = at;
}

static uint64_t
unacked(void)
{
    uint64_t sent = atomic_load(&n_sent);
    uint64_t settled = atomic_load(&n_first_acks) + atomic_load(&n_refused);

    return sent > settled ? sent - settled : 0;
}

/* --max-unacked: may one more gift go?  If not, ask to be woken (the flag
 * first, then the count again: an acknowledgement counted in between
 * either shows here or finds the flag set). */
static int
window_open(sender_t *s)
{
    uint64_t u;

    if (cfg.max_unacked == 0) {
        return 1;
    }
    u = unacked();
    if (u < cfg.max_unacked) {
        s->blocked_since = 0;
        /* this gift's send makes u + 1 */
        if (u + 1 > atomic_load_explicit(&unacked_peak,
                                         memory_order_relaxed))
        {
            atomic_store_explicit(&unacked_peak, u + 1, memory_order_relaxed);
        }
        return 1;
    }
    atomic_store(&window_blocked, 1);
    if (unacked() < cfg.max_unacked) {
        s->blocked_since = 0;
        return 1;
    }
    s->window_waits++;
    if (s->blocked_since == 0) {
        s->blocked_since = now_ns();
    } else if (now_ns() - s->blocked_since > (int64_t) (cfg.grace * 1e9)) {
        /* nothing acknowledged for the whole grace period: the gifts in
         * the window are lost (counted so), and no more are sent */
        s->stalled = 1;
        s->exhausted = 1;
    }
    return 0;
}

/* an SSE thread, after a first acknowledgement: wake blocked senders */
static void
window_wake(void)
{
    uint64_t one = 1;
    int      i;

    if (atomic_load(&window_blocked) && unacked() <= window_low
        && atomic_exchange(&window_blocked, 0))
    {
        for (i = 0; i < cfg.threads; i++) {
            ssize_t r = write(senders[i].wfd, &one, sizeof(one));

            (void) r;
        }
    }
}

/* Hand every gift that is due to an idle connection. */
static void
dispatch_due(sender_t *s)
{
    int64_t now = now_ns();

    if (t_stop && now >= t_stop) {
        s->exhausted = 1;           /* even while the window is full */
    }
    while (s->nidle > 0 && !s->exhausted && !interrupted && window_open(s)) {
        int64_t sched;

        if (!s->has_claim) {
            uint64_t n = atomic_fetch_add(&next_gift, 1);

            if (n >= ngifts || (t_stop && now >= t_stop)) {
                s->exhausted = 1;
                break;
            }
            s->claimed = n;
            s->has_claim = 1;
        }
        sched = period_ns ? t0 + (int64_t) s->claimed * period_ns : now;
        if (sched > now) {
            now = now_ns();
            if (sched > now) {
                arm_timer(s, sched);
                return;
            }
        }
        s->has_claim = 0;
        hconn_send(&s->conns[s->idle[--s->nidle]], s->claimed, sched, now);
        now = now_ns();
    }
}

static void *
sender_main(void *arg)
{
    sender_t           *s = arg;
    struct epoll_event  evs[MAX_EVENTS];
    int                 i, n;

    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    {
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };

        epoll_ctl(s->ep, EPOLL_CTL_ADD, s->tfd, &ev);
        ev.data.ptr = &wake_tag;
        epoll_ctl(s->ep, EPOLL_CTL_ADD, s->wfd, &ev);
    }
    /* wait for t0 */
    while (now_ns() < t0) {
        arm_timer(s, t0);
        epoll_wait(s->ep, evs, 1, 50);
        {
            uint64_t x;
            ssize_t  r = read(s->tfd, &x, sizeof(x));
            (void) r;
        }
    }
    s->timer_at = 0;
    for (;;) {
        int64_t now;

        dispatch_due(s);
        if ((s->exhausted || interrupted) && s->busy == 0) {
            break;
        }
        n = epoll_wait(s->ep, evs, MAX_EVENTS, 100);
        now = now_ns();
        for (i = 0; i < n; i++) {
            hconn_t *c = evs[i].data.ptr;

            if (c == NULL) {
                uint64_t x;
                ssize_t  r = read(s->tfd, &x, sizeof(x));

                (void) r;
                s->timer_at = 0;
                continue;
            }
            if ((void *) c == (void *) &wake_tag) {
                uint64_t x;
                ssize_t  r = read(s->wfd, &x, sizeof(x));

                (void) r;
                continue;
            }
            if (c->fd < 0) {
                continue;
            }
            if ((evs[i].events & EPOLLOUT) && c->state == C_BUSY) {
                hconn_flush(c, now);
                if (c->fd < 0) {
                    continue;
                }
            }
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)) {
                hconn_read(c, now);
            }
        }
        /* reopen closed connections */
        if (s->closed > 0) {
            for (i = 0; i < s->nconns; i++) {
                hconn_t *c = &s->conns[i];

                if (c->state == C_CLOSED && now >= c->retry_at) {
                    if (hconn_open(c) == 0) {
                        s->closed--;
                        s->reconnects++;
                    } else {
                        c->retry_at = now + 100000000LL;
                    }
                }
            }
        }
    }
    return NULL;
}

/* --------------------------------------------------------- SSE clients */

enum { CS_SIZE = 0, CS_DATA, CS_CRLF, CS_END };

typedef struct {
    int        fd;
    int        idx;
    int        streaming;
    int        chunked;
    int        cstate;
    uint64_t   crem;
    uint64_t   csize;
    int        cext;
    int        counted;             /* in sse_ready */
    uint64_t   reconnects;
    uint64_t   events_at_connect;
    int64_t    retry_at;            /* a reconnection put off */
    char       hdr[4096];
    size_t     hdr_len;
    char      *ev;
    size_t     ev_len, ev_cap, ev_scan;
    uint8_t   *seen;
    uint64_t   last_seq;
    uint64_t   events, acks, dups, foreign, gaps, out_of_order, deliveries;
    int        closed;
} sse_t;

typedef struct {
    int        ep;
    sse_t    **cl;
    int        ncl;
    uint64_t   reads, bytes;
    int64_t    last_delivery_ns, last_first_ns;
    pthread_t  th;
} sse_thread_t;

static sse_t        *sses;
static sse_thread_t *sse_threads;

static uint64_t
parse_u64(const char *p, const char *end, const char **stop)
{
    uint64_t v = 0;

    while (p < end && *p >= '0' && *p <= '9') {
        v = v * 10 + (uint64_t) (*p - '0');
        p++;
    }
    if (stop) {
        *stop = p;
    }
    return v;
}

static void
sse_ack(sse_thread_t *t, sse_t *c, const char *d, size_t n, int64_t now)
{
    const char *p, *end = d + n, *q;
    uint64_t    idx;
    gift_t     *g;
    int64_t     zero = 0;

    c->acks++;
    p = memmem(d, n, "\"eventId\":\"", 11);
    if (p == NULL) {
        c->foreign++;
        return;
    }
    p += 11;
    if ((size_t) (end - p) < prefix_len + 2 || memcmp(p, cfg.prefix, prefix_len)
        != 0 || p[prefix_len] != '-')
    {
        c->foreign++;
        return;
    }
    p += prefix_len + 1;
    idx = parse_u64(p, end, &q);
    if (q == p || q >= end || *q != '"' || idx >= ngifts) {
        c->foreign++;
        return;
    }
    if (c->seen[idx >> 3] & (1u << (idx & 7))) {
        c->dups++;
        return;
    }
    c->seen[idx >> 3] |= (uint8_t) (1u << (idx & 7));
    c->deliveries++;
    g = &gifts[idx];
    atomic_fetch_add_explicit(&g->deliveries, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&n_deliveries, 1, memory_order_relaxed);
    t->last_delivery_ns = now;
    if (atomic_load_explicit(&g->ack_ns, memory_order_relaxed) == 0
        && atomic_compare_exchange_strong(&g->ack_ns, &zero, now))
    {
        const char *r = memmem(d, n, "\"rounds\":", 9);
        const char *st = memmem(d, n, "\"status\":\"", 10);

        g->ack_rounds = r ? (uint32_t) parse_u64(r + 9, end, NULL) : 0;
        g->ack_status = st == NULL ? 3
            : (size_t) (end - st) >= 12 && memcmp(st + 10, "ok", 2) == 0 ? 1
            : (size_t) (end - st) >= 21
              && memcmp(st + 10, "dead_letter", 11) == 0 ? 2 : 3;
        atomic_fetch_add(&n_first_acks, 1);
        t->last_first_ns = now;
        if (cfg.max_unacked) {
            window_wake();
        }
    }
}

/* one SSE event (the text before its blank line) */
static void
sse_event(sse_thread_t *t, sse_t *c, const char *e, size_t n, int64_t now)
{
    const char *p = e, *end = e + n, *eol;
    const char *type = NULL, *data = NULL;
    size_t      type_len = 0, data_len = 0;
    int         has_id = 0;
    uint64_t    id = 0;

    while (p < end) {
        eol = memchr(p, '\n', (size_t) (end - p));
        if (eol == NULL) {
            eol = end;
        }
        if (eol - p >= 3 && memcmp(p, "id:", 3) == 0) {
            const char *v = p + 3;

            while (v < eol && *v == ' ') {
                v++;
            }
            id = parse_u64(v, eol, NULL);
            has_id = 1;
        } else if (eol - p >= 6 && memcmp(p, "event:", 6) == 0) {
            type = p + 6;
            while (type < eol && *type == ' ') {
                type++;
            }
            type_len = (size_t) (eol - type);
        } else if (eol - p >= 5 && memcmp(p, "data:", 5) == 0) {
            data = p + 5;
            data_len = (size_t) (eol - data);
        }
        p = eol + 1;
    }
    if (data == NULL) {
        return;                 /* a comment or a retry: hint */
    }
    c->events++;
    if (has_id) {
        if (id <= c->last_seq) {
            c->out_of_order++;
        }
        c->last_seq = id;
    }
    if (type == NULL || (type_len == 3 && memcmp(type, "ack", 3) == 0)) {
        sse_ack(t, c, data, data_len, now);
    } else if (type_len == 3 && memcmp(type, "gap", 3) == 0) {
        c->gaps++;
    }
}

static void
sse_text(sse_thread_t *t, sse_t *c, const char *p, size_t n, int64_t now)
{
    size_t start = 0, i;

    if (c->ev_len + n > c->ev_cap) {
        size_t cap = c->ev_cap ? c->ev_cap : 65536;

        while (cap < c->ev_len + n) {
            cap *= 2;
        }
        c->ev = realloc(c->ev, cap);
        if (c->ev == NULL) {
            die("out of memory");
        }
        c->ev_cap = cap;
    }
    memcpy(c->ev + c->ev_len, p, n);
    c->ev_len += n;
    /* events end at a blank line ("\n\n"; a CR before a LF is tolerated
     * by treating "\r\n\r\n" the same after the fact: our servers send LF) */
    i = c->ev_scan > 0 ? c->ev_scan - 1 : 0;
    for (;;) {
        char *nl = memchr(c->ev + i, '\n', c->ev_len - i);

        if (nl == NULL || (size_t) (nl - c->ev) + 1 >= c->ev_len) {
            break;
        }
        i = (size_t) (nl - c->ev) + 1;
        if (c->ev[i] == '\n') {
            sse_event(t, c, c->ev + start, i - 1 - start, now);
            i++;
            start = i;
        }
    }
    if (start > 0) {
        memmove(c->ev, c->ev + start, c->ev_len - start);
        c->ev_len -= start;
        i -= start;
    }
    c->ev_scan = i;
}

/* the chunked coding around the SSE text */
static void
sse_body(sse_thread_t *t, sse_t *c, const char *p, size_t n, int64_t now)
{
    const char *end = p + n;

    if (!c->chunked) {
        sse_text(t, c, p, n, now);
        return;
    }
    while (p < end) {
        switch (c->cstate) {
        case CS_SIZE:
            while (p < end && *p != '\n') {
                char ch = *p++;

                if (ch == ';') {
                    c->cext = 1;                /* a chunk extension */
                } else if (!c->cext && isxdigit((unsigned char) ch)) {
                    c->csize = c->csize * 16 + (uint64_t) (isdigit(
                        (unsigned char) ch) ? ch - '0'
                        : (tolower((unsigned char) ch) - 'a' + 10));
                }
            }
            if (p == end) {
                break;
            }
            p++;                                /* the LF */
            c->cext = 0;
            if (c->csize == 0) {
                c->cstate = CS_END;
                c->closed = 1;
                return;
            }
            c->crem = c->csize;
            c->csize = 0;
            c->cstate = CS_DATA;
            break;
        case CS_DATA: {
            size_t k = (size_t) (end - p) < c->crem ? (size_t) (end - p)
                       : (size_t) c->crem;

            sse_text(t, c, p, k, now);
            p += k;
            c->crem -= k;
            if (c->crem == 0) {
                c->cstate = CS_CRLF;
            }
            break;
        }
        case CS_CRLF:
            while (p < end && *p != '\n') {
                p++;
            }
            if (p < end) {
                p++;
                c->cstate = CS_SIZE;
            }
            break;
        default:
            return;
        }
    }
}

static int sse_connect(sse_t *c);

static void
sse_close(sse_t *c)
{
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    c->closed = 1;
    if (!c->counted) {
        c->counted = 1;
        c->streaming = -1;
        atomic_fetch_add(&sse_ready, 1);    /* do not wait for it */
    }
}

/* The server ended a stream that was live: reconnect at once and resume
 * after the last event seen (Last-Event-ID), as EventSource does. */
static void
sse_reconnect(sse_thread_t *t, sse_t *c)
{
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = c };
    int                tries;

    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    if (atomic_load(&sse_stop) || !c->counted || c->streaming < 0
        || c->reconnects >= 1000)
    {
        sse_close(c);
        return;
    }
    c->streaming = 0;
    c->hdr_len = 0;
    c->chunked = 0;
    c->cstate = CS_SIZE;
    c->crem = c->csize = 0;
    c->cext = 0;
    c->ev_len = c->ev_scan = 0;
    c->closed = 0;
    /* a stream that ended without a new event: wait a little first (a
     * server that cuts every resumed stream must not make us spin) */
    if (c->events == c->events_at_connect) {
        c->retry_at = now_ns() + 100000000LL;
        return;
    }
    for (tries = 0; tries < 20; tries++) {
        if (sse_connect(c) == 0) {
            c->reconnects++;
            c->events_at_connect = c->events;
            epoll_ctl(t->ep, EPOLL_CTL_ADD, c->fd, &ev);
            return;
        }
        usleep(50000);
    }
    sse_close(c);
}

/* reconnections that were put off */
static void
sse_retry(sse_thread_t *t, int64_t now)
{
    struct epoll_event ev;
    int                i;

    for (i = 0; i < t->ncl; i++) {
        sse_t *c = t->cl[i];

        if (c->fd < 0 && c->retry_at && now >= c->retry_at) {
            c->retry_at = 0;
            if (sse_connect(c) == 0) {
                c->reconnects++;
                c->events_at_connect = c->events;
                ev.events = EPOLLIN | EPOLLRDHUP;
                ev.data.ptr = c;
                epoll_ctl(t->ep, EPOLL_CTL_ADD, c->fd, &ev);
            } else {
                sse_close(c);
            }
        }
    }
}

static void
sse_read(sse_thread_t *t, sse_t *c, char *buf, int64_t now)
{
    for (;;) {
        ssize_t n = read(c->fd, buf, RBUF_SIZE);

        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            if (!atomic_load(&sse_stop) && !cfg.quiet) {
                fprintf(stderr, PROGRAM ": SSE client %d: the server closed "
                        "the stream after #%" PRIu64 "; resuming\n", c->idx,
                        c->last_seq);
            }
            sse_reconnect(t, c);
            return;
        }
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return;
        }
        t->reads++;
        t->bytes += (uint64_t) n;
        if (!c->streaming) {
            char   *e;
            size_t  k = (size_t) n;

            if (c->hdr_len + k > sizeof(c->hdr) - 1) {
                k = sizeof(c->hdr) - 1 - c->hdr_len;
            }
            memcpy(c->hdr + c->hdr_len, buf, k);
            c->hdr_len += k;
            c->hdr[c->hdr_len] = '\0';
            e = strstr(c->hdr, "\r\n\r\n");
            if (e == NULL) {
                if (c->hdr_len >= sizeof(c->hdr) - 1) {
                    fprintf(stderr, PROGRAM ": SSE client %d: header too "
                            "long\n", c->idx);
                    sse_close(c);
                    return;
                }
                continue;
            }
            if (strncmp(c->hdr, "HTTP/1.1 200", 12) != 0) {
                fprintf(stderr, PROGRAM ": SSE client %d: %.*s\n", c->idx,
                        (int) strcspn(c->hdr, "\r\n"), c->hdr);
                sse_close(c);
                return;
            }
            c->chunked = strcasestr(c->hdr, "transfer-encoding: chunked")
                         != NULL;
            c->streaming = 1;
            if (!c->counted) {
                c->counted = 1;
                atomic_fetch_add(&sse_ready, 1);
            }
            {
                size_t used = (size_t) (e + 4 - c->hdr) - (c->hdr_len - k);

                if ((size_t) n > used) {
                    sse_body(t, c, buf + used, (size_t) n - used, now);
                }
            }
            continue;
        }
        sse_body(t, c, buf, (size_t) n, now);
        if (c->closed) {
            sse_reconnect(t, c);
            return;
        }
        if ((size_t) n < RBUF_SIZE) {
            return;
        }
    }
}

static void *
sse_main(void *arg)
{
    sse_thread_t       *t = arg;
    struct epoll_event  evs[MAX_EVENTS];
    char               *buf = malloc(RBUF_SIZE);
    int                 i, n;

    if (buf == NULL) {
        die("out of memory");
    }
    while (!atomic_load_explicit(&sse_stop, memory_order_relaxed)) {
        int64_t now;

        n = epoll_wait(t->ep, evs, MAX_EVENTS, 50);
        now = now_ns();
        for (i = 0; i < n; i++) {
            sse_t *c = evs[i].data.ptr;

            if (c->fd >= 0) {
                sse_read(t, c, buf, now);
            }
        }
        sse_retry(t, now);
    }
    free(buf);
    return NULL;
}

static int
sse_connect(sse_t *c)
{
    char req[1024];
    int  fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), len;

    if (fd < 0 || connect(fd, (struct sockaddr *) &cfg.addr,
                          sizeof(cfg.addr)) != 0)
    {
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    set_nodelay(fd);
    if (c->last_seq > 0) {
        len = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: %s\r\n"
                       "Accept: text/event-stream\r\nCache-Control: no-cache"
                       "\r\nLast-Event-ID: %" PRIu64 "\r\n\r\n",
                       cfg.sse_path, cfg.hostport, c->last_seq);
    } else {
        len = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: %s\r\n"
                       "Accept: text/event-stream\r\nCache-Control: no-cache"
                       "\r\n\r\n", cfg.sse_path, cfg.hostport);
    }
    if (write(fd, req, (size_t) len) != len) {
        close(fd);
        return -1;
    }
    set_nonblock(fd);
    c->fd = fd;
    return 0;
}

/* --------------------------------------------------------- /proc */

static long clk_tck;

static int
proc_sample(pid_t pid, double *cpu, long *hwm, long *rss, long *threads)
{
    char   path[64], buf[4096], *p;
    FILE  *f;
    size_t n;
    unsigned long long ut = 0, st = 0;
    long   nth = 0;
    int    field;

    snprintf(path, sizeof(path), "/proc/%d/stat", (int) pid);
    if ((f = fopen(path, "r")) == NULL) {
        return -1;
    }
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    p = strrchr(buf, ')');
    if (p == NULL) {
        return -1;
    }
    p += 2;                                 /* field 3: state */
    for (field = 3; field < 20 && *p; field++) {
        if (field == 14) {
            ut = strtoull(p, NULL, 10);
        } else if (field == 15) {
            st = strtoull(p, NULL, 10);
        }
        p = strchr(p, ' ');
        if (p == NULL) {
            return -1;
        }
        p++;
    }
    nth = strtol(p, NULL, 10);              /* field 20: num_threads */
    *cpu = (double) (ut + st) / (double) clk_tck;
    if (threads) {
        *threads = nth;
    }
    if (hwm || rss) {
        snprintf(path, sizeof(path), "/proc/%d/status", (int) pid);
        if ((f = fopen(path, "r")) != NULL) {
            char line[256];

            while (fgets(line, sizeof(line), f)) {
                if (hwm && strncmp(line, "VmHWM:", 6) == 0) {
                    *hwm = strtol(line + 6, NULL, 10);
                } else if (rss && strncmp(line, "VmRSS:", 6) == 0) {
                    *rss = strtol(line + 6, NULL, 10);
                }
            }
            fclose(f);
        }
    }
    return 0;
}

/* busy and total jiffies of the machine */
static void
machine_sample(unsigned long long *busy, unsigned long long *total)
{
    unsigned long long v[10] = { 0 };
    FILE *f = fopen("/proc/stat", "r");
    int   i;

    *busy = *total = 0;
    if (f == NULL) {
        return;
    }
    if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu",
               &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8],
               &v[9]) >= 4)
    {
        for (i = 0; i < 8; i++) {           /* guest time is in user too */
            *total += v[i];
        }
        *busy = *total - v[3] - v[4];       /* minus idle and iowait */
    }
    fclose(f);
}

static void
parse_pids(const char *s)
{
    char *dup = strdup(s), *tok, *save = NULL;

    for (tok = strtok_r(dup, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');

        if (eq == NULL || nprocs >= MAX_PIDS) {
            die("--pids: NAME=PID,... (at most %d)", MAX_PIDS);
        }
        *eq = '\0';
        snprintf(procs[nprocs].name, sizeof(procs[nprocs].name), "%s", tok);
        procs[nprocs].pid = (pid_t) atoi(eq + 1);
        nprocs++;
    }
    free(dup);
}

static void
parse_kinds(const char *s)
{
    char *dup = strdup(s), *tok, *save = NULL;

    cfg.nkinds = 0;
    for (tok = strtok_r(dup, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *colon = strrchr(tok, ':');

        if (colon == NULL || cfg.nkinds >= MAX_KINDS
            || colon - tok >= (long) sizeof(cfg.kinds[0].name))
        {
            die("--gift: NAME:DIAMOND,... (at most %d)", MAX_KINDS);
        }
        *colon = '\0';
        for (char *p = tok; *p; p++) {
            if (*p == '"' || *p == '\\' || (unsigned char) *p < 0x20) {
                die("--gift: a name needs no JSON escaping here");
            }
        }
        snprintf(cfg.kinds[cfg.nkinds].name, sizeof(cfg.kinds[0].name), "%s",
                 tok);
        cfg.kinds[cfg.nkinds].diamond = (unsigned) strtoul(colon + 1, NULL, 10);
        cfg.nkinds++;
    }
    free(dup);
    if (cfg.nkinds == 0) {
        die("--gift: empty");
    }
}

/* --------------------------------------------------------- report */

static int
cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *) a, y = *(const int64_t *) b;

    return (x > y) - (x < y);
}

typedef struct {
    uint64_t n;
    double   p50, p90, p99, p999, max, mean;
} dist_t;

static dist_t
dist(int64_t *v, uint64_t n)
{
    dist_t   d;
    double   sum = 0;
    uint64_t i;

    memset(&d, 0, sizeof(d));
    d.n = n;
    if (n == 0) {
        return d;
    }
    qsort(v, n, sizeof(*v), cmp_i64);
    for (i = 0; i < n; i++) {
        sum += (double) v[i];
    }
#define PCT(p) ((double) v[(uint64_t) ((p) * (double) n + 0.999999) > 0 \
        ? (uint64_t) ((p) * (double) n + 0.999999) - 1 : 0] / 1e6)
    d.p50 = PCT(0.50);
    d.p90 = PCT(0.90);
    d.p99 = PCT(0.99);
    d.p999 = PCT(0.999);
#undef PCT
    d.max = (double) v[n - 1] / 1e6;
    d.mean = sum / (double) n / 1e6;
    return d;
}

static void
json_dist(FILE *f, const char *name, const dist_t *d)
{
    fprintf(f, "\"%s\":{\"n\":%" PRIu64 ",\"p50\":%.3f,\"p90\":%.3f,"
            "\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f,\"mean\":%.3f}", name,
            d->n, d->p50, d->p90, d->p99, d->p999, d->max, d->mean);
}

static void
json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') {
            fputc('\\', f);
            fputc(*s, f);
        } else if ((unsigned char) *s < 0x20) {
            fprintf(f, "\\u%04x", *s);
        } else {
            fputc(*s, f);
        }
    }
    fputc('"', f);
}

static void
on_sigint(int sig)
{
    (void) sig;
    interrupted = 1;
}

static void
usage(FILE *f)
{
    fprintf(f,
"usage: giftbench [run] -u URL (-K GIFTS | -d SECONDS) [options]\n"
"       giftbench echo -l HOST:PORT [-T THREADS] [--sse-path P]\n"
"                      [--drop-every N] [--dup-every N]   (self-tests: leave\n"
"                      out / repeat every Nth acknowledgement)\n"
"run:\n"
"  -u, --url URL          http://127.0.0.1:8080 (the server: webhook and SSE)\n"
"      --post-path P      (/gift)        --sse-path P   (/gift/events)\n"
"  -S, --sse N            SSE clients on the acknowledgement stream (10)\n"
"  -C, --conns N          keep-alive connections posting gifts (64)\n"
"  -T, --threads N        sender threads (1)\n"
"  -U, --sse-threads N    SSE client threads (1)\n"
"  -K, --gifts N          gifts to send\n"
"  -d, --duration S       with -R: K = R x S; without: send for S seconds\n"
"  -R, --rate R           gifts/s, open loop (latency from the intended send\n"
"                         time); 0 or absent: as fast as answers come\n"
"      --secret S         sign with X-Gift-Signature (HMAC-SHA256)\n"
"      --gift N:D,...     gift names and diamonds, cycled (Motor:10)\n"
"      --users N          distinct userIds (5000)\n"
"      --grace S          wait for acknowledgements after the last answer (10)\n"
"      --linger S         then keep reading for duplicates (0.3)\n"
"      --pids N=PID,...   processes to account (CPU seconds, peak RSS)\n"
"      --reset-hwm        reset their peak RSS first (/proc/PID/clear_refs)\n"
"      --prefix P         event id prefix (gb<pid>x<time>)\n"
"      --label L          a name for this run in the JSON\n"
"      --json FILE        also write the JSON line to FILE\n"
"      --max-gifts N      bound of K when only -d is given (4000000)\n"
"      --max-unacked N    send no gift while N sent gifts are neither\n"
"                         acknowledged at an SSE client nor refused: a\n"
"                         closed loop on acknowledgements, so acked/s is\n"
"                         what the pipeline keeps up with (0: no bound)\n"
"  -q, --quiet            no table on stderr\n"
"Output: a table on stderr, one JSON line on stdout.  Exit 0 when every\n"
"accepted gift was acknowledged exactly once at every client, else 3.\n");
}

static int echo_main(int argc, char **argv);

int
main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "url", required_argument, NULL, 'u' },
        { "post-path", required_argument, NULL, 1 },
        { "sse-path", required_argument, NULL, 2 },
        { "sse", required_argument, NULL, 'S' },
        { "conns", required_argument, NULL, 'C' },
        { "threads", required_argument, NULL, 'T' },
        { "sse-threads", required_argument, NULL, 'U' },
        { "gifts", required_argument, NULL, 'K' },
        { "duration", required_argument, NULL, 'd' },
        { "rate", required_argument, NULL, 'R' },
        { "secret", required_argument, NULL, 3 },
        { "gift", required_argument, NULL, 4 },
        { "grace", required_argument, NULL, 5 },
        { "linger", required_argument, NULL, 6 },
        { "pids", required_argument, NULL, 7 },
        { "reset-hwm", no_argument, NULL, 8 },
        { "prefix", required_argument, NULL, 9 },
        { "label", required_argument, NULL, 10 },
        { "json", required_argument, NULL, 11 },
        { "max-gifts", required_argument, NULL, 12 },
        { "users", required_argument, NULL, 13 },
        { "max-unacked", required_argument, NULL, 14 },
        { "quiet", no_argument, NULL, 'q' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 }
    };
    const char *url = NULL;
    int         c, i;
    uint64_t    k;
    int64_t     t_send_end, t_done, t_deadline;
    unsigned long long mbusy0, mtot0, mbusy1, mtot1;
    struct sigaction sa;

    if (argc > 1 && strcmp(argv[1], "echo") == 0) {
        return echo_main(argc - 1, argv + 1);
    }
    if (argc > 1 && strcmp(argv[1], "run") == 0) {
        argc--;
        argv++;
    }
    clk_tck = sysconf(_SC_CLK_TCK);
    parse_kinds("Motor:10");
    snprintf(cfg.prefix, sizeof(cfg.prefix), "gb%dx%ld", (int) getpid(),
             (long) time(NULL));
    while ((c = getopt_long(argc, argv, "u:S:C:T:U:K:d:R:qh", lo, NULL)) != -1)
    {
        switch (c) {
        case 'u': url = optarg; break;
        case 1: cfg.post_path = optarg; break;
        case 2: cfg.sse_path = optarg; break;
        case 'S': cfg.sse_clients = atoi(optarg); break;
        case 'C': cfg.conns = atoi(optarg); break;
        case 'T': cfg.threads = atoi(optarg); break;
        case 'U': cfg.sse_threads = atoi(optarg); break;
        case 'K': cfg.gifts = strtoull(optarg, NULL, 10); break;
        case 'd': cfg.duration = strtod(optarg, NULL); break;
        case 'R': cfg.rate = strtod(optarg, NULL); break;
        case 3: cfg.secret = optarg[0] ? optarg : NULL; break;
        case 4: parse_kinds(optarg); break;
        case 5: cfg.grace = strtod(optarg, NULL); break;
        case 6: cfg.linger = strtod(optarg, NULL); break;
        case 7: parse_pids(optarg); break;
        case 8: cfg.reset_hwm = 1; break;
        case 9:
            if (strlen(optarg) >= sizeof(cfg.prefix) || !optarg[0]
                || strspn(optarg, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop"
                          "qrstuvwxyz0123456789._:") != strlen(optarg))
            {
                die("--prefix: 1-63 of [A-Za-z0-9._:]");
            }
            snprintf(cfg.prefix, sizeof(cfg.prefix), "%s", optarg);
            break;
        case 10: cfg.label = optarg; break;
        case 11: cfg.json_path = optarg; break;
        case 12: cfg.max_gifts = strtoull(optarg, NULL, 10); break;
        case 13: cfg.users = atoi(optarg) > 0 ? atoi(optarg) : 1; break;
        case 14: cfg.max_unacked = strtoull(optarg, NULL, 10); break;
        case 'q': cfg.quiet = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (url == NULL || parse_addr(url, &cfg.addr, cfg.hostport,
                                  sizeof(cfg.hostport)) != 0)
    {
        usage(stderr);
        die("-u http://HOST:PORT is required (IPv4)");
    }
    if (cfg.gifts == 0 && cfg.duration <= 0) {
        die("-K GIFTS or -d SECONDS is required");
    }
    if (cfg.conns < 1 || cfg.threads < 1 || cfg.sse_threads < 1
        || cfg.sse_clients < 0 || cfg.rate < 0)
    {
        die("bad -C, -T, -U, -S or -R");
    }
    if (cfg.threads > cfg.conns) {
        cfg.threads = cfg.conns;
    }
    if (cfg.sse_clients > 0 && cfg.sse_threads > cfg.sse_clients) {
        cfg.sse_threads = cfg.sse_clients;
    }
    if (cfg.gifts == 0) {
        cfg.gifts = cfg.rate > 0 ? (uint64_t) (cfg.rate * cfg.duration + 0.5)
                                 : cfg.max_gifts;
    }
    if (cfg.gifts == 0) {
        die("no gift to send");
    }
    ngifts = cfg.gifts;
    prefix_len = strlen(cfg.prefix);
    if (cfg.max_unacked > 0 && cfg.sse_clients == 0) {
        die("--max-unacked needs an SSE client (-S) to see acknowledgements");
    }
    if (cfg.max_unacked > 0) {
        /* wake blocked senders once a sixteenth of the window is free: a
         * wake-up for a batch of gifts rather than for each */
        window_low = cfg.max_unacked - (cfg.max_unacked / 16 > 0
                                        ? cfg.max_unacked / 16 : 1);
    }
    period_ns = cfg.rate > 0 ? (int64_t) (1e9 / cfg.rate) : 0;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_sigint;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    {
        struct rlimit rl;

        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
            rl.rlim_cur = rl.rlim_max;
            setrlimit(RLIMIT_NOFILE, &rl);
        }
    }

    /* large and zeroed: the kernel hands out pages as they are touched */
    gifts = xcalloc(ngifts, sizeof(gift_t));

    /* SSE clients first: every one streaming before the first gift */
    sses = xcalloc((size_t) cfg.sse_clients, sizeof(sse_t));
    sse_threads = xcalloc((size_t) cfg.sse_threads, sizeof(sse_thread_t));
    for (i = 0; i < cfg.sse_threads; i++) {
        sse_threads[i].ep = epoll_create1(EPOLL_CLOEXEC);
        sse_threads[i].cl = xcalloc((size_t) cfg.sse_clients / (size_t)
                                    cfg.sse_threads + 1, sizeof(sse_t *));
    }
    for (i = 0; i < cfg.sse_clients; i++) {
        sse_t        *s = &sses[i];
        sse_thread_t *t = &sse_threads[i % cfg.sse_threads];
        struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP,
                                  .data.ptr = s };

        s->idx = i;
        s->fd = -1;
        s->seen = xcalloc(ngifts / 8 + 1, 1);
        if (sse_connect(s) != 0) {
            die("SSE client %d: cannot connect to %s: %s", i, cfg.hostport,
                strerror(errno));
        }
        epoll_ctl(t->ep, EPOLL_CTL_ADD, s->fd, &ev);
        t->cl[t->ncl++] = s;
    }
    for (i = 0; i < cfg.sse_threads; i++) {
        pthread_create(&sse_threads[i].th, NULL, sse_main, &sse_threads[i]);
    }
    t_deadline = now_ns() + (int64_t) (cfg.ready_timeout * 1e9);
    while (atomic_load(&sse_ready) < cfg.sse_clients && now_ns() < t_deadline
           && !interrupted)
    {
        usleep(2000);
    }
    {
        int streaming = 0;

        for (i = 0; i < cfg.sse_clients; i++) {
            streaming += sses[i].streaming == 1;
        }
        if (streaming < cfg.sse_clients) {
            die("%d of %d SSE clients streaming after %.0f s", streaming,
                cfg.sse_clients, cfg.ready_timeout);
        }
    }
    usleep(50000);      /* the server registers a stream as it answers it */

    /* senders: connections opened before t0 */
    senders = xcalloc((size_t) cfg.threads, sizeof(sender_t));
    for (i = 0; i < cfg.threads; i++) {
        sender_t *s = &senders[i];
        int       j, n = cfg.conns / cfg.threads
                         + (i < cfg.conns % cfg.threads);

        s->id = i;
        s->ep = epoll_create1(EPOLL_CLOEXEC);
        s->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        s->wfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (s->tfd < 0 || s->wfd < 0) {
            die("timerfd/eventfd: %s", strerror(errno));
        }
        s->conns = xcalloc((size_t) n, sizeof(hconn_t));
        s->idle = xcalloc((size_t) n, sizeof(int));
        s->nconns = n;
        for (j = 0; j < n; j++) {
            s->conns[j].s = s;
            s->conns[j].fd = -1;
            if (hconn_open(&s->conns[j]) != 0) {
                die("cannot connect to %s: %s", cfg.hostport, strerror(errno));
            }
        }
    }

    if (cfg.reset_hwm) {
        for (i = 0; i < nprocs; i++) {
            char  path[64];
            FILE *f;

            snprintf(path, sizeof(path), "/proc/%d/clear_refs",
                     (int) procs[i].pid);
            if ((f = fopen(path, "w")) != NULL) {
                fputs("5", f);
                fclose(f);
            }
        }
    }
    snprintf(procs[nprocs].name, sizeof(procs[0].name), "giftbench");
    procs[nprocs].pid = getpid();
    nprocs++;
    for (i = 0; i < nprocs; i++) {
        procs[i].ok = proc_sample(procs[i].pid, &procs[i].cpu0, NULL, NULL,
                                  &procs[i].threads) == 0;
    }
    machine_sample(&mbusy0, &mtot0);

    t0 = now_ns() + 20000000LL;
    if (cfg.rate <= 0 && cfg.duration > 0) {
        t_stop = t0 + (int64_t) (cfg.duration * 1e9);
    }
    for (i = 0; i < cfg.threads; i++) {
        pthread_create(&senders[i].th, NULL, sender_main, &senders[i]);
    }
    t_send_end = t0;
    for (i = 0; i < cfg.threads; i++) {
        pthread_join(senders[i].th, NULL);
        if (senders[i].last_resp_ns > t_send_end) {
            t_send_end = senders[i].last_resp_ns;
        }
    }
    k = atomic_load(&next_gift);
    if (k > ngifts) {
        k = ngifts;
    }
    /* k gifts were claimed; the last claim of each sender may be unsent */
    {
        uint64_t sent = 0;

        for (uint64_t n = 0; n < k; n++) {
            sent += gifts[n].sent_ns != 0;
        }
        /* gifts are claimed in order: the unsent ones are the last few */
        while (k > 0 && gifts[k - 1].sent_ns == 0) {
            k--;
        }
        (void) sent;
    }

    /* wait for the acknowledgements */
    t_deadline = now_ns() + (int64_t) (cfg.grace * 1e9);
    t_done = 0;
    while (!interrupted) {
        int64_t now = now_ns();
        uint64_t acc = atomic_load(&n_accepted);
        uint64_t first = atomic_load(&n_first_acks);
        uint64_t deliv = atomic_load(&n_deliveries);
        int      live = 0;

        for (i = 0; i < cfg.sse_clients; i++) {
            live += sses[i].fd >= 0;
        }
        if (first >= acc && deliv >= first * (uint64_t) live) {
            /* exactly: every accepted gift acknowledged at every client */
            uint64_t missing = 0;

            for (uint64_t n = 0; n < k; n++) {
                gift_t *g = &gifts[n];

                if (g->status == 202 && !g->dup202
                    && atomic_load_explicit(&g->deliveries,
                                            memory_order_relaxed)
                       < (uint32_t) live)
                {
                    missing++;
                    break;
                }
            }
            if (missing == 0) {
                t_done = now;
                break;
            }
        }
        if (now >= t_deadline) {
            break;
        }
        usleep(first >= acc ? 20000 : 2000);
    }
    if (t_done == 0) {
        t_done = now_ns();
    }
    for (i = 0; i < nprocs; i++) {
        if (procs[i].ok) {
            procs[i].ok = proc_sample(procs[i].pid, &procs[i].cpu1,
                                      &procs[i].hwm_kb, &procs[i].rss_kb,
                                      NULL) == 0;
        }
    }
    machine_sample(&mbusy1, &mtot1);
    if (!interrupted) {
        usleep((useconds_t) (cfg.linger * 1e6));
    }
    atomic_store(&sse_stop, 1);
    for (i = 0; i < cfg.sse_threads; i++) {
        pthread_join(sse_threads[i].th, NULL);
    }

    /* ---------------------------------------------------- figures */
    {
        uint64_t   status[600], conn_errors = 0, dup202 = 0, accepted = 0;
        uint64_t   acked = 0, lost = 0, acked_not_accepted = 0, dead = 0;
        uint64_t   incomplete = 0, deliveries = 0, dups = 0, foreign = 0;
        uint64_t   gaps = 0, ooo = 0, closed = 0, events = 0, reads = 0;
        uint64_t   sse_reconnects = 0, window_waits = 0;
        int        stalled = 0;
        uint64_t   rounds_exp = 0, rounds_ack = 0, sent = 0, reconnects = 0;
        uint64_t   ne = 0, nr = 0, nl = 0, first_lost = UINT64_MAX;
        int64_t    last_ack = t0, last_deliv = t0, max_lag = 0;
        int64_t   *lat = xcalloc(k, sizeof(int64_t));
        int64_t   *rlat = xcalloc(k, sizeof(int64_t));
        int64_t   *lag = xcalloc(k, sizeof(int64_t));
        dist_t     d_e2e, d_resp, d_lag;
        double     win, send_s, cpu_total = 0, machine_pct;
        FILE      *outs[2] = { stdout, NULL };
        int        live = 0, ok;

        memset(status, 0, sizeof(status));
        for (i = 0; i < cfg.threads; i++) {
            for (int j = 0; j < 600; j++) {
                status[j] += senders[i].status[j];
            }
            conn_errors += senders[i].conn_errors;
            dup202 += senders[i].dup202;
            reconnects += senders[i].reconnects;
            window_waits += senders[i].window_waits;
            stalled |= senders[i].stalled;
            if (senders[i].max_lag_ns > max_lag) {
                max_lag = senders[i].max_lag_ns;
            }
        }
        for (i = 0; i < cfg.sse_threads; i++) {
            reads += sse_threads[i].reads;
            if (sse_threads[i].last_first_ns > last_ack) {
                last_ack = sse_threads[i].last_first_ns;
            }
            if (sse_threads[i].last_delivery_ns > last_deliv) {
                last_deliv = sse_threads[i].last_delivery_ns;
            }
        }
        for (i = 0; i < cfg.sse_clients; i++) {
            sse_t *s = &sses[i];

            dups += s->dups;
            foreign += s->foreign;
            gaps += s->gaps;
            ooo += s->out_of_order;
            events += s->events;
            live += s->streaming == 1 && s->fd >= 0;
            closed += s->fd < 0;
            sse_reconnects += s->reconnects;
        }
        for (uint64_t n = 0; n < k; n++) {
            gift_t  *g = &gifts[n];
            int64_t  a = atomic_load(&g->ack_ns);
            uint32_t dv = atomic_load(&g->deliveries);

            if (g->sent_ns == 0) {
                continue;
            }
            sent++;
            deliveries += dv;
            if (period_ns) {
                lag[nl++] = g->sent_ns - g->sched_ns;
            }
            if (g->status >= 100) {
                rlat[nr++] = g->resp_ns - g->sched_ns;
            }
            if (a) {
                acked++;
                rounds_ack += g->ack_rounds;
                dead += g->ack_status == 2;
            }
            if (g->status == 202 && !g->dup202) {
                accepted++;
                rounds_exp += cfg.kinds[g->kind].diamond;
                if (a) {
                    lat[ne++] = a - g->sched_ns;
                    if (dv < (uint32_t) cfg.sse_clients) {
                        incomplete++;
                    }
                } else {
                    lost++;
                    if (first_lost == UINT64_MAX) {
                        first_lost = n;
                    }
                }
            } else if (a) {
                acked_not_accepted++;
            }
        }
        machine_pct = mtot1 > mtot0 ? 100.0 * (double) (mbusy1 - mbusy0)
                      / (double) (mtot1 - mtot0)
                      * (double) sysconf(_SC_NPROCESSORS_ONLN) : 0;
        for (i = 0; i < nprocs; i++) {
            if (procs[i].ok) {
                cpu_total += procs[i].cpu1 - procs[i].cpu0;
            }
        }
        d_e2e = dist(lat, ne);
        d_resp = dist(rlat, nr);
        d_lag = dist(lag, nl);
        send_s = (double) (t_send_end - t0) / 1e9;
        win = (double) (t_done - t0) / 1e9;
        ok = lost == 0 && dups == 0 && incomplete == 0 && closed == 0
             && accepted > 0 && accepted == sent;

        if (!cfg.quiet) {
            FILE *e = stderr;

            fprintf(e, "\ngiftbench %s%s%s: %s, %" PRIu64 " gifts over %d "
                    "connections (%d thread%s), %d SSE clients, %s\n",
                    cfg.label, cfg.label[0] ? " " : "", cfg.hostport,
                    period_ns ? "open loop" : "as fast as answered", sent,
                    cfg.conns, cfg.threads, cfg.threads > 1 ? "s" : "",
                    cfg.sse_clients, cfg.secret ? "signed" : "unsigned");
            if (period_ns) {
                fprintf(e, "  offered      %10.0f gifts/s\n", cfg.rate);
            }
            if (cfg.max_unacked) {
                fprintf(e, "  unacked      at most %" PRIu64 " (peak %" PRIu64
                        ", the senders waited %" PRIu64 " times)%s\n",
                        cfg.max_unacked, atomic_load(&unacked_peak),
                        window_waits, stalled ? "; STALLED: nothing "
                        "acknowledged for the grace period, sending stopped"
                        : "");
            }
            fprintf(e, "  accepted/s   %10.0f   (%" PRIu64 " accepted in "
                    "%.2f s)\n", send_s > 0 ? (double) accepted / send_s : 0,
                    accepted, send_s);
            fprintf(e, "  acked/s      %10.0f   (%" PRIu64 " acknowledged)\n",
                    last_ack > t0 ? (double) acked / ((double) (last_ack - t0)
                    / 1e9) : 0, acked);
            fprintf(e, "  deliveries/s %10.0f   (%" PRIu64 " of %" PRIu64
                    " to %d clients)\n", last_deliv > t0 ? (double) deliveries
                    / ((double) (last_deliv - t0) / 1e9) : 0, deliveries,
                    accepted * (uint64_t) cfg.sse_clients, cfg.sse_clients);
            fprintf(e, "  statuses    ");
            for (int j = 100; j < 600; j++) {
                if (status[j]) {
                    fprintf(e, " %d=%" PRIu64, j, status[j]);
                }
            }
            if (conn_errors) {
                fprintf(e, " conn_error=%" PRIu64, conn_errors);
            }
            fprintf(e, "\n  %-18s %8s %8s %8s %8s %8s\n", "latency ms", "p50",
                    "p90", "p99", "p99.9", "max");
            fprintf(e, "  %-18s %8.3f %8.3f %8.3f %8.3f %8.3f\n",
                    "end to end", d_e2e.p50, d_e2e.p90, d_e2e.p99, d_e2e.p999,
                    d_e2e.max);
            fprintf(e, "  %-18s %8.3f %8.3f %8.3f %8.3f %8.3f\n", "202 answer",
                    d_resp.p50, d_resp.p90, d_resp.p99, d_resp.p999,
                    d_resp.max);
            if (period_ns) {
                fprintf(e, "  %-18s %8.3f %8.3f %8.3f %8.3f %8.3f\n",
                        "send lag", d_lag.p50, d_lag.p90, d_lag.p99,
                        d_lag.p999, d_lag.max);
            }
            fprintf(e, "  lost %" PRIu64 "  duplicate acks %" PRIu64
                    "  incomplete fan-out %" PRIu64 "  acked not accepted %"
                    PRIu64 "  dead_letter %" PRIu64 "  foreign %" PRIu64
                    "  gaps %" PRIu64 "  rounds %" PRIu64 "/%" PRIu64 "\n",
                    lost, dups, incomplete, acked_not_accepted, dead, foreign,
                    gaps, rounds_ack, rounds_exp);
            if (sse_reconnects || closed) {
                fprintf(e, "  SSE streams ended by the server: %" PRIu64
                        " (resumed with Last-Event-ID), closed at the end: %"
                        PRIu64 "\n", sse_reconnects, closed);
            }
            if (lost) {
                fprintf(e, "  first lost: %s-%" PRIu64 "\n", cfg.prefix,
                        first_lost);
            }
            if (incomplete) {
                fprintf(e, "  deliveries per client:");
                for (i = 0; i < cfg.sse_clients; i++) {
                    fprintf(e, " %" PRIu64 "%s", sses[i].deliveries,
                            sses[i].fd < 0 ? "(closed)" : "");
                }
                fputc('\n', e);
            }
            fprintf(e, "  %-16s %8s %7s %9s %10s %7s\n", "process", "CPU s",
                    "CPU %", "us/gift", "peak MiB", "threads");
            for (i = 0; i < nprocs; i++) {
                proc_t *p = &procs[i];
                double  cs = p->cpu1 - p->cpu0;

                if (!p->ok) {
                    fprintf(e, "  %-16s (pid %d gone)\n", p->name, (int) p->pid);
                    continue;
                }
                fprintf(e, "  %-16s %8.2f %7.1f %9.2f %10.1f %7ld\n", p->name,
                        cs, win > 0 ? 100 * cs / win : 0, accepted ? cs * 1e6
                        / (double) accepted : 0, (double) p->hwm_kb / 1024,
                        p->threads);
            }
            fprintf(e, "  machine CPU %.0f%% of %ld cores over %.2f s (others "
                    "than these: %.0f%%); %s\n", machine_pct,
                    sysconf(_SC_NPROCESSORS_ONLN), win, win > 0 && machine_pct
                    > 100 * cpu_total / win ? machine_pct - 100 * cpu_total
                    / win : 0, ok ? "every accepted gift acknowledged once at every "
                    "client" : "NOT every accepted gift was acknowledged once "
                    "at every client");
        }

        if (cfg.json_path && (outs[1] = fopen(cfg.json_path, "w")) == NULL) {
            die("%s: %s", cfg.json_path, strerror(errno));
        }
        for (int o = 0; o < 2; o++) {
            FILE *f = outs[o];

            if (f == NULL) {
                continue;
            }
            fprintf(f, "{\"tool\":\"giftbench\",\"label\":");
            json_str(f, cfg.label);
            fprintf(f, ",\"url\":\"http://%s\",\"prefix\":\"%s\",\"mode\":\"%s\","
                    "\"rate\":%.1f,\"sse_clients\":%d,\"conns\":%d,"
                    "\"threads\":%d,\"sse_threads\":%d,\"signed\":%s,",
                    cfg.hostport, cfg.prefix, period_ns ? "rate" : "max",
                    cfg.rate, cfg.sse_clients, cfg.conns, cfg.threads,
                    cfg.sse_threads, cfg.secret ? "true" : "false");
            fprintf(f, "\"sent\":%" PRIu64 ",\"accepted\":%" PRIu64
                    ",\"duplicate_202\":%" PRIu64 ",\"status\":{", sent,
                    accepted, dup202);
            {
                int first = 1;

                for (int j = 100; j < 600; j++) {
                    if (status[j]) {
                        fprintf(f, "%s\"%d\":%" PRIu64, first ? "" : ",", j,
                                status[j]);
                        first = 0;
                    }
                }
                fprintf(f, "%s\"conn_error\":%" PRIu64 "},", first ? "" : ",",
                        conn_errors);
            }
            fprintf(f, "\"reconnects\":%" PRIu64 ",\"send_seconds\":%.3f,"
                    "\"window_seconds\":%.3f,\"accepted_per_s\":%.1f,"
                    "\"acked_per_s\":%.1f,\"acked\":%" PRIu64 ",\"lost\":%"
                    PRIu64 ",\"dup_acks\":%" PRIu64 ",\"acked_not_accepted\":%"
                    PRIu64 ",\"dead_letter\":%" PRIu64 ",\"foreign_acks\":%"
                    PRIu64 ",", reconnects, send_s, win, send_s > 0
                    ? (double) accepted / send_s : 0, last_ack > t0
                    ? (double) acked / ((double) (last_ack - t0) / 1e9) : 0,
                    acked, lost, dups, acked_not_accepted, dead, foreign);
            fprintf(f, "\"max_unacked\":%" PRIu64 ",\"unacked_peak\":%" PRIu64
                    ",\"window_waits\":%" PRIu64 ",\"window_stalled\":%s,",
                    cfg.max_unacked, atomic_load(&unacked_peak), window_waits,
                    stalled ? "true" : "false");
            json_dist(f, "latency_ms", &d_e2e);
            fputc(',', f);
            json_dist(f, "accept_latency_ms", &d_resp);
            fputc(',', f);
            json_dist(f, "send_lag_ms", &d_lag);
            fprintf(f, ",\"fanout\":{\"clients\":%d,\"deliveries\":%" PRIu64
                    ",\"expected\":%" PRIu64 ",\"deliveries_per_s\":%.1f,"
                    "\"incomplete\":%" PRIu64 ",\"closed\":%" PRIu64 ","
                    "\"gaps\":%" PRIu64 ",\"out_of_order\":%" PRIu64 ","
                    "\"events\":%" PRIu64 ",\"reads\":%" PRIu64 ","
                    "\"reconnects\":%" PRIu64 "},",
                    cfg.sse_clients, deliveries, accepted
                    * (uint64_t) cfg.sse_clients, last_deliv > t0
                    ? (double) deliveries / ((double) (last_deliv - t0) / 1e9)
                    : 0, incomplete, closed, gaps, ooo, events, reads,
                    sse_reconnects);
            fprintf(f, "\"rounds\":{\"expected\":%" PRIu64 ",\"acked\":%"
                    PRIu64 "},\"processes\":{", rounds_exp, rounds_ack);
            for (i = 0; i < nprocs; i++) {
                proc_t *p = &procs[i];
                double  cs = p->cpu1 - p->cpu0;

                fprintf(f, "%s", i ? "," : "");
                json_str(f, p->name);
                if (!p->ok) {
                    fprintf(f, ":{\"pid\":%d,\"gone\":true}", (int) p->pid);
                    continue;
                }
                fprintf(f, ":{\"pid\":%d,\"cpu_s\":%.2f,\"cpu_pct\":%.1f,"
                        "\"us_per_gift\":%.2f,\"peak_rss_kb\":%ld,\"rss_kb\":"
                        "%ld,\"threads\":%ld}", (int) p->pid, cs, win > 0
                        ? 100 * cs / win : 0, accepted ? cs * 1e6
                        / (double) accepted : 0, p->hwm_kb, p->rss_kb,
                        p->threads);
            }
            fprintf(f, "},\"cpu_s_total\":%.2f,\"machine_cpu_pct\":%.1f,"
                    "\"others_cpu_pct\":%.1f,\"cpus\":%ld,\"ok\":%s}\n",
                    cpu_total, machine_pct, win > 0 && machine_pct > 100
                    * cpu_total / win ? machine_pct - 100 * cpu_total / win
                    : 0, sysconf(_SC_NPROCESSORS_ONLN),
                    ok ? "true" : "false");
            fflush(f);
        }
        if (outs[1]) {
            fclose(outs[1]);
        }
        free(lat);
        free(rlat);
        free(lag);
        return ok ? 0 : 3;
    }
}

/* =================================================================== echo */

typedef struct {
    int       fd;
    int       sse;
    char     *in;
    size_t    in_len, in_cap;
    char     *out;
    size_t    out_len, out_off, out_cap;
    int       want_out;
} econn_t;

static struct {
    struct sockaddr_in addr;
    const char        *sse_path;
    int                threads;
    uint64_t           drop_every, dup_every;
} ecfg = { .sse_path = "/gift/events", .threads = 2 };

static _Atomic uint64_t  echo_seq, echo_posts;

/* the fan-out thread's inbox: ack chunks from the HTTP threads, new
 * subscribers */
static pthread_mutex_t   fan_mu = PTHREAD_MUTEX_INITIALIZER;
static char             *fan_q;
static size_t            fan_q_len, fan_q_cap;
static int              *fan_new;
static int               fan_new_n, fan_new_cap;
static int               fan_efd;
static uint64_t          fan_seq;         /* under fan_mu */

static void
buf_put(char **b, size_t *len, size_t *cap, const char *p, size_t n)
{
    if (*len + n > *cap) {
        size_t c = *cap ? *cap : 16384;

        while (c < *len + n) {
            c *= 2;
        }
        *b = realloc(*b, c);
        if (*b == NULL) {
            die("out of memory");
        }
        *cap = c;
    }
    memcpy(*b + *len, p, n);
    *len += n;
}

static void
econn_free(econn_t *c)
{
    if (c->fd >= 0) {
        close(c->fd);
    }
    free(c->in);
    free(c->out);
    free(c);
}

/* write what is queued; 0 ok (maybe partial), -1 dead */
static int
econn_flush(econn_t *c, int ep)
{
    while (c->out_off < c->out_len) {
        ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);

        if (n > 0) {
            c->out_off += (size_t) n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            if (!c->want_out) {
                struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT,
                                          .data.ptr = c };

                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                c->want_out = 1;
            }
            return 0;
        } else {
            return -1;
        }
    }
    c->out_off = c->out_len = 0;
    if (c->want_out) {
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };

        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->want_out = 0;
    }
    return 0;
}

static uint64_t
json_u64_after(const char *b, size_t n, const char *key, uint64_t dflt)
{
    size_t      kl = strlen(key);
    const char *p = memmem(b, n, key, kl);

    if (p == NULL) {
        return dflt;
    }
    return parse_u64(p + kl, b + n, NULL);
}

/* Parse and answer every complete request in c->in.  Returns -1 to drop
 * the connection, 1 when it became an SSE subscriber (handed over). */
static int
echo_requests(econn_t *c, char **acks, size_t *acks_len, size_t *acks_cap)
{
    size_t off = 0;

    for (;;) {
        char       *h = c->in + off, *end, *line, *eol, *sp;
        size_t      avail = c->in_len - off, hlen, clen = 0;
        char        hdr[512];
        int         n;

        end = memmem(h, avail, "\r\n\r\n", 4);
        if (end == NULL) {
            if (avail > 65536) {
                return -1;
            }
            break;
        }
        hlen = (size_t) (end - h) + 4;
        for (line = memchr(h, '\n', hlen) + 1; line < end; line = eol + 1) {
            eol = memchr(line, '\n', (size_t) (end + 2 - line));
            if (strncasecmp(line, "content-length:", 15) == 0) {
                clen = strtoul(line + 15, NULL, 10);
            }
        }
        if (clen > 1 << 20) {
            return -1;
        }
        if (avail < hlen + clen) {
            break;
        }
        sp = memchr(h, ' ', hlen);
        if (sp == NULL) {
            return -1;
        }
        if (sp - h == 4 && memcmp(h, "POST", 4) == 0) {
            const char *body = h + hlen;
            const char *id = memmem(body, clen, "\"eventId\":\"", 11);
            size_t      idlen = 0;
            char        eid[160], ack[1024], chunk[1200];
            uint64_t    seq = atomic_fetch_add(&echo_seq, 1) + 1;
            uint64_t    dia = json_u64_after(body, clen, "\"diamond\":", 1);
            uint64_t    qty = json_u64_after(body, clen, "\"quantity\":", 1);
            struct timespec ts;
            int         alen, blen;

            if (id) {
                id += 11;
                while (id + idlen < body + clen && id[idlen] != '"'
                       && idlen < sizeof(eid) - 1)
                {
                    idlen++;
                }
                memcpy(eid, id, idlen);
            }
            eid[idlen] = '\0';
            alen = snprintf(ack, sizeof(ack), "{\"id\":\"%s\",\"seq\":%" PRIu64
                            ",\"duplicate\":false}\n", eid, seq);
            n = snprintf(hdr, sizeof(hdr), "HTTP/1.1 202 Accepted\r\n"
                         "Server: giftbench-echo\r\nContent-Type: "
                         "application/json\r\nContent-Length: %d\r\n"
                         "Connection: keep-alive\r\n\r\n", alen);
            buf_put(&c->out, &c->out_len, &c->out_cap, hdr, (size_t) n);
            buf_put(&c->out, &c->out_len, &c->out_cap, ack, (size_t) alen);
            clock_gettime(CLOCK_REALTIME, &ts);
            /* the acknowledgement without its seq (the fan-out thread
             * numbers them in the order it streams them, as GIFT_ACKS
             * does); records end with a NUL */
            blen = snprintf(chunk, sizeof(chunk), "\"eventId\":\"%s\","
                "\"deviceId\":\"motor_01\",\"rounds\":%" PRIu64 ",\"status\":"
                "\"ok\",\"attempts\":1,\"platform\":\"tiktok\",\"roomId\":"
                "\"\",\"userId\":\"user\",\"userName\":\"Bench\",\"giftName\""
                ":\"Motor\",\"diamond\":%" PRIu64 ",\"quantity\":%" PRIu64
                ",\"latencyMs\":0.001,\"ts\":%" PRId64 "}", eid, dia * qty,
                dia, qty, (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
            /* self-test of giftbench's accounting: --drop-every and
             * --dup-every leave out or repeat some acknowledgements */
            if (ecfg.drop_every == 0 || seq % ecfg.drop_every != 0) {
                buf_put(acks, acks_len, acks_cap, chunk, (size_t) blen + 1);
                if (ecfg.dup_every && seq % ecfg.dup_every == 0) {
                    buf_put(acks, acks_len, acks_cap, chunk, (size_t) blen + 1);
                }
            }
            atomic_fetch_add_explicit(&echo_posts, 1, memory_order_relaxed);
        } else if (sp - h == 3 && memcmp(h, "GET", 3) == 0
                   && strncmp(sp + 1, ecfg.sse_path, strlen(ecfg.sse_path))
                      == 0
                   && (sp[1 + strlen(ecfg.sse_path)] == ' '
                       || sp[1 + strlen(ecfg.sse_path)] == '?'))
        {
            static const char sse_hdr[] =
                "HTTP/1.1 200 OK\r\nServer: giftbench-echo\r\n"
                "Content-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                "Transfer-Encoding: chunked\r\n\r\n";
            static const char hello[] = ": giftbench echo\nretry: 2000\n\n";

            buf_put(&c->out, &c->out_len, &c->out_cap, sse_hdr,
                    sizeof(sse_hdr) - 1);
            n = snprintf(hdr, sizeof(hdr), "%zx\r\n%s\r\n",
                         sizeof(hello) - 1, hello);
            buf_put(&c->out, &c->out_len, &c->out_cap, hdr, (size_t) n);
            c->sse = 1;
            off += hlen + clen;
            break;
        } else {
            static const char nf[] = "HTTP/1.1 404 Not Found\r\n"
                "Content-Type: application/json\r\nContent-Length: 22\r\n\r\n"
                "{\"error\":\"not_found\"}\n";

            buf_put(&c->out, &c->out_len, &c->out_cap, nf, sizeof(nf) - 1);
        }
        off += hlen + clen;
    }
    if (off > 0) {
        memmove(c->in, c->in + off, c->in_len - off);
        c->in_len -= off;
    }
    return c->sse ? 1 : 0;
}

static void
fan_push(const char *acks, size_t n, char **tmp, size_t *tmp_len,
    size_t *tmp_cap)
{
    const char *p = acks, *end = acks + n;
    char        sz[128];
    int         k, wake;

    pthread_mutex_lock(&fan_mu);
    *tmp_len = 0;
    while (p < end) {
        size_t   len = strlen(p);
        uint64_t seq = ++fan_seq;

        k = snprintf(sz, sizeof(sz), "id: %" PRIu64 "\nevent: ack\ndata: "
                     "{\"seq\":%" PRIu64 ",", seq, seq);
        buf_put(tmp, tmp_len, tmp_cap, sz, (size_t) k);
        buf_put(tmp, tmp_len, tmp_cap, p, len);
        buf_put(tmp, tmp_len, tmp_cap, "\n\n", 2);
        p += len + 1;
    }
    wake = fan_q_len == 0;
    k = snprintf(sz, sizeof(sz), "%zx\r\n", *tmp_len);
    buf_put(&fan_q, &fan_q_len, &fan_q_cap, sz, (size_t) k);
    buf_put(&fan_q, &fan_q_len, &fan_q_cap, *tmp, *tmp_len);
    buf_put(&fan_q, &fan_q_len, &fan_q_cap, "\r\n", 2);
    pthread_mutex_unlock(&fan_mu);
    if (wake) {
        uint64_t one = 1;
        ssize_t  r = write(fan_efd, &one, sizeof(one));

        (void) r;
    }
}

static void *
echo_http_main(void *arg)
{
    int                 lfd = (int) (intptr_t) arg;
    int                 ep = epoll_create1(EPOLL_CLOEXEC), i, n;
    struct epoll_event  evs[MAX_EVENTS], ev = { .events = EPOLLIN
                                                          | EPOLLEXCLUSIVE,
                                                .data.ptr = NULL };
    char               *acks = NULL, *tmp = NULL;
    size_t              acks_len = 0, acks_cap = 0, tmp_len = 0, tmp_cap = 0;

    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    for (;;) {
        n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        for (i = 0; i < n; i++) {
            econn_t *c = evs[i].data.ptr;
            int      rc = 0;

            if (c == NULL) {
                /* one connection per wake-up, so that the threads share
                 * them (the listening socket stays readable for the rest) */
                int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

                if (fd >= 0) {
                    econn_t *nc = xcalloc(1, sizeof(*nc));

                    set_nodelay(fd);
                    nc->fd = fd;
                    ev.events = EPOLLIN;
                    ev.data.ptr = nc;
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                if (econn_flush(c, ep) != 0) {
                    econn_free(c);
                    continue;
                }
            }
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                for (;;) {
                    ssize_t r;

                    if (c->in_cap - c->in_len < 16384) {
                        c->in_cap = c->in_cap ? c->in_cap * 2 : 32768;
                        c->in = realloc(c->in, c->in_cap);
                        if (c->in == NULL) {
                            die("out of memory");
                        }
                    }
                    r = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
                    if (r > 0) {
                        c->in_len += (size_t) r;
                        if ((size_t) r < 16384) {
                            break;
                        }
                        continue;
                    }
                    if (r < 0 && errno == EINTR) {
                        continue;
                    }
                    if (r < 0 && errno == EAGAIN) {
                        break;
                    }
                    rc = -1;
                    break;
                }
                if (rc == 0) {
                    rc = echo_requests(c, &acks, &acks_len, &acks_cap);
                }
                if (rc < 0) {
                    econn_free(c);
                    continue;
                }
                if (rc == 1) {
                    /* a subscriber: its header first (blocking briefly if
                     * need be), then the fan-out thread owns it, so that
                     * no acknowledgement can overtake the header */
                    size_t o = c->out_off;

                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    while (o < c->out_len) {
                        ssize_t w = write(c->fd, c->out + o, c->out_len - o);

                        if (w > 0) {
                            o += (size_t) w;
                        } else if (w < 0 && (errno == EAGAIN
                                             || errno == EINTR))
                        {
                            usleep(100);
                        } else {
                            break;
                        }
                    }
                    if (o < c->out_len) {
                        econn_free(c);
                        continue;
                    }
                    pthread_mutex_lock(&fan_mu);
                    if (fan_new_n == fan_new_cap) {
                        fan_new_cap = fan_new_cap ? fan_new_cap * 2 : 64;
                        fan_new = realloc(fan_new, (size_t) fan_new_cap
                                          * sizeof(int));
                        if (fan_new == NULL) {
                            die("out of memory");
                        }
                    }
                    fan_new[fan_new_n++] = c->fd;
                    pthread_mutex_unlock(&fan_mu);
                    c->fd = -1;
                    econn_free(c);
                    {
                        uint64_t one = 1;
                        ssize_t  w = write(fan_efd, &one, sizeof(one));

                        (void) w;
                    }
                    continue;
                }
                if (c->out_len > c->out_off && econn_flush(c, ep) != 0) {
                    econn_free(c);
                    continue;
                }
            }
        }
        if (acks_len > 0) {
            fan_push(acks, acks_len, &tmp, &tmp_len, &tmp_cap);
            acks_len = 0;
        }
    }
    return NULL;
}

typedef struct {
    int     fd;
    char   *out;
    size_t  out_len, out_off, out_cap;
    int     want_out;
} sub_t;

static void *
echo_fan_main(void *arg)
{
    int                 ep = epoll_create1(EPOLL_CLOEXEC), i, n;
    struct epoll_event  evs[MAX_EVENTS], ev = { .events = EPOLLIN,
                                                .data.ptr = NULL };
    sub_t             **subs = NULL;
    int                 nsubs = 0, capsubs = 0;
    char               *batch = NULL;
    size_t              batch_len = 0, batch_cap = 0;

    (void) arg;
    epoll_ctl(ep, EPOLL_CTL_ADD, fan_efd, &ev);
    for (;;) {
        n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        for (i = 0; i < n; i++) {
            sub_t *s = evs[i].data.ptr;

            if (s == NULL) {
                uint64_t x;
                ssize_t  r = read(fan_efd, &x, sizeof(x));
                char    *tmp;
                size_t   tcap;

                (void) r;
                pthread_mutex_lock(&fan_mu);
                for (int j = 0; j < fan_new_n; j++) {
                    sub_t *ns = xcalloc(1, sizeof(*ns));

                    ns->fd = fan_new[j];
                    if (nsubs == capsubs) {
                        capsubs = capsubs ? capsubs * 2 : 64;
                        subs = realloc(subs, (size_t) capsubs * sizeof(*subs));
                    }
                    subs[nsubs++] = ns;
                    ev.events = EPOLLIN;
                    ev.data.ptr = ns;
                    epoll_ctl(ep, EPOLL_CTL_ADD, ns->fd, &ev);
                }
                fan_new_n = 0;
                /* swap buffers: the HTTP threads fill the other one */
                tmp = fan_q;
                tcap = fan_q_cap;
                fan_q = batch;
                fan_q_cap = batch_cap;
                batch = tmp;
                batch_cap = tcap;
                batch_len = fan_q_len;
                fan_q_len = 0;
                pthread_mutex_unlock(&fan_mu);
                if (batch_len == 0) {
                    continue;
                }
                for (int j = 0; j < nsubs; j++) {
                    sub_t  *u = subs[j];
                    size_t  o = 0;

                    if (u->fd < 0) {
                        continue;
                    }
                    if (u->out_len == u->out_off) {
                        while (o < batch_len) {
                            ssize_t w = write(u->fd, batch + o, batch_len - o);

                            if (w > 0) {
                                o += (size_t) w;
                            } else if (w < 0 && errno == EINTR) {
                                continue;
                            } else {
                                break;
                            }
                        }
                        u->out_len = u->out_off = 0;
                    }
                    if (o < batch_len) {
                        buf_put(&u->out, &u->out_len, &u->out_cap, batch + o,
                                batch_len - o);
                        if (u->out_len > (size_t) 256 << 20) {
                            close(u->fd);   /* it does not read: cut off */
                            u->fd = -1;
                            continue;
                        }
                        if (!u->want_out) {
                            ev.events = EPOLLIN | EPOLLOUT;
                            ev.data.ptr = u;
                            epoll_ctl(ep, EPOLL_CTL_MOD, u->fd, &ev);
                            u->want_out = 1;
                        }
                    }
                }
                continue;
            }
            if (s->fd < 0) {
                continue;
            }
            if (evs[i].events & EPOLLIN) {
                char    junk[4096];
                ssize_t r = read(s->fd, junk, sizeof(junk));

                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    close(s->fd);
                    s->fd = -1;
                    continue;
                }
            }
            if (evs[i].events & EPOLLOUT) {
                while (s->out_off < s->out_len) {
                    ssize_t w = write(s->fd, s->out + s->out_off,
                                      s->out_len - s->out_off);

                    if (w > 0) {
                        s->out_off += (size_t) w;
                    } else {
                        break;
                    }
                }
                if (s->out_off == s->out_len) {
                    s->out_off = s->out_len = 0;
                    ev.events = EPOLLIN;
                    ev.data.ptr = s;
                    epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                    s->want_out = 0;
                }
            }
        }
        /* drop closed subscribers */
        for (i = 0; i < nsubs; i++) {
            if (subs[i]->fd < 0) {
                free(subs[i]->out);
                free(subs[i]);
                subs[i--] = subs[--nsubs];
            }
        }
    }
    return NULL;
}

static int
echo_main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "listen", required_argument, NULL, 'l' },
        { "threads", required_argument, NULL, 'T' },
        { "sse-path", required_argument, NULL, 2 },
        { "drop-every", required_argument, NULL, 3 },
        { "dup-every", required_argument, NULL, 4 },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 }
    };
    const char *listen_s = NULL;
    pthread_t   th;
    sigset_t    set;
    int         c, i, sig;

    while ((c = getopt_long(argc, argv, "l:T:h", lo, NULL)) != -1) {
        switch (c) {
        case 'l': listen_s = optarg; break;
        case 'T': ecfg.threads = atoi(optarg); break;
        case 2: ecfg.sse_path = optarg; break;
        case 3: ecfg.drop_every = strtoull(optarg, NULL, 10); break;
        case 4: ecfg.dup_every = strtoull(optarg, NULL, 10); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (listen_s == NULL || parse_addr(listen_s, &ecfg.addr, NULL, 0) != 0
        || ecfg.threads < 1)
    {
        usage(stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    fan_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    {
        /* one listening socket that every thread watches (EPOLLEXCLUSIVE),
         * not SO_REUSEPORT: a port already taken, by a stale echo server
         * say, must be an error, not a silent share */
        int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK
                                 | SOCK_CLOEXEC, 0);

        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *) &ecfg.addr, sizeof(ecfg.addr)) != 0
            || listen(fd, 4096) != 0)
        {
            die("echo: cannot listen on %s: %s", listen_s, strerror(errno));
        }
        for (i = 0; i < ecfg.threads; i++) {
            pthread_create(&th, NULL, echo_http_main, (void *) (intptr_t) fd);
        }
    }
    pthread_create(&th, NULL, echo_fan_main, NULL);
    fprintf(stderr, PROGRAM " echo: listening on %s, %d threads, SSE at %s\n",
            listen_s, ecfg.threads, ecfg.sse_path);
    sigwait(&set, &sig);
    fprintf(stderr, PROGRAM " echo: %" PRIu64 " gifts answered\n",
            atomic_load(&echo_posts));
    return 0;
}
