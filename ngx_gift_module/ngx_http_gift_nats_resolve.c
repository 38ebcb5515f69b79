/*
 * Host names of NATS servers, resolved off the event loop.
 *
 * getaddrinfo() blocks (DNS, /etc/hosts, nsswitch), so it runs on a
 * detached thread of its own, one per look-up; the thread writes its job's
 * address into a pipe whose read end is a connection of the worker's event
 * loop, and the answer is taken there.  A job the worker no longer wants
 * (it went on, or it is exiting) is dropped: when the pipe is closed the
 * thread frees the job itself.  No lock: a job belongs to the thread until
 * it is written into the pipe, to the loop after.
 *
 * Names are resolved when the worker comes round to a server again after a
 * failure (and for names a cluster announces), so that a node whose address
 * changed is found without a reload; the first connection uses what the
 * master resolved when it read the configuration.
 */

#include "ngx_http_gift_nats_conn.h"

#include <netdb.h>
#include <pthread.h>


typedef struct {
    ngx_uint_t                 server;
    ngx_uint_t                 gen;
    int                        wfd;
    int                        rc;
    struct addrinfo           *res;
    char                       port[8];
    char                       host[1];         /* and on */
} ngx_http_gift_resolve_job_t;


static void *ngx_http_gift_nats_resolve_thread(void *arg);
static void ngx_http_gift_nats_resolve_read(ngx_event_t *rev);


static int                  ngx_http_gift_resolve_wfd = -1;
static ngx_connection_t    *ngx_http_gift_resolve_conn;
static ngx_uint_t           ngx_http_gift_resolve_gen;


/*
 * Start resolving the host of server `s`; p->resolving is set and
 * ngx_http_gift_nats_resolved() is called from the loop when the answer is
 * there.  NGX_ERROR: no thread (the caller connects with what it has).
 */
ngx_int_t
ngx_http_gift_nats_resolve(ngx_http_gift_nats_t *p, ngx_uint_t s)
{
    int                            fds[2], err;
    pthread_t                      tid;
    pthread_attr_t                 attr;
    ngx_connection_t              *c;
    ngx_http_gift_nats_server_t   *srv;
    ngx_http_gift_resolve_job_t   *job;

    srv = &p->servers[s];

    if (ngx_http_gift_resolve_conn == NULL) {
        if (pipe2(fds, O_CLOEXEC) == -1) {
            ngx_log_error(NGX_LOG_ALERT, p->log, ngx_errno,
                          "gift: pipe() for the NATS resolver failed");
            return NGX_ERROR;
        }

        c = ngx_get_connection(fds[0], p->log);
        if (c == NULL) {
            close(fds[0]);
            close(fds[1]);
            return NGX_ERROR;
        }

        if (ngx_nonblocking(fds[0]) == -1) {
            ngx_close_connection(c);
            close(fds[1]);
            return NGX_ERROR;
        }

        c->data = p;
        c->read->handler = ngx_http_gift_nats_resolve_read;
        c->read->log = p->log;
        c->write->log = p->log;

        if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
            ngx_close_connection(c);
            close(fds[1]);
            return NGX_ERROR;
        }

        ngx_http_gift_resolve_conn = c;
        ngx_http_gift_resolve_wfd = fds[1];
    }

    job = ngx_alloc(sizeof(ngx_http_gift_resolve_job_t) + srv->host.len,
                    p->log);
    if (job == NULL) {
        return NGX_ERROR;
    }

    job->server = s;
    job->gen = ++ngx_http_gift_resolve_gen;
    job->wfd = ngx_http_gift_resolve_wfd;
    job->res = NULL;
    job->rc = 0;
    ngx_sprintf((u_char *) job->port, "%d%Z", (int) srv->port);
    ngx_memcpy(job->host, srv->host.data, srv->host.len);
    job->host[srv->host.len] = '\0';

    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    err = pthread_create(&tid, &attr, ngx_http_gift_nats_resolve_thread,
                         job);
    pthread_attr_destroy(&attr);

    if (err != 0) {
        ngx_log_error(NGX_LOG_ERR, p->log, err,
                      "gift: cannot start a thread to resolve \"%V\"",
                      &srv->host);
        ngx_free(job);
        return NGX_ERROR;
    }

    p->resolving = job->gen;

    return NGX_OK;
}


