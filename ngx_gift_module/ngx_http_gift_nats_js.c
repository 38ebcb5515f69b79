/*
 * JetStream publishes for webhooks, on the worker's NATS connection.
 *
 * A webhook's publish is a JetStream request: HPUB to gift.events.<platform>
 * with a Nats-Msg-Id header and the reply subject "<inbox>.<id>"; the
 * PubAck comes back as a MSG on this worker's one subscription "<inbox>.*"
 * (sid "p") and finds its request by id in an rbtree.  No thread, no lock,
 * no wakeup between the request and its PubAck.
 *
 * When the connection drops, a publish whose bytes never left ends at once
 * with "unavailable" (it was not stored: a retry is safe); one that was
 * written may have been stored, and waits for its gift_publish_timeout.
 *
 * Once connected, it asks JetStream for GIFTS' settings ("<inbox>.i"): a
 * duplicate window shorter than a signed webhook's window plus skew lets a
 * replayed request be stored twice, which nginx -t cannot see.  A warning,
 * and nothing else changes.
 */

#include "ngx_http_gift_nats.h"

#include <jansson.h>


typedef struct {
    ngx_uint_t                     queue_max;
    time_t                         span;        /* signature window + skew */
    int64_t                        warned_ns;   /* the window warned about */
    uint64_t                       next_id;
    ngx_rbtree_t                   pending;
    ngx_rbtree_node_t              sentinel;
    ngx_http_gift_nats_user_t      user;
} ngx_http_gift_js_t;


static ngx_int_t ngx_http_gift_js_handshake(void *data);
static void ngx_http_gift_js_connected(void *data);
static void ngx_http_gift_js_disconnected(void *data, uint64_t written);
static void ngx_http_gift_js_message(void *data, ngx_http_gift_nats_msg_t *m);
static void ngx_http_gift_js_stream_info(ngx_http_gift_js_t *js,
    ngx_http_gift_nats_msg_t *m);


static ngx_http_gift_js_t  *ngx_http_gift_js;


ngx_int_t
ngx_http_gift_js_init_process(ngx_cycle_t *cycle,
    ngx_http_gift_main_conf_t *gmcf)
{
    ngx_http_gift_js_t  *js;

    js = ngx_pcalloc(cycle->pool, sizeof(ngx_http_gift_js_t));
    if (js == NULL) {
        return NGX_ERROR;
    }

    js->queue_max = gmcf->queue_size;
    js->span = gmcf->signature_span;
    js->warned_ns = -1;
    js->next_id = 1;
    ngx_rbtree_init(&js->pending, &js->sentinel, ngx_rbtree_insert_value);

    js->user.sid = 'p';
    js->user.handshake = ngx_http_gift_js_handshake;
    js->user.connected = ngx_http_gift_js_connected;
    js->user.disconnected = ngx_http_gift_js_disconnected;
    js->user.message = ngx_http_gift_js_message;
    js->user.data = js;

    ngx_http_gift_js = js;

    return ngx_http_gift_nats_add_user(&js->user);
}


ngx_uint_t
ngx_http_gift_nats_connected(void)
{
    return ngx_http_gift_js != NULL && ngx_http_gift_nats_up();
}


