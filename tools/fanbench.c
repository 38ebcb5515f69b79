/*
 * fanbench: fan-out benchmark for Server-Sent Events / WebSocket servers
 * (issue 8): our module (acknowledgements published to JetStream) side by
 * side with nchan (messages POSTed to its publisher location).
 *
 *   fanbench run      -u URL -c N (--nats URL | --http-pub URL) [options]
 *       N clients (epoll, -T threads) subscribe to URL; once all are
 *       connected and idle, the worker's RSS is sampled (--rss-pid); then
 *       phase "max": publish as fast as the fan-out goes (at most
 *       --window messages not yet delivered to every client), then phase
 *       "lat": a fixed rate (--lat-dps deliveries/s, or --lat-rate msg/s).
 *       Prints a summary on stderr and one JSON object on stdout.
 *   fanbench clients  -u URL -c N -d SECONDS   clients only (any publisher)
 *   fanbench publish  (--nats URL | --http-pub URL) [-r RATE] -d SECONDS
 *   fanbench selftest -c N -d SECONDS          clients against a trivial
 *       built-in SSE server thread: the client's own ceiling.
 *
 * Every message carries its send time in its event id:
 * "fb-<ns since epoch, CLOCK_REALTIME>-<n>".  A client finds it in each
 * event's data and counts publish->client latency (a log-linear histogram,
 * < 1% error) and deliveries; n is the message's index, so each connection
 * checks order, gaps and duplicates, and lost = messages x clients -
 * deliveries.
 *
 * Clients read in batches: after each epoll round a thread sleeps until
 * --batch-us have passed since the round began (default 1000 us; 0 reads
 * every event the moment it arrives).  Each read takes up to 256 KiB; the
 * HTTP chunked coding is removed in place; SSE lines / WebSocket frames
 * cut by a read are carried to the next one (per connection, allocated
 * only then).
 */

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
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
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <nats/nats.h>

#include "gift.pb-c.h"
#include "gift_json.h"


#define RBUF_SIZE      (256 * 1024)
#define CARRY_MAX      (64 * 1024)
#define HIST_SUB_BITS  7
#define HIST_SUB       (1 << HIST_SUB_BITS)             /* 128 */
#define HIST_N         (2 * HIST_SUB + 48 * HIST_SUB)
#define MAX_EVENTS     1024


/* ------------------------------------------------------------ settings */

typedef enum { PROTO_SSE = 0, PROTO_WS } proto_t;
typedef enum { PUB_NONE = 0, PUB_NATS, PUB_HTTP, PUB_SELF } pub_kind_t;

typedef struct {
    char                host[128];
    int                 port;
    char                path[1024];
    struct sockaddr_in  addr;
} url_t;

static struct {
    url_t        url;
    proto_t      proto;
    int          clients;
    int          threads;
    int          batch_us;
    int          quickack;
    int          connect_parallel;
    pub_kind_t   pub;
    const char  *nats_url;
    url_t        http_pub;
    int          pub_conns;
    double       duration;          /* "max" phase (run), or total */
    int          window;
    double       rate;              /* publish / clients: msg/s, 0 = max */
    double       lat_dps;
    double       lat_rate;
    double       lat_duration;
    int64_t      burst;
    int          size;
    int          settle_ms;
    double       drain_s;
    pid_t        rss_pid;
    const char  *label;
    const char  *subject;
} cfg = {
    .threads = 1, .batch_us = 1000, .connect_parallel = 512,
    .pub_conns = 1, .duration = 5, .window = 64, .lat_dps = 20000,
    .lat_duration = 5, .size = 360, .settle_ms = 2000, .drain_s = 10,
    .label = "", .subject = "gift.acks.motor_01",
};

static volatile sig_atomic_t  interrupted;
static int                    debug;          /* FANBENCH_DEBUG=1 */
static int                    debug_left = 20;
static _Atomic int            errors_shown;   /* connection errors shown */


static int64_t
now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}


static int64_t
mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}


static void
sleep_ns(int64_t ns)
{
    struct timespec ts;

    if (ns <= 0) {
        return;
    }
    ts.tv_sec = ns / 1000000000;
    ts.tv_nsec = ns % 1000000000;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        /* the rest */
    }
}


static void
sleep_until_mono(int64_t t)
{
    struct timespec ts;

    ts.tv_sec = t / 1000000000;
    ts.tv_nsec = t % 1000000000;
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL)
           == EINTR)
    {
        /* again */
    }
}


