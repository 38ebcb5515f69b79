/*
 * The worker's NATS connection: what the server says (the parser's
 * callbacks), the handshake and TLS.
 *
 * INFO comes in clear.  A tls:// server must say tls_required; the client
 * then upgrades the same socket with nginx's SSL (ngx_ssl_handshake, as
 * nginx's upstream SSL does), checks the certificate chain and the name
 * (gift_nats_ssl_name, or the URL's host), and only then sends CONNECT,
 * with the credentials: user and password or a token from the URL,
 * gift_nats_token, or an NKey (gift_nats_nkey, or the seed of a .creds
 * file with its JWT) signing the server's nonce.  The users' SUB lines and
 * a PING follow; the PONG makes the connection up.
 */

#include "ngx_http_gift_nats_conn.h"

#include <jansson.h>


static int ngx_http_gift_nats_on_msg(void *ctx, ngx_http_gift_nats_msg_t *m);
static int ngx_http_gift_nats_on_info(void *ctx, const unsigned char *json,
    size_t len);
static int ngx_http_gift_nats_on_ping(void *ctx);
static int ngx_http_gift_nats_on_pong(void *ctx);
static int ngx_http_gift_nats_on_err(void *ctx, const unsigned char *text,
    size_t len);
#if (NGX_SSL)
static void ngx_http_gift_nats_ssl_start(ngx_http_gift_nats_t *p);
static void ngx_http_gift_nats_ssl_done(ngx_connection_t *c);
#endif
static void ngx_http_gift_nats_send_connect(ngx_http_gift_nats_t *p);


void
ngx_http_gift_nats_handshake_init(ngx_http_gift_nats_t *p)
{
    p->parser.msg = ngx_http_gift_nats_on_msg;
    p->parser.info = ngx_http_gift_nats_on_info;
    p->parser.ping = ngx_http_gift_nats_on_ping;
    p->parser.pong = ngx_http_gift_nats_on_pong;
    p->parser.err = ngx_http_gift_nats_on_err;
    p->parser.ctx = p;
    p->parser.max_payload = p->max_payload;
}


/* ------------------------------------------------------------ protocol */


static int
ngx_http_gift_nats_on_msg(void *ctx, ngx_http_gift_nats_msg_t *m)
{
    ngx_uint_t             i;
    ngx_connection_t      *c;
    ngx_http_gift_nats_t  *p = ctx;

    c = p->c;

    for (i = 0; i < p->nusers; i++) {
        if (p->users[i]->sid == m->sid[0]) {
            p->users[i]->message(p->users[i]->data, m);
            break;
        }
    }

    return p->c == c ? 0 : 1;
}


static int
ngx_http_gift_nats_on_ping(void *ctx)
{
    u_char  *o;

    o = ngx_http_gift_nats_out(6);
    if (o == NULL) {
        return 1;
    }

    (void) ngx_http_gift_nats_queue(ngx_cpymem(o, "PONG\r\n", 6));

    return 0;
}


static int
ngx_http_gift_nats_on_pong(void *ctx)
{
    ngx_uint_t                    i;
    ngx_connection_t             *c;
    ngx_http_gift_nats_t         *p = ctx;
    ngx_http_gift_nats_server_t  *srv;

    p->pings_out = 0;

    if (p->state != NGX_HTTP_GIFT_NATS_HANDSHAKE) {
        return 0;
    }

    srv = &p->servers[p->server];
    c = p->c;

    p->state = NGX_HTTP_GIFT_NATS_CONNECTED;
    p->tried = 0;
    p->warned = 0;

    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }

    c->log = p->log;
    c->read->log = p->log;
    c->write->log = p->log;

    ngx_http_gift_stat_nats(1, p->was_connected);
    p->was_connected = 1;

    ngx_add_timer(&p->ping_ev, NGX_HTTP_GIFT_NATS_PING_INTERVAL);

    ngx_log_error(NGX_LOG_NOTICE, p->log, 0, "gift: connected to NATS %V%s",
                  &srv->name,
#if (NGX_SSL)
                  c->ssl ? " over TLS" : ""
#else
                  ""
#endif
                  );

    for (i = 0; i < p->nusers && p->c == c; i++) {
        p->users[i]->connected(p->users[i]->data);
    }

    return p->c == c ? 0 : 1;
}


static int
ngx_http_gift_nats_on_err(void *ctx, const unsigned char *text, size_t len)
{
    ngx_http_gift_nats_t  *p = ctx;

    ngx_log_error(NGX_LOG_ERR, p->log, 0, "gift: NATS %V: %*s",
                  &p->servers[p->server].name, len, text);

    if (p->state != NGX_HTTP_GIFT_NATS_CONNECTED) {
        ngx_http_gift_nats_fail(p, "refused by the server", 0);
        return 1;
    }

    /* a fatal one is followed by the server closing */
    return 0;
}


