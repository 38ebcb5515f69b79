/*
 * GIFT_ACKS, followed on the worker's NATS connection for the SSE and
 * WebSocket clients.
 *
 * An ordered consumer, as the NATS clients build it: an ephemeral push
 * consumer (no acks, flow control, idle heartbeats every 5 s, in memory)
 * delivering to "<inbox>.d.<gen>" (sid "fd<gen>"); JetStream API answers
 * come on "<inbox>.c.<n>" (sid "fc").  Each delivery's reply subject
 * carries its stream and consumer sequences; a consumer sequence out of
 * order, a heartbeat that reports more than we got, or 15 s without a
 * message or a heartbeat, and the consumer is replaced by a new one that
 * starts after the last stream sequence we have (a new <gen>: late
 * deliveries of the old one are dropped).  The first one starts
 * gift_sse_replay_max messages back, so that the replay ring is full from
 * the start.  What one read brings is framed and handed to the fan-out in
 * one batch.
 *
 * A worker without streaming clients for gift_sse_idle_follow stops
 * following (its consumer is deleted): each worker that follows costs
 * nats-server a delivery, and the worker a wake-up, per acknowledgement.
 * The next client starts it again: STREAM.INFO says where the stream is;
 * the consumer starts after the last sequence the ring has, or, when more
 * than gift_sse_replay_max went by, that far back from the end (the ring
 * is emptied and clients behind get an `event: gap`).  A client without
 * Last-Event-ID that comes meanwhile is parked until STREAM.INFO answers:
 * it gets what is stored after that, and its response only then.
 */

#include "ngx_http_gift_nats.h"

#include <jansson.h>


#define NGX_HTTP_GIFT_FOLLOW_HB        5000
#define NGX_HTTP_GIFT_FOLLOW_RETRY     1000


typedef enum {
    NGX_HTTP_GIFT_FOLLOW_IDLE = 0,
    NGX_HTTP_GIFT_FOLLOW_INFO,          /* STREAM.INFO sent */
    NGX_HTTP_GIFT_FOLLOW_CREATE,        /* CONSUMER.CREATE sent */
    NGX_HTTP_GIFT_FOLLOW_ACTIVE
} ngx_http_gift_follow_state_e;


typedef struct {
    ngx_log_t                     *log;
    ngx_uint_t                     replay_max;
    ngx_http_gift_follow_state_e   fstate;
    uint64_t                       fctl;        /* JetStream API request */
    uint64_t                       fgen;        /* deliver subject */
    uint64_t                       fsub;        /* the one subscribed */
    u_char                         consumer[128];
    size_t                         consumer_len;
    ngx_uint_t                     started;     /* origin is set */
    uint64_t                       origin;
    uint64_t                       last_sseq;
    uint64_t                       next_cseq;
    ngx_uint_t                     followed;    /* "following" logged */
    ngx_uint_t                     fwarned;
    ngx_msec_t                     fseen;       /* last message, heartbeat */
    ngx_event_t                    follow_ev;
    ngx_msec_t                     idle_follow;
    ngx_event_t                    idle_ev;     /* no client since */
    ngx_uint_t                     paused;      /* not followed: no client */
    ngx_uint_t                     resuming;    /* STREAM.INFO, then on */
    ngx_http_gift_frame_t        **frames;      /* read, not yet delivered */
    size_t                         nframes;
    size_t                         frames_cap;
    ngx_http_gift_nats_user_t      user;
} ngx_http_gift_follow_t;


static void ngx_http_gift_follow_start(ngx_http_gift_follow_t *p,
    const char *why);
static void ngx_http_gift_follow_handler(ngx_event_t *ev);
static void ngx_http_gift_follow_control(ngx_http_gift_follow_t *p,
    const u_char *subj, size_t slen, const u_char *data, size_t len);