ngx_int_t
ngx_http_gift_nats_publish(ngx_http_gift_pending_t *pd, const char *subject,
    const char *msg_id, const u_char *data, size_t len, ngx_log_t *log)
{
    u_char              *o;
    size_t               slen, ilen, hlen, need;
    ngx_str_t           *inbox;
    ngx_http_gift_js_t  *js;

    js = ngx_http_gift_js;

    if (js == NULL || !ngx_http_gift_nats_up()) {
        return NGX_DECLINED;
    }

    if (ngx_http_gift_nats_unsent() >= js->queue_max) {
        return NGX_BUSY;
    }

    inbox = ngx_http_gift_nats_inbox();
    slen = ngx_strlen(subject);
    ilen = msg_id ? ngx_strlen(msg_id) : 0;

    /* "NATS/1.0\r\nNats-Msg-Id: <id>\r\n\r\n" */
    hlen = msg_id ? sizeof("NATS/1.0\r\nNats-Msg-Id: \r\n\r\n") - 1 + ilen : 0;

    /* the server counts the headers in: over it, it closes the connection */
    if (hlen + len > ngx_http_gift_nats_max_payload()) {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "gift: message of %uz bytes over the server's "
                      "max_payload of %uz", hlen + len,
                      ngx_http_gift_nats_max_payload());
        return NGX_ERROR;
    }

    need = sizeof("HPUB  . 18446744073709551615 4294967295 4294967295\r\n")
           + slen + inbox->len + hlen + len + 2;

    o = ngx_http_gift_nats_out(need);
    if (o == NULL) {
        return NGX_ERROR;
    }

    if (msg_id) {
        o = ngx_sprintf(o, "HPUB %s %V.%uL %uz %uz\r\n"
                        "NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n",
                        subject, inbox, js->next_id, hlen, hlen + len,
                        msg_id);
    } else {
        o = ngx_sprintf(o, "PUB %s %V.%uL %uz\r\n", subject, inbox,
                        js->next_id, len);
    }

    if (len) {                  /* an empty message may come as NULL */
        o = ngx_cpymem(o, data, len);
    }
    *o++ = '\r';
    *o++ = '\n';

    pd->out_end = ngx_http_gift_nats_queue(o);
    ngx_http_gift_nats_count_msg();

    pd->node.key = js->next_id++;
    pd->queued = 1;
    ngx_rbtree_insert(&js->pending, &pd->node);

    return NGX_OK;
}


void
ngx_http_gift_nats_cancel(ngx_http_gift_pending_t *pd)
{
    if (pd->queued && ngx_http_gift_js != NULL) {
        ngx_rbtree_delete(&ngx_http_gift_js->pending, &pd->node);
    }

    pd->queued = 0;
}


static ngx_int_t
ngx_http_gift_js_handshake(void *data)
{
    u_char     *o;
    ngx_str_t  *inbox;

    inbox = ngx_http_gift_nats_inbox();

    o = ngx_http_gift_nats_out(inbox->len + sizeof("SUB .* p\r\n"));
    if (o == NULL) {
        return NGX_ERROR;
    }

    (void) ngx_http_gift_nats_queue(ngx_sprintf(o, "SUB %V.* p\r\n", inbox));

    return NGX_OK;
}


/* GIFTS' settings, once per connection: see ngx_http_gift_js_stream_info() */
static void
ngx_http_gift_js_connected(void *data)
{
    ngx_http_gift_js_t *js = data;

    u_char     *o;
    ngx_str_t  *inbox;

    if (js->span == 0) {
        return;                 /* no signed webhook */
    }

    inbox = ngx_http_gift_nats_inbox();

    o = ngx_http_gift_nats_out(sizeof("PUB $JS.API.STREAM.INFO.GIFTS .i 0"
                                      "\r\n\r\n")
                               + inbox->len);
    if (o == NULL) {
        return;
    }

    (void) ngx_http_gift_nats_queue(ngx_sprintf(o,
                                    "PUB $JS.API.STREAM.INFO.GIFTS %V.i 0"
                                    "\r\n\r\n", inbox));
}


/*
 * The answer to STREAM.INFO: {"config":{"duplicate_window":<ns>,...},...}.
 * An error (no stream yet, no JetStream) says nothing here: the publishes
 * report it.
 */
static void
ngx_http_gift_js_stream_info(ngx_http_gift_js_t *js,
    ngx_http_gift_nats_msg_t *m)
{
    int64_t        ns;
    json_t        *root, *v;
    json_error_t   jerr;

    if (m->len == 0) {
        return;                 /* a status: no responders */
    }

    root = json_loadb((const char *) m->data, m->len, 0, &jerr);
    if (root == NULL) {
        return;
    }

    v = json_object_get(json_object_get(root, "config"), "duplicate_window");
    ns = json_is_integer(v) ? (int64_t) json_integer_value(v) : -1;
    json_decref(root);

    if (ns < 0) {
        return;
    }

    if (ns >= (int64_t) js->span * 1000000000LL) {
        ngx_log_error(NGX_LOG_INFO, ngx_http_gift_nats_log(), 0,
                      "gift: the GIFTS duplicate window (%uLs) covers "
                      "signed webhooks (%Ts)",
                      (uint64_t) (ns / 1000000000LL), js->span);
        return;
    }

    if (ns == js->warned_ns) {
        return;                 /* once, not at every reconnect */
    }

    js->warned_ns = ns;

    ngx_log_error(NGX_LOG_WARN, ngx_http_gift_nats_log(), 0,
                  "gift: the GIFTS stream's duplicate window "
                  "(duplicate_window) is %uLs, shorter than "
                  "gift_webhook_signature_window plus "
                  "gift_webhook_signature_skew (%Ts): a replayed signed "
                  "webhook could be stored twice; raise the stream's "
                  "duplicate window (nats stream edit GIFTS --dupe-window "
                  "10m) or lower the two settings",
                  (uint64_t) (ns / 1000000000LL), js->span);
}


