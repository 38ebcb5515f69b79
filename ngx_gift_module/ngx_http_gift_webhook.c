/*
 * gift_webhook: read a gift webhook, check it, publish it to JetStream, and
 * answer 202 only once the PubAck says it is stored.
 *
 * The request waits for its PubAck without blocking the loop: it sits in
 * the NATS client's pending tree with a timer.  Whichever comes first, the
 * PubAck or the timer, answers; the request's cleanup removes both, so a
 * client that leaves early, or a PubAck that comes late, finds nothing to
 * touch.
 */

#include "ngx_http_gift_module.h"

#include "gift_json.h"


typedef struct {
    ngx_http_gift_pending_t    pending;
    ngx_event_t                timer;
    ngx_http_request_t        *request;
    uint64_t                   start_us;        /* monotonic, at publish */
    int64_t                    publish_us;      /* -1 until the PubAck */
    u_char                     event_id[GIFT_ID_MAX + 1];
} ngx_http_gift_webhook_ctx_t;


static uint64_t
ngx_http_gift_mono_us(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}


static void ngx_http_gift_webhook_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_gift_webhook_read_body(ngx_http_request_t *r,
    ngx_http_gift_loc_conf_t *glcf, u_char **body, size_t *len);
static ngx_int_t ngx_http_gift_webhook_check_signature(ngx_http_request_t *r,
    ngx_http_gift_loc_conf_t *glcf, u_char *body, size_t len);
static void ngx_http_gift_webhook_published(ngx_http_gift_pending_t *p,
    ngx_http_gift_pub_result_t *res);
static void ngx_http_gift_webhook_timeout(ngx_event_t *ev);
static void ngx_http_gift_webhook_cleanup(void *data);
static ngx_int_t ngx_http_gift_webhook_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *code, const char *message,
    const char *field);
static ngx_int_t ngx_http_gift_send_json(ngx_http_request_t *r,
    ngx_uint_t status, u_char *body, size_t len);
static ngx_uint_t ngx_http_gift_is_json(ngx_table_elt_t *ct);


/* $gift_event_id, $gift_publish_ms: for log_format */
ngx_int_t
ngx_http_gift_webhook_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                       *p;
    ngx_http_gift_loc_conf_t     *glcf;
    ngx_http_gift_webhook_ctx_t  *ctx;

    glcf = ngx_http_get_module_loc_conf(r, ngx_http_gift_module);
    ctx = ngx_http_get_module_ctx(r, ngx_http_gift_module);

    if (!glcf->webhook || ctx == NULL
        || (data == 1 && ctx->publish_us < 0))
    {
        v->not_found = 1;
        return NGX_OK;
    }

    if (data == 0) {
        v->data = ctx->event_id;
        v->len = ngx_strlen(ctx->event_id);

    } else {
        p = ngx_pnalloc(r->pool, NGX_INT64_LEN + 4);
        if (p == NULL) {
            return NGX_ERROR;
        }
        v->data = p;
        v->len = ngx_sprintf(p, "%uL.%03uL", (uint64_t) ctx->publish_us / 1000,
                             (uint64_t) ctx->publish_us % 1000) - p;
    }

    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