static void
die(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fputs("fanbench: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}


static int
parse_url(const char *s, url_t *u)
{
    const char  *p, *slash, *colon;
    size_t       hl;

    if (strncmp(s, "http://", 7) == 0) {
        s += 7;
    } else if (strncmp(s, "ws://", 5) == 0) {
        s += 5;
    }

    slash = strchr(s, '/');
    p = slash ? slash : s + strlen(s);
    colon = memchr(s, ':', p - s);

    hl = (colon ? colon : p) - s;
    if (hl == 0 || hl >= sizeof(u->host)) {
        return -1;
    }
    memcpy(u->host, s, hl);
    u->host[hl] = '\0';
    u->port = colon ? atoi(colon + 1) : 80;
    snprintf(u->path, sizeof(u->path), "%s", slash ? slash : "/");

    memset(&u->addr, 0, sizeof(u->addr));
    u->addr.sin_family = AF_INET;
    u->addr.sin_port = htons((uint16_t) u->port);
    if (strcmp(u->host, "localhost") == 0) {
        u->addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else if (inet_pton(AF_INET, u->host, &u->addr.sin_addr) != 1) {
        return -1;
    }
    return 0;
}


/* ------------------------------------------------------------ histogram */

static int
hist_index(uint64_t v)
{
    int  msb, shift;

    if (v < 2 * HIST_SUB) {
        return (int) v;
    }
    msb = 63 - __builtin_clzll(v);                  /* >= 8 */
    shift = msb - HIST_SUB_BITS;
    v >>= shift;                                    /* 128..255 */
    msb = (msb - HIST_SUB_BITS - 1) * HIST_SUB + 2 * HIST_SUB
          + (int) (v - HIST_SUB);
    return msb < HIST_N ? msb : HIST_N - 1;
}


/* the middle of bucket i, in the histogram's unit (us) */
static double
hist_value(int i)
{
    int  e;

    if (i < 2 * HIST_SUB) {
        return i;
    }
    e = (i - 2 * HIST_SUB) / HIST_SUB + 1;          /* shift */
    return ((double) ((i - 2 * HIST_SUB) % HIST_SUB + HIST_SUB) + 0.5)
           * (double) (1ULL << e);
}


static double
hist_pct(const uint64_t *h, uint64_t total, double pct)
{
    int       i;
    uint64_t  want, acc;

    if (total == 0) {
        return 0;
    }
    want = (uint64_t) ceil(total * pct / 100.0);
    if (want == 0) {
        want = 1;
    }
    acc = 0;
    for (i = 0; i < HIST_N; i++) {
        acc += h[i];
        if (acc >= want) {
            return hist_value(i);
        }
    }
    return hist_value(HIST_N - 1);
}


/* ------------------------------------------------------------ clients */

enum { C_IDLE = 0, C_CONNECTING, C_HEADERS, C_BODY, C_CLOSED };
enum { CS_SIZE = 0, CS_EXT, CS_SIZE_LF, CS_DATA, CS_DATA_CR, CS_DATA_LF,
       CS_END };

typedef struct worker_s  worker_t;

typedef struct {
    int         fd;
    uint8_t     state;
    uint8_t     chunked;
    uint8_t     cstate;
    uint8_t     failed;
    uint32_t    crem;               /* chunk bytes left */
    uint32_t    carry_len;
    uint32_t    carry_cap;
    char       *carry;
    int64_t     last_n;             /* newest message index seen */
    uint64_t    seen;               /* bit i: last_n - i was seen */
    int64_t     cur_ns;             /* SSE: event being read */
    int64_t     cur_n;
    worker_t   *w;
} conn_t;

typedef struct {
    uint64_t    delivered;          /* in-phase, unique */
    uint64_t    dups;
    uint64_t    gaps;               /* indexes skipped when seen (some may
                                       come later: reordered) */
    uint64_t    reordered;          /* came after a newer one */
    uint64_t    stray;              /* from an earlier phase */
    uint64_t    stale;              /* from before this process */
    uint64_t    other;              /* events without our event id */
    uint64_t    comments;           /* SSE comments, WebSocket pings */
    uint64_t    bytes;
    uint64_t    reads;
    uint64_t    rounds;
    uint64_t    closed;             /* streams that ended */
    int64_t     first_ns;
    int64_t     last_ns;
    uint64_t    lat_max;
    uint64_t    hist[HIST_N];
} stats_t;

struct worker_s {
    int              id;
    pthread_t        tid;
    int              ep;
    conn_t          *conns;
    int              nconns;
    int              next;          /* next connection to open */
    int              inflight;      /* connecting or reading headers */
    char            *rbuf;
    pthread_mutex_t  lock;          /* stats, held during a round */
    stats_t          st;
    _Atomic uint64_t delivered;     /* copy of st.delivered, for the pacer */
    _Atomic int      ready;         /* streams with headers read */
    _Atomic int      failed;
    _Atomic int      open_closed;   /* streams that ended */
    int64_t          now;           /* realtime of this round */
};

static worker_t         *workers;
static _Atomic int       stop_workers;
static _Atomic int64_t   phase_first = INT64_MAX;  /* first index of phase */
static int64_t           start_ns;                  /* process start */
static char              request[2048];
static size_t            request_len;


static void conn_close(worker_t *w, conn_t *c, int failed);


static void
conn_start(worker_t *w, conn_t *c)
{
    int                 fd, one = 1;
    struct epoll_event  ev;

    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fprintf(stderr, "fanbench: socket: %s\n", strerror(errno));
        c->state = C_CLOSED;
        c->failed = 1;
        atomic_fetch_add(&w->failed, 1);
        return;
    }
    (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    c->fd = fd;
    c->w = w;
    c->last_n = -1;
    c->cur_n = -1;
    c->state = C_CONNECTING;
    w->inflight++;

    if (connect(fd, (struct sockaddr *) &cfg.url.addr, sizeof(cfg.url.addr))
        != 0 && errno != EINPROGRESS)
    {
        fprintf(stderr, "fanbench: connect: %s\n", strerror(errno));
        conn_close(w, c, 1);
        return;
    }

    ev.events = EPOLLOUT;
    ev.data.ptr = c;
    if (epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
        conn_close(w, c, 1);
    }
}


static void
conn_close(worker_t *w, conn_t *c, int failed)
{
    if (c->state == C_CLOSED) {
        return;
    }
    if (c->state == C_CONNECTING || c->state == C_HEADERS) {
        w->inflight--;
    }
    if (failed && c->state != C_BODY) {
        atomic_fetch_add(&w->failed, 1);
        c->failed = 1;
    } else {
        atomic_fetch_add(&w->open_closed, 1);
        w->st.closed++;
    }
    if (c->fd >= 0) {
        close(c->fd);           /* leaves the epoll set too */
        c->fd = -1;
    }
    c->state = C_CLOSED;
    free(c->carry);
    c->carry = NULL;
    c->carry_len = c->carry_cap = 0;
}


/*
 * One event of ours: its send time and index.  Each connection remembers
 * the newest index and which of the 64 before it it has seen, so that a
 * publisher whose messages overtake one another (several nchan publisher
 * connections) is not mistaken for loss or duplication.
 */
static void
deliver(worker_t *w, conn_t *c, int64_t ns, int64_t n)
{
    int64_t   first, d;
    uint64_t  lat;

    if (ns < start_ns) {
        w->st.stale++;
        return;
    }

    first = atomic_load_explicit(&phase_first, memory_order_relaxed);

    if (n > c->last_n) {
        d = n - c->last_n;
        c->seen = d >= 64 ? 1 : (c->seen << d) | 1;
        if (n >= first && d > 1) {
            w->st.gaps += n - (c->last_n >= first ? c->last_n + 1 : first);
            if (debug && debug_left > 0) {
                debug_left--;
                fprintf(stderr, "fanbench: connection %d: %" PRId64
                        " after %" PRId64 "\n", (int) (c - w->conns), n,
                        c->last_n);
            }
        }
        c->last_n = n;
    } else {
        d = c->last_n - n;
        if (d >= 64 || (c->seen & (1ULL << d))) {
            w->st.dups++;
            return;
        }
        c->seen |= 1ULL << d;
        if (n >= first) {
            w->st.reordered++;
        }
    }

    if (n < first) {
        w->st.stray++;
        return;
    }

    w->st.delivered++;
    lat = w->now > ns ? (uint64_t) (w->now - ns) / 1000 : 0;
    w->st.hist[hist_index(lat)]++;
    if (lat > w->st.lat_max) {
        w->st.lat_max = lat;
    }
    if (w->st.first_ns == 0) {
        w->st.first_ns = w->now;
    }
    w->st.last_ns = w->now;
}


/* "eventId":"fb-<ns>-<n>" inside [p, end) */
static int
find_id(const char *p, const char *end, int64_t *ns, int64_t *n)
{
    static const char  key[] = "\"eventId\":\"fb-";
    const char        *q;
    int64_t            a, b;

    q = memmem(p, end - p, key, sizeof(key) - 1);
    if (q == NULL) {
        return -1;
    }
    q += sizeof(key) - 1;
    for (a = 0; q < end && *q >= '0' && *q <= '9'; q++) {
        a = a * 10 + (*q - '0');
    }
    if (q >= end || *q != '-') {
        return -1;
    }
    for (q++, b = 0; q < end && *q >= '0' && *q <= '9'; q++) {
        b = b * 10 + (*q - '0');
    }
    *ns = a;
    *n = b;
    return 0;
}


/* Complete SSE lines in [p, p+len): returns the bytes consumed. */
static size_t
parse_sse(worker_t *w, conn_t *c, char *p, size_t len)
{
    char     *line, *nl, *end;
    size_t    ll;
    int64_t   ns, n;

    line = p;
    end = p + len;

    while (line < end) {
        nl = memchr(line, '\n', end - line);
        if (nl == NULL) {
            break;
        }
        ll = nl - line;
        if (ll && line[ll - 1] == '\r') {
            ll--;
        }

        if (ll == 0) {
            /* end of an event */
            if (c->cur_n >= 0) {
                deliver(w, c, c->cur_ns, c->cur_n);
                c->cur_n = -1;
            }
        } else if (line[0] == ':') {
            w->st.comments++;
        } else if (ll > 5 && memcmp(line, "data:", 5) == 0) {
            if (find_id(line + 5, line + ll, &ns, &n) == 0) {
                c->cur_ns = ns;
                c->cur_n = n;
            } else {
                w->st.other++;
            }
        }
        line = nl + 1;
    }

    return line - p;
}


/* Complete WebSocket frames in [p, p+len): returns the bytes consumed. */
static size_t
parse_ws(worker_t *w, conn_t *c, char *p, size_t len)
{
    static const unsigned char  pong[6] = { 0x8a, 0x80, 1, 2, 3, 4 };
    unsigned char              *b;
    size_t                      pos, hl, pl;
    int64_t                     ns, n;

    pos = 0;

    while (len - pos >= 2) {
        b = (unsigned char *) p + pos;
        pl = b[1] & 0x7f;
        hl = 2;
        if (pl == 126) {
            if (len - pos < 4) {
                break;
            }
            pl = (size_t) b[2] << 8 | b[3];
            hl = 4;
        } else if (pl == 127) {
            if (len - pos < 10) {
                break;
            }
            pl = (size_t) b[6] << 24 | (size_t) b[7] << 16
                 | (size_t) b[8] << 8 | b[9];
            hl = 10;
        }
        if (b[1] & 0x80) {
            hl += 4;                /* a masked server frame: wrong, but */
        }
        if (len - pos < hl + pl) {
            break;
        }

        switch (b[0] & 0x0f) {
        case 0x1:
            if (find_id(p + pos + hl, p + pos + hl + pl, &ns, &n) == 0) {
                deliver(w, c, ns, n);
            } else {
                w->st.other++;
            }
            break;
        case 0x9:
            w->st.comments++;
            (void) !write(c->fd, pong, sizeof(pong));
            break;
        case 0x8:
            conn_close(w, c, 0);
            return len;
        default:
            break;
        }
        pos += hl + pl;
    }

    return pos;
}


/* Remove the chunked coding from n raw bytes at s, writing payload at d. */
static size_t
dechunk(conn_t *c, char *d, const char *s, size_t n, int *err)
{
    char        *d0 = d;
    const char  *end = s + n;
    size_t       k;
    int          ch, v;

    while (s < end) {
        switch (c->cstate) {
        case CS_SIZE:
            ch = *s++;
            if (isxdigit(ch)) {
                v = ch <= '9' ? ch - '0' : (ch | 0x20) - 'a' + 10;
                if (c->crem > (1u << 27)) {
                    *err = 1;
                    return d - d0;
                }
                c->crem = c->crem * 16 + v;
            } else if (ch == ';' || ch == ' ') {
                c->cstate = CS_EXT;
            } else if (ch == '\r') {
                c->cstate = CS_SIZE_LF;
            } else if (ch == '\n') {
                c->cstate = c->crem ? CS_DATA : CS_END;
            } else {
                *err = 1;
                return d - d0;
            }
            break;
        case CS_EXT:
        case CS_SIZE_LF:
            if (*s++ == '\n') {
                c->cstate = c->crem ? CS_DATA : CS_END;
            }
            break;
        case CS_DATA:
            k = (size_t) (end - s) < c->crem ? (size_t) (end - s) : c->crem;
            memmove(d, s, k);
            d += k;
            s += k;
            c->crem -= k;
            if (c->crem == 0) {
                c->cstate = CS_DATA_CR;
            }
            break;
        case CS_DATA_CR:
            ch = *s++;
            c->cstate = ch == '\r' ? CS_DATA_LF : CS_SIZE;
            if (ch != '\r' && ch != '\n') {
                *err = 1;
                return d - d0;
            }
            break;
        case CS_DATA_LF:
            if (*s++ != '\n') {
                *err = 1;
                return d - d0;
            }
            c->cstate = CS_SIZE;
            break;
        default:        /* CS_END: the last chunk; ignore the trailer */
            s = end;
            break;
        }
    }

    return d - d0;
}


/* Response headers at [p, p+len): -1 bad, 0 incomplete, else their size. */
static int
parse_headers(conn_t *c, char *p, size_t len)
{
    char   *end, *q;
    int     status;
    size_t  hl;

    end = memmem(p, len, "\r\n\r\n", 4);
    if (end == NULL) {
        return len > 16384 ? -1 : 0;
    }
    hl = end + 4 - p;

    if (len < 12 || memcmp(p, "HTTP/1.", 7) != 0) {
        return -1;
    }
    status = atoi(p + 9);
    if (status != (cfg.proto == PROTO_WS ? 101 : 200)) {
        if (atomic_fetch_add(&errors_shown, 1) < 3) {
            fprintf(stderr, "fanbench: status %d: %.*s\n", status,
                    (int) (len < 300 ? len : 300), p);
        }
        return -1;
    }

    for (q = p; q < end; q++) {
        if ((*q == 't' || *q == 'T') && end - q > 26
            && strncasecmp(q, "transfer-encoding:", 18) == 0)
        {
            q += 18;
            while (*q == ' ') {
                q++;
            }
            if (strncasecmp(q, "chunked", 7) == 0) {
                c->chunked = 1;
            }
        }
    }

    return (int) hl;
}


static int
carry_save(conn_t *c, const char *p, size_t len)
{
    size_t  cap;
    char   *nb;

    if (len == 0) {
        c->carry_len = 0;
        return 0;
    }
    if (len > CARRY_MAX) {
        return -1;
    }
    if (len > c->carry_cap) {
        cap = len < 1024 ? 1024 : len;
        nb = realloc(c->carry, cap);
        if (nb == NULL) {
            return -1;
        }
        c->carry = nb;
        c->carry_cap = (uint32_t) cap;
    }
    memmove(c->carry, p, len);
    c->carry_len = (uint32_t) len;
    return 0;
}


static void
conn_readable(worker_t *w, conn_t *c)
{
    char     *buf = w->rbuf;
    size_t    off, plen, used;
    ssize_t   n;
    int       hl, err;

    for (;;) {
        off = c->carry_len;
        if (off) {
            memcpy(buf, c->carry, off);
        }

        n = read(c->fd, buf + off, RBUF_SIZE);
        if (n <= 0) {
            if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
                return;
            }
            if (c->state != C_BODY
                && atomic_fetch_add(&errors_shown, 1) < 3)
            {
                fprintf(stderr, "fanbench: closed before the response "
                        "header: %s\n", n < 0 ? strerror(errno) : "EOF");
            }
            conn_close(w, c, c->state != C_BODY);
            return;
        }
        w->st.bytes += n;
        w->st.reads++;
        if (cfg.quickack) {
            /* re-armed after each read: no delayed ACK (diagnosis only) */
            int one = 1;
            (void) setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one,
                              sizeof(one));
        }

        plen = off + n;

        if (c->state == C_HEADERS) {
            hl = parse_headers(c, buf, plen);
            if (hl < 0) {
                conn_close(w, c, 1);
                return;
            }
            if (hl == 0) {
                if (carry_save(c, buf, plen) != 0) {
                    conn_close(w, c, 1);
                }
                return;
            }
            c->state = C_BODY;
            w->inflight--;
            atomic_fetch_add(&w->ready, 1);
            /* the body's first bytes, moved to the front */
            memmove(buf, buf + hl, plen - hl);
            off = 0;
            n = plen - hl;
            plen = n;
        }

        if (c->chunked) {
            err = 0;
            plen = off + dechunk(c, buf + off, buf + off, n, &err);
            if (err) {
                fprintf(stderr, "fanbench: bad chunked coding\n");
                conn_close(w, c, 0);
                return;
            }
        }

        used = cfg.proto == PROTO_SSE ? parse_sse(w, c, buf, plen)
                                      : parse_ws(w, c, buf, plen);
        if (c->state == C_CLOSED) {
            return;
        }

        if (carry_save(c, buf + used, plen - used) != 0) {
            fprintf(stderr, "fanbench: an event larger than %d bytes\n",
                    CARRY_MAX);
            conn_close(w, c, 0);
            return;
        }

        if ((size_t) n < RBUF_SIZE) {
            return;             /* level-triggered: more comes as an event */
        }
    }
}


static void
conn_writable(worker_t *w, conn_t *c)
{
    int                 err = 0;
    socklen_t           el = sizeof(err);
    ssize_t             n;
    struct epoll_event  ev;

    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el) != 0 || err) {
        if (atomic_fetch_add(&errors_shown, 1) < 3) {
            fprintf(stderr, "fanbench: connect: %s\n", strerror(err));
        }
        conn_close(w, c, 1);
        return;
    }

    /* a small request goes out whole into an empty socket */
    n = write(c->fd, request, request_len);
    if (n != (ssize_t) request_len) {
        conn_close(w, c, 1);
        return;
    }

    c->state = C_HEADERS;
    ev.events = EPOLLIN;
    ev.data.ptr = c;
    if (epoll_ctl(w->ep, EPOLL_CTL_MOD, c->fd, &ev) != 0) {
        conn_close(w, c, 1);
    }
}


