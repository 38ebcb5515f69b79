/*
 * NATS configuration: gift_nats_url, TLS (gift_nats_ssl_*, in the manner of
 * proxy_ssl_*) and credentials (token, NKey seed, .creds file).
 *
 * Every file is read here, by the master, when it reads the configuration:
 * the workers run as an unprivileged user that may not read a 0600 key,
 * and a file that cannot be read or parsed stops nginx at start, naming
 * the file and the reason.  The SSL context, with its certificates, is
 * made here too and inherited by the workers.
 */

#include "ngx_http_gift_nats_conn.h"

#include <jansson.h>


#define NGX_HTTP_GIFT_NATS_KEY_FILE_MAX  65536


static ngx_int_t ngx_http_gift_nats_server(ngx_conf_t *cf,
    ngx_http_gift_main_conf_t *gmcf, ngx_str_t *value);


char *
ngx_http_gift_nats_url(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_gift_main_conf_t *gmcf = conf;

    ngx_str_t   *value, *url;
    ngx_uint_t   i;

    if (gmcf->nats_urls == NULL) {
        gmcf->nats_urls = ngx_array_create(cf->pool, 4, sizeof(ngx_str_t));
        if (gmcf->nats_urls == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {
        if (ngx_strncmp(value[i].data, "nats://", 7) != 0
            && ngx_strncmp(value[i].data, "tls://", 6) != 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid NATS URL \"%V\": expected "
                               "nats://host:port or tls://host:port",
                               &value[i]);
            return NGX_CONF_ERROR;
        }

        url = ngx_array_push(gmcf->nats_urls);
        if (url == NULL) {
            return NGX_CONF_ERROR;
        }

        *url = value[i];

        if (value[i].data[0] == 't') {
            gmcf->nats_tls = 1;
        }

        if (ngx_http_gift_nats_server(cf, gmcf, &value[i]) != NGX_OK) {
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


/* "host:port" (or "[v6]:port"): host NUL-terminated, in pool */
static ngx_int_t
ngx_http_gift_nats_host(ngx_pool_t *pool, ngx_http_gift_nats_server_t *srv,
    ngx_url_t *u)
{
    u_char  *h;

    h = ngx_pnalloc(pool, u->host.len + 1);
    if (h == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(h, u->host.data, u->host.len);
    h[u->host.len] = '\0';

    srv->host.data = h;
    srv->host.len = u->host.len;
    srv->port = u->port;
    srv->is_name = ngx_inet_addr(h, u->host.len) == INADDR_NONE
                   && u->host.data[0] != '[';

    return NGX_OK;
}


/*
 * scheme://[user:password@ | token@]host[:port] into a server: resolved
 * now (as nginx resolves its upstream servers), so that a bad name fails
 * at start.
 */
static ngx_int_t
ngx_http_gift_nats_server(ngx_conf_t *cf, ngx_http_gift_main_conf_t *gmcf,
    ngx_str_t *value)
{
    u_char                       *at, *colon, *host, *p;
    ngx_url_t                     u;
    ngx_http_gift_nats_server_t  *srv;

    if (gmcf->nats_servers == NULL) {
        gmcf->nats_servers = ngx_array_create(cf->pool, 4,
                                          sizeof(ngx_http_gift_nats_server_t));
        if (gmcf->nats_servers == NULL) {
            return NGX_ERROR;
        }
    }

    srv = ngx_array_push(gmcf->nats_servers);
    if (srv == NULL) {
        return NGX_ERROR;
    }
    ngx_memzero(srv, sizeof(ngx_http_gift_nats_server_t));
    srv->url = *value;
    srv->tls = (value->data[0] == 't');

    host = (u_char *) ngx_strstr(value->data, "://") + 3;

    /*
     * The last '@': a password may hold one.  Taken as written, without
     * percent-decoding, as cnats (the dispatcher, giftctl) takes it.
     */
    at = NULL;
    for (p = value->data + value->len; p > host; p--) {
        if (p[-1] == '@') {
            at = p - 1;
            break;
        }
    }

    if (at != NULL) {
        colon = ngx_strlchr(host, at, ':');
        if (colon != NULL) {
            srv->user.data = host;
            srv->user.len = colon - host;
            srv->pass.data = colon + 1;
            srv->pass.len = at - colon - 1;
        } else {
            srv->token.data = host;
            srv->token.len = at - host;
        }
        host = at + 1;
    }

    ngx_memzero(&u, sizeof(ngx_url_t));
    u.url.data = host;
    u.url.len = value->data + value->len - host;
    u.default_port = 4222;

    if (ngx_parse_url(cf->pool, &u) != NGX_OK || u.naddrs == 0) {
        /* the host part only: the credentials stay out of the log */
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid NATS URL (host \"%V\")%s%s", &u.url,
                           u.err ? ": " : "", u.err ? u.err : "");
        return NGX_ERROR;
    }

    srv->addrs = u.addrs;
    srv->naddrs = u.naddrs;
    srv->name.data = host;
    srv->name.len = u.url.len;

    return ngx_http_gift_nats_host(cf->pool, srv, &u);
}


/*
 * gift_nats_nkey FILE (a seed) and gift_nats_credentials FILE (a user JWT
 * and its seed, as nsc writes them): read now, by the master.
 */
char *
ngx_http_gift_nats_key_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_gift_main_conf_t *gmcf = conf;

    u_char           *buf;
    size_t            jlen;
    ssize_t           n;
    ngx_fd_t          fd;
    ngx_str_t        *value, file;
    gift_nkey_t      *k;
    ngx_file_info_t   fi;
    const char       *err, *seed, *jwt;

    if (gmcf->nats.nkey != NULL) {
        return "is duplicate: one of gift_nats_nkey and gift_nats_credentials";
    }

    value = cf->args->elts;
    file = value[1];

    if (ngx_conf_full_name(cf->cycle, &file, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    fd = ngx_open_file(file.data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "%V: cannot open \"%s\"", &cmd->name, file.data);
        return NGX_CONF_ERROR;
    }

    buf = NULL;
    err = NULL;

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "%V: cannot stat \"%s\"", &cmd->name, file.data);
        goto failed;
    }

    if (ngx_file_size(&fi) > NGX_HTTP_GIFT_NATS_KEY_FILE_MAX) {
        err = "too large for a key file";
        goto bad;
    }

    buf = ngx_pnalloc(cf->temp_pool, ngx_file_size(&fi) + 1);
    if (buf == NULL) {
        goto failed;
    }

    n = ngx_read_fd(fd, buf, ngx_file_size(&fi));
    if (n == -1) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "%V: cannot read \"%s\"", &cmd->name, file.data);
        goto failed;
    }

    k = ngx_pcalloc(cf->pool, sizeof(gift_nkey_t));
    if (k == NULL) {
        goto failed;
    }

    if (cmd->post != NULL) {
        /* gift_nats_credentials */
        if (gift_nkey_find_jwt((char *) buf, n, &jwt, &jlen, &err) != 0) {
            goto bad;
        }

        gmcf->nats.jwt.data = ngx_pnalloc(cf->pool, jlen);
        if (gmcf->nats.jwt.data == NULL) {
            goto failed;
        }
        ngx_memcpy(gmcf->nats.jwt.data, jwt, jlen);
        gmcf->nats.jwt.len = jlen;
    }

    if (gift_nkey_find_seed((char *) buf, n, &seed, &err) != 0
        || gift_nkey_from_seed(seed, GIFT_NKEY_SEED_LEN, k, &err) != 0)
    {
        goto bad;
    }

    if (k->type != GIFT_NKEY_USER) {
        err = "the seed is not a user's (\"SU...\")";
        goto bad;
    }

    gmcf->nats.nkey = k;

    OPENSSL_cleanse(buf, n);
    ngx_close_file(fd);

    return NGX_CONF_OK;

bad:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%V: \"%s\": %s", &cmd->name,
                       file.data, err);

failed:

    if (buf) {
        OPENSSL_cleanse(buf, ngx_file_size(&fi));
    }
    ngx_close_file(fd);

    return NGX_CONF_ERROR;
}