ngx_int_t
ngx_http_gift_webhook_handler(ngx_http_request_t *r)
{
    ngx_int_t                  rc;
    ngx_table_elt_t           *h;
    ngx_http_gift_loc_conf_t  *glcf;

    glcf = ngx_http_get_module_loc_conf(r, ngx_http_gift_module);

    if (!(r->method & NGX_HTTP_POST)) {
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
        h->hash = 1;
        ngx_str_set(&h->key, "Allow");
        ngx_str_set(&h->value, "POST");

        return ngx_http_gift_webhook_error(r, NGX_HTTP_NOT_ALLOWED,
                                           "method_not_allowed",
                                           "use POST with a JSON body", NULL);
    }

    /*
     * application/json only, and a missing Content-Type is no exception:
     * a browser posts text/plain, form data or a body without a type to
     * any origin without a CORS preflight (fetch(..., {mode: "no-cors"}),
     * a <form>), so any page the streaming PC opens could post gifts.
     * application/json is not a "simple" type: a browser asks first.
     */
    if (r->headers_in.content_type == NULL
        || !ngx_http_gift_is_json(r->headers_in.content_type))
    {
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        return ngx_http_gift_webhook_error(r, NGX_HTTP_UNSUPPORTED_MEDIA_TYPE,
                                           "unsupported_media_type",
                                           "the body must be application/json",
                                           NULL);
    }

    if (r->headers_in.content_length_n > (off_t) glcf->max_body) {
        r->keepalive = 0;
        rc = ngx_http_discard_request_body(r);
        if (rc != NGX_OK) {
            return rc;
        }

        return ngx_http_gift_webhook_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                           "body_too_large",
                                           "the body is larger than "
                                           "gift_webhook_max_body", NULL);
    }

    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r,
                                          ngx_http_gift_webhook_body_handler);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


static void
ngx_http_gift_webhook_body_handler(ngx_http_request_t *r)
{
    u_char                       *body, *packed;
    size_t                        len, plen;
    int64_t                       now_ms;
    ngx_int_t                     rc;
    ngx_time_t                   *tp;
    gift_event_t                  ev;
    gift_norm_error_t             err;
    ngx_http_cleanup_t           *cln;
    ngx_http_gift_loc_conf_t     *glcf;
    ngx_http_gift_webhook_ctx_t  *ctx;
    char                          subject[sizeof(NGX_HTTP_GIFT_SUBJECT_PREFIX)
                                          + GIFT_PLATFORM_MAX];

    glcf = ngx_http_get_module_loc_conf(r, ngx_http_gift_module);

    body = NULL;
    len = 0;

    rc = ngx_http_gift_webhook_read_body(r, glcf, &body, &len);
    if (rc == NGX_DECLINED) {
        rc = (len == 0)
             ? ngx_http_gift_webhook_error(r, NGX_HTTP_BAD_REQUEST,
                                           "invalid_json", "the body is empty",
                                           NULL)
             : ngx_http_gift_webhook_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                                           "body_too_large",
                                           "the body is larger than "
                                           "gift_webhook_max_body", NULL);
        ngx_http_finalize_request(r, rc);
        return;
    }

    if (rc != NGX_OK) {
        ngx_http_finalize_request(r, rc);
        return;
    }

    if (glcf->secrets != NULL) {
        rc = ngx_http_gift_webhook_check_signature(r, glcf, body, len);
        if (rc != NGX_OK) {
            ngx_http_finalize_request(r, rc == NGX_DONE ? NGX_OK : rc);
            return;
        }
    }

    if (gift_normalize((const char *) body, len, &ev, &err) != 0) {
        ngx_http_finalize_request(r,
            ngx_http_gift_webhook_error(r, err.status, err.code, err.message,
                                        err.field[0] ? err.field : NULL));
        return;
    }

    tp = ngx_timeofday();
    now_ms = (int64_t) tp->sec * 1000 + tp->msec;

    packed = ngx_pnalloc(r->pool, gift_event_packed_max());
    if (packed == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    plen = gift_event_pack(&ev, now_ms, packed, gift_event_packed_max());
    if (plen == 0) {
        ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                      "gift: event \"%s\" does not fit its packing bound",
                      ev.event_id);
        ngx_http_gift_stat_webhook(NGX_HTTP_GIFT_OUT_INTERNAL);
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_gift_webhook_ctx_t));
    if (ctx == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    ctx->request = r;
    ctx->publish_us = -1;
    ngx_cpystrn(ctx->event_id, (u_char *) ev.event_id, sizeof(ctx->event_id));
    ngx_http_set_ctx(r, ctx, ngx_http_gift_module);

    /* platform is [a-z0-9_-]{1,32}: a single, safe subject token */
    ngx_sprintf((u_char *) subject, NGX_HTTP_GIFT_SUBJECT_PREFIX "%s%Z",
                ev.platform);

    cln = ngx_http_cleanup_add(r, 0);
    if (cln == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }
    cln->handler = ngx_http_gift_webhook_cleanup;
    cln->data = ctx;

    ctx->pending.handler = ngx_http_gift_webhook_published;
    ctx->pending.data = ctx;
    ctx->start_us = ngx_http_gift_mono_us();

    rc = ngx_http_gift_nats_publish(&ctx->pending, subject, ev.event_id,
                                    packed, plen, r->connection->log);

    if (rc == NGX_DECLINED || rc == NGX_BUSY || rc == NGX_ERROR) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "gift: event \"%s\" refused: %s", ev.event_id,
                      rc == NGX_DECLINED ? "NATS is not connected"
                      : rc == NGX_BUSY ? "the NATS queue is full"
                      : "cannot build the message");
        ngx_http_finalize_request(r,
            ngx_http_gift_webhook_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                        "unavailable",
                                        rc == NGX_BUSY
                                        ? "too many gifts waiting for NATS"
                                        : "NATS is not connected", NULL));
        return;
    }

    ctx->timer.handler = ngx_http_gift_webhook_timeout;
    ctx->timer.data = ctx;
    ctx->timer.log = r->connection->log;
    ngx_add_timer(&ctx->timer, glcf->publish_timeout);

    /* notice a client that goes away while we wait */
    r->read_event_handler = ngx_http_test_reading;
}


