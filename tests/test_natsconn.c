/*
 * Unit tests for gift_nats_connect() (common/gift_natsconn.c): cnats before
 * 3.10 sends CONNECT without "sig" when the Ed25519 signature of the
 * server's nonce begins with a zero byte (1 nonce in 256), and valid
 * credentials are refused.  A stand-in server on loopback hands out nonces
 * chosen for the user's key: the first one's signature begins with 0, the
 * next ones' do not.  It accepts a CONNECT whose "sig" is the right
 * signature of its nonce and answers any other with "Authorization
 * Violation", as nats-server does.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <check.h>

#include "gift_natsconn.h"
#include "gift_nkey.h"

#define CNATS_SIG_FIXED  0x030A00           /* 3.10.0 */


typedef struct {
    int          fd;
    int          port;
    gift_nkey_t  key;
    char         zero_nonce[32];             /* signature begins with 0 */
    char         good_nonce[32];             /* and one that does not */
    int          refuse_all;
    int          conns;                      /* connections served */
    int          unsigned_conns;             /* CONNECTs without "sig" */
    int          accepted;
    pthread_t    tid;
} fake_t;

static fake_t  srv;
static char    creds_file[64], seed_file[64];


/* The first nonce "gift-N" whose signature by k begins (or not) with 0. */
static void
find_nonce(const gift_nkey_t *k, int zero, char *out, size_t cap)
{
    int            i;
    unsigned char  sig[64];

    for (i = 0; i < 100000; i++) {
        snprintf(out, cap, "gift-%d", i);
        ck_assert_int_eq(gift_nkey_sign(k, (unsigned char *) out,
                                        strlen(out), sig), 0);
        if ((sig[0] == 0) == zero) {
            return;
        }
    }
    ck_abort_msg("no nonce found");
}


/* Serve one connection: 1 when the client was accepted. */
static int
serve(int c, const char *nonce)
{
    char           buf[8192], want[128], info[512];
    const char    *sig;
    unsigned char  raw[64];
    size_t         n = 0;
    ssize_t        r;
    int            ok;

    snprintf(info, sizeof(info), "INFO {\"server_id\":\"GIFTFAKE\","
             "\"version\":\"2.9.0\",\"proto\":1,\"host\":\"127.0.0.1\","
             "\"port\":%d,\"headers\":true,\"max_payload\":1048576,"
             "\"auth_required\":true,\"nonce\":\"%s\"}\r\n", srv.port, nonce);
    if (write(c, info, strlen(info)) < 0) {
        return 0;
    }

    /* cnats sends CONNECT and PING together */
    buf[0] = '\0';
    while (strstr(buf, "PING\r\n") == NULL) {
        r = read(c, buf + n, sizeof(buf) - 1 - n);
        if (r <= 0) {
            return 0;
        }
        n += (size_t) r;
        buf[n] = '\0';
    }

    sig = strstr(buf, "\"sig\":\"");
    if (sig == NULL) {
        __atomic_add_fetch(&srv.unsigned_conns, 1, __ATOMIC_SEQ_CST);
    }
    gift_nkey_sign(&srv.key, (const unsigned char *) nonce, strlen(nonce),
                   raw);
    want[0] = '"';
    gift_base64url(raw, 64, want + 1);
    strcat(want, "\"");
    ok = !srv.refuse_all && sig != NULL
         && strncmp(sig + 6, want, strlen(want)) == 0;

    if (!ok) {
        static const char  err[] = "-ERR 'Authorization Violation'\r\n";
        (void) !write(c, err, sizeof(err) - 1);
        return 0;
    }
    if (write(c, "PONG\r\n", 6) < 0) {
        return 0;
    }
    /* until the client closes */
    while (read(c, buf, sizeof(buf)) > 0) {
        /* void */
    }
    return 1;
}


static void *
fake_server(void *arg)
{
    int  c;

    (void) arg;
    while (!srv.accepted && (c = accept(srv.fd, NULL, NULL)) >= 0) {
        __atomic_add_fetch(&srv.conns, 1, __ATOMIC_SEQ_CST);
        srv.accepted = serve(c, srv.conns == 1 ? srv.zero_nonce
                                               : srv.good_nonce);
        close(c);
    }
    return NULL;
}


static void
write_file(char *path, const char *text)
{
    int  fd;

    strcpy(path, "/tmp/gift-natsconn-XXXXXX");
    fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t) strlen(text));
    close(fd);
}


static void
setup(void)
{
    struct sockaddr_in  sa;
    socklen_t           len = sizeof(sa);
    char                seed[GIFT_NKEY_SEED_LEN + 1], text[512];

    memset(&srv, 0, sizeof(srv));
    ck_assert_int_eq(gift_nkey_generate(GIFT_NKEY_USER, &srv.key), 0);
    find_nonce(&srv.key, 1, srv.zero_nonce, sizeof(srv.zero_nonce));
    find_nonce(&srv.key, 0, srv.good_nonce, sizeof(srv.good_nonce));

    gift_nkey_encode_seed(&srv.key, seed);
    snprintf(text, sizeof(text), "-----BEGIN NATS USER JWT-----\n"
             "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n"
             "------END NATS USER JWT------\n\n"
             "-----BEGIN USER NKEY SEED-----\n%s\n"
             "------END USER NKEY SEED------\n", seed);
    write_file(creds_file, text);
    snprintf(text, sizeof(text), "%s\n", seed);
    write_file(seed_file, text);

    srv.fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(srv.fd, 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(srv.fd, (struct sockaddr *) &sa, sizeof(sa)), 0);
    ck_assert_int_eq(listen(srv.fd, 8), 0);
    getsockname(srv.fd, (struct sockaddr *) &sa, &len);
    srv.port = ntohs(sa.sin_port);
}


