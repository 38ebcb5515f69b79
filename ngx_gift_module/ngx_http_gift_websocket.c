/*
 * gift_websocket: the acknowledgement stream over WebSocket (RFC 6455).
 *
 * The handshake answers 101 with Sec-WebSocket-Accept (nginx's SHA-1 and
 * base64).  The server then sends each acknowledgement as a text frame
 * holding the acknowledgement JSON, framed once per worker (the frame's
 * `ws` bytes, see ngx_http_gift_nats.c), and pings on the worker's
 * heartbeat.  A client may send text messages:
 *
 *   {"device":"motor_01","room":["a","b"],"status":null}   set its filters
 *   {"lastEventId":41}                                      resume
 *
 * Client frames are checked: they must be masked, carry no RSV bits and a
 * known opcode (else close 1002), fit NGX_HTTP_GIFT_WS_MAX_MESSAGE (else
 * close 1009); binary messages are refused (1003).  A close frame is
 * answered with a close frame, then the connection is closed.
 */

#include "ngx_http_gift_module.h"

#include <ngx_sha1.h>
#include <jansson.h>

#include "gift_wsframe.h"


#define NGX_HTTP_GIFT_WS_MAX_MESSAGE   4096
#define NGX_HTTP_GIFT_WS_MAX_CONTROL   64     /* messages per connection */
#define NGX_HTTP_GIFT_WS_GUID          "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


typedef struct {
    ngx_http_gift_client_t     client;      /* first: the module's ctx */
    u_char                    *buf;         /* incoming bytes */
    size_t                     len;
    u_char                    *msg;         /* a fragmented text message */
    size_t                     msg_len;
    ngx_uint_t                 messages;
    unsigned                   fragmented:1;
} ngx_http_gift_ws_t;


static void ngx_http_gift_ws_read(ngx_http_request_t *r);
static ngx_int_t ngx_http_gift_ws_frames(ngx_http_gift_ws_t *ws);
static ngx_int_t ngx_http_gift_ws_message(ngx_http_gift_ws_t *ws,
    u_char *data, size_t len);
static ngx_int_t ngx_http_gift_ws_send(ngx_http_gift_ws_t *ws,
    ngx_uint_t opcode, u_char *data, size_t len);
static ngx_int_t ngx_http_gift_ws_close(ngx_http_gift_ws_t *ws,
    ngx_uint_t code, const char *reason);
static ngx_int_t ngx_http_gift_ws_filter(ngx_http_request_t *r,
    ngx_array_t **arr, json_t *v);
static ngx_uint_t ngx_http_gift_header_has(ngx_table_elt_t *h,
    const char *token, size_t len);
static void ngx_http_gift_ws_cleanup(void *data);


ngx_int_t
ngx_http_gift_websocket_handler(ngx_http_request_t *r)
{
    u_char                    *p;
    uint64_t                   last;
    ngx_int_t                  rc, resume;
    ngx_str_t                  key, decoded, accept, *origin;
    ngx_uint_t                 i, ok;
    ngx_sha1_t                 sha1;
    ngx_table_elt_t           *h;
    ngx_http_cleanup_t        *cln;
    ngx_http_gift_ws_t        *ws;
    ngx_http_gift_loc_conf_t  *glcf;
    u_char                     hash[20], kbuf[32];

    static ngx_str_t  none = ngx_string("(none)");

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

    if (glcf->ws_origins != NULL) {
        h = ngx_http_gift_find_header(r, "Origin", sizeof("Origin") - 1);
        origin = glcf->ws_origins->elts;
        ok = 0;

        for (i = 0; i < glcf->ws_origins->nelts; i++) {
            if ((origin[i].len == 1 && origin[i].data[0] == '*')
                || (h != NULL && h->value.len == origin[i].len
                    && ngx_strncasecmp(h->value.data, origin[i].data,
                                       origin[i].len) == 0))
            {
                ok = 1;
                break;
            }
        }

        if (!ok) {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "gift: WebSocket from a refused origin \"%V\"",
                          h ? &h->value : &none);
            return ngx_http_gift_send_error(r, NGX_HTTP_FORBIDDEN,
                                            "origin_refused",
                                            "this Origin may not connect",
                                            NULL);
        }
    }

    resume = ngx_http_gift_last_event_id(r, &last);
    if (resume == NGX_ERROR) {
        return ngx_http_gift_send_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_field",
                                        "last_event_id must be a sequence "
                                        "number", "last_event_id");
    }

    if (ngx_http_gift_fanout_full()) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "gift: gift_sse_max_clients reached");
        return ngx_http_gift_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "unavailable",
                                        "too many streaming clients", NULL);
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
    if (ngx_http_send_special(r, NGX_HTTP_FLUSH) == NGX_ERROR) {
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

        if (ws->client.closing) {
            /* after our close frame: read and drop until the peer closes */
            ws->len = 0;
            continue;
        }

        ws->len += n;

        rc = ngx_http_gift_ws_frames(ws);

        if (rc == NGX_DONE) {
            ngx_http_gift_client_close(&ws->client, "closed");
            return;
        }

        if (rc != NGX_OK) {
            ngx_http_gift_client_close(&ws->client, "write error");
            return;
        }
    }
}