/*
 * The whole body as one contiguous buffer: the request's own buffer when
 * nginx read it into one (the common case), otherwise a copy from its
 * buffers or its temporary file.  Returns NGX_OK, NGX_DECLINED (empty body:
 * *len is 0; too large: *len is its size) or an HTTP status.
 */
static ngx_int_t
ngx_http_gift_webhook_read_body(ngx_http_request_t *r,
    ngx_http_gift_loc_conf_t *glcf, u_char **body, size_t *len)
{
    u_char       *p;
    off_t         size;
    ssize_t       n;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    *len = 0;

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        return NGX_DECLINED;
    }

    size = 0;
    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        size += ngx_buf_size(cl->buf);
    }

    if (size == 0) {
        return NGX_DECLINED;
    }

    if (size > (off_t) glcf->max_body) {
        r->keepalive = 0;
        *len = (size_t) size;
        return NGX_DECLINED;
    }

    cl = r->request_body->bufs;
    b = cl->buf;

    if (cl->next == NULL && !b->in_file) {
        *body = b->pos;
        *len = b->last - b->pos;
        return NGX_OK;
    }

    p = ngx_pnalloc(r->pool, (size_t) size);
    if (p == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    *body = p;
    *len = (size_t) size;

    for ( /* void */ ; cl; cl = cl->next) {
        b = cl->buf;

        if (b->in_file) {
            n = ngx_read_file(b->file, p, (size_t) (b->file_last - b->file_pos),
                              b->file_pos);
            if (n != b->file_last - b->file_pos) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }
            p += n;

        } else if (b->last != b->pos) {
            /* an empty buffer may have no memory at all (pos NULL) */
            p = ngx_cpymem(p, b->pos, b->last - b->pos);
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_gift_webhook_check_signature(ngx_http_request_t *r,
    ngx_http_gift_loc_conf_t *glcf, u_char *body, size_t len)
{
    ngx_int_t         rc;
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h, *sig;

    static const char *messages[] = {
        "",
        "the X-Gift-Signature header is missing",
        "the signature does not match",
        "the signature's timestamp is outside the accepted window"
    };

    sig = NULL;
    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }
            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == sizeof("X-Gift-Signature") - 1
            && ngx_strncasecmp(h[i].key.data, (u_char *) "X-Gift-Signature",
                               sizeof("X-Gift-Signature") - 1) == 0)
        {
            sig = &h[i];
            break;
        }
    }

    rc = (ngx_int_t) gift_signature_verify_skew(
                        sig ? (const char *) sig->value.data : NULL,
                        sig ? sig->value.len : 0, body, len,
                        glcf->secrets->elts, glcf->secrets->nelts,
                        ngx_time(), glcf->signature_window,
                        glcf->signature_skew);

    if (rc == GIFT_SIG_OK) {
        return NGX_OK;
    }

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "gift: webhook refused: %s", gift_sig_code((gift_sig_rc) rc));

    /* an answer is sent: the caller finalizes, whatever the filters said */
    rc = ngx_http_gift_webhook_error(r, NGX_HTTP_UNAUTHORIZED,
                                     gift_sig_code((gift_sig_rc) rc),
                                     messages[rc], NULL);
    return rc == NGX_OK ? NGX_DONE : rc;
}