static void ngx_http_gift_follow_deliver(ngx_http_gift_follow_t *p,
    uint64_t gen, u_char *reply, size_t rlen, u_char *hdr, size_t hlen,
    u_char *data, size_t len);
static uint64_t ngx_http_gift_follow_num(u_char *s, size_t len);
static ngx_int_t ngx_http_gift_follow_handshake(void *data);
static void ngx_http_gift_follow_connected(void *data);
static void ngx_http_gift_follow_disconnected(void *data, uint64_t written);
static void ngx_http_gift_follow_message(void *data,
    ngx_http_gift_nats_msg_t *m);
static void ngx_http_gift_follow_flush_frames(void *data);


static void ngx_http_gift_follow_idle_handler(ngx_event_t *ev);
static ngx_int_t ngx_http_gift_follow_pub(ngx_http_gift_follow_t *p,
    const char *subject, size_t slen, ngx_uint_t reply, u_char *data,
    size_t len);


static ngx_http_gift_follow_t  *ngx_http_gift_follow;


ngx_int_t
ngx_http_gift_follow_init_process(ngx_cycle_t *cycle,
    ngx_http_gift_main_conf_t *gmcf)
{
    ngx_http_gift_follow_t  *p;

    p = ngx_pcalloc(cycle->pool, sizeof(ngx_http_gift_follow_t));
    if (p == NULL) {
        return NGX_ERROR;
    }

    p->log = cycle->log;
    p->replay_max = gmcf->replay_max;
    p->follow_ev.handler = ngx_http_gift_follow_handler;
    p->follow_ev.data = p;
    p->follow_ev.log = cycle->log;
    p->follow_ev.cancelable = 1;
    p->idle_follow = gmcf->idle_follow;
    p->idle_ev.handler = ngx_http_gift_follow_idle_handler;
    p->idle_ev.data = p;
    p->idle_ev.log = cycle->log;
    p->idle_ev.cancelable = 1;

    p->user.sid = 'f';
    p->user.handshake = ngx_http_gift_follow_handshake;
    p->user.connected = ngx_http_gift_follow_connected;
    p->user.disconnected = ngx_http_gift_follow_disconnected;
    p->user.message = ngx_http_gift_follow_message;
    p->user.read_done = ngx_http_gift_follow_flush_frames;
    p->user.data = p;

    ngx_http_gift_follow = p;

    /* no client yet: the ring is filled, and then, without one, let go */
    ngx_http_gift_follow_clients(0);

    return ngx_http_gift_nats_add_user(&p->user);
}


void
ngx_http_gift_follow_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_gift_follow_t  *p;

    p = ngx_http_gift_follow;
    if (p == NULL) {
        return;
    }

    ngx_http_gift_follow = NULL;

    if (p->follow_ev.timer_set) {
        ngx_del_timer(&p->follow_ev);
    }

    if (p->idle_ev.timer_set) {
        ngx_del_timer(&p->idle_ev);
    }

    while (p->nframes) {
        ngx_free(p->frames[--p->nframes]);
    }
    ngx_free(p->frames);
    p->frames = NULL;
}


/* the JetStream API's answers, before the handshake's PING */
static ngx_int_t
ngx_http_gift_follow_handshake(void *data)
{
    u_char     *o;
    ngx_str_t  *inbox;

    inbox = ngx_http_gift_nats_inbox();

    o = ngx_http_gift_nats_out(inbox->len + sizeof("SUB .c.* fc\r\n"));
    if (o == NULL) {
        return NGX_ERROR;
    }

    (void) ngx_http_gift_nats_queue(ngx_sprintf(o, "SUB %V.c.* fc\r\n",
                                                inbox));

    return NGX_OK;
}


static void
ngx_http_gift_follow_connected(void *data)
{
    ngx_http_gift_follow_t *p = data;

    if (p->paused) {
        return;                     /* the next client starts it */
    }

    ngx_http_gift_follow_start(p, "connected");
}