/*
 * Handle every complete frame in ws->buf.  NGX_OK (wait for more),
 * NGX_DONE (a close frame is written: end the connection), NGX_ERROR.
 */
static ngx_int_t
ngx_http_gift_ws_frames(ngx_http_gift_ws_t *ws)
{
    u_char           *payload;
    size_t            hlen;
    uint64_t          plen;
    ngx_int_t         rc;
    ngx_uint_t        fin, opcode, code;
    gift_ws_frame_t   frame;

    while (ws->len >= 2 && !ws->client.closing) {

        rc = gift_ws_parse(ws->buf, ws->len, NGX_HTTP_GIFT_WS_MAX_MESSAGE,
                           &frame);

        if (rc == GIFT_WS_MORE) {
            return NGX_OK;
        }

        if (rc != GIFT_WS_OK) {
            return ngx_http_gift_ws_close(ws, rc, rc == 1009
                                          ? "message too large"
                                          : "protocol error");
        }

        fin = frame.fin;
        opcode = frame.opcode;
        plen = frame.payload_len;
        payload = ws->buf + (frame.payload - ws->buf);

        if (opcode == 0x0
            && ws->msg_len + plen > NGX_HTTP_GIFT_WS_MAX_MESSAGE)
        {
            return ngx_http_gift_ws_close(ws, 1009, "message too large");
        }

        gift_ws_unmask(payload, plen, frame.mask);

        rc = NGX_OK;

        switch (opcode) {

        case 0x1:   /* text */
            if (ws->fragmented) {
                return ngx_http_gift_ws_close(ws, 1002, "expected a "
                                              "continuation frame");
            }

            if (fin) {
                rc = ngx_http_gift_ws_message(ws, payload, plen);
                break;
            }

            if (ws->msg == NULL) {
                ws->msg = ngx_pnalloc(ws->client.request->pool,
                                      NGX_HTTP_GIFT_WS_MAX_MESSAGE);
                if (ws->msg == NULL) {
                    return NGX_ERROR;
                }
            }

            ngx_memcpy(ws->msg, payload, plen);
            ws->msg_len = plen;
            ws->fragmented = 1;
            break;

        case 0x0:   /* continuation */
            if (!ws->fragmented) {
                return ngx_http_gift_ws_close(ws, 1002, "unexpected "
                                              "continuation frame");
            }

            ngx_memcpy(ws->msg + ws->msg_len, payload, plen);
            ws->msg_len += plen;

            if (fin) {
                ws->fragmented = 0;
                rc = ngx_http_gift_ws_message(ws, ws->msg, ws->msg_len);
                ws->msg_len = 0;
            }
            break;

        case 0x2:   /* binary */
            return ngx_http_gift_ws_close(ws, 1003, "binary messages are "
                                          "not accepted");

        case 0x8:   /* close: answer with the peer's code */
            code = plen >= 2 ? ((ngx_uint_t) payload[0] << 8 | payload[1])
                             : 1000;
            return ngx_http_gift_ws_close(ws, code, NULL);

        case 0x9:   /* ping */
            rc = ngx_http_gift_ws_send(ws, 0xa, payload, plen);
            break;

        default:    /* pong */
            break;
        }

        if (rc != NGX_OK) {
            return rc;
        }

        /* drop the frame from the buffer */
        hlen = frame.header_len + plen;
        ws->len -= hlen;
        if (ws->len) {
            ngx_memmove(ws->buf, ws->buf + hlen, ws->len);
        }
    }

    return NGX_OK;
}