static void *
worker_main(void *arg)
{
    worker_t            *w = arg;
    int                  i, n, limit;
    int64_t              round_start, t;
    conn_t              *c;
    struct epoll_event   evs[MAX_EVENTS];

    limit = cfg.connect_parallel / cfg.threads;
    if (limit < 8) {
        limit = 8;
    }

    while (!atomic_load_explicit(&stop_workers, memory_order_relaxed)) {
        while (w->next < w->nconns && w->inflight < limit) {
            conn_start(w, &w->conns[w->next++]);
        }

        n = epoll_wait(w->ep, evs, MAX_EVENTS, 50);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            die("epoll_wait: %s", strerror(errno));
        }
        if (n == 0) {
            continue;
        }

        round_start = mono_ns();

        pthread_mutex_lock(&w->lock);
        w->now = now_ns();
        w->st.rounds++;

        for (i = 0; i < n; i++) {
            c = evs[i].data.ptr;
            if (c->state == C_CONNECTING) {
                conn_writable(w, c);
            } else if (c->state == C_HEADERS || c->state == C_BODY) {
                conn_readable(w, c);
            }
        }

        atomic_store_explicit(&w->delivered, w->st.delivered,
                              memory_order_relaxed);
        pthread_mutex_unlock(&w->lock);

        if (cfg.batch_us && n < MAX_EVENTS) {
            t = round_start + (int64_t) cfg.batch_us * 1000;
            if (mono_ns() < t) {
                sleep_until_mono(t);
            }
        }
    }

    return NULL;
}


static void
workers_start(void)
{
    int  i, j, per;

    if (cfg.proto == PROTO_WS) {
        request_len = snprintf(request, sizeof(request),
            "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n",
            cfg.url.path, cfg.url.host, cfg.url.port);
    } else {
        request_len = snprintf(request, sizeof(request),
            "GET %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n\r\n",
            cfg.url.path, cfg.url.host, cfg.url.port);
    }

    workers = calloc(cfg.threads, sizeof(worker_t));
    if (workers == NULL) {
        die("out of memory");
    }

    for (i = 0; i < cfg.threads; i++) {
        worker_t *w = &workers[i];

        per = cfg.clients / cfg.threads
              + (i < cfg.clients % cfg.threads ? 1 : 0);
        w->id = i;
        w->nconns = per;
        w->conns = calloc(per ? per : 1, sizeof(conn_t));
        w->rbuf = malloc(RBUF_SIZE + CARRY_MAX);
        w->ep = epoll_create1(EPOLL_CLOEXEC);
        if (w->conns == NULL || w->rbuf == NULL || w->ep < 0) {
            die("out of memory or epoll");
        }
        for (j = 0; j < per; j++) {
            w->conns[j].fd = -1;
        }
        pthread_mutex_init(&w->lock, NULL);
        if (pthread_create(&w->tid, NULL, worker_main, w) != 0) {
            die("pthread_create");
        }
    }
}


static void
workers_stop(void)
{
    int  i, j;

    atomic_store(&stop_workers, 1);
    for (i = 0; i < cfg.threads; i++) {
        pthread_join(workers[i].tid, NULL);
        for (j = 0; j < workers[i].nconns; j++) {
            conn_close(&workers[i], &workers[i].conns[j], 0);
        }
    }
}


static int
count_ready(void)
{
    int  i, n = 0;

    for (i = 0; i < cfg.threads; i++) {
        n += atomic_load(&workers[i].ready);
    }
    return n;
}


static int
count_failed(void)
{
    int  i, n = 0;

    for (i = 0; i < cfg.threads; i++) {
        n += atomic_load(&workers[i].failed);
    }
    return n;
}