void
ngx_http_gift_follow_clients(ngx_uint_t n)
{
    ngx_http_gift_follow_t  *p;

    p = ngx_http_gift_follow;
    if (p == NULL || p->idle_follow == 0) {
        return;
    }

    if (n == 0) {
        if (!p->idle_ev.timer_set && !p->paused) {
            ngx_add_timer(&p->idle_ev, p->idle_follow);
        }
        return;
    }

    if (p->idle_ev.timer_set) {
        ngx_del_timer(&p->idle_ev);
    }

    if (!p->paused) {
        return;
    }

    p->paused = 0;
    p->resuming = 1;

    ngx_log_error(NGX_LOG_NOTICE, p->log, 0,
                  "gift: GIFT_ACKS followed again for a streaming client");

    if (!ngx_http_gift_nats_up()) {
        /* no "now" to wait for: from what the ring has, as in an outage */
        ngx_http_gift_fanout_unpark(p->last_sseq);
        return;                     /* started once connected */
    }

    ngx_http_gift_follow_start(p, "a streaming client");
}


ngx_uint_t
ngx_http_gift_follow_parking(void)
{
    ngx_http_gift_follow_t  *p;

    p = ngx_http_gift_follow;

    return p != NULL && p->resuming && ngx_http_gift_nats_up();
}


/* No streaming client for gift_sse_idle_follow: stop following. */
static void
ngx_http_gift_follow_idle_handler(ngx_event_t *ev)
{
    u_char                  subj[192], *e;
    ngx_http_gift_follow_t *p = ev->data;

    if (ngx_http_gift_fanout_clients() > 0 || p->paused) {
        return;                     /* a client came */
    }

    if (p->resuming || !p->started) {
        /* the stream has not said where it is yet: later */
        ngx_add_timer(&p->idle_ev, p->idle_follow);
        return;
    }

    if (ngx_http_gift_nats_up()) {
        if (p->consumer_len) {
            e = ngx_snprintf(subj, sizeof(subj),
                             "$JS.API.CONSUMER.DELETE.GIFT_ACKS.%*s",
                             p->consumer_len, p->consumer);
            (void) ngx_http_gift_follow_pub(p, (char *) subj, e - subj, 0,
                                            NULL, 0);
        }

        if (p->fsub) {
            e = ngx_http_gift_nats_out(sizeof("UNSUB fd18446744073709551615"
                                              "\r\n"));
            if (e != NULL) {
                (void) ngx_http_gift_nats_queue(ngx_sprintf(e,
                                                        "UNSUB fd%uL\r\n",
                                                        p->fsub));
            }
        }
    }

    p->consumer_len = 0;
    p->fsub = 0;
    p->fgen++;                      /* what is still on its way: dropped */
    p->fstate = NGX_HTTP_GIFT_FOLLOW_IDLE;
    p->paused = 1;

    if (p->follow_ev.timer_set) {
        ngx_del_timer(&p->follow_ev);
    }

    ngx_log_error(NGX_LOG_NOTICE, p->log, 0,
                  "gift: GIFT_ACKS no longer followed after #%uL: no "
                  "streaming client for %M ms", p->last_sseq, p->idle_follow);
}


/* the server drops the consumer with the connection; a new one later */
static void
ngx_http_gift_follow_disconnected(void *data, uint64_t written)
{
    ngx_http_gift_follow_t *p = data;

    p->fstate = NGX_HTTP_GIFT_FOLLOW_IDLE;
    p->consumer_len = 0;
    p->fsub = 0;
    p->fgen++;

    if (p->follow_ev.timer_set) {
        ngx_del_timer(&p->follow_ev);
    }
}