static void
ngx_http_gift_webhook_published(ngx_http_gift_pending_t *p,
    ngx_http_gift_pub_result_t *res)
{
    ngx_http_gift_webhook_ctx_t *ctx = p->data;

    u_char              *body, *last;
    ngx_int_t            rc;
    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    r = ctx->request;
    c = r->connection;

    if (ctx->timer.timer_set) {
        ngx_del_timer(&ctx->timer);
    }

    ctx->publish_us = ngx_http_gift_mono_us() - ctx->start_us;

    switch (res->status) {

    case NGX_HTTP_GIFT_PUB_OK:
        ngx_http_gift_stat_publish(ctx->publish_us);
        ngx_http_gift_stat_webhook(res->duplicate
                                   ? NGX_HTTP_GIFT_OUT_DUPLICATE
                                   : NGX_HTTP_GIFT_OUT_ACCEPTED);

        body = ngx_pnalloc(r->pool, GIFT_ID_MAX + 80);
        if (body == NULL) {
            rc = NGX_HTTP_INTERNAL_SERVER_ERROR;
            break;
        }

        /* the event id is [A-Za-z0-9._:-]: nothing to escape */
        last = ngx_sprintf(body, "{\"id\":\"%s\",\"seq\":%uL,"
                           "\"duplicate\":%s}\n", ctx->event_id, res->seq,
                           res->duplicate ? "true" : "false");

        rc = ngx_http_gift_send_json(r, NGX_HTTP_ACCEPTED, body, last - body);
        break;

    case NGX_HTTP_GIFT_PUB_STREAM_FULL:
        ngx_log_error(NGX_LOG_WARN, c->log, 0,
                      "gift: event \"%s\" refused: stream full (%s)",
                      ctx->event_id, res->error);
        rc = ngx_http_gift_webhook_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                         "stream_full",
                                         "the gift stream is full; retry later",
                                         NULL);
        break;

    default:
        ngx_log_error(NGX_LOG_WARN, c->log, 0,
                      "gift: event \"%s\" not stored: %s", ctx->event_id,
                      res->error);
        rc = ngx_http_gift_webhook_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                         "unavailable", res->error, NULL);
        break;
    }

    ngx_http_finalize_request(r, rc);
    ngx_http_run_posted_requests(c);
}


static void
ngx_http_gift_webhook_timeout(ngx_event_t *ev)
{
    ngx_http_gift_webhook_ctx_t *ctx = ev->data;

    ngx_connection_t    *c;
    ngx_http_request_t  *r;

    r = ctx->request;
    c = r->connection;

    ngx_http_gift_nats_cancel(&ctx->pending);

    ngx_log_error(NGX_LOG_WARN, c->log, 0,
                  "gift: event \"%s\": no PubAck in time", ctx->event_id);

    ngx_http_finalize_request(r,
        ngx_http_gift_webhook_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                    "publish_timeout",
                                    "NATS did not confirm the gift in time; "
                                    "retry (retries are deduplicated)", NULL));
    ngx_http_run_posted_requests(c);
}


static void
ngx_http_gift_webhook_cleanup(void *data)
{
    ngx_http_gift_webhook_ctx_t *ctx = data;

    if (ctx->timer.timer_set) {
        ngx_del_timer(&ctx->timer);
    }

    ngx_http_gift_nats_cancel(&ctx->pending);
}


/*
 * A refusal of the webhook: counted in gift_webhooks_total by its code,
 * then answered as ngx_http_gift_send_error() does.  The stream endpoints'
 * refusals are no webhook answers and call that directly.
 */