/* The SSL context for tls:// servers, with its files; from init_main_conf. */
char *
ngx_http_gift_nats_init_conf(ngx_conf_t *cf, ngx_http_gift_main_conf_t *gmcf)
{
#if (NGX_SSL)
    ngx_ssl_t                  *ssl;
    ngx_pool_cleanup_t         *cln;
#endif
    ngx_http_gift_nats_conf_t  *nc;

    nc = &gmcf->nats;

    ngx_conf_init_value(nc->ssl_verify, 1);

    if (nc->ssl_certificate.len && nc->ssl_certificate_key.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "no \"gift_nats_ssl_certificate_key\" for "
                           "\"gift_nats_ssl_certificate\" \"%V\"",
                           &nc->ssl_certificate);
        return NGX_CONF_ERROR;
    }

    if (!gmcf->nats_tls) {
        if (nc->ssl_certificate.len || nc->ssl_trusted_certificate.len) {
            ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                               "gift_nats_ssl_* without a tls:// URL in "
                               "gift_nats_url: no TLS");
        }
        return NGX_CONF_OK;
    }

#if !(NGX_SSL)

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "a tls:// NATS URL needs nginx built with SSL");
    return NGX_CONF_ERROR;

#else

    ssl = ngx_pcalloc(cf->pool, sizeof(ngx_ssl_t));
    if (ssl == NULL) {
        return NGX_CONF_ERROR;
    }

    ssl->log = cf->log;

    if (ngx_ssl_create(ssl, NGX_SSL_TLSv1_2|NGX_SSL_TLSv1_3, NULL) != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        ngx_ssl_cleanup_ctx(ssl);
        return NGX_CONF_ERROR;
    }

    cln->handler = ngx_ssl_cleanup_ctx;
    cln->data = ssl;

    /* the output buffer may grow (move) between two tries of one write */
    SSL_CTX_set_mode(ssl->ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                               |SSL_MODE_ENABLE_PARTIAL_WRITE);

    if (nc->ssl_certificate.len
        && ngx_ssl_certificate(cf, ssl, &nc->ssl_certificate,
                               &nc->ssl_certificate_key, NULL)
           != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    if (nc->ssl_verify) {
        if (nc->ssl_trusted_certificate.len) {
            if (ngx_ssl_trusted_certificate(cf, ssl,
                                            &nc->ssl_trusted_certificate, 9)
                != NGX_OK)
            {
                return NGX_CONF_ERROR;
            }

        } else if (SSL_CTX_set_default_verify_paths(ssl->ctx) != 1) {
            ngx_ssl_error(NGX_LOG_EMERG, cf->log, 0,
                          "gift_nats_ssl_verify: the system's CA "
                          "certificates cannot be loaded");
            return NGX_CONF_ERROR;
        }
    }

    nc->ssl = ssl;

    return NGX_CONF_OK;

#endif
}