/* "fc": a JetStream API answer; "fd<gen>": the consumer of <gen> */
static void
ngx_http_gift_follow_message(void *data, ngx_http_gift_nats_msg_t *m)
{
    ngx_http_gift_follow_t *p = data;

    if (m->sid_len == 2 && m->sid[1] == 'c') {
        ngx_http_gift_follow_control(p, m->subject, m->subject_len, m->data,
                                     m->len);

    } else if (m->sid_len > 2 && m->sid[1] == 'd') {
        ngx_http_gift_follow_deliver(p,
                                 ngx_http_gift_follow_num((u_char *) m->sid + 2,
                                                          m->sid_len - 2),
                                 (u_char *) m->reply, m->reply_len,
                                 (u_char *) m->hdr, m->hdr_len,
                                 (u_char *) m->data, m->len);
    }
}



/*
 * An ordered consumer, as the NATS clients build it: an ephemeral push
 * consumer (no acks, flow control, idle heartbeats every 5 s, in memory)
 * delivering to "<inbox>.d.<gen>".  Each delivery's reply subject carries
 * its stream and consumer sequences; a consumer sequence out of order, a
 * heartbeat that reports more than we got, or 15 s without a message or a
 * heartbeat, and the consumer is replaced by a new one that starts after
 * the last stream sequence we have (a new <gen>: late deliveries of the
 * old one are dropped).  The first one starts gift_sse_replay_max messages
 * back, so that the replay ring is full from the start.
 */



/* Append one protocol line and its payload to the output. */
static ngx_int_t
ngx_http_gift_follow_pub(ngx_http_gift_follow_t *p, const char *subject,
    size_t slen, ngx_uint_t reply, u_char *data, size_t len)
{
    u_char     *o;
    ngx_str_t  *inbox;

    inbox = ngx_http_gift_nats_inbox();

    o = ngx_http_gift_nats_out(sizeof("PUB   .c.18446744073709551615 "
                                      "4294967295\r\n\r\n")
                               + slen + inbox->len + len);
    if (o == NULL) {
        return NGX_ERROR;
    }

    if (reply) {
        o = ngx_sprintf(o, "PUB %*s %V.c.%uL %uz\r\n", slen, subject,
                        inbox, p->fctl, len);
    } else {
        o = ngx_sprintf(o, "PUB %*s %uz\r\n", slen, subject, len);
    }
    if (len) {                  /* an empty message may come as NULL */
        o = ngx_cpymem(o, data, len);
    }
    *o++ = '\r';
    *o++ = '\n';

    (void) ngx_http_gift_nats_queue(o);

    return NGX_OK;
}