static int
ngx_http_gift_nats_on_info(void *ctx, const unsigned char *data, size_t len)
{
    json_t                       *info, *v;
    json_error_t                  jerr;
    ngx_uint_t                    tls, avail;
    const char                   *s;
    ngx_http_gift_nats_t         *p = ctx;
    ngx_http_gift_nats_server_t  *srv;

    info = json_loadb((const char *) data, len, 0, &jerr);
    if (info == NULL) {
        ngx_http_gift_nats_fail(p, "unreadable INFO", 0);
        return 1;
    }

    v = json_object_get(info, "max_payload");
    if (json_is_integer(v) && json_integer_value(v) > 0
        && json_integer_value(v) <= 64 * 1024 * 1024)
    {
        p->max_payload = (size_t) json_integer_value(v);
        p->parser.max_payload = p->max_payload;
    }

    ngx_http_gift_nats_discover(p->pool, p->servers, &p->nservers,
                                p->nconf + NGX_HTTP_GIFT_NATS_DISCOVER_MAX,
                                p->server,
                                json_object_get(info, "connect_urls"),
                                p->log);

    if (p->state != NGX_HTTP_GIFT_NATS_CONNECTING) {
        json_decref(info);
        return 0;               /* an update from a cluster: nothing else */
    }

    srv = &p->servers[p->server];

    v = json_object_get(info, "headers");
    if (v != NULL && !json_is_true(v)) {
        json_decref(info);
        ngx_http_gift_nats_fail(p, "the server does not support headers "
                                "(nats-server 2.2 or newer is needed)", 0);
        return 1;
    }

    p->nonce.len = 0;
    v = json_object_get(info, "nonce");
    if (json_is_string(v)) {
        s = json_string_value(v);
        p->nonce.len = ngx_min(ngx_strlen(s), sizeof(p->nonce_buf));
        p->nonce.data = p->nonce_buf;
        ngx_memcpy(p->nonce_buf, s, p->nonce.len);
    }

    tls = json_is_true(json_object_get(info, "tls_required"));
    /* allow_non_tls: TLS offered, not required */
    avail = tls || json_is_true(json_object_get(info, "tls_available"));
    json_decref(info);

    if (tls && !srv->tls) {
        ngx_http_gift_nats_fail(p, "the server requires TLS: use a tls:// "
                                "URL", 0);
        return 1;
    }

    if (srv->tls) {
        if (!avail) {
            ngx_http_gift_nats_fail(p, "the server does not offer TLS "
                                    "(a tls:// URL needs tls {} in its "
                                    "configuration)", 0);
            return 1;
        }

#if (NGX_SSL)
        ngx_http_gift_nats_ssl_start(p);
        return 1;               /* the socket is TLS's now */
#else
        ngx_http_gift_nats_fail(p, "nginx is built without SSL", 0);
        return 1;
#endif
    }

    ngx_http_gift_nats_send_connect(p);

    return p->c ? 0 : 1;
}


/* ------------------------------------------------------------ TLS */

#if (NGX_SSL)

static void
ngx_http_gift_nats_ssl_start(ngx_http_gift_nats_t *p)
{
    ngx_int_t                     rc;
    ngx_str_t                    *name;
    ngx_connection_t             *c;
    ngx_http_gift_nats_server_t  *srv;

    c = p->c;
    srv = &p->servers[p->server];

    if (c->pool == NULL) {
        c->pool = ngx_create_pool(128, p->log);
        if (c->pool == NULL) {
            ngx_http_gift_nats_fail(p, "out of memory", 0);
            return;
        }
    }

    if (ngx_ssl_create_connection(p->conf->ssl, c, NGX_SSL_CLIENT) != NGX_OK)
    {
        ngx_http_gift_nats_fail(p, "cannot start TLS", 0);
        return;
    }

    name = p->conf->ssl_name.len ? &p->conf->ssl_name : &srv->host;

    /* SNI takes a name, not an address (RFC 6066) */
    if (p->conf->ssl_name.len || srv->is_name) {
        if (SSL_set_tlsext_host_name(c->ssl->connection, (char *) name->data)
            != 1)
        {
            ngx_ssl_error(NGX_LOG_ERR, p->log, 0,
                          "gift: SSL_set_tlsext_host_name(\"%V\") failed",
                          name);
        }
    }

    p->state = NGX_HTTP_GIFT_NATS_TLS;

    rc = ngx_ssl_handshake(c);

    if (rc == NGX_AGAIN) {
        c->ssl->handler = ngx_http_gift_nats_ssl_done;
        return;
    }

    ngx_http_gift_nats_ssl_done(c);
}


