/*
 * Unit tests for the module's NATS protocol parser
 * (ngx_gift_module/ngx_http_gift_nats_parse.c) and for NKeys
 * (common/gift_nkey.c): sizes checked for digits and overflow, the CRLF
 * after a payload, a message of the server's max_payload, one split over
 * many reads; an NKey seed against the NATS documentation's vector, and a
 * signature OpenSSL verifies.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>
#include <openssl/evp.h>

#include "ngx_http_gift_nats_parse.h"
#include "gift_nkey.h"

static int     nmsg, ninfo, nping, npong, nerr;
static size_t  last_len;
static char    last_sid[32], last_reply[64];

static int
on_msg(void *ctx, ngx_http_gift_nats_msg_t *m)
{
    (void) ctx;
    nmsg++;
    last_len = m->len;
    snprintf(last_sid, sizeof(last_sid), "%.*s", (int) m->sid_len,
             (const char *) m->sid);
    snprintf(last_reply, sizeof(last_reply), "%.*s", (int) m->reply_len,
             m->reply ? (const char *) m->reply : "");
    return 0;
}

static int on_info(void *c, const unsigned char *j, size_t l)
{ (void) c; (void) j; (void) l; ninfo++; return 0; }
static int on_ping(void *c) { (void) c; nping++; return 0; }
static int on_pong(void *c) { (void) c; npong++; return 0; }
static int on_err(void *c, const unsigned char *t, size_t l)
{ (void) c; (void) t; (void) l; nerr++; return 0; }

static ngx_http_gift_nats_parser_t
parser(size_t max)
{
    ngx_http_gift_nats_parser_t  p;

    memset(&p, 0, sizeof(p));
    p.msg = on_msg;
    p.info = on_info;
    p.ping = on_ping;
    p.pong = on_pong;
    p.err = on_err;
    p.max_payload = max;
    nmsg = ninfo = nping = npong = nerr = 0;
    return p;
}

static long
parse(const char *s, size_t max, const char **why)
{
    ngx_http_gift_nats_parser_t  p = parser(max);

    *why = NULL;
    return ngx_http_gift_nats_parse(&p, (const unsigned char *) s,
                                    strlen(s), why);
}

START_TEST(control_lines)
{
    const char  *why;
    const char   in[] = "INFO {\"x\":1}\r\nPING\r\nPONG\r\n+OK\r\n"
                        "-ERR 'Stale Connection'\r\nPIN";

    ck_assert_int_eq(parse(in, 1024, &why), (long) strlen(in) - 3);
    ck_assert_int_eq(ninfo, 1);
    ck_assert_int_eq(nping, 1);
    ck_assert_int_eq(npong, 1);
    ck_assert_int_eq(nerr, 1);
    ck_assert_int_eq(parse("BOGUS\r\n", 1024, &why),
                     NGX_HTTP_GIFT_NATS_PARSE_ERROR);
    ck_assert_ptr_nonnull(why);
}
END_TEST

START_TEST(messages)
{
    const char  *why;
    const char   in[] = "MSG a.b p 5\r\nhello\r\n"
                        "HMSG c fd7 $JS.ACK.x 12 14\r\nNATS/1.0\r\n\r\nhi\r\n";

    ck_assert_int_eq(parse(in, 1024, &why), (long) strlen(in));
    ck_assert_int_eq(nmsg, 2);
    ck_assert_str_eq(last_sid, "fd7");
    ck_assert_str_eq(last_reply, "$JS.ACK.x");
    ck_assert_uint_eq(last_len, 2);

    /* incomplete: nothing consumed yet */
    ck_assert_int_eq(parse("MSG a p 5\r\nhel", 1024, &why), 0);
    ck_assert_int_eq(nmsg, 0);
}
END_TEST

START_TEST(bad_numbers)
{
    const char  *why;

    ck_assert_int_eq(parse("MSG a p 1x\r\nab\r\n", 1024, &why),
                     NGX_HTTP_GIFT_NATS_PARSE_ERROR);
    ck_assert_int_eq(parse("MSG a p -1\r\n", 1024, &why),
                     NGX_HTTP_GIFT_NATS_PARSE_ERROR);
    ck_assert_int_eq(parse("MSG a p 18446744073709551616\r\n", (size_t) -1,
                           &why), NGX_HTTP_GIFT_NATS_PARSE_ERROR);
    ck_assert_int_eq(parse("HMSG a p 9 5\r\n", 1024, &why),
                     NGX_HTTP_GIFT_NATS_PARSE_ERROR);      /* hdr > total */
    ck_assert_int_eq(parse("MSG a p 1025\r\n", 1024, &why),
                     NGX_HTTP_GIFT_NATS_PARSE_ERROR);      /* > max */
    ck_assert_int_eq(parse("MSG a p\r\n", 1024, &why),
                     NGX_HTTP_GIFT_NATS_PARSE_ERROR);
    ck_assert_int_eq(parse("MSG a p r 3 x\r\n", 1024, &why),
                     NGX_HTTP_GIFT_NATS_PARSE_ERROR);
}
END_TEST

START_TEST(trailer)
{
    const char  *why;

    ck_assert_int_eq(parse("MSG a p 3\r\nabcXY", 1024, &why),
                     NGX_HTTP_GIFT_NATS_PARSE_ERROR);
    ck_assert_str_eq(why, "no CRLF after a message");
}
END_TEST