static ngx_int_t
ngx_http_gift_webhook_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message, const char *field)
{
    ngx_uint_t  i;

    /* in ngx_http_gift_outcome_e order */
    static const char  *ngx_http_gift_codes[NGX_HTTP_GIFT_OUTCOME_N] = {
        "", "", "invalid_json", "signature_missing", "signature_invalid",
        "signature_expired", "method_not_allowed", "body_too_large",
        "unsupported_media_type", "invalid_field", "unavailable",
        "publish_timeout", "stream_full", "internal_error"
    };

    for (i = 0; i < NGX_HTTP_GIFT_OUTCOME_N; i++) {
        if (ngx_strcmp(code, ngx_http_gift_codes[i]) == 0) {
            ngx_http_gift_stat_webhook(i);
            break;
        }
    }

    return ngx_http_gift_send_error(r, status, code, message, field);
}


ngx_int_t
ngx_http_gift_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *code, const char *message, const char *field)
{
    char                      *out;
    size_t                     len, cap;
    u_char                    *p;
    ngx_table_elt_t           *h;
    ngx_http_gift_loc_conf_t  *glcf;

    cap = 1024;
    out = ngx_pnalloc(r->pool, cap);
    if (out == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    len = 0;
    p = ngx_cpymem(out, "{\"error\":", sizeof("{\"error\":") - 1);
    len = p - (u_char *) out;

    if (gift_json_str(out, cap, &len, code) != 0) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    p = ngx_cpymem(out + len, ",\"message\":", sizeof(",\"message\":") - 1);
    len = p - (u_char *) out;

    if (gift_json_str(out, cap - 40, &len, message) != 0) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (field != NULL) {
        p = ngx_cpymem(out + len, ",\"field\":", sizeof(",\"field\":") - 1);
        len = p - (u_char *) out;

        if (gift_json_str(out, cap - 4, &len, field) != 0) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    out[len++] = '}';
    out[len++] = '\n';

    if (status == NGX_HTTP_SERVICE_UNAVAILABLE) {
        glcf = ngx_http_get_module_loc_conf(r, ngx_http_gift_module);

        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        p = ngx_pnalloc(r->pool, NGX_TIME_T_LEN);
        if (p == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "Retry-After");
        h->value.data = p;
        h->value.len = ngx_sprintf(p, "%T", glcf->retry_after) - p;
    }

    return ngx_http_gift_send_json(r, status, (u_char *) out, len);
}


static ngx_int_t
ngx_http_gift_send_json(ngx_http_request_t *r, ngx_uint_t status,
    u_char *body, size_t len)
{
    static ngx_str_t  json = ngx_string("application/json");

    return ngx_http_gift_send_body(r, status, &json, body, len);
}


ngx_int_t
ngx_http_gift_send_body(ngx_http_request_t *r, ngx_uint_t status,
    ngx_str_t *type, u_char *body, size_t len)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_chain_t   out;

    r->headers_out.status = status;
    r->headers_out.content_length_n = len;
    r->headers_out.content_type = *type;
    r->headers_out.content_type_len = type->len;
    r->headers_out.content_type_lowcase = NULL;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = body;
    b->last = body + len;
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


/*
 * application/json, in any case, with or without parameters
 * ("application/json; charset=utf-8").  Not application/<x>+json: one type
 * is enough for every sender we know, and the fewer types, the less to
 * reason about.
 */
static ngx_uint_t
ngx_http_gift_is_json(ngx_table_elt_t *ct)
{
    u_char  *p, *end, *semi;

    p = ct->value.data;
    end = p + ct->value.len;

    while (p < end && (*p == ' ' || *p == '\t')) {
        p++;
    }

    semi = ngx_strlchr(p, end, ';');
    if (semi != NULL) {
        end = semi;
    }

    while (end > p && (end[-1] == ' ' || end[-1] == '\t')) {
        end--;
    }

    return (size_t) (end - p) == sizeof("application/json") - 1
           && ngx_strncasecmp(p, (u_char *) "application/json",
                              sizeof("application/json") - 1) == 0;
}