/* A text message from the client: filters and resume. */
static ngx_int_t
ngx_http_gift_ws_message(ngx_http_gift_ws_t *ws, u_char *data, size_t len)
{
    json_t              *root, *v;
    uint64_t             last;
    ngx_int_t            rc;
    json_error_t         err;
    ngx_http_request_t  *r;

    static u_char  bad_json[] = "{\"event\":\"error\",\"error\":\"invalid_json\","
                                "\"message\":\"send a JSON object\"}";

    r = ws->client.request;

    if (++ws->messages > NGX_HTTP_GIFT_WS_MAX_CONTROL) {
        return ngx_http_gift_ws_close(ws, 1008, "too many messages");
    }

    root = json_loadb((const char *) data, len, JSON_REJECT_DUPLICATES, &err);

    if (root == NULL || !json_is_object(root)) {
        json_decref(root);
        return ngx_http_gift_ws_send(ws, 0x1, bad_json, sizeof(bad_json) - 1);
    }

    rc = NGX_OK;

    if ((v = json_object_get(root, "device")) != NULL) {
        rc = ngx_http_gift_ws_filter(r, &ws->client.devices, v);
    }

    if (rc == NGX_OK && (v = json_object_get(root, "room")) != NULL) {
        rc = ngx_http_gift_ws_filter(r, &ws->client.rooms, v);
    }

    if (rc == NGX_OK && (v = json_object_get(root, "status")) != NULL) {
        rc = ngx_http_gift_ws_filter(r, &ws->client.statuses, v);
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
        return ngx_http_gift_ws_send(ws, 0x1, bad_json, sizeof(bad_json) - 1);
    }

    return rc;
}


/* A filter from JSON: a string, an array of strings, or null (any). */
static ngx_int_t
ngx_http_gift_ws_filter(ngx_http_request_t *r, ngx_array_t **arr, json_t *v)
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

    *arr = ngx_array_create(r->pool, 2, sizeof(ngx_str_t));
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
        s->data = ngx_pnalloc(r->pool, s->len);
        if (s->data == NULL) {
            return NGX_ERROR;
        }
        ngx_memcpy(s->data, json_string_value(e), s->len);
    }

    return NGX_OK;
}


/* One unmasked server frame (payload <= 125 bytes) from a copy. */
static ngx_int_t
ngx_http_gift_ws_send(ngx_http_gift_ws_t *ws, ngx_uint_t opcode,
    u_char *data, size_t len)
{
    u_char  *p;

    p = ngx_pnalloc(ws->client.request->pool, len + 2);
    if (p == NULL) {
        return NGX_ERROR;
    }

    p[0] = (u_char) (0x80 | opcode);
    p[1] = (u_char) len;
    ngx_memcpy(p + 2, data, len);

    return ngx_http_gift_fanout_send_raw(&ws->client, p, len + 2);
}


/*
 * Send a close frame and stop sending anything else; the connection ends
 * once it is written (NGX_DONE when that is already the case).
 */
static ngx_int_t
ngx_http_gift_ws_close(ngx_http_gift_ws_t *ws, ngx_uint_t code,
    const char *reason)
{
    u_char     *p;
    size_t      len;
    ngx_int_t   rc;

    if (reason != NULL) {
        ngx_log_error(NGX_LOG_INFO, ws->client.request->connection->log, 0,
                      "gift: closing WebSocket with %ui: %s", code, reason);
    }

    len = reason ? ngx_min(ngx_strlen(reason), 120) : 0;

    p = ngx_pnalloc(ws->client.request->pool, len + 2);
    if (p == NULL) {
        return NGX_ERROR;
    }

    p[0] = (u_char) (code >> 8);
    p[1] = (u_char) code;
    if (len) {
        ngx_memcpy(p + 2, reason, len);
    }

    rc = ngx_http_gift_ws_send(ws, 0x8, p, len + 2);

    ws->client.closing = 1;

    if (rc == NGX_OK && ws->client.out_head == NULL) {
        return NGX_DONE;
    }

    return rc;
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