/* The publishes whose bytes never left end now: unavailable. */
static void
ngx_http_gift_js_disconnected(void *data, uint64_t written)
{
    ngx_http_gift_js_t *js = data;

    ngx_rbtree_node_t           *node, *next, *root, *sentinel;
    ngx_http_gift_pending_t     *pd;
    ngx_http_gift_pub_result_t   res;

    sentinel = js->pending.sentinel;
    root = js->pending.root;

    if (root == sentinel) {
        return;
    }

    /* ids grow in the order the publishes were queued: the last ones */
    node = ngx_rbtree_min(root, sentinel);

    while (node != NULL) {
        next = ngx_rbtree_next(&js->pending, node);
        pd = (ngx_http_gift_pending_t *) node;

        if (pd->out_end > written) {
            ngx_rbtree_delete(&js->pending, node);
            pd->queued = 0;

            ngx_memzero(&res, sizeof(res));
            res.id = node->key;
            res.status = NGX_HTTP_GIFT_PUB_UNAVAILABLE;
            ngx_cpystrn((u_char *) res.error, (u_char *) "the connection to "
                        "NATS was lost before the publish was sent",
                        sizeof(res.error));

            pd->handler(pd, &res);
        }

        node = next;
    }
}


/* The publish waiting for reply `id`, or NULL. */
static ngx_http_gift_pending_t *
ngx_http_gift_js_find(ngx_rbtree_t *pending, uint64_t id)
{
    ngx_rbtree_node_t  *node, *sentinel;

    node = pending->root;
    sentinel = pending->sentinel;

    while (node != sentinel && node->key != id) {
        node = id < node->key ? node->left : node->right;
    }

    return node == sentinel ? NULL : (ngx_http_gift_pending_t *) node;
}


/*
 * Where the value of a top-level key starts in a flat JSON object, as
 * nats-server writes its PubAck: {"stream":"GIFTS", "seq":5,"duplicate": true}
 */
static const u_char *
ngx_http_gift_js_value(const u_char *data, size_t len, char *key)
{
    const u_char  *s, *e;

    s = ngx_strnstr((u_char *) data, key, len);
    if (s == NULL) {
        return NULL;
    }

    e = data + len;
    s += ngx_strlen(key);

    while (s < e && (*s == ' ' || *s == '\t')) {
        s++;
    }
    if (s == e || *s++ != ':') {
        return NULL;
    }
    while (s < e && (*s == ' ' || *s == '\t')) {
        s++;
    }

    return s;
}


/*
 * A PubAck, a JetStream error, or (with headers) a status:
 *   {"stream":"GIFTS","seq":5,"duplicate":true}
 *   {"error":{"code":503,"err_code":10077,"description":"maximum ..."}}
 *   NATS/1.0 503  (no responders: no stream holds the subject)
 */