/* a message of exactly max_payload, fed 1000 bytes at a time */
START_TEST(largest_message_in_pieces)
{
    static char                   buf[1024 * 1024 + 64];
    long                          rc;
    size_t                        max = 1024 * 1024, len, have, fed, n;
    const char                   *why;
    ngx_http_gift_nats_parser_t   p = parser(max);

    len = (size_t) sprintf(buf, "MSG _INBOX.x.d.1 fd1 %zu\r\n", max);
    memset(buf + len, 'a', max);
    memcpy(buf + len + max, "\r\n", 2);
    len += max + 2;

    have = 0;
    for (fed = 0; fed < len; fed += n) {
        n = len - fed < 1000 ? len - fed : 1000;
        have += n;
        rc = ngx_http_gift_nats_parse(&p, (unsigned char *) buf, have, &why);
        ck_assert_int_ge(rc, 0);
        if (rc > 0) {
            memmove(buf, buf + rc, have - (size_t) rc);
            have -= (size_t) rc;
        }
    }
    ck_assert_int_eq(nmsg, 1);
    ck_assert_uint_eq(last_len, max);
    ck_assert_uint_eq(have, 0);
}
END_TEST

START_TEST(number)
{
    uint64_t  n;

    ck_assert_int_eq(ngx_http_gift_nats_number((unsigned char *)
                     "18446744073709551615", 20, &n), 0);
    ck_assert(n == UINT64_MAX);
    ck_assert_int_eq(ngx_http_gift_nats_number((unsigned char *) "", 0, &n),
                     -1);
    ck_assert_int_eq(ngx_http_gift_nats_number((unsigned char *) "1 ", 2, &n),
                     -1);
}
END_TEST

/* the NATS documentation's example seed and its public key */
START_TEST(nkey_vector)
{
    const char   *seed = "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQ"
                         "YYYCU3VY";
    const char   *err;
    char          again[GIFT_NKEY_SEED_LEN + 1], bad[GIFT_NKEY_SEED_LEN + 1];
    gift_nkey_t   k;

    ck_assert_int_eq(gift_nkey_from_seed(seed, strlen(seed), &k, &err), 0);
    ck_assert_int_eq(k.type, GIFT_NKEY_USER);
    ck_assert_str_eq(k.public_key,
        "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4");
    ck_assert_int_eq(gift_nkey_encode_seed(&k, again), 0);
    ck_assert_str_eq(again, seed);

    memcpy(bad, seed, sizeof(bad));
    bad[10] = bad[10] == 'A' ? 'B' : 'A';
    ck_assert_int_eq(gift_nkey_from_seed(bad, strlen(bad), &k, &err), -1);
    ck_assert_int_eq(gift_nkey_from_seed("SU", 2, &k, &err), -1);
}
END_TEST

START_TEST(nkey_signature)
{
    unsigned char   sig[64];
    gift_nkey_t     k;
    EVP_PKEY       *pub;
    EVP_MD_CTX     *md;
    const char     *nonce = "PXoWU7zWAMt75FY";

    ck_assert_int_eq(gift_nkey_generate(GIFT_NKEY_USER, &k), 0);
    ck_assert_int_eq(k.public_key[0], 'U');
    ck_assert_int_eq(gift_nkey_sign(&k, (const unsigned char *) nonce,
                                    strlen(nonce), sig), 0);

    pub = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, k.pub, 32);
    md = EVP_MD_CTX_new();
    ck_assert_int_eq(EVP_DigestVerifyInit(md, NULL, NULL, NULL, pub), 1);
    ck_assert_int_eq(EVP_DigestVerify(md, sig, 64,
                     (const unsigned char *) nonce, strlen(nonce)), 1);
    EVP_MD_CTX_free(md);
    EVP_PKEY_free(pub);
}
END_TEST

START_TEST(creds_file)
{
    const char  *text = "-----BEGIN NATS USER JWT-----\neyJhbGciOi.x.y\n"
                        "------END NATS USER JWT------\n\n*** IMPORTANT\n"
                        "-----BEGIN USER NKEY SEED-----\n"
                        "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY\n"
                        "------END USER NKEY SEED------\n";
    const char  *jwt, *seed, *err;
    size_t       jlen;

    ck_assert_int_eq(gift_nkey_find_jwt(text, strlen(text), &jwt, &jlen,
                                        &err), 0);
    ck_assert_int_eq((int) jlen, 14);
    ck_assert_int_eq(strncmp(jwt, "eyJhbGciOi.x.y", jlen), 0);
    ck_assert_int_eq(gift_nkey_find_seed(text, strlen(text), &seed, &err), 0);
    ck_assert_int_eq(strncmp(seed, "SUACSSL3", 8), 0);
    ck_assert_int_eq(gift_nkey_find_jwt("nothing", 7, &jwt, &jlen, &err), -1);
}
END_TEST

static Suite *
nats_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("nats");
    tc = tcase_create("parser");
    tcase_add_test(tc, control_lines);
    tcase_add_test(tc, messages);
    tcase_add_test(tc, bad_numbers);
    tcase_add_test(tc, trailer);
    tcase_add_test(tc, largest_message_in_pieces);
    tcase_add_test(tc, number);
    suite_add_tcase(s, tc);
    tc = tcase_create("nkey");
    tcase_add_test(tc, nkey_vector);
    tcase_add_test(tc, nkey_signature);
    tcase_add_test(tc, creds_file);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    int       failed;
    SRunner  *sr;

    sr = srunner_create(nats_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