static void
ngx_http_gift_follow_start(ngx_http_gift_follow_t *p, const char *why)
{
    u_char      subj[192], json[512], *e;
    ngx_str_t  *inbox;

    inbox = ngx_http_gift_nats_inbox();

    if (!ngx_http_gift_nats_up()) {
        return;
    }

    if (p->consumer_len) {
        /* the old consumer goes now, not at its inactivity threshold */
        e = ngx_snprintf(subj, sizeof(subj),
                         "$JS.API.CONSUMER.DELETE.GIFT_ACKS.%*s",
                         p->consumer_len, p->consumer);
        if (ngx_http_gift_follow_pub(p, (char *) subj, e - subj, 0, NULL, 0)
            != NGX_OK)
        {
            return;
        }
        p->consumer_len = 0;

        ngx_log_error(NGX_LOG_INFO, p->log, 0,
                      "gift: GIFT_ACKS consumer replaced (%s)", why);
    }

    p->fgen++;
    p->fctl++;

    if (!p->started || p->resuming) {
        /* where the stream is: the start of the replay */
        p->fstate = NGX_HTTP_GIFT_FOLLOW_INFO;
        if (ngx_http_gift_follow_pub(p,
                          "$JS.API.STREAM.INFO.GIFT_ACKS",
                          sizeof("$JS.API.STREAM.INFO.GIFT_ACKS") - 1, 1,
                          NULL, 0)
            != NGX_OK)
        {
            return;
        }

    } else {
        p->fstate = NGX_HTTP_GIFT_FOLLOW_CREATE;
        p->next_cseq = 1;
        p->fseen = 0;                   /* its own messages will say */

        /*
         * The deliver subject, subscribed exactly (nats-server 2.9 sees no
         * interest in a wildcard) under a sid of its own, so that what the
         * old consumer still sends is told apart and dropped.
         */
        e = ngx_http_gift_nats_out(2 * sizeof("UNSUB fd18446744073709551615"
                                              "\r\n")
                                   + inbox->len + 32);
        if (e == NULL) {
            return;
        }
        if (p->fsub) {
            e = ngx_sprintf(e, "UNSUB fd%uL\r\n", p->fsub);
        }
        e = ngx_sprintf(e, "SUB %V.d.%uL fd%uL\r\n", inbox, p->fgen,
                        p->fgen);
        (void) ngx_http_gift_nats_queue(e);
        p->fsub = p->fgen;

        if (p->last_sseq > 0) {
            e = ngx_snprintf(json, sizeof(json),
                "{\"stream_name\":\"GIFT_ACKS\",\"config\":{"
                "\"deliver_subject\":\"%V.d.%uL\","
                "\"deliver_policy\":\"by_start_sequence\","
                "\"opt_start_seq\":%uL,", inbox, p->fgen,
                p->last_sseq + 1);
        } else {
            e = ngx_snprintf(json, sizeof(json),
                "{\"stream_name\":\"GIFT_ACKS\",\"config\":{"
                "\"deliver_subject\":\"%V.d.%uL\","
                "\"deliver_policy\":\"all\",", inbox, p->fgen);
        }

        e = ngx_snprintf(e, json + sizeof(json) - e,
                "\"ack_policy\":\"none\",\"max_deliver\":1,"
                "\"replay_policy\":\"instant\",\"flow_control\":true,"
                "\"idle_heartbeat\":%uL,\"mem_storage\":true,"
                "\"num_replicas\":1}}",
                (uint64_t) NGX_HTTP_GIFT_FOLLOW_HB * 1000000);

        if (ngx_http_gift_follow_pub(p, "$JS.API.CONSUMER.CREATE.GIFT_ACKS",
                          sizeof("$JS.API.CONSUMER.CREATE.GIFT_ACKS") - 1, 1,
                          json, e - json)
            != NGX_OK)
        {
            return;
        }
    }

    /* an answer within 5 s, or again */
    if (p->follow_ev.timer_set) {
        ngx_del_timer(&p->follow_ev);
    }
    ngx_add_timer(&p->follow_ev, NGX_HTTP_GIFT_FOLLOW_HB);
}


/* Timer: retry, a request without an answer, or the heartbeat watchdog. */
static void
ngx_http_gift_follow_handler(ngx_event_t *ev)
{
    ngx_http_gift_follow_t *p = ev->data;

    if (!ngx_http_gift_nats_up() || p->paused) {
        return;                     /* started again once connected */
    }

    switch (p->fstate) {

    case NGX_HTTP_GIFT_FOLLOW_ACTIVE:
        if (ngx_current_msec - p->fseen < 3 * NGX_HTTP_GIFT_FOLLOW_HB) {
            ngx_add_timer(&p->follow_ev, NGX_HTTP_GIFT_FOLLOW_HB);
            return;
        }
        ngx_http_gift_follow_start(p, "no heartbeat for 15 s");
        return;

    case NGX_HTTP_GIFT_FOLLOW_IDLE:
        ngx_http_gift_follow_start(p, "retry");
        return;

    case NGX_HTTP_GIFT_FOLLOW_CREATE:
        if (ngx_current_msec - p->fseen < NGX_HTTP_GIFT_FOLLOW_HB) {
            /* no answer yet, but its messages are coming: wait on */
            ngx_add_timer(&p->follow_ev, NGX_HTTP_GIFT_FOLLOW_HB);
            return;
        }
        /* fall through */

    default:
        if (p->resuming) {
            /* parked clients wait no longer: from what the ring has */
            ngx_http_gift_fanout_unpark(p->last_sseq);
        }
        if (!p->fwarned) {
            ngx_log_error(NGX_LOG_WARN, p->log, 0,
                          "gift: no answer from JetStream in 5 s while "
                          "setting up the GIFT_ACKS consumer; retrying");
            p->fwarned = 1;
        }
        ngx_http_gift_follow_start(p, "no answer from JetStream");
        return;
    }
}