static void
teardown(void)
{
    unlink(creds_file);
    unlink(seed_file);
}


static void
start(void)
{
    ck_assert_int_eq(pthread_create(&srv.tid, NULL, fake_server, NULL), 0);
}


/* Closes the listener, which ends an accept() still waiting. */
static void
finish(void)
{
    shutdown(srv.fd, SHUT_RDWR);
    close(srv.fd);
    pthread_join(srv.tid, NULL);
}


static natsOptions *
options(int nkey)
{
    natsOptions  *o = NULL;
    char          url[64];

    snprintf(url, sizeof(url), "nats://127.0.0.1:%d", srv.port);
    ck_assert_int_eq(natsOptions_Create(&o), NATS_OK);
    ck_assert_int_eq(natsOptions_SetURL(o, url), NATS_OK);
    ck_assert_int_eq(natsOptions_SetTimeout(o, 5000), NATS_OK);
    ck_assert_int_eq(natsOptions_SetAllowReconnect(o, false), NATS_OK);
    if (nkey) {
        ck_assert_int_eq(natsOptions_SetNKeyFromSeed(o, srv.key.public_key,
                                                     seed_file), NATS_OK);
    } else {
        ck_assert_int_eq(natsOptions_SetUserCredentialsFromFiles(o,
                             creds_file, NULL), NATS_OK);
    }
    return o;
}


/* What the work-around is for: plain cnats and the nonce whose signature
 * begins with 0.  Refused if the installed cnats has the bug; when a fixed
 * one is installed, accepted (and the retries are not armed). */
START_TEST(plain_cnats_and_a_zero_first_byte)
{
    natsConnection  *nc = NULL;
    natsOptions     *o;
    natsStatus       s;

    start();
    o = options(0);
    s = natsConnection_Connect(&nc, o);
    if (nats_GetVersionNumber() < CNATS_SIG_FIXED) {
        ck_assert_int_eq(s, NATS_CONNECTION_AUTH_FAILED);
        ck_assert_int_eq(__atomic_load_n(&srv.unsigned_conns,
                                         __ATOMIC_SEQ_CST), 1);
    } else {
        ck_assert_int_eq(s, NATS_OK);
    }
    natsConnection_Destroy(nc);
    natsOptions_Destroy(o);
    finish();
}
END_TEST


static void
connects(int nkey)
{
    natsConnection  *nc = NULL;
    natsOptions     *o;

    start();
    o = options(nkey);
    ck_assert_int_eq(gift_nats_connect(&nc, o, 1), NATS_OK);
    ck_assert_int_eq(natsConnection_Status(nc), NATS_CONN_STATUS_CONNECTED);
    natsConnection_Destroy(nc);
    natsOptions_Destroy(o);
    finish();
    ck_assert_int_eq(srv.accepted, 1);
    ck_assert_int_le(srv.conns, 2);
}

START_TEST(creds_connect_despite_a_zero_first_byte)
{
    connects(0);
}
END_TEST

START_TEST(nkey_connects_despite_a_zero_first_byte)
{
    connects(1);
}
END_TEST


/* A credential the server refuses is given up after a few tries, and
 * without signed auth there is no retry. */
START_TEST(a_refusal_is_final)
{
    natsConnection  *nc = NULL;
    natsOptions     *o;
    int              tries;

    srv.refuse_all = 1;
    start();
    o = options(0);
    ck_assert_int_eq(gift_nats_connect(&nc, o, 1),
                     NATS_CONNECTION_AUTH_FAILED);
    tries = __atomic_load_n(&srv.conns, __ATOMIC_SEQ_CST);
    ck_assert_int_eq(gift_nats_connect(&nc, o, 0),
                     NATS_CONNECTION_AUTH_FAILED);
    natsOptions_Destroy(o);
    finish();
    ck_assert_int_eq(tries, nats_GetVersionNumber() < CNATS_SIG_FIXED
                            ? GIFT_NATS_SIGNED_TRIES : 1);
    ck_assert_int_eq(srv.conns, tries + 1);
}
END_TEST


static Suite *
natsconn_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("natsconn");
    tc = tcase_create("signed CONNECT");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, plain_cnats_and_a_zero_first_byte);
    tcase_add_test(tc, creds_connect_despite_a_zero_first_byte);
    tcase_add_test(tc, nkey_connects_despite_a_zero_first_byte);
    tcase_add_test(tc, a_refusal_is_final);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    int       failed;
    SRunner  *sr;

    sr = srunner_create(natsconn_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