static void
ngx_http_gift_js_message(void *data, ngx_http_gift_nats_msg_t *m)
{
    ngx_http_gift_js_t *js = data;

    size_t                       n;
    uint64_t                     id;
    ngx_str_t                   *inbox;
    const u_char                *s, *e;
    ngx_http_gift_pending_t     *pd;
    ngx_http_gift_pub_result_t   res;

    inbox = ngx_http_gift_nats_inbox();

    if (m->subject_len == inbox->len + 2
        && m->subject[inbox->len] == '.'
        && m->subject[inbox->len + 1] == 'i'
        && ngx_strncmp(m->subject, inbox->data, inbox->len) == 0)
    {
        ngx_http_gift_js_stream_info(js, m);
        return;
    }

    if (m->subject_len <= inbox->len + 1
        || ngx_strncmp(m->subject, inbox->data, inbox->len) != 0
        || m->subject[inbox->len] != '.'
        || ngx_http_gift_nats_number(m->subject + inbox->len + 1,
                                     m->subject_len - inbox->len - 1, &id)
           != 0)
    {
        return;
    }

    pd = ngx_http_gift_js_find(&js->pending, id);
    if (pd == NULL) {
        return;             /* the request timed out or went away */
    }

    ngx_memzero(&res, sizeof(res));
    res.id = id;

    if (m->hdr_len >= sizeof("NATS/1.0 503") - 1
        && ngx_strncmp(m->hdr, "NATS/1.0 503", sizeof("NATS/1.0 503") - 1)
           == 0)
    {
        res.status = NGX_HTTP_GIFT_PUB_UNAVAILABLE;
        ngx_cpystrn((u_char *) res.error,
                    (u_char *) "no stream for the subject (no responders)",
                    sizeof(res.error));

    } else if (m->len > 0
               && ngx_strnstr((u_char *) m->data, "\"error\"", m->len) == NULL
               && (s = ngx_http_gift_js_value(m->data, m->len, "\"seq\""))
                  != NULL)
    {
        /* the common case, without a JSON parser */
        e = m->data + m->len;
        for (n = 0; s + n < e && s[n] >= '0' && s[n] <= '9'; n++) {
            /* void */
        }
        if (ngx_http_gift_nats_number(s, n, &res.seq) != 0) {
            res.seq = 0;
        }
        s = ngx_http_gift_js_value(m->data, m->len, "\"duplicate\"");
        res.duplicate = s != NULL && e - s >= 4
                        && ngx_strncmp(s, "true", 4) == 0;
        res.status = res.seq ? NGX_HTTP_GIFT_PUB_OK : NGX_HTTP_GIFT_PUB_ERROR;
        if (res.seq == 0) {
            ngx_cpystrn((u_char *) res.error, (u_char *) "PubAck without a "
                        "sequence", sizeof(res.error));
        }

    } else {
        ngx_http_gift_puback_parse((const char *) m->data, m->len, &res);
    }

    ngx_rbtree_delete(&js->pending, &pd->node);
    pd->queued = 0;
    pd->handler(pd, &res);
}


/*
 * A JetStream publish reply: the PubAck or an error.
 *
 *   {"stream":"GIFTS","seq":5,"duplicate":true}
 *   {"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}
 */
void
ngx_http_gift_puback_parse(const char *data, size_t len,
    ngx_http_gift_pub_result_t *res)
{
    const char    *desc;
    json_t        *root, *err, *v;
    json_error_t   jerr;

    root = json_loadb(data, len, 0, &jerr);
    if (root == NULL) {
        res->status = NGX_HTTP_GIFT_PUB_ERROR;
        ngx_cpystrn((u_char *) res->error, (u_char *) "unreadable PubAck",
                    sizeof(res->error));
        return;
    }

    err = json_object_get(root, "error");
    if (err != NULL) {
        v = json_object_get(err, "description");
        desc = json_is_string(v) ? json_string_value(v) : "JetStream error";
        ngx_cpystrn((u_char *) res->error, (u_char *) desc,
                    sizeof(res->error));

        /* discard new: "maximum messages exceeded", "... bytes ..." */
        res->status = (ngx_strstr(desc, "maximum") != NULL
                       && ngx_strstr(desc, "exceeded") != NULL)
                      ? NGX_HTTP_GIFT_PUB_STREAM_FULL
                      : NGX_HTTP_GIFT_PUB_ERROR;

        v = json_object_get(err, "code");
        if (res->status == NGX_HTTP_GIFT_PUB_ERROR
            && json_is_integer(v) && json_integer_value(v) == 503)
        {
            res->status = NGX_HTTP_GIFT_PUB_UNAVAILABLE;
        }

    } else {
        v = json_object_get(root, "seq");
        res->seq = json_is_integer(v) ? (uint64_t) json_integer_value(v) : 0;
        res->duplicate = json_is_true(json_object_get(root, "duplicate"));
        res->status = res->seq ? NGX_HTTP_GIFT_PUB_OK : NGX_HTTP_GIFT_PUB_ERROR;
    }

    json_decref(root);
}
