/*
 * ngx_http_gift_module: directives, configuration and init hooks.
 *
 * The handlers live in their own files (see ngx_http_gift_module.h).  The
 * NATS connection is opened per worker in init_process, never in the
 * master; the master only reads the NATS files (keys, certificates).
 */

#include "ngx_http_gift_module.h"


static ngx_int_t ngx_http_gift_init_process(ngx_cycle_t *cycle);
static void ngx_http_gift_exit_process(ngx_cycle_t *cycle);
static void *ngx_http_gift_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_gift_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_gift_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_gift_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);

static char *ngx_http_gift_handler(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_gift_secret(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_gift_ws_origin(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_gift_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_gift_add_variables(ngx_conf_t *cf);


static ngx_http_variable_t  ngx_http_gift_vars[] = {

    { ngx_string("gift_event_id"), NULL, ngx_http_gift_webhook_variable,
      0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("gift_publish_ms"), NULL, ngx_http_gift_webhook_variable,
      1, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


/* What a location directive installs (the `post` of its command). */
typedef struct {
    ngx_http_handler_pt        handler;
    ngx_uint_t                 follow_acks;     /* it streams GIFT_ACKS */
} ngx_http_gift_handler_t;


static ngx_http_gift_handler_t  ngx_http_gift_webhook_post = {
    ngx_http_gift_webhook_handler, 0
};

static ngx_http_gift_handler_t  ngx_http_gift_sse_post = {
    ngx_http_gift_sse_handler, 1
};

static ngx_http_gift_handler_t  ngx_http_gift_websocket_post = {
    ngx_http_gift_websocket_handler, 1
};


static ngx_conf_num_bounds_t  ngx_http_gift_queue_bounds = {
    ngx_conf_check_num_bounds, 16, 1048576
};

static ngx_conf_num_bounds_t  ngx_http_gift_replay_bounds = {
    ngx_conf_check_num_bounds, 1, 1000000
};

static ngx_conf_num_bounds_t  ngx_http_gift_backlog_bounds = {
    ngx_conf_check_num_bounds, 8, 1000000
};


static char *ngx_http_gift_secret_file(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_gift_secret_add(ngx_conf_t *cf,
    ngx_http_gift_loc_conf_t *glcf, u_char *data, size_t len);

static ngx_conf_num_bounds_t  ngx_http_gift_frame_rate_bounds = {
    ngx_conf_check_num_bounds, 1, 100000000
};


static ngx_command_t  ngx_http_gift_commands[] = {

    { ngx_string("gift_nats_url"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_gift_nats_url,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gift_nats_queue_size"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, queue_size),
      &ngx_http_gift_queue_bounds },

    { ngx_string("gift_nats_reconnect_wait"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, reconnect_wait),
      NULL },

    /* TLS and credentials for NATS (ngx_http_gift_nats_conf.c) */

    { ngx_string("gift_nats_ssl_trusted_certificate"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, nats.ssl_trusted_certificate),
      NULL },

    { ngx_string("gift_nats_ssl_verify"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, nats.ssl_verify),
      NULL },

    { ngx_string("gift_nats_ssl_name"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, nats.ssl_name),
      NULL },

    { ngx_string("gift_nats_ssl_certificate"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, nats.ssl_certificate),
      NULL },

    { ngx_string("gift_nats_ssl_certificate_key"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, nats.ssl_certificate_key),
      NULL },

    { ngx_string("gift_nats_token"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, nats.token),
      NULL },

    { ngx_string("gift_nats_nkey"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_gift_nats_key_file,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gift_nats_credentials"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_gift_nats_key_file,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      (void *) "creds" },

    { ngx_string("gift_webhook"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_gift_handler,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_gift_loc_conf_t, webhook),
      &ngx_http_gift_webhook_post },

    { ngx_string("gift_publish_timeout"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_gift_loc_conf_t, publish_timeout),
      NULL },

    { ngx_string("gift_webhook_max_body"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_gift_loc_conf_t, max_body),
      NULL },

    { ngx_string("gift_webhook_secret"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_gift_secret,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gift_webhook_signature_window"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_gift_loc_conf_t, signature_window),
      NULL },

    { ngx_string("gift_retry_after"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_gift_loc_conf_t, retry_after),
      NULL },

    { ngx_string("gift_sse"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_gift_handler,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_gift_loc_conf_t, sse),
      &ngx_http_gift_sse_post },

    { ngx_string("gift_sse_allow_origin"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_gift_loc_conf_t, allow_origin),
      NULL },

    { ngx_string("gift_sse_retry"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_gift_loc_conf_t, sse_retry),
      NULL },

    { ngx_string("gift_websocket"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_gift_handler,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_gift_loc_conf_t, websocket),
      &ngx_http_gift_websocket_post },

    { ngx_string("gift_websocket_allow_origin"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_gift_ws_origin,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gift_status"),
      NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_gift_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gift_sse_heartbeat"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, heartbeat),
      NULL },

    { ngx_string("gift_sse_idle_follow"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_msec_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, idle_follow),
      NULL },

    { ngx_string("gift_sse_replay_max"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, replay_max),
      &ngx_http_gift_replay_bounds },

    { ngx_string("gift_sse_max_clients"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, max_clients),
      NULL },

    { ngx_string("gift_sse_max_backlog"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_gift_main_conf_t, max_backlog),
      &ngx_http_gift_backlog_bounds },

    /* hostile clients (docs/security.md) */

    { ngx_string("gift_webhook_signature_skew"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_sec_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_gift_loc_conf_t, signature_skew),
      NULL },

    { ngx_string("gift_webhook_secret_file"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_gift_secret_file,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("gift_websocket_frame_rate"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_gift_loc_conf_t, ws_frame_rate),
      &ngx_http_gift_frame_rate_bounds },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_gift_module_ctx = {
    ngx_http_gift_add_variables,           /* preconfiguration */
    NULL,                                  /* postconfiguration */

    ngx_http_gift_create_main_conf,        /* create main configuration */
    ngx_http_gift_init_main_conf,          /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_gift_create_loc_conf,         /* create location configuration */
    ngx_http_gift_merge_loc_conf           /* merge location configuration */
};


ngx_module_t  ngx_http_gift_module = {
    NGX_MODULE_V1,
    &ngx_http_gift_module_ctx,             /* module context */
    ngx_http_gift_commands,                /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_gift_init_process,            /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_gift_exit_process,            /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_int_t
ngx_http_gift_init_process(ngx_cycle_t *cycle)
{
    ngx_http_gift_main_conf_t  *gmcf;

    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return NGX_OK;
    }

    gmcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_gift_module);
    if (gmcf == NULL || !gmcf->used) {
        return NGX_OK;
    }

    if (gmcf->follow_acks
        && ngx_http_gift_fanout_init_process(cycle, gmcf) != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* the connection's users first, then the connection */
    if (ngx_http_gift_js_init_process(cycle, gmcf) != NGX_OK) {
        return NGX_ERROR;
    }

    if (gmcf->follow_acks
        && ngx_http_gift_follow_init_process(cycle, gmcf) != NGX_OK)
    {
        return NGX_ERROR;
    }

    return ngx_http_gift_nats_init_process(cycle, gmcf);
}


static void
ngx_http_gift_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_gift_nats_exit_process(cycle);
    ngx_http_gift_follow_exit_process(cycle);
    ngx_http_gift_fanout_exit_process(cycle);
}


static void *
ngx_http_gift_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_gift_main_conf_t  *gmcf;

    gmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_gift_main_conf_t));
    if (gmcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     gmcf->nats_urls = NULL;
     *     gmcf->used = 0;
     *     gmcf->follow_acks = 0;
     *     gmcf->signature_span = 0;
     *     gmcf->nats.ssl = NULL;
     *     gmcf->nats.ssl_name = { 0, NULL };
     *     gmcf->nats.ssl_trusted_certificate = { 0, NULL };
     *     gmcf->nats.ssl_certificate = { 0, NULL };
     *     gmcf->nats.ssl_certificate_key = { 0, NULL };
     *     gmcf->nats.token = { 0, NULL };
     *     gmcf->nats.jwt = { 0, NULL };
     *     gmcf->nats.nkey = NULL;
     */

    gmcf->queue_size = NGX_CONF_UNSET_UINT;
    gmcf->reconnect_wait = NGX_CONF_UNSET_MSEC;
    gmcf->replay_max = NGX_CONF_UNSET_UINT;
    gmcf->heartbeat = NGX_CONF_UNSET_MSEC;
    gmcf->idle_follow = NGX_CONF_UNSET_MSEC;
    gmcf->max_clients = NGX_CONF_UNSET_UINT;
    gmcf->max_backlog = NGX_CONF_UNSET_UINT;
    gmcf->nats.ssl_verify = NGX_CONF_UNSET;

    return gmcf;
}


static char *
ngx_http_gift_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_gift_main_conf_t *gmcf = conf;

    ngx_conf_init_uint_value(gmcf->queue_size, 65536);
    ngx_conf_init_msec_value(gmcf->reconnect_wait, 250);
    ngx_conf_init_uint_value(gmcf->replay_max, 1000);
    ngx_conf_init_msec_value(gmcf->heartbeat, 15000);
    ngx_conf_init_msec_value(gmcf->idle_follow, 10000);
    ngx_conf_init_uint_value(gmcf->max_clients, 10000);
    ngx_conf_init_uint_value(gmcf->max_backlog, 1024);

    if (ngx_http_gift_status_add_zone(cf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (gmcf->used && gmcf->nats_urls == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "gift_webhook and gift_sse need \"gift_nats_url\""
                           " in the http block");
        return NGX_CONF_ERROR;
    }

    if (gmcf->nats_urls != NULL) {
        return ngx_http_gift_nats_init_conf(cf, gmcf);
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_gift_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_gift_loc_conf_t  *glcf;

    glcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_gift_loc_conf_t));
    if (glcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     glcf->secrets = NULL;
     *     glcf->allow_origin = { 0, NULL };
     *     glcf->ws_origins = NULL;
     */

    glcf->webhook = NGX_CONF_UNSET;
    glcf->sse = NGX_CONF_UNSET;
    glcf->websocket = NGX_CONF_UNSET;
    glcf->sse_retry = NGX_CONF_UNSET_MSEC;
    glcf->publish_timeout = NGX_CONF_UNSET_MSEC;
    glcf->max_body = NGX_CONF_UNSET_SIZE;
    glcf->signature_window = NGX_CONF_UNSET;
    glcf->retry_after = NGX_CONF_UNSET;
    glcf->signature_skew = NGX_CONF_UNSET;
    glcf->ws_frame_rate = NGX_CONF_UNSET_UINT;

    return glcf;
}


static char *
ngx_http_gift_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_gift_loc_conf_t *prev = parent;
    ngx_http_gift_loc_conf_t *conf = child;

    ngx_http_core_loc_conf_t   *clcf;
    ngx_http_gift_main_conf_t  *gmcf;

    ngx_conf_merge_value(conf->webhook, prev->webhook, 0);
    ngx_conf_merge_msec_value(conf->publish_timeout, prev->publish_timeout,
                              2000);
    ngx_conf_merge_size_value(conf->max_body, prev->max_body, 64 * 1024);
    ngx_conf_merge_value(conf->signature_window, prev->signature_window, 300);
    ngx_conf_merge_value(conf->retry_after, prev->retry_after, 1);
    ngx_conf_merge_value(conf->sse, prev->sse, 0);
    ngx_conf_merge_value(conf->websocket, prev->websocket, 0);

    if (conf->ws_origins == NULL) {
        conf->ws_origins = prev->ws_origins;
    }
    ngx_conf_merge_str_value(conf->allow_origin, prev->allow_origin, "");
    ngx_conf_merge_msec_value(conf->sse_retry, prev->sse_retry, 2000);

    if (conf->secrets == NULL) {
        conf->secrets = prev->secrets;
    }

    ngx_conf_merge_value(conf->signature_skew, prev->signature_skew, 30);
    ngx_conf_merge_uint_value(conf->ws_frame_rate, prev->ws_frame_rate, 100);

    /*
     * A replayed request must fall inside GIFTS' duplicate window (10
     * minutes), or a captured webhook could turn a motor twice.  A request
     * stays valid from t - skew to t + window (server clock): the two
     * together may not exceed it.
     */
    if (conf->signature_window + conf->signature_skew > 600) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "gift_webhook_signature_window %T plus "
                           "gift_webhook_signature_skew %T is longer than "
                           "the GIFTS duplicate window (600s): a captured "
                           "request could be stored twice",
                           conf->signature_window, conf->signature_skew);
        return NGX_CONF_ERROR;
    }

    /*
     * The stream itself cannot be seen from here: each worker compares
     * the largest span with GIFTS' duplicate window once connected.
     */
    if (conf->webhook && conf->secrets != NULL) {
        gmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_gift_module);
        if (gmcf->signature_span
            < conf->signature_window + conf->signature_skew)
        {
            gmcf->signature_span = conf->signature_window
                                   + conf->signature_skew;
        }
    }

    if (conf->webhook && conf->secrets == NULL) {
        /* cf->ctx is this location's while merging */
        clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
        ngx_log_error(NGX_LOG_WARN, cf->log, 0,
                      "gift_webhook without gift_webhook_secret in "
                      "location \"%V\": unsigned webhooks are accepted",
                      &clcf->name);
    }

    return NGX_CONF_OK;
}


/* gift_webhook, gift_sse, gift_websocket: the location's content handler */
static char *
ngx_http_gift_handler(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_gift_handler_t *h = cmd->post;

    ngx_flag_t                 *flag;
    ngx_http_core_loc_conf_t   *clcf;
    ngx_http_gift_main_conf_t  *gmcf;

    flag = (ngx_flag_t *) ((char *) conf + cmd->offset);

    if (*flag != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    *flag = 1;

    gmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_gift_module);
    gmcf->used = 1;

    if (h->follow_acks) {
        gmcf->follow_acks = 1;
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = h->handler;

    return NGX_CONF_OK;
}


static char *
ngx_http_gift_secret(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_gift_loc_conf_t *glcf = conf;

    ngx_str_t      *value;

    value = cf->args->elts;

    return ngx_http_gift_secret_add(cf, glcf, value[1].data, value[1].len);
}


static char *
ngx_http_gift_secret_add(ngx_conf_t *cf, ngx_http_gift_loc_conf_t *glcf,
    u_char *data, size_t len)
{
    gift_secret_t  *s;

    if (len < 16) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "gift_webhook_secret is too short (%uz bytes; "
                           "use at least 16)", len);
        return NGX_CONF_ERROR;
    }

    if (glcf->secrets == NULL) {
        glcf->secrets = ngx_array_create(cf->pool, 2, sizeof(gift_secret_t));
        if (glcf->secrets == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    s = ngx_array_push(glcf->secrets);
    if (s == NULL) {
        return NGX_CONF_ERROR;
    }

    s->data = data;
    s->len = len;

    return NGX_CONF_OK;
}


/*
 * gift_webhook_secret_file PATH: one secret a line (several during a key
 * rotation); empty lines and lines starting with # are skipped.  Read by
 * the master with the rest of the configuration, so a reload re-reads it
 * and the file may be readable by root only.
 */
static char *
ngx_http_gift_secret_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_gift_loc_conf_t *glcf = conf;

    u_char           *buf, *p, *end, *eol, *last;
    ssize_t           n;
    ngx_fd_t          fd;
    ngx_str_t        *value, path;
    ngx_uint_t        count;
    ngx_file_info_t   fi;

    value = cf->args->elts;
    path = value[1];

    if (ngx_conf_full_name(cf->cycle, &path, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    fd = ngx_open_file(path.data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "gift_webhook_secret_file: cannot open \"%V\"",
                           &path);
        return NGX_CONF_ERROR;
    }

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR
        || ngx_file_size(&fi) > 65536)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "gift_webhook_secret_file: \"%V\" is not a "
                           "readable file of at most 64k", &path);
        ngx_close_file(fd);
        return NGX_CONF_ERROR;
    }

    if (fi.st_mode & S_IROTH) {
        ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                           "gift_webhook_secret_file: \"%V\" is readable "
                           "by every user; chmod o-r it", &path);
    }

    buf = ngx_pnalloc(cf->pool, (size_t) ngx_file_size(&fi) + 1);
    if (buf == NULL) {
        ngx_close_file(fd);
        return NGX_CONF_ERROR;
    }

    n = ngx_read_fd(fd, buf, (size_t) ngx_file_size(&fi));
    ngx_close_file(fd);

    if (n == -1) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           "gift_webhook_secret_file: cannot read \"%V\"",
                           &path);
        return NGX_CONF_ERROR;
    }

    count = 0;
    p = buf;
    end = buf + n;

    while (p < end) {
        eol = ngx_strlchr(p, end, '\n');
        if (eol == NULL) {
            eol = end;
        }

        last = eol;
        while (last > p && (last[-1] == '\r' || last[-1] == ' '
                            || last[-1] == '\t'))
        {
            last--;
        }
        while (p < last && (*p == ' ' || *p == '\t')) {
            p++;
        }

        if (p < last && *p != '#') {
            if (ngx_http_gift_secret_add(cf, glcf, p, last - p)
                != NGX_CONF_OK)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "in gift_webhook_secret_file \"%V\"",
                                   &path);
                return NGX_CONF_ERROR;
            }
            count++;
        }

        p = eol + 1;
    }

    if (count == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "gift_webhook_secret_file: \"%V\" holds no "
                           "secret", &path);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_gift_ws_origin(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_gift_loc_conf_t *glcf = conf;

    ngx_str_t   *value, *o;
    ngx_uint_t   i;

    if (glcf->ws_origins == NULL) {
        glcf->ws_origins = ngx_array_create(cf->pool, 2, sizeof(ngx_str_t));
        if (glcf->ws_origins == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    value = cf->args->elts;

    for (i = 1; i < cf->args->nelts; i++) {
        o = ngx_array_push(glcf->ws_origins);
        if (o == NULL) {
            return NGX_CONF_ERROR;
        }
        *o = value[i];
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_gift_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);
    clcf->handler = ngx_http_gift_status_handler;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_gift_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_gift_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}