static int
count_open(void)
{
    int  i, n = 0;

    for (i = 0; i < cfg.threads; i++) {
        n += atomic_load(&workers[i].ready)
             - atomic_load(&workers[i].open_closed);
    }
    return n;
}


static uint64_t
delivered_total(void)
{
    int       i;
    uint64_t  n = 0;

    for (i = 0; i < cfg.threads; i++) {
        n += atomic_load_explicit(&workers[i].delivered,
                                  memory_order_relaxed);
    }
    return n;
}


/* Wait until every client has connected (or failed); 0 when all did. */
static int
wait_connected(double timeout_s)
{
    int64_t  end = mono_ns() + (int64_t) (timeout_s * 1e9);
    int      r, f;

    for (;;) {
        r = count_ready();
        f = count_failed();
        if (r + f >= cfg.clients || interrupted) {
            break;
        }
        if (mono_ns() > end) {
            fprintf(stderr, "fanbench: %d of %d connected after %.0f s\n",
                    r, cfg.clients, timeout_s);
            break;
        }
        sleep_ns(20 * 1000000);
    }
    return f == 0 && r == cfg.clients ? 0 : -1;
}


/* Reset every thread's statistics (between phases). */
static void
stats_reset(void)
{
    int  i;

    for (i = 0; i < cfg.threads; i++) {
        pthread_mutex_lock(&workers[i].lock);
        memset(&workers[i].st, 0, sizeof(stats_t));
        atomic_store(&workers[i].delivered, 0);
        pthread_mutex_unlock(&workers[i].lock);
    }
}


static void
stats_collect(stats_t *t)
{
    int  i, j;

    memset(t, 0, sizeof(*t));
    for (i = 0; i < cfg.threads; i++) {
        stats_t *s = &workers[i].st;

        pthread_mutex_lock(&workers[i].lock);
        t->delivered += s->delivered;
        t->dups += s->dups;
        t->gaps += s->gaps;
        t->reordered += s->reordered;
        t->stray += s->stray;
        t->stale += s->stale;
        t->other += s->other;
        t->comments += s->comments;
        t->bytes += s->bytes;
        t->reads += s->reads;
        t->rounds += s->rounds;
        t->closed += s->closed;
        if (s->first_ns && (t->first_ns == 0 || s->first_ns < t->first_ns)) {
            t->first_ns = s->first_ns;
        }
        if (s->last_ns > t->last_ns) {
            t->last_ns = s->last_ns;
        }
        if (s->lat_max > t->lat_max) {
            t->lat_max = s->lat_max;
        }
        for (j = 0; j < HIST_N; j++) {
            t->hist[j] += s->hist[j];
        }
        pthread_mutex_unlock(&workers[i].lock);
    }
}


/* CPU time (ns) of the client threads: total and the busiest one. */
static void
client_cpu(int64_t *total, int64_t *max)
{
    int              i;
    int64_t          v;
    clockid_t        cid;
    struct timespec  ts;

    *total = *max = 0;
    for (i = 0; i < cfg.threads; i++) {
        if (pthread_getcpuclockid(workers[i].tid, &cid) != 0
            || clock_gettime(cid, &ts) != 0)
        {
            continue;
        }
        v = (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
        *total += v;
        if (v > *max) {
            *max = v;
        }
    }
}


static int64_t
process_cpu_ns(void)
{
    struct rusage  ru;

    getrusage(RUSAGE_SELF, &ru);
    return ((int64_t) ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000
           + ((int64_t) ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000;
}


/* ------------------------------------------------------------ /proc */

/* VmRSS, RssAnon, RssShmem (KiB) of pid; -1 when unknown. */
static void
proc_rss(pid_t pid, long *rss, long *anon, long *shm)
{
    char   path[64], line[256];
    FILE  *f;

    *rss = *anon = *shm = -1;
    if (pid <= 0) {
        return;
    }
    snprintf(path, sizeof(path), "/proc/%d/status", (int) pid);
    f = fopen(path, "r");
    if (f == NULL) {
        return;
    }
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "VmRSS:", 6) == 0) {
            *rss = atol(line + 6);
        } else if (strncmp(line, "RssAnon:", 8) == 0) {
            *anon = atol(line + 8);
        } else if (strncmp(line, "RssShmem:", 9) == 0) {
            *shm = atol(line + 9);
        }
    }
    fclose(f);
}


/* utime + stime of pid in ns; -1 when unknown. */
static int64_t
proc_cpu_ns(pid_t pid)
{
    char                path[64], buf[1024], *p;
    FILE               *f;
    size_t              n;
    unsigned long long  ut, st;

    if (pid <= 0) {
        return -1;
    }
    snprintf(path, sizeof(path), "/proc/%d/stat", (int) pid);
    f = fopen(path, "r");
    if (f == NULL) {
        return -1;
    }
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    p = strrchr(buf, ')');
    if (p == NULL
        || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
                  &ut, &st) != 2)
    {
        return -1;
    }
    return (int64_t) ((ut + st) * (1000000000.0 / sysconf(_SC_CLK_TCK)));
}


/* busy and total jiffies of the whole machine (/proc/stat) */
static void
machine_cpu(uint64_t *busy, uint64_t *total)
{
    FILE                *f;
    unsigned long long   v[10];
    int                  i, n;

    *busy = *total = 0;
    f = fopen("/proc/stat", "r");
    if (f == NULL) {
        return;
    }
    memset(v, 0, sizeof(v));
    n = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu",
               &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8],
               &v[9]);
    fclose(f);
    for (i = 0; i < n && i < 8; i++) {
        *total += v[i];
        if (i != 3 && i != 4) {         /* idle, iowait */
            *busy += v[i];
        }
    }
}


/* ------------------------------------------------------------ messages */

static Gift__V1__GiftAck  ack_tmpl;
static char               ack_user[512];
static char               ack_id[64];


static void
message_init(void)
{
    char    json[GIFT_JSON_MAX];
    size_t  len, pad;
    int64_t now_ms = now_ns() / 1000000;

    gift__v1__gift_ack__init(&ack_tmpl);
    snprintf(ack_id, sizeof(ack_id), "fb-%" PRId64 "-%d", now_ns(), 123456);
    ack_tmpl.event_id = ack_id;
    ack_tmpl.device_id = "motor_01";
    ack_tmpl.rounds = 10;
    ack_tmpl.status = GIFT__V1__ACK_STATUS__ACK_STATUS_OK;
    ack_tmpl.attempts = 1;
    ack_tmpl.rpc_latency_us = 2345;
    ack_tmpl.completed_at_ms = now_ms;
    ack_tmpl.received_at_ms = now_ms - 12;
    ack_tmpl.platform = "tiktok";
    ack_tmpl.room_id = "7301234567890123456";
    ack_tmpl.user_id = "6801234567890123456";
    ack_tmpl.gift_name = "Motor";
    ack_tmpl.diamond = 10;
    ack_tmpl.quantity = 1;

    /* the viewer's name makes up the size asked for */
    strcpy(ack_user, "Viewer");
    ack_tmpl.user_name = ack_user;
    len = gift_ack_json(&ack_tmpl, 123456, json, sizeof(json));
    if (cfg.size > (int) len) {
        pad = cfg.size - len;
        if (pad > sizeof(ack_user) - 8) {
            pad = sizeof(ack_user) - 8;
        }
        memset(ack_user + 6, 'x', pad);
        ack_user[6 + pad] = '\0';
    }
}


/* The acknowledgement JSON of message n (nchan, selftest). */
static size_t
message_json(int64_t ns, int64_t n, char *out, size_t cap)
{
    char               id[64];
    Gift__V1__GiftAck  a = ack_tmpl;        /* publisher threads: a copy */

    snprintf(id, sizeof(id), "fb-%" PRId64 "-%" PRId64, ns, n);
    a.event_id = id;
    a.completed_at_ms = ns / 1000000;
    a.received_at_ms = a.completed_at_ms - 12;
    return gift_ack_json(&a, (uint64_t) n + 1, out, cap);
}


/* ------------------------------------------------------------ publishers */

typedef struct {
    /* set by the phase */
    int64_t           first;         /* index of the first message */
    int64_t           t0;            /* mono */
    int64_t           t_end;         /* mono: publish nothing after */
    double            rate;          /* msg/s; 0: window */
    int               window;
    int64_t           max_msgs;      /* 0: no limit */
    int64_t           mono2real;     /* realtime - monotonic, ns */
    int               clients;       /* open at the start */
    /* the publishers' */
    _Atomic int64_t   next;          /* tickets: offsets from first */
    _Atomic int64_t   sent;
    _Atomic int64_t   errors;
    _Atomic int64_t   last_sent_mono;
    _Atomic int64_t   stalls;
    _Atomic int64_t   late_max;      /* ns behind the schedule, at most */
} phase_pub_t;

static phase_pub_t  *pp;