static void
ngx_http_gift_follow_retry(ngx_http_gift_follow_t *p, const char *what,
    const char *desc)
{
    if (!p->fwarned) {
        ngx_log_error(NGX_LOG_WARN, p->log, 0,
                      "gift: cannot follow GIFT_ACKS (%s: %s)%s; retrying",
                      what, desc, ngx_strstr(desc, "not found")
                                  ? ": run giftctl setup" : "");
        p->fwarned = 1;
    }

    p->fstate = NGX_HTTP_GIFT_FOLLOW_IDLE;

    if (p->resuming) {
        ngx_http_gift_fanout_unpark(p->last_sseq);
    }

    if (p->follow_ev.timer_set) {
        ngx_del_timer(&p->follow_ev);
    }
    ngx_add_timer(&p->follow_ev, NGX_HTTP_GIFT_FOLLOW_RETRY);
}


/* An answer of the JetStream API on "<inbox>.c.<n>". */
static void
ngx_http_gift_follow_control(ngx_http_gift_follow_t *p, const u_char *subj,
    size_t slen, const u_char *data, size_t len)
{
    size_t         plen;
    ngx_str_t     *inbox;
    uint64_t       n, last, first, start;
    json_t        *root, *err, *v, *st;
    const char    *desc, *name;
    json_error_t   jerr;

    inbox = ngx_http_gift_nats_inbox();
    plen = inbox->len + 3;
    if (slen <= plen || ngx_strncmp(subj + inbox->len, ".c.", 3) != 0
        || ngx_http_gift_nats_number(subj + plen, slen - plen, &n) != 0)
    {
        return;
    }

    if (n != p->fctl || (p->fstate != NGX_HTTP_GIFT_FOLLOW_INFO
                         && p->fstate != NGX_HTTP_GIFT_FOLLOW_CREATE))
    {
        return;                     /* an answer to an older request */
    }

    root = json_loadb((const char *) data, len, 0, &jerr);
    if (root == NULL) {
        ngx_http_gift_follow_retry(p, "JetStream API", "unreadable answer");
        return;
    }

    err = json_object_get(root, "error");
    if (err != NULL) {
        v = json_object_get(err, "description");
        desc = json_is_string(v) ? json_string_value(v) : "error";
        ngx_http_gift_follow_retry(p, p->fstate == NGX_HTTP_GIFT_FOLLOW_INFO
                                      ? "stream info" : "consumer",
                                   desc);
        json_decref(root);
        return;
    }

    if (p->fstate == NGX_HTTP_GIFT_FOLLOW_INFO) {
        st = json_object_get(root, "state");
        v = json_object_get(st, "last_seq");
        last = json_is_integer(v) ? (uint64_t) json_integer_value(v) : 0;
        v = json_object_get(st, "first_seq");
        first = json_is_integer(v) ? (uint64_t) json_integer_value(v) : 0;
        json_decref(root);

        start = last >= p->replay_max ? last - p->replay_max + 1 : 1;
        if (start < first) {
            start = first;
        }

        if (p->resuming) {
            /* on after the ring, or, if too much went by, afresh */
            p->resuming = 0;
            if (start > p->last_sseq + 1) {
                p->last_sseq = start - 1;
                ngx_http_gift_fanout_reset(start - 1);
            }
            ngx_http_gift_fanout_unpark(last);
            p->fwarned = 0;

            ngx_http_gift_follow_start(p, "stream info");
            return;
        }

        p->started = 1;
        p->origin = last;
        ngx_http_gift_fanout_origin(last);
        p->last_sseq = start - 1;
        p->fwarned = 0;

        ngx_http_gift_follow_start(p, "stream info");
        return;
    }

    v = json_object_get(root, "name");
    name = json_is_string(v) ? json_string_value(v) : "";
    p->consumer_len = ngx_cpystrn(p->consumer, (u_char *) name,
                                  sizeof(p->consumer)) - p->consumer;
    json_decref(root);

    p->fstate = NGX_HTTP_GIFT_FOLLOW_ACTIVE;
    p->fseen = ngx_current_msec;
    p->fwarned = 0;

    if (!p->followed) {
        ngx_log_error(NGX_LOG_NOTICE, p->log, 0,
                      "gift: following GIFT_ACKS after #%uL", p->origin);
        p->followed = 1;

    } else {
        ngx_log_error(NGX_LOG_INFO, p->log, 0,
                      "gift: GIFT_ACKS followed again from #%uL",
                      p->last_sseq + 1);
    }

    if (p->follow_ev.timer_set) {
        ngx_del_timer(&p->follow_ev);
    }
    ngx_add_timer(&p->follow_ev, NGX_HTTP_GIFT_FOLLOW_HB);
}


