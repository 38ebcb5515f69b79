/*
 * gift_sse: acknowledgements as Server-Sent Events.
 *
 *   GET /gift/events?device=motor_01,motor_02&status=ok
 *   Last-Event-ID: 41            (or ?last_event_id=41)
 *
 * The answer is text/event-stream: an opening comment and a retry: hint,
 * then each acknowledgement as "id: <GIFT_ACKS seq>", "event: ack",
 * "data: <JSON>", and comment heartbeats.  The stream itself is the
 * worker's fan-out (ngx_http_gift_fanout.c).
 */

#include "ngx_http_gift_module.h"

#include "gift_ssereq.h"


static void ngx_http_gift_sse_cleanup(void *data);


ngx_int_t
ngx_http_gift_sse_handler(ngx_http_request_t *r)
{
    u_char                    *p;
    size_t                     len;
    uint64_t                   last;
    ngx_int_t                  rc, resume;
    ngx_http_cleanup_t        *cln;
    ngx_http_gift_client_t    *c;
    ngx_http_gift_loc_conf_t  *glcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    glcf = ngx_http_get_module_loc_conf(r, ngx_http_gift_module);

    c = ngx_pcalloc(r->pool, sizeof(ngx_http_gift_client_t));
    if (c == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    c->request = r;
    c->kind = NGX_HTTP_GIFT_CLIENT_SSE;

    if (ngx_http_gift_fanout_parse_filters(r, c) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    resume = ngx_http_gift_last_event_id(r, &last);
    if (resume == NGX_ERROR) {
        return ngx_http_gift_send_error(r, NGX_HTTP_BAD_REQUEST,
                                        "invalid_field",
                                        "Last-Event-ID must be a sequence "
                                        "number", "Last-Event-ID");
    }

    rc = ngx_http_gift_fanout_refuse(r);
    if (rc != NGX_DECLINED) {
        return rc;
    }

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = -1;
    ngx_str_set(&r->headers_out.content_type, "text/event-stream");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    if (ngx_http_gift_add_header(r, "Cache-Control", 13,
                                 (u_char *) "no-cache", 8) != NGX_OK
        || ngx_http_gift_add_header(r, "X-Accel-Buffering", 17,
                                    (u_char *) "no", 2) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (glcf->allow_origin.len
        && ngx_http_gift_add_header(r, "Access-Control-Allow-Origin", 27,
                                    glcf->allow_origin.data,
                                    glcf->allow_origin.len) != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    /*
     * Over HTTP/1.1 the body is chunked.  nginx's chunked filter keeps each
     * buffer it wraps on a busy list until its next call, which would pin
     * the output records that the fan-out recycles across clients; so the
     * frames carry their own chunk framing (made once per worker) and the
     * filter is switched off for this request.
     */
    if (r->chunked) {
        r->chunked = 0;
        c->chunked = 1;
    }

    ngx_http_set_ctx(r, c, ngx_http_gift_module);

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        return NGX_ERROR;
    }

    cln->handler = ngx_http_gift_sse_cleanup;
    cln->data = c;

    len = sizeof(": gift acknowledgements\nretry: \n\n") - 1 + NGX_INT_T_LEN;
    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    len = ngx_sprintf(p, ": gift acknowledgements\nretry: %M\n\n",
                      glcf->sse_retry) - p;

    if (ngx_http_gift_fanout_attach(c, resume == NGX_OK, last, p, len)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* notice a client that goes away */
    r->read_event_handler = ngx_http_test_reading;

    r->main->count++;

    return NGX_DONE;
}


ngx_table_elt_t *
ngx_http_gift_find_header(ngx_http_request_t *r, const char *name,
    size_t len)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NULL;
            }
            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == len
            && ngx_strncasecmp(h[i].key.data, (u_char *) name, len) == 0)
        {
            return &h[i];
        }
    }
}


/*
 * The Last-Event-ID header, else ?last_event_id=.  NGX_OK with *seq,
 * NGX_DECLINED when absent, NGX_ERROR when it is not a number.
 */
ngx_int_t
ngx_http_gift_last_event_id(ngx_http_request_t *r, uint64_t *seq)
{
    ngx_str_t         value;
    ngx_table_elt_t  *h;

    ngx_str_null(&value);

    h = ngx_http_gift_find_header(r, "Last-Event-ID",
                                  sizeof("Last-Event-ID") - 1);
    if (h != NULL) {
        value = h->value;
    }

    if (value.len == 0
        && ngx_http_arg(r, (u_char *) "last_event_id", 13, &value) != NGX_OK)
    {
        return NGX_DECLINED;
    }

    switch (gift_sse_event_id((const char *) value.data, value.len, seq)) {
    case 0:
        return NGX_OK;
    case 1:
        return NGX_DECLINED;
    default:
        return NGX_ERROR;
    }
}


static void
ngx_http_gift_sse_cleanup(void *data)
{
    ngx_http_gift_client_t *c = data;

    ngx_http_gift_fanout_detach(c);
}


ngx_int_t
ngx_http_gift_add_header(ngx_http_request_t *r, const char *key, size_t klen,
    u_char *value, size_t vlen)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key.data = (u_char *) key;
    h->key.len = klen;
    h->value.data = value;
    h->value.len = vlen;

    return NGX_OK;
}