/* The thread: touches nothing but its job (and the pipe it writes). */
static void *
ngx_http_gift_nats_resolve_thread(void *arg)
{
    ngx_http_gift_resolve_job_t *job = arg;

    ssize_t          n;
    struct addrinfo  hints;

    ngx_memzero(&hints, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_ADDRCONFIG;

    job->rc = getaddrinfo(job->host, job->port, &hints, &job->res);

    do {
        n = write(job->wfd, &job, sizeof(job));
    } while (n == -1 && errno == EINTR);

    if (n != sizeof(job)) {
        /* the worker is gone (its end is closed): the job is ours */
        if (job->res) {
            freeaddrinfo(job->res);
        }
        free(job);
    }

    return NULL;
}


static void
ngx_http_gift_nats_resolve_read(ngx_event_t *rev)
{
    ssize_t                        n;
    ngx_uint_t                     i, k;
    ngx_addr_t                    *addrs;
    struct addrinfo               *ai;
    ngx_connection_t              *c;
    ngx_http_gift_nats_t          *p;
    ngx_http_gift_nats_server_t   *srv;
    ngx_http_gift_resolve_job_t   *job;

    c = rev->data;
    p = c->data;

    for ( ;; ) {
        n = read(c->fd, &job, sizeof(job));

        if (n != sizeof(job)) {
            break;
        }

        if (job->gen != p->resolving || job->server >= p->nservers) {
            goto done;              /* not wanted any more */
        }

        srv = &p->servers[job->server];

        if (job->rc != 0) {
            ngx_log_error(NGX_LOG_WARN, p->log, 0,
                          "gift: cannot resolve NATS server \"%V\": %s%s",
                          &srv->host, gai_strerror(job->rc),
                          srv->naddrs ? "; its last addresses are tried"
                                      : "");
            goto done;
        }

        for (k = 0, ai = job->res; ai; ai = ai->ai_next) {
            k++;
        }

        addrs = ngx_alloc(k * sizeof(ngx_addr_t), p->log);
        if (addrs == NULL) {
            goto done;
        }

        for (i = 0, ai = job->res; ai && i < k; ai = ai->ai_next) {
            addrs[i].sockaddr = ngx_alloc(ai->ai_addrlen, p->log);
            if (addrs[i].sockaddr == NULL) {
                break;
            }
            ngx_memcpy(addrs[i].sockaddr, ai->ai_addr, ai->ai_addrlen);
            addrs[i].socklen = ai->ai_addrlen;
            addrs[i].name = srv->name;
            i++;
        }

        if (i == 0) {
            ngx_free(addrs);
            goto done;
        }

        if (srv->resolved) {
            for (k = 0; k < srv->naddrs; k++) {
                ngx_free(srv->addrs[k].sockaddr);
            }
            ngx_free(srv->addrs);
        }

        srv->addrs = addrs;
        srv->naddrs = i;
        srv->resolved = 1;

        ngx_log_error(NGX_LOG_INFO, p->log, 0,
                      "gift: NATS server \"%V\" resolved: %ui address%s",
                      &srv->host, i, i == 1 ? "" : "es");

    done:

        if (job->res) {
            freeaddrinfo(job->res);
        }

        if (job->gen == p->resolving) {
            p->resolving = 0;
            ngx_http_gift_nats_resolved(p);
        }

        ngx_free(job);
    }

    if (ngx_handle_read_event(rev, 0) != NGX_OK) {
        ngx_log_error(NGX_LOG_ALERT, p->log, 0,
                      "gift: cannot wait for the NATS resolver");
    }
}


void
ngx_http_gift_nats_resolve_exit(void)
{
    if (ngx_http_gift_resolve_conn != NULL) {
        /*
         * A thread still resolving finds the read end closed and cleans
         * up.  The write end stays open until the process exits: closed,
         * its number could be reused by another file the thread would
         * then write into.
         */
        ngx_close_connection(ngx_http_gift_resolve_conn);
        ngx_http_gift_resolve_conn = NULL;
    }
}