/* The value of header `name` in a NATS header block, or NULL. */
static u_char *
ngx_http_gift_follow_header(u_char *hdr, size_t hlen, const char *name,
    size_t *len)
{
    u_char  *s, *e, *v;
    size_t   nlen;

    nlen = ngx_strlen(name);
    e = hdr + hlen;

    for (s = hdr; s < e; ) {
        v = ngx_strlchr(s, e, '\n');
        if (v == NULL) {
            break;
        }
        if ((size_t) (v - s) > nlen + 1 && ngx_strncasecmp(s, (u_char *) name,
                                                           nlen) == 0
            && s[nlen] == ':')
        {
            s += nlen + 1;
            while (s < v && *s == ' ') {
                s++;
            }
            *len = (v > s && v[-1] == '\r') ? (size_t) (v - 1 - s)
                                            : (size_t) (v - s);
            return s;
        }
        s = v + 1;
    }

    return NULL;
}


/* The number at s (digits up to a '.' or the end), or 0. */
static uint64_t
ngx_http_gift_follow_num(u_char *s, size_t len)
{
    size_t    n;
    uint64_t  v;

    for (n = 0; n < len && s[n] != '.'; n++) {
        /* void */
    }

    return ngx_http_gift_nats_number(s, n, &v) == 0 ? v : 0;
}


/*
 * A message of the consumer of generation `gen` (its subscription's sid is
 * "d<gen>"): a GiftAck under its own subject, or a status on the deliver
 * subject (heartbeat, flow control).
 */