/*
 * Wait until message k (an offset in the phase) may go: its time slot at a
 * fixed rate, or (window) until no more than `window` messages are not yet
 * delivered to every client.  Returns the time to put in the message
 * (realtime ns): at a fixed rate the slot's time, not the moment it went,
 * so that a publisher held up by a slow server (nchan's publisher answers
 * once it has fanned the message out) does not hide that wait from the
 * latency figures (coordinated omission).  -1: the phase is over.
 */
static int64_t
pace(int64_t k)
{
    int64_t   t, stall_end, late, prev;
    uint64_t  need;

    if (pp->max_msgs && k >= pp->max_msgs) {
        return -1;
    }

    if (pp->rate > 0) {
        t = pp->t0 + (int64_t) (k * 1e9 / pp->rate);
        if (t >= pp->t_end || interrupted) {
            return -1;
        }
        sleep_until_mono(t);
        late = mono_ns() - t;
        prev = atomic_load(&pp->late_max);
        while (late > prev
               && !atomic_compare_exchange_weak(&pp->late_max, &prev, late))
        {
            /* retry */
        }
        return t + pp->mono2real;
    }

    if (mono_ns() >= pp->t_end || interrupted) {
        return -1;
    }

    if (k < pp->window) {
        return now_ns();
    }

    need = (uint64_t) (k - pp->window + 1) * (uint64_t) pp->clients;
    stall_end = 0;

    while (delivered_total() < need) {
        t = mono_ns();
        if (t >= pp->t_end || interrupted) {
            return -1;
        }
        if (stall_end == 0) {
            stall_end = t + 2000000000LL;
        } else if (t > stall_end) {
            /* lost deliveries would stop the window forever: go on */
            atomic_fetch_add(&pp->stalls, 1);
            break;
        }
        sleep_ns(20000);
    }
    return now_ns();
}


/* --- JetStream */

static natsConnection  *pub_nc;
static jsCtx           *pub_js;


static void
js_err_handler(jsCtx *js, jsPubAckErr *pae, void *closure)
{
    (void) js;
    (void) closure;
    if (pp == NULL || atomic_fetch_add(&pp->errors, 1) < 3) {
        fprintf(stderr, "fanbench: publish failed: %s\n",
                pae->ErrText ? pae->ErrText : natsStatus_GetText(pae->Err));
    }
}


static void
nats_pub_init(void)
{
    natsStatus    s;
    natsOptions  *o = NULL;
    jsOptions     jo;

    s = natsOptions_Create(&o);
    if (s == NATS_OK) {
        s = natsOptions_SetURL(o, cfg.nats_url);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetSendAsap(o, true);
    }
    if (s == NATS_OK) {
        s = natsOptions_SetName(o, "fanbench");
    }
    if (s == NATS_OK) {
        s = natsConnection_Connect(&pub_nc, o);
    }
    natsOptions_Destroy(o);
    if (s != NATS_OK) {
        die("NATS %s: %s", cfg.nats_url, natsStatus_GetText(s));
    }

    jsOptions_Init(&jo);
    jo.PublishAsync.MaxPending = 4096;
    jo.PublishAsync.ErrHandler = js_err_handler;
    s = natsConnection_JetStream(&pub_js, pub_nc, &jo);
    if (s != NATS_OK) {
        die("JetStream: %s", natsStatus_GetText(s));
    }
}


static void *
nats_pub_main(void *arg)
{
    uint8_t     buf[4096];
    char        msgid[80];
    size_t      len;
    int64_t     k, ns;
    natsMsg    *m;
    natsStatus  s;

    (void) arg;

    for (;;) {
        k = atomic_fetch_add(&pp->next, 1);
        ns = pace(k);
        if (ns < 0) {
            break;
        }

        snprintf(ack_id, sizeof(ack_id), "fb-%" PRId64 "-%" PRId64, ns,
                 pp->first + k);
        ack_tmpl.completed_at_ms = ns / 1000000;
        ack_tmpl.received_at_ms = ack_tmpl.completed_at_ms - 12;
        len = gift__v1__gift_ack__pack(&ack_tmpl, buf);
        snprintf(msgid, sizeof(msgid), "%s:ack", ack_id);

        m = NULL;
        s = natsMsg_Create(&m, cfg.subject, NULL, (const char *) buf,
                           (int) len);
        if (s == NATS_OK) {
            s = natsMsgHeader_Set(m, "Nats-Msg-Id", msgid);
        }
        if (s == NATS_OK) {
            s = js_PublishMsgAsync(pub_js, &m, NULL);
        }
        if (m != NULL) {
            natsMsg_Destroy(m);
        }
        if (s != NATS_OK) {
            atomic_fetch_add(&pp->errors, 1);
            continue;
        }
        atomic_fetch_add(&pp->sent, 1);
        atomic_store(&pp->last_sent_mono, mono_ns());
    }

    return NULL;
}


static void
nats_pub_complete(void)
{
    jsPubOptions  po;
    natsStatus    s;

    jsPubOptions_Init(&po);
    po.MaxWait = 10000;
    s = js_PublishAsyncComplete(pub_js, &po);
    if (s != NATS_OK) {
        fprintf(stderr, "fanbench: publish not complete: %s\n",
                natsStatus_GetText(s));
        atomic_fetch_add(&pp->errors, 1);
    }
}


/* --- HTTP (nchan's publisher location), keep-alive, one request at a time */

static int
http_connect(url_t *u)
{
    int  fd, one = 1;

    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -1;
    }
    (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(fd, (struct sockaddr *) &u->addr, sizeof(u->addr)) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}


/* Read one response on fd (buf holds leftovers); its status, or -1. */
static int
http_response(int fd, char *buf, size_t cap, size_t *have)
{
    char     *he, *p, *end;
    int       status;
    long      clen;
    size_t    need, hl;
    ssize_t   n;

    for (;;) {
        he = *have ? memmem(buf, *have, "\r\n\r\n", 4) : NULL;
        if (he) {
            break;
        }
        if (*have == cap) {
            return -1;
        }
        n = read(fd, buf + *have, cap - *have);
        if (n <= 0) {
            return -1;
        }
        *have += n;
    }

    hl = he + 4 - buf;
    status = atoi(buf + 9);
    clen = 0;
    for (p = buf, end = he; p < end; p++) {
        if ((*p == 'c' || *p == 'C') && strncasecmp(p, "content-length:", 15)
                                        == 0)
        {
            clen = atol(p + 15);
        }
        if ((*p == 't' || *p == 'T')
            && strncasecmp(p, "transfer-encoding:", 18) == 0)
        {
            return -1;          /* not expected from nchan */
        }
    }

    need = hl + (size_t) clen;
    while (*have < need) {
        if (need > cap) {
            return -1;
        }
        n = read(fd, buf + *have, cap - *have);
        if (n <= 0) {
            return -1;
        }
        *have += n;
    }

    memmove(buf, buf + need, *have - need);
    *have -= need;
    return status;
}


static void *
http_pub_main(void *arg)
{
    char     body[GIFT_JSON_MAX], req[GIFT_JSON_MAX + 512], resp[16384];
    int      fd, status;
    size_t   blen, rlen, have;
    int64_t  k, ns;

    (void) arg;
    have = 0;
    fd = http_connect(&cfg.http_pub);
    if (fd < 0) {
        fprintf(stderr, "fanbench: connect to the publisher: %s\n",
                strerror(errno));
        atomic_fetch_add(&pp->errors, 1);
        return NULL;
    }

    for (;;) {
        k = atomic_fetch_add(&pp->next, 1);
        ns = pace(k);
        if (ns < 0) {
            break;
        }

        blen = message_json(ns, pp->first + k, body, sizeof(body));
        rlen = snprintf(req, sizeof(req),
                        "POST %s HTTP/1.1\r\nHost: %s:%d\r\n"
                        "Content-Type: application/json\r\n"
                        "Content-Length: %zu\r\n\r\n",
                        cfg.http_pub.path, cfg.http_pub.host,
                        cfg.http_pub.port, blen);
        memcpy(req + rlen, body, blen);
        rlen += blen;

        if (write(fd, req, rlen) != (ssize_t) rlen) {
            atomic_fetch_add(&pp->errors, 1);
            break;
        }
        atomic_fetch_add(&pp->sent, 1);
        atomic_store(&pp->last_sent_mono, mono_ns());

        status = http_response(fd, resp, sizeof(resp), &have);
        if (status < 200 || status > 299) {
            if (atomic_fetch_add(&pp->errors, 1) < 3) {
                fprintf(stderr, "fanbench: publish: HTTP %d\n", status);
            }
            if (status < 0) {
                break;
            }
        }
    }

    close(fd);
    return NULL;
}


/* --- selftest: a trivial SSE server (blocking writes, batches of 16) */

static int    self_lfd;
static int   *self_fds;
static int    self_n;


static void *
self_accept_main(void *arg)
{
    static const char  hdr[] = "HTTP/1.1 200 OK\r\n"
                               "Content-Type: text/event-stream\r\n"
                               "Transfer-Encoding: chunked\r\n\r\n";
    char               buf[4096];
    int                fd;

    (void) arg;
    while (self_n < cfg.clients) {
        fd = accept4(self_lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) {
                continue;
            }
            break;
        }
        if (read(fd, buf, sizeof(buf)) <= 0
            || write(fd, hdr, sizeof(hdr) - 1) != sizeof(hdr) - 1)
        {
            close(fd);
            continue;
        }
        self_fds[self_n++] = fd;
    }
    return NULL;
}