/*
 * The servers of the cluster, as INFO announces them ("connect_urls", at
 * connect and whenever the cluster changes): added to the list the worker
 * goes round when a connection is lost, as the NATS clients do, with the
 * scheme and credentials of the server that announced them.  A name is
 * resolved when the worker comes to it (off the loop).
 */
void
ngx_http_gift_nats_discover(ngx_pool_t *pool,
    ngx_http_gift_nats_server_t *servers, ngx_uint_t *nservers,
    ngx_uint_t max, ngx_uint_t from, void *list, ngx_log_t *log)
{
    u_char                       *d;
    size_t                        i, len;
    json_t                       *v, *urls;
    ngx_url_t                     u;
    ngx_addr_t                   *addr;
    ngx_uint_t                    k, a, known;
    ngx_pool_t                   *tmp;
    const char                   *str;
    ngx_http_gift_nats_server_t  *srv, *f;

    urls = list;

    if (!json_is_array(urls) || json_array_size(urls) == 0) {
        return;
    }

    /* parsed in a pool of its own: only what is new is kept */
    tmp = ngx_create_pool(1024, log);
    if (tmp == NULL) {
        return;
    }

    f = &servers[from];

    json_array_foreach(urls, i, v) {
        if (!json_is_string(v) || *nservers >= max) {
            continue;
        }

        str = json_string_value(v);
        len = ngx_strlen(str);

        if (len == 0) {
            continue;
        }

        ngx_memzero(&u, sizeof(ngx_url_t));
        u.url.data = (u_char *) str;
        u.url.len = len;
        u.default_port = 4222;
        u.no_resolve = 1;           /* a name: resolved off the loop */

        if (ngx_parse_url(tmp, &u) != NGX_OK || u.host.len == 0) {
            continue;
        }

        if (u.host.data[0] == '['
            || ngx_inet_addr(u.host.data, u.host.len) != INADDR_NONE)
        {
            /* an address: no DNS in taking it */
            ngx_memzero(&u, sizeof(ngx_url_t));
            u.url.data = (u_char *) str;
            u.url.len = len;
            u.default_port = 4222;
            if (ngx_parse_url(tmp, &u) != NGX_OK || u.naddrs == 0) {
                continue;
            }
        }

        known = 0;
        for (k = 0; k < *nservers && !known; k++) {
            if (servers[k].name.len == len
                && ngx_strncmp(servers[k].name.data, str, len) == 0)
            {
                known = 1;
            }
            for (a = 0; a < servers[k].naddrs && u.naddrs; a++) {
                if (ngx_cmp_sockaddr(servers[k].addrs[a].sockaddr,
                                     servers[k].addrs[a].socklen,
                                     u.addrs[0].sockaddr, u.addrs[0].socklen,
                                     1)
                    == NGX_OK)
                {
                    known = 1;
                    break;
                }
            }
        }

        if (known) {
            continue;
        }

        d = ngx_pnalloc(pool, len);
        if (d == NULL) {
            break;
        }
        ngx_memcpy(d, str, len);

        addr = NULL;
        if (u.naddrs) {
            addr = ngx_palloc(pool, sizeof(ngx_addr_t));
            if (addr == NULL) {
                break;
            }
            addr->sockaddr = ngx_palloc(pool, u.addrs[0].socklen);
            if (addr->sockaddr == NULL) {
                break;
            }
            ngx_memcpy(addr->sockaddr, u.addrs[0].sockaddr,
                       u.addrs[0].socklen);
            addr->socklen = u.addrs[0].socklen;
            addr->name.data = d;
            addr->name.len = len;
        }

        srv = &servers[*nservers];
        ngx_memzero(srv, sizeof(ngx_http_gift_nats_server_t));
        srv->url.data = d;
        srv->url.len = len;
        srv->name = srv->url;
        srv->addrs = addr;
        srv->naddrs = addr ? 1 : 0;
        srv->user = f->user;
        srv->pass = f->pass;
        srv->token = f->token;
        srv->tls = f->tls;

        if (ngx_http_gift_nats_host(pool, srv, &u) != NGX_OK) {
            break;
        }

        (*nservers)++;

        ngx_log_error(NGX_LOG_INFO, log, 0,
                      "gift: NATS server %V learned from the cluster",
                      &srv->name);
    }

    ngx_destroy_pool(tmp);
}