static void
ngx_http_gift_follow_deliver(ngx_http_gift_follow_t *p, uint64_t gen,
    u_char *reply, size_t rlen, u_char *hdr, size_t hlen, u_char *data,
    size_t len)
{
    u_char                  *s, *e, *tok[16];
    size_t                   vlen;
    uint64_t                 sseq, cseq;
    ngx_uint_t               ntok;
    ngx_http_gift_frame_t   *f, **frames;

    /*
     * The consumer starts sending as soon as it exists: its first messages
     * may come before the answer to CONSUMER.CREATE.
     */
    if (gen != p->fgen || (p->fstate != NGX_HTTP_GIFT_FOLLOW_ACTIVE
                           && p->fstate != NGX_HTTP_GIFT_FOLLOW_CREATE))
    {
        return;                     /* the consumer we replaced */
    }

    p->fseen = ngx_current_msec;

    if (hlen >= sizeof("NATS/1.0 100") - 1
        && ngx_strncmp(hdr, "NATS/1.0 100", sizeof("NATS/1.0 100") - 1) == 0)
    {
        /* flow control: answer, or the server stops sending */
        if (reply != NULL) {
            ngx_log_debug0(NGX_LOG_DEBUG_HTTP, p->log, 0,
                           "gift: GIFT_ACKS flow control");
            (void) ngx_http_gift_follow_pub(p, (char *) reply, rlen, 0,
                                            NULL, 0);
            return;
        }

        s = ngx_http_gift_follow_header(hdr, hlen, "Nats-Consumer-Stalled",
                                        &vlen);
        if (s != NULL && vlen > 0) {
            if (ngx_http_gift_follow_pub(p, (char *) s, vlen, 0, NULL, 0)
                != NGX_OK)
            {
                return;
            }
        }

        /* a heartbeat says what the consumer sent last */
        s = ngx_http_gift_follow_header(hdr, hlen, "Nats-Last-Consumer",
                                        &vlen);
        if (s != NULL
            && ngx_http_gift_follow_num(s, vlen) != p->next_cseq - 1)
        {
            ngx_http_gift_follow_start(p, "a heartbeat reports messages "
                                          "we did not get");
        }
        return;
    }

    if (hlen > 0 && !(hlen >= 12 && ngx_strncmp(hdr, "NATS/1.0\r\n", 10) == 0))
    {
        /* another status (the consumer was deleted, ...): a new one */
        ngx_http_gift_follow_start(p, "status from the consumer");
        return;
    }

    /*
     * $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
     * or, newer, with <domain>.<account hash> after ACK and a token at the
     * end: the sequences are 4th and 3rd from the end of the first form.
     */
    ntok = 0;
    if (reply != NULL) {
        e = reply + rlen;
        tok[ntok++] = reply;
        for (s = reply; s < e && ntok < 16; s++) {
            if (*s == '.') {
                tok[ntok++] = s + 1;
            }
        }
    }

    if (ntok == 9) {
        sseq = ngx_http_gift_follow_num(tok[5], rlen);
        cseq = ngx_http_gift_follow_num(tok[6], rlen);

    } else if (ntok >= 11) {
        sseq = ngx_http_gift_follow_num(tok[7], rlen);
        cseq = ngx_http_gift_follow_num(tok[8], rlen);

    } else {
        ngx_http_gift_follow_start(p, "a message without JetStream metadata");
        return;
    }

    if (cseq != p->next_cseq) {
        ngx_http_gift_follow_start(p, "a gap in the consumer's sequence");
        return;
    }

    p->next_cseq++;

    if (sseq <= p->last_sseq) {
        return;                     /* had it already */
    }

    p->last_sseq = sseq;

    f = ngx_http_gift_frame_create(sseq, data, len);
    if (f == NULL) {
        ngx_log_error(NGX_LOG_WARN, p->log, 0,
                      "gift: GIFT_ACKS #%uL is not a GiftAck; skipped", sseq);
        return;
    }

    if (p->nframes == p->frames_cap) {
        frames = ngx_alloc((p->frames_cap ? p->frames_cap * 2 : 256)
                           * sizeof(ngx_http_gift_frame_t *), p->log);
        if (frames == NULL) {
            ngx_free(f);
            return;
        }
        if (p->nframes) {
            ngx_memcpy(frames, p->frames,
                       p->nframes * sizeof(ngx_http_gift_frame_t *));
        }
        ngx_free(p->frames);
        p->frames = frames;
        p->frames_cap = p->frames_cap ? p->frames_cap * 2 : 256;
    }

    p->frames[p->nframes++] = f;
}


static void
ngx_http_gift_follow_flush_frames(void *data)
{
    ngx_http_gift_follow_t *p = data;

    size_t  n;

    if (p->nframes == 0) {
        return;
    }

    n = p->nframes;
    p->nframes = 0;

    ngx_http_gift_fanout_deliver(p->frames, n);
}