static void
self_server_init(void)
{
    struct sockaddr_in  a;
    socklen_t           al = sizeof(a);
    pthread_t           t;

    self_fds = calloc(cfg.clients, sizeof(int));
    self_lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (self_fds == NULL || self_lfd < 0
        || bind(self_lfd, (struct sockaddr *) &a, sizeof(a)) != 0
        || listen(self_lfd, 4096) != 0
        || getsockname(self_lfd, (struct sockaddr *) &a, &al) != 0)
    {
        die("selftest server: %s", strerror(errno));
    }
    cfg.url.addr = a;
    snprintf(cfg.url.host, sizeof(cfg.url.host), "127.0.0.1");
    cfg.url.port = ntohs(a.sin_port);
    snprintf(cfg.url.path, sizeof(cfg.url.path), "/");
    if (pthread_create(&t, NULL, self_accept_main, NULL) != 0) {
        die("pthread_create");
    }
    pthread_detach(t);
}


#define SELF_BATCH  16

static void *
self_pub_main(void *arg)
{
    char      *buf, *p, json[GIFT_JSON_MAX];
    size_t     jl, len;
    int64_t    k, ns, i;
    int        j;

    (void) arg;
    buf = malloc(SELF_BATCH * (GIFT_JSON_MAX + 64) + 64);
    if (buf == NULL) {
        return NULL;
    }

    for (;;) {
        k = atomic_fetch_add(&pp->next, SELF_BATCH);
        ns = pace(k + SELF_BATCH - 1);
        if (ns < 0) {
            break;
        }
        p = buf + 10;                       /* room for the chunk size */
        for (i = 0; i < SELF_BATCH; i++) {
            jl = message_json(ns, pp->first + k + i, json, sizeof(json));
            p += sprintf(p, "id: %" PRId64 "\nevent: ack\ndata: ",
                         pp->first + k + i + 1);
            memcpy(p, json, jl);
            p += jl;
            *p++ = '\n';
            *p++ = '\n';
        }
        len = p - (buf + 10);
        *p++ = '\r';
        *p++ = '\n';
        j = snprintf(json, 16, "%zx\r\n", len);
        memcpy(buf + 10 - j, json, j);

        for (j = 0; j < self_n; j++) {
            if (self_fds[j] >= 0
                && write(self_fds[j], buf + 10 - strlen(json),
                         p - (buf + 10 - strlen(json))) < 0)
            {
                close(self_fds[j]);
                self_fds[j] = -1;
            }
        }
        atomic_fetch_add(&pp->sent, SELF_BATCH);
        atomic_store(&pp->last_sent_mono, mono_ns());
    }

    free(buf);
    return NULL;
}


/* ------------------------------------------------------------ phases */

typedef struct {
    const char  *name;
    double       rate;
    double       duration;
    int          window;
    int64_t      max_msgs;
    int          clients;
    int64_t      published;
    int64_t      pub_errors;
    int64_t      stalls;
    double       pub_late_max_ms;     /* fixed rate: behind the schedule */
    double       pub_seconds;
    double       seconds;             /* first publish -> last delivery */
    double       wall;                /* phase start -> drained */
    stats_t      st;
    uint64_t     expected;
    int64_t      lost;
    double       dps;
    double       p50, p90, p99, p999;
    double       client_cpu_pct;      /* all client threads, % of a core */
    double       client_cpu_max_pct;  /* busiest client thread */
    double       process_cpu_pct;     /* fanbench, publisher included */
    double       worker_cpu_pct;      /* the server's worker (--rss-pid) */
    double       worker_us_per_delivery;
    double       machine_busy_pct;    /* all cores, everyone's processes */
    double       others_pct;          /* of that, not fanbench nor worker */
} phase_t;


static void
run_phase(phase_t *ph, int64_t first)
{
    int          i, nthr;
    int64_t      t_start, t_drain_end, pub_t0, last_prog, cc0, cm0, cc1, cm1;
    int64_t      pc0, pc1, wc0, wc1, rt0;
    uint64_t     mb0, mt0, mb1, mt1;
    long         ncpu;
    uint64_t     d, dprev, want;
    pthread_t    tids[16];
    void        *(*fn)(void *);
    phase_pub_t  p;

    memset(&p, 0, sizeof(p));
    p.first = first;
    p.rate = ph->rate;
    p.window = ph->window;
    p.max_msgs = ph->max_msgs;
    p.clients = count_open();
    ph->clients = p.clients;

    atomic_store(&phase_first, first);
    stats_reset();
    pp = &p;

    client_cpu(&cc0, &cm0);
    pc0 = process_cpu_ns();
    wc0 = proc_cpu_ns(cfg.rss_pid);
    machine_cpu(&mb0, &mt0);

    t_start = mono_ns();
    rt0 = now_ns();
    p.t0 = t_start;
    p.t_end = t_start + (int64_t) (ph->duration * 1e9);
    p.mono2real = rt0 - t_start;

    nthr = 1;
    switch (cfg.pub) {
    case PUB_NATS:
        fn = nats_pub_main;
        break;
    case PUB_HTTP:
        fn = http_pub_main;
        nthr = cfg.pub_conns;
        break;
    default:
        fn = self_pub_main;
        break;
    }
    if (nthr > 16) {
        nthr = 16;
    }
    for (i = 0; i < nthr; i++) {
        if (pthread_create(&tids[i], NULL, fn, NULL) != 0) {
            die("pthread_create");
        }
    }
    for (i = 0; i < nthr; i++) {
        pthread_join(tids[i], NULL);
    }
    if (cfg.pub == PUB_NATS) {
        nats_pub_complete();
    }
    pub_t0 = t_start;
    ph->published = atomic_load(&p.sent);
    ph->pub_errors = atomic_load(&p.errors);
    ph->stalls = atomic_load(&p.stalls);
    ph->pub_late_max_ms = atomic_load(&p.late_max) / 1e6;
    ph->pub_seconds = (atomic_load(&p.last_sent_mono) - pub_t0) / 1e9;

    /* drain: until everything arrived, or nothing more for 2 s */
    want = (uint64_t) ph->published * (uint64_t) p.clients;
    dprev = 0;
    last_prog = mono_ns();
    for (;;) {
        d = delivered_total();
        if (d >= want || interrupted) {
            break;
        }
        if (d != dprev) {
            dprev = d;
            last_prog = mono_ns();
        } else if (mono_ns() - last_prog > 2000000000LL
                   || mono_ns() - last_prog > (int64_t) (cfg.drain_s * 1e9))
        {
            break;
        }
        sleep_ns(2000000);
    }
    sleep_ns(50000000);         /* stray duplicates, if any */
    t_drain_end = mono_ns();

    client_cpu(&cc1, &cm1);
    pc1 = process_cpu_ns();
    wc1 = proc_cpu_ns(cfg.rss_pid);
    machine_cpu(&mb1, &mt1);

    stats_collect(&ph->st);
    pp = NULL;

    ph->wall = (t_drain_end - t_start) / 1e9;
    ph->expected = want;
    ph->lost = (int64_t) want - (int64_t) ph->st.delivered;
    ph->seconds = ph->st.last_ns > rt0 ? (ph->st.last_ns - rt0) / 1e9 : 0;
    ph->dps = ph->seconds > 0 ? ph->st.delivered / ph->seconds : 0;
    ph->p50 = hist_pct(ph->st.hist, ph->st.delivered, 50);
    ph->p90 = hist_pct(ph->st.hist, ph->st.delivered, 90);
    ph->p99 = hist_pct(ph->st.hist, ph->st.delivered, 99);
    ph->p999 = hist_pct(ph->st.hist, ph->st.delivered, 99.9);
    ph->client_cpu_pct = 100.0 * (cc1 - cc0) / (t_drain_end - t_start);
    ph->client_cpu_max_pct = 100.0 * (cm1 - cm0) / (t_drain_end - t_start);
    ph->process_cpu_pct = 100.0 * (pc1 - pc0) / (t_drain_end - t_start);
    ph->worker_cpu_pct = wc0 >= 0 && wc1 >= 0
                         ? 100.0 * (wc1 - wc0) / (t_drain_end - t_start)
                         : -1;
    ph->worker_us_per_delivery = wc0 >= 0 && wc1 >= 0 && ph->st.delivered
                                 ? (wc1 - wc0) / 1000.0 / ph->st.delivered
                                 : -1;
    ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    ph->machine_busy_pct = mt1 > mt0
                           ? 100.0 * ncpu * (mb1 - mb0) / (mt1 - mt0) : -1;
    ph->others_pct = ph->machine_busy_pct - ph->process_cpu_pct
                     - (ph->worker_cpu_pct > 0 ? ph->worker_cpu_pct : 0);
}


