/*
 * gift_websocket: the acknowledgement stream over WebSocket (RFC 6455).
 *
 * The handshake answers 101 with Sec-WebSocket-Accept (nginx's SHA-1 and
 * base64).  The server then sends each acknowledgement as a text frame
 * holding the acknowledgement JSON, framed once per worker (the frame's
 * `ws` bytes, see ngx_http_gift_frame.c), and pings on the worker's
 * heartbeat.  A client may send text messages:
 *
 *   {"device":"motor_01","room":["a","b"],"status":null}   set its filters
 *   {"lastEventId":41}                                      resume
 *
 * Client frames are checked: they must be masked, carry no RSV bits and a
 * known opcode (else close 1002), fit NGX_HTTP_GIFT_WS_MAX_MESSAGE (else
 * close 1009); binary messages are refused (1003), text that is not UTF-8
 * too (1007).  A close frame with a valid code is answered with that code,
 * then the connection is closed; an invalid code, or a one-byte payload,
 * gets 1002.  When we close first (an error, a shutdown), we wait up to
 * NGX_HTTP_GIFT_WS_CLOSE_WAIT for the client's close frame.
 *
 * What a client can make us hold is bounded per connection, not per frame:
 * a ping is answered from one fixed buffer (only the latest ping is
 * answered when pongs cannot be written as fast as pings come, as RFC 6455
 * 5.5.3 allows), every frame counts against gift_websocket_frame_rate and
 * every message against NGX_HTTP_GIFT_WS_MAX_MESSAGES, both per
 * NGX_HTTP_GIFT_WS_WINDOW, and the filters of the latest message live in a
 * pool of their own that the next message replaces.
 *
 * Origin: with gift_websocket_allow_origin, only the listed origins; without
 * it, a browser (which always sends Origin) only from a page of this very
 * origin: scheme, host and port of the request's Host.  No Origin: not a
 * browser, accepted.
 */

#include "ngx_http_gift_module.h"

#include <ngx_sha1.h>
#include <jansson.h>

#include "gift_wsframe.h"


#define NGX_HTTP_GIFT_WS_MAX_MESSAGE   4096
#define NGX_HTTP_GIFT_WS_MAX_MESSAGES  64     /* per window */
#define NGX_HTTP_GIFT_WS_WINDOW        10000  /* ms */
#define NGX_HTTP_GIFT_WS_CLOSE_WAIT    5000   /* ms for the peer's close */
#define NGX_HTTP_GIFT_WS_GUID          "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


typedef struct {
    ngx_http_gift_client_t     client;      /* first: the module's ctx */
    u_char                    *buf;         /* incoming bytes */
    size_t                     len;
    gift_ws_reader_t           reader;      /* reassembly, checks */
    ngx_msec_t                 window;      /* start of the rate window */
    ngx_uint_t                 frames;      /* in this window */
    ngx_uint_t                 messages;
    ngx_pool_t                *filters;     /* the latest message's */
    size_t                     ping_len;
    u_char                     ping[125];   /* latest unanswered ping */
    u_char                     pong[127];   /* the pong being written */
    unsigned                   pong_due:1;
    unsigned                   pong_queued:1;
    unsigned                   peer_closed:1;
} ngx_http_gift_ws_t;


static void ngx_http_gift_ws_read(ngx_http_request_t *r);
static ngx_int_t ngx_http_gift_ws_frames(ngx_http_gift_ws_t *ws);
static ngx_int_t ngx_http_gift_ws_message(ngx_http_gift_ws_t *ws,
    u_char *data, size_t len);
static ngx_int_t ngx_http_gift_ws_close(ngx_http_gift_ws_t *ws,
    ngx_uint_t code, const char *reason);
static ngx_int_t ngx_http_gift_ws_pong(ngx_http_gift_ws_t *ws);
static ngx_int_t ngx_http_gift_ws_origin(ngx_http_request_t *r,
    ngx_http_gift_loc_conf_t *glcf);