static void
ngx_http_gift_nats_ssl_done(ngx_connection_t *c)
{
    long                          rc;
    ngx_str_t                    *name;
    ngx_http_gift_nats_t         *p;
    ngx_http_gift_nats_server_t  *srv;

    p = c->data;
    srv = &p->servers[p->server];

    if (!c->ssl->handshaked) {
        ngx_http_gift_nats_fail(p, c->read->timedout
                                   ? "TLS handshake timed out"
                                   : "TLS handshake failed", 0);
        return;
    }

    if (p->conf->ssl_verify) {
        name = p->conf->ssl_name.len ? &p->conf->ssl_name : &srv->host;

        rc = SSL_get_verify_result(c->ssl->connection);
        if (rc != X509_V_OK) {
            ngx_log_error(NGX_LOG_ERR, p->log, 0,
                          "gift: NATS %V: the server's certificate is not "
                          "trusted: (%l:%s)", &srv->name, rc,
                          X509_verify_cert_error_string(rc));
            ngx_http_gift_nats_fail(p, "certificate not trusted", 0);
            return;
        }

        if (ngx_ssl_check_host(c, name) != NGX_OK) {
            ngx_log_error(NGX_LOG_ERR, p->log, 0,
                          "gift: NATS %V: the server's certificate does not "
                          "match \"%V\"", &srv->name, name);
            ngx_http_gift_nats_fail(p, "certificate of another name", 0);
            return;
        }
    }

    c->read->handler = ngx_http_gift_nats_read_handler;
    c->write->handler = ngx_http_gift_nats_write_handler;

    ngx_http_gift_nats_send_connect(p);

    if (p->c == c && c->read->ready) {
        /* the server may have spoken already */
        ngx_post_event(c->read, &ngx_posted_events);
    }
}

#endif /* NGX_SSL */


/* ------------------------------------------------------------ CONNECT */


static void
ngx_http_gift_nats_send_connect(ngx_http_gift_nats_t *p)
{
    char                         *connect;
    u_char                        name[64], sig[64], b64[128], *o;
    size_t                        clen;
    json_t                       *co;
    ngx_uint_t                    i;
    ngx_http_gift_nats_conf_t    *cf;
    ngx_http_gift_nats_server_t  *srv;

    srv = &p->servers[p->server];
    cf = p->conf;

    /* the name nats-server shows (connz): the worker's PID in it */
    ngx_sprintf(name, "nginx-gift worker %P%Z", ngx_pid);

    co = json_pack("{s:b, s:b, s:b, s:s, s:s, s:s, s:i, s:b, s:b}",
                   "verbose", 0, "pedantic", 0, "tls_required", srv->tls,
                   "name", (char *) name, "lang", "C",
                   "version", NGX_HTTP_GIFT_VERSION, "protocol", 1,
                   "headers", 1, "no_responders", 1);
    if (co == NULL) {
        ngx_http_gift_nats_fail(p, "out of memory", 0);
        return;
    }

    if (srv->user.len || srv->pass.len) {
        json_object_set_new(co, "user", json_stringn((char *) srv->user.data,
                                                     srv->user.len));
        json_object_set_new(co, "pass", json_stringn((char *) srv->pass.data,
                                                     srv->pass.len));
    }

    if (srv->token.len || cf->token.len) {
        json_object_set_new(co, "auth_token", srv->token.len
                            ? json_stringn((char *) srv->token.data,
                                           srv->token.len)
                            : json_stringn((char *) cf->token.data,
                                           cf->token.len));
    }

    if (cf->nkey) {
        /* the server's nonce, signed: proof that we hold the seed */
        if (gift_nkey_sign(cf->nkey, p->nonce.data, p->nonce.len, sig) != 0)
        {
            json_decref(co);
            ngx_http_gift_nats_fail(p, "cannot sign the nonce", 0);
            return;
        }
        gift_base64url(sig, 64, (char *) b64);
        json_object_set_new(co, "sig", json_string((char *) b64));

        if (cf->jwt.len) {
            json_object_set_new(co, "jwt", json_stringn((char *) cf->jwt.data,
                                                        cf->jwt.len));
        } else {
            json_object_set_new(co, "nkey",
                                json_string(cf->nkey->public_key));
        }
    }

    connect = json_dumps(co, JSON_COMPACT);
    json_decref(co);

    if (connect == NULL) {
        ngx_http_gift_nats_fail(p, "out of memory", 0);
        return;
    }

    clen = ngx_strlen(connect);

    o = ngx_http_gift_nats_out(clen + sizeof("CONNECT \r\n"));
    if (o == NULL) {
        free(connect);
        return;
    }

    o = ngx_sprintf(o, "CONNECT %*s\r\n", clen, connect);
    (void) ngx_http_gift_nats_queue(o);
    free(connect);

    p->state = NGX_HTTP_GIFT_NATS_HANDSHAKE;

    /* the users' subscriptions, then the PING that ends the handshake */
    for (i = 0; i < p->nusers; i++) {
        if (p->users[i]->handshake(p->users[i]->data) != NGX_OK) {
            return;
        }
    }

    o = ngx_http_gift_nats_out(6);
    if (o == NULL) {
        return;
    }
    (void) ngx_http_gift_nats_queue(ngx_cpymem(o, "PING\r\n", 6));

    ngx_http_gift_nats_flush(p);
}