static void
phase_print(const phase_t *ph)
{
    fprintf(stderr,
        "  %-5s %s %.0f, %d clients: published %" PRId64 " in %.2f s "
        "(%" PRId64 " errors, %.1f ms behind schedule at most)\n"
        "       delivered %" PRIu64 " of %" PRIu64 " (lost %" PRId64
        ", gaps %" PRIu64 ", dups %" PRIu64 ", stray %" PRIu64
        ", closed %" PRIu64 ") in %.2f s: %.0f deliveries/s\n"
        "       latency us p50 %.0f p90 %.0f p99 %.0f p99.9 %.0f max %" PRIu64
        "\n"
        "       %.1f events/read, %.1f reads/round; CPU %%: client threads "
        "%.0f (busiest %.0f), fanbench %.0f, server worker %.0f (%.2f us "
        "per delivery); machine %.0f of %ld, others %.0f\n",
        ph->name, ph->rate > 0 ? "msg/s" : "window",
        ph->rate > 0 ? ph->rate : (double) ph->window, ph->clients,
        ph->published, ph->pub_seconds, ph->pub_errors, ph->pub_late_max_ms,
        ph->st.delivered, ph->expected, ph->lost, ph->st.gaps, ph->st.dups,
        ph->st.stray, ph->st.closed, ph->seconds, ph->dps,
        ph->p50, ph->p90, ph->p99, ph->p999, ph->st.lat_max,
        ph->st.reads ? (double) (ph->st.delivered + ph->st.comments)
                       / ph->st.reads : 0,
        ph->st.rounds ? (double) ph->st.reads / ph->st.rounds : 0,
        ph->client_cpu_pct, ph->client_cpu_max_pct, ph->process_cpu_pct,
        ph->worker_cpu_pct, ph->worker_us_per_delivery, ph->machine_busy_pct,
        100 * sysconf(_SC_NPROCESSORS_ONLN), ph->others_pct);
}


static void
phase_json(FILE *f, const phase_t *ph)
{
    fprintf(f,
        "{\"rate\":%.3f,\"window\":%d,\"clients\":%d,\"published\":%" PRId64
        ",\"publish_errors\":%" PRId64 ",\"publish_seconds\":%.3f,"
        "\"publish_behind_schedule_max_ms\":%.2f,"
        "\"window_stalls\":%" PRId64 ",\"expected\":%" PRIu64
        ",\"delivered\":%" PRIu64 ",\"lost\":%" PRId64 ",\"gaps\":%" PRIu64
        ",\"dups\":%" PRIu64 ",\"stray\":%" PRIu64 ",\"closed\":%" PRIu64
        ",\"seconds\":%.3f,\"deliveries_per_s\":%.0f,"
        "\"latency_us\":{\"p50\":%.0f,\"p90\":%.0f,\"p99\":%.0f,"
        "\"p999\":%.0f,\"max\":%" PRIu64 "},"
        "\"reads\":%" PRIu64 ",\"events_per_read\":%.2f,"
        "\"client_cpu_pct\":%.1f,\"client_cpu_busiest_thread_pct\":%.1f,"
        "\"fanbench_cpu_pct\":%.1f,\"server_worker_cpu_pct\":%.1f,"
        "\"worker_us_per_delivery\":%.3f,\"machine_busy_pct\":%.1f,"
        "\"others_cpu_pct\":%.1f,\"reordered\":%" PRIu64 ","
        "\"wall_seconds\":%.3f}",
        ph->rate, ph->window, ph->clients, ph->published, ph->pub_errors,
        ph->pub_seconds, ph->pub_late_max_ms, ph->stalls, ph->expected, ph->st.delivered,
        ph->lost, ph->st.gaps, ph->st.dups, ph->st.stray, ph->st.closed,
        ph->seconds, ph->dps, ph->p50, ph->p90, ph->p99, ph->p999,
        ph->st.lat_max, ph->st.reads,
        ph->st.reads ? (double) (ph->st.delivered + ph->st.comments)
                       / ph->st.reads : 0,
        ph->client_cpu_pct, ph->client_cpu_max_pct, ph->process_cpu_pct,
        ph->worker_cpu_pct, ph->worker_us_per_delivery, ph->machine_busy_pct,
        ph->others_pct, ph->st.reordered, ph->wall);
}


/* ------------------------------------------------------------ commands */

static void
usage(void)
{
    fputs(
"usage: fanbench run      -u URL -c N (--nats URL | --http-pub URL) [opts]\n"
"       fanbench clients  -u URL -c N -d SECONDS [opts]\n"
"       fanbench publish  (--nats URL | --http-pub URL) [-r RATE] -d SECONDS\n"
"       fanbench selftest -c N [-d SECONDS] [opts]\n"
"  -u, --url URL          subscriber URL (http://127.0.0.1:8080/gift/events)\n"
"      --ws               WebSocket instead of SSE\n"
"  -c, --clients N        concurrent clients (default 1)\n"
"  -T, --threads N        client threads, one epoll each (default 1)\n"
"      --batch-us US      a client thread reads at most once per US (1000;\n"
"                         0: every event at once)\n"
"      --connect-parallel N  connections being opened at once (512)\n"
"      --quickack         TCP_QUICKACK after each read (no delayed ACKs;\n"
"                         diagnosis: browsers do not do this)\n"
"      --nats URL         publish GiftAcks to JetStream (our module)\n"
"      --subject S        subject (gift.acks.motor_01)\n"
"      --http-pub URL     POST the JSON to an nchan publisher location\n"
"      --pub-conns N      keep-alive publisher connections (1)\n"
"  -d, --duration S       the \"max\" phase (run), or the run (5)\n"
"  -w, --window N         max phase: messages not yet delivered to all (64)\n"
"  -r, --rate R           publish: messages/s (0: max)\n"
"      --lat-dps D        lat phase: D deliveries/s, i.e. D/N msg/s (20000)\n"
"      --lat-rate R       lat phase: R msg/s (overrides --lat-dps)\n"
"      --lat-duration S   lat phase duration (5; 0: none)\n"
"      --burst M          then phase \"burst\": M messages at once (no\n"
"                         window), all must arrive (0: none)\n"
"  -s, --size B           acknowledgement JSON size (360)\n"
"      --rss-pid PID      the server worker: RSS (idle clients) and CPU\n"
"      --settle-ms MS     wait after connecting before sampling RSS (2000)\n"
"      --label NAME       put in the JSON\n", stderr);
    exit(2);
}


static void
on_signal(int sig)
{
    (void) sig;
    interrupted = 1;
}