static ngx_int_t ngx_http_gift_ws_filter(ngx_pool_t *pool,
    ngx_array_t **arr, json_t *v);
static ngx_array_t *ngx_http_gift_ws_filter_copy(ngx_pool_t *pool,
    ngx_array_t *a);
static ngx_uint_t ngx_http_gift_header_has(ngx_table_elt_t *h,
    const char *token, size_t len);
static void ngx_http_gift_ws_cleanup(void *data);


ngx_int_t
ngx_http_gift_websocket_handler(ngx_http_request_t *r)
{
    u_char                    *p;
    uint64_t                   last;
    ngx_int_t                  rc, resume;
    ngx_str_t                  key, decoded, accept;
    ngx_sha1_t                 sha1;
    ngx_table_elt_t           *h;
    ngx_http_cleanup_t        *cln;
    ngx_http_gift_ws_t        *ws;
    ngx_http_gift_loc_conf_t  *glcf;
    u_char                     hash[20], kbuf[32];

    if (r->method != NGX_HTTP_GET) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    glcf = ngx_http_get_module_loc_conf(r, ngx_http_gift_module);

    /* nginx 1.22 does not index Upgrade for HTTP/1.1: look it up */
    if (r->http_version != NGX_HTTP_VERSION_11
        || !ngx_http_gift_header_has(
                ngx_http_gift_find_header(r, "Upgrade", 7), "websocket", 9)
        || !ngx_http_gift_header_has(
                ngx_http_gift_find_header(r, "Connection", 10), "upgrade", 7))
    {
        if (ngx_http_gift_add_header(r, "Upgrade", 7, (u_char *) "websocket",
                                     9) != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        return ngx_http_gift_send_error(r, 426, "upgrade_required",
                                        "this endpoint speaks WebSocket",
                                        NULL);
    }

    h = ngx_http_gift_find_header(r, "Sec-WebSocket-Version",
                                  sizeof("Sec-WebSocket-Version") - 1);
    if (h == NULL || h->value.len != 2
        || ngx_strncmp(h->value.data, "13", 2) != 0)
    {
        if (ngx_http_gift_add_header(r, "Sec-WebSocket-Version", 21,
                                     (u_char *) "13", 2) != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        return ngx_http_gift_send_error(r, 426, "upgrade_required",
                                        "WebSocket version 13 only", NULL);
    }

    h = ngx_http_gift_find_header(r, "Sec-WebSocket-Key",
                                  sizeof("Sec-WebSocket-Key") - 1);
    key.len = 0;
    if (h != NULL) {
        key = h->value;
    }

    decoded.data = kbuf;
    if (key.len != 24 || ngx_decode_base64(&decoded, &key) != NGX_OK
        || decoded.len != 16)
    {
        return ngx_http_gift_send_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_field",
                                        "Sec-WebSocket-Key must be 16 bytes "
                                        "in base64", "Sec-WebSocket-Key");
    }

    if (ngx_http_gift_ws_origin(r, glcf) != NGX_OK) {
        return ngx_http_gift_send_error(r, NGX_HTTP_FORBIDDEN,
                                        "origin_refused",
                                        "this Origin may not connect",
                                        NULL);
    }

    resume = ngx_http_gift_last_event_id(r, &last);
    if (resume == NGX_ERROR) {
        return ngx_http_gift_send_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_field",
                                        "last_event_id must be a sequence "
                                        "number", "last_event_id");
    }

    rc = ngx_http_gift_fanout_refuse(r);
    if (rc != NGX_DECLINED) {
        return rc;
    }

    ws = ngx_pcalloc(r->pool, sizeof(ngx_http_gift_ws_t));
    if (ws == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ws->client.request = r;
    ws->client.kind = NGX_HTTP_GIFT_CLIENT_WS;

    if (ngx_http_gift_fanout_parse_filters(r, &ws->client) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* Sec-WebSocket-Accept: base64(SHA-1(key GUID)) */
    ngx_sha1_init(&sha1);
    ngx_sha1_update(&sha1, key.data, key.len);
    ngx_sha1_update(&sha1, NGX_HTTP_GIFT_WS_GUID,
                    sizeof(NGX_HTTP_GIFT_WS_GUID) - 1);
    ngx_sha1_final(hash, &sha1);

    p = ngx_pnalloc(r->pool, ngx_base64_encoded_length(20));
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    decoded.data = hash;
    decoded.len = 20;
    accept.data = p;
    ngx_encode_base64(&accept, &decoded);

    r->headers_out.status = NGX_HTTP_SWITCHING_PROTOCOLS;
    r->headers_out.content_length_n = -1;
    r->keepalive = 0;

    if (ngx_http_gift_add_header(r, "Upgrade", 7, (u_char *) "websocket", 9)
        != NGX_OK
        || ngx_http_gift_add_header(r, "Sec-WebSocket-Accept", 20,
                                    accept.data, accept.len) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK) {
        return rc;
    }

    ngx_http_set_ctx(r, ws, ngx_http_gift_module);

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_http_gift_ws_cleanup;
    cln->data = ws;

    if (ngx_http_gift_fanout_attach(&ws->client, resume == NGX_OK, last,
                                    NULL, 0) != NGX_OK)
    {
        return NGX_ERROR;
    }

    /*
     * The 101 is small: nginx's write filter holds it (postpone_output)
     * until something with a flush follows, and without a replay that is
     * the first acknowledgement or ping, up to gift_sse_heartbeat later;
     * the browser's "open" waits as long.  Send it now.
     */
    if (!ws->client.parked
        && ngx_http_send_special(r, NGX_HTTP_FLUSH) == NGX_ERROR)
    {
        return NGX_ERROR;
    }

    r->read_event_handler = ngx_http_gift_ws_read;

    r->main->count++;

    /* frames that came with the handshake, if any */
    if (r->connection->read->ready) {
        ngx_post_event(r->connection->read, &ngx_posted_events);
    }

    return NGX_DONE;
}


static void
ngx_http_gift_ws_read(ngx_http_request_t *r)
{
    ssize_t              n;
    ngx_int_t            rc;
    ngx_connection_t    *c;
    ngx_http_gift_ws_t  *ws;

    ws = ngx_http_get_module_ctx(r, ngx_http_gift_module);
    c = r->connection;

    if (ws == NULL || !ws->client.attached) {
        return;
    }

    if (c->read->timedout) {
        ngx_http_gift_client_close(&ws->client,
                                   "no close frame from the client in time");
        return;
    }

    if (ws->buf == NULL) {
        ws->buf = ngx_pnalloc(r->pool, NGX_HTTP_GIFT_WS_MAX_MESSAGE + 14);
        if (ws->buf == NULL) {
            ngx_http_gift_client_close(&ws->client, "out of memory");
            return;
        }
    }

    for ( ;; ) {
        if (ws->len == NGX_HTTP_GIFT_WS_MAX_MESSAGE + 14) {
            /* a full buffer and no complete frame: cannot happen, the
             * length check in ngx_http_gift_ws_frames() comes first */
            ngx_http_gift_client_close(&ws->client, "frame too large");
            return;
        }

        n = c->recv(c, ws->buf + ws->len,
                    NGX_HTTP_GIFT_WS_MAX_MESSAGE + 14 - ws->len);

        if (n == NGX_AGAIN) {
            if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
                ngx_http_gift_client_close(&ws->client, "read error");
            }
            return;
        }

        if (n == 0 || n == NGX_ERROR) {
            ngx_http_gift_client_close(&ws->client,
                                       n == 0 ? "client closed the connection"
                                              : "read error");
            return;
        }

        ws->len += n;

        rc = ngx_http_gift_ws_frames(ws);

        if (rc == NGX_DONE) {
            if (ws->peer_closed) {
                ngx_http_gift_client_close(&ws->client, "closed");
                return;
            }

            /* our close frame is out: wait for the client's */
            ngx_http_gift_ws_close_written(&ws->client);
            continue;
        }

        if (rc != NGX_OK) {
            ngx_http_gift_client_close(&ws->client, "write error");
            return;
        }
    }
}


/*
 * Handle every complete frame in ws->buf (gift_ws_read() checks and
 * reassembles them).  NGX_OK (wait for more), NGX_DONE (a close frame is
 * written), NGX_ERROR.  After our close frame, only the peer's close
 * matters: everything else is dropped.
 */
static ngx_int_t
ngx_http_gift_ws_frames(ngx_http_gift_ws_t *ws)
{
    ngx_int_t                  rc;
    ngx_msec_t                 now;
    gift_ws_event_t            ev;
    ngx_http_gift_loc_conf_t  *glcf;

    glcf = ngx_http_get_module_loc_conf(ws->client.request,
                                        ngx_http_gift_module);

    if (ws->reader.msg == NULL) {
        ws->reader.msg = ngx_pnalloc(ws->client.request->pool,
                                     NGX_HTTP_GIFT_WS_MAX_MESSAGE);
        if (ws->reader.msg == NULL) {
            return NGX_ERROR;
        }
        ws->reader.max_message = NGX_HTTP_GIFT_WS_MAX_MESSAGE;
    }

    while (ws->len >= 2) {

        gift_ws_read(&ws->reader, ws->buf, ws->len, &ev);

        if (ev.type == GIFT_WS_EV_MORE) {
            return NGX_OK;
        }

        if (ws->client.closing) {
            if (ev.type == GIFT_WS_EV_CLOSE) {
                ws->peer_closed = 1;
                return NGX_DONE;
            }

            if (ev.type == GIFT_WS_EV_FAIL) {
                ws->len = 0;            /* garbage after our close: drop */
                return NGX_OK;
            }

            goto next;
        }

        if (ev.type == GIFT_WS_EV_FAIL) {
            return ngx_http_gift_ws_close(ws, ev.code, ev.reason);
        }

        /* every frame counts, pings and pongs included */
        now = ngx_current_msec;
        if (now - ws->window >= NGX_HTTP_GIFT_WS_WINDOW) {
            ws->window = now;
            ws->frames = 0;
            ws->messages = 0;
        }

        if (++ws->frames
            > glcf->ws_frame_rate * (NGX_HTTP_GIFT_WS_WINDOW / 1000))
        {
            return ngx_http_gift_ws_close(ws, 1008, "too many frames");
        }

        rc = NGX_OK;

        switch (ev.type) {

        case GIFT_WS_EV_TEXT:
            rc = ngx_http_gift_ws_message(ws, (u_char *) ev.data, ev.len);
            break;

        case GIFT_WS_EV_CLOSE:
            ws->peer_closed = 1;
            return ngx_http_gift_ws_close(ws, ev.code, NULL);

        case GIFT_WS_EV_PING:   /* only the latest needs an answer */
            if (ev.len) {
                ngx_memcpy(ws->ping, ev.data, ev.len);
            }
            ws->ping_len = ev.len;
            ws->pong_due = 1;
            rc = ngx_http_gift_ws_pong(ws);
            break;

        case GIFT_WS_EV_PONG:   /* the client is alive */
            ws->client.pings_out = 0;
            break;

        default:                /* a fragment, kept */
            break;
        }

        if (rc != NGX_OK) {
            return rc;
        }

        if (ws->client.closing) {
            /* a message's answer closed the connection */
            return NGX_OK;
        }

    next:

        ws->len -= ev.consumed;
        if (ws->len) {
            ngx_memmove(ws->buf, ws->buf + ev.consumed, ws->len);
        }
    }

    return NGX_OK;
}


/*
 * Answer the latest ping from the connection's one pong buffer; while an
 * earlier pong may still be queued, wait until the output drains (then
 * ngx_http_gift_ws_drained() comes back here).
 */
static ngx_int_t
ngx_http_gift_ws_pong(ngx_http_gift_ws_t *ws)
{
    if (!ws->pong_due || ws->client.closing) {
        return NGX_OK;
    }

    if (ws->pong_queued) {
        if (ws->client.out_head != NULL) {
            return NGX_OK;
        }
        ws->pong_queued = 0;
    }

    ws->pong[0] = 0x8a;
    ws->pong[1] = (u_char) ws->ping_len;
    ngx_memcpy(ws->pong + 2, ws->ping, ws->ping_len);
    ws->pong_due = 0;
    ws->pong_queued = 1;

    return ngx_http_gift_fanout_send_raw(&ws->client, ws->pong,
                                         ws->ping_len + 2);
}


ngx_int_t
ngx_http_gift_ws_drained(ngx_http_gift_client_t *c)
{
    ngx_http_gift_ws_t  *ws = (ngx_http_gift_ws_t *) c;

    ws->pong_queued = 0;

    return ngx_http_gift_ws_pong(ws);
}


void
ngx_http_gift_ws_close_written(ngx_http_gift_client_t *c)
{
    ngx_http_gift_ws_t  *ws = (ngx_http_gift_ws_t *) c;

    ngx_event_t  *rev;

    if (ws->peer_closed) {
        ngx_http_gift_client_close(c, "closed");
        return;
    }

    rev = c->request->connection->read;

    if (!rev->timer_set) {
        ngx_add_timer(rev, NGX_HTTP_GIFT_WS_CLOSE_WAIT);
    }
}


void
ngx_http_gift_ws_going_away(ngx_http_gift_client_t *c)
{
    ngx_int_t            rc;
    ngx_connection_t    *conn;
    ngx_http_gift_ws_t  *ws = (ngx_http_gift_ws_t *) c;

    if (c->closing) {
        return;
    }

    conn = c->request->connection;

    rc = ngx_http_gift_ws_close(ws, 1001, "server going away");

    if (rc == NGX_DONE) {
        ngx_http_gift_ws_close_written(c);

    } else if (rc != NGX_OK) {
        ngx_http_gift_client_close(c, "write error");
    }

    ngx_http_run_posted_requests(conn);
}


/* A text message from the client: filters and resume. */
static ngx_int_t
ngx_http_gift_ws_message(ngx_http_gift_ws_t *ws, u_char *data, size_t len)
{
    json_t              *root, *v;
    uint64_t             last;
    ngx_int_t            rc;
    ngx_pool_t          *pool;
    ngx_array_t         *devices, *rooms, *statuses;
    json_error_t         err;
    ngx_http_request_t  *r;

    /* a ready frame: sent from static memory, never copied */
    static u_char  bad_json[] = "\x81" "\x47"     /* 71 bytes of text */
                                "{\"event\":\"error\",\"error\":"
                                "\"invalid_json\",\"message\":\"send a JSON "
                                "object\"}";

    r = ws->client.request;

    if (++ws->messages > NGX_HTTP_GIFT_WS_MAX_MESSAGES) {
        return ngx_http_gift_ws_close(ws, 1008, "too many messages");
    }

    root = json_loadb((const char *) data, len, JSON_REJECT_DUPLICATES, &err);

    if (root == NULL || !json_is_object(root)) {
        json_decref(root);
        return ngx_http_gift_fanout_send_raw(&ws->client, bad_json,
                                             sizeof(bad_json) - 1);
    }

    /*
     * The filters this message sets, and copies of those it keeps, go to
     * a new pool; the previous message's pool is then destroyed: a client
     * that sends filters forever holds one set, not all of them.
     */
    pool = ngx_create_pool(1024, r->connection->log);
    if (pool == NULL) {
        json_decref(root);
        return NGX_ERROR;
    }

    devices = ws->client.devices;
    rooms = ws->client.rooms;
    statuses = ws->client.statuses;

    rc = NGX_OK;

    if ((v = json_object_get(root, "device")) != NULL) {
        rc = ngx_http_gift_ws_filter(pool, &devices, v);
    }

    if (rc == NGX_OK && (v = json_object_get(root, "room")) != NULL) {
        rc = ngx_http_gift_ws_filter(pool, &rooms, v);
    }

    if (rc == NGX_OK && (v = json_object_get(root, "status")) != NULL) {
        rc = ngx_http_gift_ws_filter(pool, &statuses, v);
    }

    if (rc == NGX_OK && ws->filters != NULL) {
        /* what this message keeps, out of the pool about to go */
        if (devices != NULL && devices == ws->client.devices) {
            devices = ngx_http_gift_ws_filter_copy(pool, devices);
            rc = (devices == NULL) ? NGX_ERROR : rc;
        }
        if (rooms != NULL && rooms == ws->client.rooms) {
            rooms = ngx_http_gift_ws_filter_copy(pool, rooms);
            rc = (rooms == NULL) ? NGX_ERROR : rc;
        }
        if (statuses != NULL && statuses == ws->client.statuses) {
            statuses = ngx_http_gift_ws_filter_copy(pool, statuses);
            rc = (statuses == NULL) ? NGX_ERROR : rc;
        }
    }

    if (rc != NGX_OK) {
        ngx_destroy_pool(pool);

    } else {
        ws->client.devices = devices;
        ws->client.rooms = rooms;
        ws->client.statuses = statuses;

        if (ws->filters != NULL) {
            ngx_destroy_pool(ws->filters);
        }
        ws->filters = pool;
    }

    if (rc == NGX_OK && (v = json_object_get(root, "lastEventId")) != NULL) {
        if (json_is_integer(v) && json_integer_value(v) >= 0) {
            last = (uint64_t) json_integer_value(v);
            rc = ngx_http_gift_fanout_resume(&ws->client, last);

        } else {
            rc = NGX_DECLINED;
        }
    }

    json_decref(root);

    if (rc == NGX_DECLINED) {
        return ngx_http_gift_fanout_send_raw(&ws->client, bad_json,
                                             sizeof(bad_json) - 1);
    }

    return rc;
}


/* A filter from JSON: a string, an array of strings, or null (any). */
static ngx_int_t
ngx_http_gift_ws_filter(ngx_pool_t *pool, ngx_array_t **arr, json_t *v)
{
    size_t      i;
    json_t     *e;
    ngx_str_t  *s;

    if (json_is_null(v)) {
        *arr = NULL;
        return NGX_OK;
    }

    if (!json_is_string(v) && !json_is_array(v)) {
        return NGX_DECLINED;
    }

    *arr = ngx_array_create(pool, 2, sizeof(ngx_str_t));
    if (*arr == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < (json_is_array(v) ? json_array_size(v) : 1); i++) {
        e = json_is_array(v) ? json_array_get(v, i) : v;

        if (!json_is_string(e)) {
            return NGX_DECLINED;
        }

        s = ngx_array_push(*arr);
        if (s == NULL) {
            return NGX_ERROR;
        }

        s->len = json_string_length(e);
        s->data = ngx_pnalloc(pool, s->len);
        if (s->data == NULL) {
            return NGX_ERROR;
        }
        ngx_memcpy(s->data, json_string_value(e), s->len);
    }

    return NGX_OK;
}


static ngx_array_t *
ngx_http_gift_ws_filter_copy(ngx_pool_t *pool, ngx_array_t *a)
{
    ngx_str_t    *from, *to;
    ngx_uint_t    i;
    ngx_array_t  *b;

    if (a == NULL) {
        return NULL;
    }

    b = ngx_array_create(pool, a->nelts ? a->nelts : 1, sizeof(ngx_str_t));
    if (b == NULL) {
        return NULL;
    }

    from = a->elts;

    for (i = 0; i < a->nelts; i++) {
        to = ngx_array_push(b);
        to->len = from[i].len;
        to->data = ngx_pnalloc(pool, from[i].len + 1);
        if (to->data == NULL) {
            return NULL;
        }
        if (from[i].len) {
            ngx_memcpy(to->data, from[i].data, from[i].len);
        }
    }

    return b;
}


/*
 * Send a close frame and stop sending anything else (NGX_DONE when it is
 * written already).  The frame lives in the connection's pong buffer: no
 * pong is sent after a close.
 */
static ngx_int_t
ngx_http_gift_ws_close(ngx_http_gift_ws_t *ws, ngx_uint_t code,
    const char *reason)
{
    u_char     *p;
    size_t      len;
    ngx_int_t   rc;

    if (ws->client.closing) {
        return NGX_OK;
    }

    if (reason != NULL) {
        ngx_log_error(NGX_LOG_INFO, ws->client.request->connection->log, 0,
                      "gift: closing WebSocket with %ui: %s", code, reason);
    }

    len = reason ? ngx_min(ngx_strlen(reason), 120) : 0;

    if (ws->pong_queued && ws->client.out_head != NULL) {
        /* the pong buffer may still be on its way: a buffer of its own */
        p = ngx_pnalloc(ws->client.request->pool, len + 4);
        if (p == NULL) {
            return NGX_ERROR;
        }

    } else {
        p = ws->pong;
    }

    p[0] = 0x88;
    p[1] = (u_char) (len + 2);
    p[2] = (u_char) (code >> 8);
    p[3] = (u_char) code;
    if (len) {
        ngx_memcpy(p + 4, reason, len);
    }

    ws->pong_due = 0;
    ws->client.closing = 1;

    rc = ngx_http_gift_fanout_send_raw(&ws->client, p, len + 4);

    if (rc == NGX_OK && ws->client.out_head == NULL) {
        return NGX_DONE;
    }

    return rc;
}


/*
 * Whether the handshake's Origin may connect: the configured list, or
 * without one, the request's own origin (or no Origin at all).
 */
static ngx_int_t
ngx_http_gift_ws_origin(ngx_http_request_t *r, ngx_http_gift_loc_conf_t *glcf)
{
    ngx_str_t        *origin;
    ngx_uint_t        i, https;
    ngx_table_elt_t  *h, *host;

    static ngx_str_t  none = ngx_string("(none)");

    h = ngx_http_gift_find_header(r, "Origin", sizeof("Origin") - 1);

    if (glcf->ws_origins != NULL) {
        origin = glcf->ws_origins->elts;

        for (i = 0; i < glcf->ws_origins->nelts; i++) {
            if ((origin[i].len == 1 && origin[i].data[0] == '*')
                || (h != NULL && h->value.len == origin[i].len
                    && ngx_strncasecmp(h->value.data, origin[i].data,
                                       origin[i].len) == 0))
            {
                return NGX_OK;
            }
        }

    } else {
        if (h == NULL) {
            return NGX_OK;          /* not a browser */
        }

        host = r->headers_in.host;
        https = 0;
#if (NGX_HTTP_SSL)
        https = r->connection->ssl != NULL;
#endif

        if (host != NULL
            && gift_ws_origin_same((const char *) h->value.data,
                                   h->value.len,
                                   (const char *) host->value.data,
                                   host->value.len, (int) https))
        {
            return NGX_OK;
        }
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "gift: WebSocket from a refused origin \"%V\"",
                  h ? &h->value : &none);

    return NGX_DECLINED;
}


/* Whether a comma-separated header value holds `token` (any case). */
static ngx_uint_t
ngx_http_gift_header_has(ngx_table_elt_t *h, const char *token, size_t len)
{
    u_char  *p, *end;

    if (h == NULL) {
        return 0;
    }

    p = h->value.data;
    end = p + h->value.len;

    while (p < end) {
        while (p < end && (*p == ' ' || *p == '\t' || *p == ',')) {
            p++;
        }

        if ((size_t) (end - p) >= len
            && ngx_strncasecmp(p, (u_char *) token, len) == 0
            && (p + len == end || p[len] == ',' || p[len] == ' '
                || p[len] == '\t'))
        {
            return 1;
        }

        while (p < end && *p != ',') {
            p++;
        }
    }

    return 0;
}


static void
ngx_http_gift_ws_cleanup(void *data)
{
    ngx_http_gift_ws_t *ws = data;

    ngx_http_gift_fanout_detach(&ws->client);
}