int
main(int argc, char **argv)
{
    int          opt, mode, i;
    long         rss0, anon0, shm0, rss1, anon1, shm1, rss2, anon2, shm2;
    int64_t      next_index, cc0, cm0, cc1, cm1, t0;
    phase_t      phases[3];
    int          nphases;
    const char  *cmd;
    stats_t      st;
    struct rlimit  rl;

    static const struct option  longopts[] = {
        { "url", required_argument, NULL, 'u' },
        { "ws", no_argument, NULL, 'W' },
        { "clients", required_argument, NULL, 'c' },
        { "threads", required_argument, NULL, 'T' },
        { "batch-us", required_argument, NULL, 'b' },
        { "connect-parallel", required_argument, NULL, 'P' },
        { "quickack", no_argument, NULL, 'Q' },
        { "nats", required_argument, NULL, 'n' },
        { "subject", required_argument, NULL, 'S' },
        { "http-pub", required_argument, NULL, 'h' },
        { "pub-conns", required_argument, NULL, 'C' },
        { "duration", required_argument, NULL, 'd' },
        { "window", required_argument, NULL, 'w' },
        { "rate", required_argument, NULL, 'r' },
        { "lat-dps", required_argument, NULL, 'D' },
        { "lat-rate", required_argument, NULL, 'R' },
        { "lat-duration", required_argument, NULL, 'L' },
        { "burst", required_argument, NULL, 'B' },
        { "size", required_argument, NULL, 's' },
        { "rss-pid", required_argument, NULL, 'p' },
        { "settle-ms", required_argument, NULL, 'M' },
        { "label", required_argument, NULL, 'l' },
        { NULL, 0, NULL, 0 }
    };

    if (argc < 2) {
        usage();
    }
    cmd = argv[1];
    if (strcmp(cmd, "run") == 0) {
        mode = 0;
    } else if (strcmp(cmd, "clients") == 0) {
        mode = 1;
    } else if (strcmp(cmd, "publish") == 0) {
        mode = 2;
    } else if (strcmp(cmd, "selftest") == 0) {
        mode = 3;
    } else {
        usage();
        return 2;
    }

    cfg.clients = 1;
    optind = 2;
    while ((opt = getopt_long(argc, argv, "u:c:T:d:w:r:s:", longopts, NULL))
           != -1)
    {
        switch (opt) {
        case 'u':
            if (parse_url(optarg, &cfg.url) != 0) {
                die("bad URL %s (http://IPv4:port/path)", optarg);
            }
            break;
        case 'W': cfg.proto = PROTO_WS; break;
        case 'c': cfg.clients = atoi(optarg); break;
        case 'T': cfg.threads = atoi(optarg); break;
        case 'b': cfg.batch_us = atoi(optarg); break;
        case 'P': cfg.connect_parallel = atoi(optarg); break;
        case 'Q': cfg.quickack = 1; break;
        case 'n': cfg.pub = PUB_NATS; cfg.nats_url = optarg; break;
        case 'S': cfg.subject = optarg; break;
        case 'h':
            if (parse_url(optarg, &cfg.http_pub) != 0) {
                die("bad URL %s", optarg);
            }
            cfg.pub = PUB_HTTP;
            break;
        case 'C': cfg.pub_conns = atoi(optarg); break;
        case 'd': cfg.duration = atof(optarg); break;
        case 'w': cfg.window = atoi(optarg); break;
        case 'r': cfg.rate = atof(optarg); break;
        case 'D': cfg.lat_dps = atof(optarg); break;
        case 'R': cfg.lat_rate = atof(optarg); break;
        case 'L': cfg.lat_duration = atof(optarg); break;
        case 'B': cfg.burst = atoll(optarg); break;
        case 's': cfg.size = atoi(optarg); break;
        case 'p': cfg.rss_pid = atoi(optarg); break;
        case 'M': cfg.settle_ms = atoi(optarg); break;
        case 'l': cfg.label = optarg; break;
        default: usage();
        }
    }
    if (cfg.clients < 1 || cfg.threads < 1 || cfg.threads > cfg.clients) {
        die("need clients >= threads >= 1");
    }
    if (cfg.window < 1) {
        cfg.window = 1;
    }

    debug = getenv("FANBENCH_DEBUG") != NULL;
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    /* room for the clients' descriptors */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0
        && rl.rlim_cur < (rlim_t) cfg.clients + 256)
    {
        rl.rlim_cur = (rlim_t) cfg.clients + 256;
        if (rl.rlim_max < rl.rlim_cur) {
            rl.rlim_max = rl.rlim_cur;
        }
        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
            die("%d clients need %d descriptors: %s (ulimit -n)",
                cfg.clients, cfg.clients + 256, strerror(errno));
        }
    }

    start_ns = now_ns() - 1000000000LL;     /* events sent since, are ours */
    message_init();

    /* ---- publisher only */
    if (mode == 2) {
        phase_t  ph;

        if (cfg.pub == PUB_NONE) {
            die("publish needs --nats or --http-pub");
        }
        if (cfg.pub == PUB_NATS) {
            nats_pub_init();
        }
        workers = NULL;
        cfg.threads = 0;
        memset(&ph, 0, sizeof(ph));
        ph.name = "pub";
        ph.rate = cfg.rate;         /* 0: as fast as possible */
        ph.duration = cfg.duration;
        ph.window = cfg.window;
        cfg.drain_s = 0;
        run_phase(&ph, 0);
        fprintf(stderr, "published %" PRId64 " in %.2f s (%.0f msg/s), "
                "%" PRId64 " errors\n", ph.published, ph.pub_seconds,
                ph.pub_seconds > 0 ? ph.published / ph.pub_seconds : 0,
                ph.pub_errors);
        printf("{\"published\":%" PRId64 ",\"seconds\":%.3f,\"errors\":%"
               PRId64 "}\n", ph.published, ph.pub_seconds, ph.pub_errors);
        return ph.pub_errors ? 1 : 0;
    }

    if (mode == 3) {
        cfg.pub = PUB_SELF;
        self_server_init();
    } else if (cfg.url.port == 0) {
        die("-u URL is needed");
    }
    if (mode == 0 && cfg.pub == PUB_NONE) {
        die("run needs --nats or --http-pub");
    }
    if (cfg.pub == PUB_NATS) {
        nats_pub_init();
    }

    proc_rss(cfg.rss_pid, &rss0, &anon0, &shm0);

    t0 = mono_ns();
    workers_start();
    if (wait_connected(cfg.clients / 200.0 + 10) != 0 && count_ready() == 0) {
        die("no client connected to %s:%d%s", cfg.url.host, cfg.url.port,
            cfg.url.path);
    }
    fprintf(stderr, "fanbench %s%s%s: %d of %d clients connected in %.2f s "
            "(%d failed)\n", cmd, *cfg.label ? " " : "", cfg.label,
            count_ready(), cfg.clients, (mono_ns() - t0) / 1e9,
            count_failed());

    sleep_ns((int64_t) cfg.settle_ms * 1000000);
    proc_rss(cfg.rss_pid, &rss1, &anon1, &shm1);

    /* ---- clients only: count whatever comes for the duration */
    if (mode == 1) {
        atomic_store(&phase_first, 0);
        stats_reset();
        client_cpu(&cc0, &cm0);
        t0 = mono_ns();
        sleep_ns((int64_t) (cfg.duration * 1e9));
        client_cpu(&cc1, &cm1);
        stats_collect(&st);
        fprintf(stderr, "delivered %" PRIu64 " (gaps %" PRIu64 ", dups %"
                PRIu64 ", closed %" PRIu64 "), %.0f deliveries/s; latency "
                "us p50 %.0f p99 %.0f max %" PRIu64 "; client CPU %.0f%%\n",
                st.delivered, st.gaps, st.dups, st.closed,
                st.delivered / cfg.duration,
                hist_pct(st.hist, st.delivered, 50),
                hist_pct(st.hist, st.delivered, 99), st.lat_max,
                100.0 * (cc1 - cc0) / (mono_ns() - t0));
        printf("{\"delivered\":%" PRIu64 ",\"gaps\":%" PRIu64 ",\"dups\":%"
               PRIu64 ",\"p50_us\":%.0f,\"p99_us\":%.0f}\n", st.delivered,
               st.gaps, st.dups, hist_pct(st.hist, st.delivered, 50),
               hist_pct(st.hist, st.delivered, 99));
        workers_stop();
        return 0;
    }

    /* ---- run / selftest: phases */
    memset(phases, 0, sizeof(phases));
    nphases = 0;
    next_index = 0;

    if (cfg.duration > 0) {
        phases[nphases].name = "max";
        phases[nphases].rate = cfg.rate;
        phases[nphases].window = cfg.window;
        phases[nphases].duration = cfg.duration;
        nphases++;
    }
    if (mode == 0 && cfg.lat_duration > 0) {
        phases[nphases].name = "lat";
        phases[nphases].rate = cfg.lat_rate > 0 ? cfg.lat_rate
                               : cfg.lat_dps / cfg.clients;
        phases[nphases].window = cfg.window;
        phases[nphases].duration = cfg.lat_duration;
        nphases++;
    }

    if (mode == 0 && cfg.burst > 0) {
        phases[nphases].name = "burst";
        phases[nphases].rate = 0;
        phases[nphases].window = (int) (cfg.burst < INT32_MAX ? cfg.burst
                                                                 : INT32_MAX);
        phases[nphases].max_msgs = cfg.burst;
        phases[nphases].duration = 30;
        nphases++;
    }

    for (i = 0; i < nphases && !interrupted; i++) {
        run_phase(&phases[i], next_index);
        next_index += phases[i].published + 1000;
        phase_print(&phases[i]);
    }

    proc_rss(cfg.rss_pid, &rss2, &anon2, &shm2);

    printf("{\"label\":\"%s\",\"mode\":\"%s\",\"url\":\"http://%s:%d%s\","
           "\"proto\":\"%s\",\"clients\":%d,\"connected\":%d,"
           "\"connect_failed\":%d,\"threads\":%d,\"batch_us\":%d,"
           "\"json_size\":%d,\"rss_kib\":{\"before\":%ld,\"idle\":%ld,"
           "\"after\":%ld},\"anon_kib\":{\"before\":%ld,\"idle\":%ld,"
           "\"after\":%ld},\"shmem_kib\":{\"before\":%ld,\"idle\":%ld,"
           "\"after\":%ld},\"kib_per_idle_client\":%.2f,"
           "\"kib_per_client_after\":%.2f",
           cfg.label, cmd, cfg.url.host, cfg.url.port, cfg.url.path,
           cfg.proto == PROTO_WS ? "ws" : "sse", cfg.clients, count_ready(),
           count_failed(), cfg.threads, cfg.batch_us, cfg.size,
           rss0, rss1, rss2, anon0, anon1, anon2, shm0, shm1, shm2,
           rss0 >= 0 ? (double) (rss1 - rss0) / cfg.clients : -1.0,
           rss0 >= 0 ? (double) (rss2 - rss0) / cfg.clients : -1.0);
    for (i = 0; i < nphases; i++) {
        printf(",\"%s\":", phases[i].name);
        phase_json(stdout, &phases[i]);
    }
    printf("}\n");
    fflush(stdout);

    if (cfg.rss_pid > 0) {
        fprintf(stderr, "  server worker RSS KiB: %ld before, %ld with %d "
                "idle clients (%.2f KiB each), %ld after the phases\n",
                rss0, rss1, count_ready(),
                (double) (rss1 - rss0) / cfg.clients, rss2);
    }

    workers_stop();
    return 0;
}
