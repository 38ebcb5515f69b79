/*
 * Unit tests for gift_signature: good, wrong key, the second key of a
 * rotation, stale, future, malformed headers, and a known vector computed
 * independently of the code under test.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>

#include "gift_signature.h"

#define NOW     ((time_t) 1700000000)
#define WINDOW  ((time_t) 300)
#define BODY    "{\"event\":\"gift\",\"platform\":\"tiktok\",\"userId\":" \
                "\"user_123\",\"giftName\":\"Motor\",\"diamond\":10," \
                "\"quantity\":1,\"timestamp\":1700000000000}"

static const gift_secret_t  old_key = {
    (const unsigned char *) "old-secret", 10
};
static const gift_secret_t  new_key = {
    (const unsigned char *) "new-secret", 10
};
static const gift_secret_t  other_key = {
    (const unsigned char *) "someone-else", 12
};

/* Verify `hdr` (given as a C string) against BODY with both keys of a
 * rotation configured. */
static gift_sig_rc
verify(const char *hdr)
{
    gift_secret_t  keys[2];

    keys[0] = new_key;
    keys[1] = old_key;
    return gift_signature_verify(hdr, hdr ? strlen(hdr) : 0,
                                 (const unsigned char *) BODY,
                                 sizeof(BODY) - 1, keys, 2, NOW, WINDOW);
}

/* A header for (key, t) over BODY. */
static void
make(const gift_secret_t *key, time_t t, char *out, size_t cap)
{
    size_t  n;

    n = gift_signature_make(key, t, (const unsigned char *) BODY,
                            sizeof(BODY) - 1, out, cap);
    ck_assert_uint_gt(n, 0);
    ck_assert_uint_eq(n, strlen(out));
}

/* The v1 value of a header made by make(). */
static const char *
v1_of(const char *hdr)
{
    const char  *p;

    p = strstr(hdr, "v1=");
    ck_assert_ptr_nonnull(p);
    return p + 3;
}

START_TEST(test_good)
{
    char  hdr[128];

    make(&new_key, NOW, hdr, sizeof(hdr));
    ck_assert(strncmp(hdr, "t=1700000000,v1=", 16) == 0);
    ck_assert_uint_eq(strlen(hdr), 16 + 64);
    ck_assert_int_eq(verify(hdr), GIFT_SIG_OK);
    ck_assert_ptr_null(gift_sig_code(GIFT_SIG_OK));
}
END_TEST

/* HMAC-SHA256("new-secret", "1700000000." BODY), computed with
 * `printf '%s' "1700000000.$BODY" | openssl dgst -sha256 -hmac new-secret`. */
START_TEST(test_known_vector)
{
    char  hdr[128];

    make(&new_key, NOW, hdr, sizeof(hdr));
    ck_assert_str_eq(v1_of(hdr),
                     "e16bff7ad0c89854893010940dfc4b9e"
                     "d81ff62916bd39898ebc3035bc95cfb4");
}
END_TEST

START_TEST(test_upper_case_hex)
{
    char    hdr[128];
    size_t  i;

    make(&new_key, NOW, hdr, sizeof(hdr));
    for (i = 0; hdr[i]; i++) {
        if (hdr[i] >= 'a' && hdr[i] <= 'f') {
            hdr[i] = (char) (hdr[i] - 'a' + 'A');
        }
    }
    ck_assert_int_eq(verify(hdr), GIFT_SIG_OK);
}
END_TEST

START_TEST(test_wrong_key)
{
    char  hdr[128];

    make(&other_key, NOW, hdr, sizeof(hdr));
    ck_assert_int_eq(verify(hdr), GIFT_SIG_INVALID);
    ck_assert_str_eq(gift_sig_code(GIFT_SIG_INVALID), "signature_invalid");
}
END_TEST

/* Rotation: the old key (second configured) still verifies, and a sender
 * signing with both keys at once is accepted whichever one we hold. */
START_TEST(test_rotation)
{
    char           hdr[128], a[128], b[128], both[256];
    gift_secret_t  only_old;

    make(&old_key, NOW, hdr, sizeof(hdr));
    ck_assert_int_eq(verify(hdr), GIFT_SIG_OK);

    make(&old_key, NOW, a, sizeof(a));
    make(&other_key, NOW, b, sizeof(b));
    snprintf(both, sizeof(both), "t=1700000000,v1=%s,v1=%s", v1_of(b),
             v1_of(a));
    ck_assert_int_eq(verify(both), GIFT_SIG_OK);

    only_old = old_key;
    make(&new_key, NOW, a, sizeof(a));
    snprintf(both, sizeof(both), "t=1700000000,v1=%s,v1=%s", v1_of(a),
             v1_of(hdr));
    ck_assert_int_eq(gift_signature_verify(both, strlen(both),
                                           (const unsigned char *) BODY,
                                           sizeof(BODY) - 1, &only_old, 1,
                                           NOW, WINDOW), GIFT_SIG_OK);

    /* the retired key alone no longer verifies */
    ck_assert_int_eq(gift_signature_verify(a, strlen(a),
                                           (const unsigned char *) BODY,
                                           sizeof(BODY) - 1, &only_old, 1,
                                           NOW, WINDOW), GIFT_SIG_INVALID);
}
END_TEST

START_TEST(test_stale_and_future)
{
    char  hdr[128];

    make(&new_key, NOW - WINDOW, hdr, sizeof(hdr));
    ck_assert_int_eq(verify(hdr), GIFT_SIG_OK);          /* at the edge */
    make(&new_key, NOW - WINDOW - 1, hdr, sizeof(hdr));
    ck_assert_int_eq(verify(hdr), GIFT_SIG_EXPIRED);      /* stale */
    ck_assert_str_eq(gift_sig_code(GIFT_SIG_EXPIRED), "signature_expired");

    make(&new_key, NOW + WINDOW, hdr, sizeof(hdr));
    ck_assert_int_eq(verify(hdr), GIFT_SIG_OK);
    make(&new_key, NOW + WINDOW + 1, hdr, sizeof(hdr));
    ck_assert_int_eq(verify(hdr), GIFT_SIG_EXPIRED);      /* future */

    make(&new_key, 0, hdr, sizeof(hdr));
    ck_assert_int_eq(verify(hdr), GIFT_SIG_EXPIRED);      /* t=0 */

    /* the MAC is checked first: stale and forged is invalid */
    make(&other_key, NOW - 3600, hdr, sizeof(hdr));
    ck_assert_int_eq(verify(hdr), GIFT_SIG_INVALID);
}
END_TEST

START_TEST(test_tampered_body)
{
    char           hdr[128];
    static const char  body2[] = BODY " ";

    make(&new_key, NOW, hdr, sizeof(hdr));
    ck_assert_int_eq(gift_signature_verify(hdr, strlen(hdr),
                                           (const unsigned char *) body2,
                                           sizeof(body2) - 1, &new_key, 1,
                                           NOW, WINDOW), GIFT_SIG_INVALID);

    /* the t is part of the MAC: moving it breaks the signature */
    hdr[11] = (char) (hdr[11] == '0' ? '1' : '0');
    ck_assert_int_eq(verify(hdr), GIFT_SIG_INVALID);
}
END_TEST

START_TEST(test_missing)
{
    ck_assert_int_eq(verify(NULL), GIFT_SIG_MISSING);
    ck_assert_int_eq(verify(""), GIFT_SIG_MISSING);
    ck_assert_str_eq(gift_sig_code(GIFT_SIG_MISSING), "signature_missing");
}
END_TEST

/* Malformed headers, each built around a valid v1 so that only the syntax
 * is at fault. */
START_TEST(test_malformed)
{
    static const char  *fmt[] = {
        "garbage",
        " ",
        "t=1700000000",                               /* no v1 */
        "v1=%s",                                      /* no t */
        "t=,v1=%s",
        "t=abc,v1=%s",
        "t=-1700000000,v1=%s",
        "t=+1700000000,v1=%s",
        "t=1700000000.5,v1=%s",
        "t=99999999999999999999999,v1=%s",            /* huge t */
        "t=1700000000,t=1700000000,v1=%s",            /* two t */
        "t=1700000000,v1=%.63s",                      /* short hex */
        "t=1700000000,v1=%sa",                        /* long hex */
        "t=1700000000,v1=%.62szz",                    /* not hex */
        "t=1700000000,,v1=%s",                        /* empty element */
        "t=1700000000,v1=%s,",                        /* trailing comma */
        ",t=1700000000,v1=%s",
        "t=1700000000;v1=%s",
        "t=1700000000,v1 =%s",
        "t=1700000000,=x,v1=%s",                      /* empty key */
        "t=1700000000,V1=%s",                         /* keys are lower case */
        "t=1700000000,v1=%s,v1=%s,v1=%s,v1=%s,v1=%s,v1=%s,v1=%s,v1=%s,v1=%s",
    };
    char         hdr[128], buf[1100];
    const char  *v;
    size_t       i;

    make(&new_key, NOW, hdr, sizeof(hdr));
    v = v1_of(hdr);

    for (i = 0; i < sizeof(fmt) / sizeof(fmt[0]); i++) {
        snprintf(buf, sizeof(buf), fmt[i], v, v, v, v, v, v, v, v, v);
        ck_assert_msg(verify(buf) == GIFT_SIG_INVALID, "accepted \"%s\"",
                      buf);
    }

    /* over-long headers (> 1024 bytes) are refused before parsing, even
     * when what they hold is valid; 1024 bytes still pass */
    memset(buf, ' ', sizeof(buf));
    memcpy(buf, hdr, strlen(hdr));
    ck_assert_int_eq(gift_signature_verify(buf, 1024,
                                           (const unsigned char *) BODY,
                                           sizeof(BODY) - 1, &new_key, 1,
                                           NOW, WINDOW), GIFT_SIG_OK);
    ck_assert_int_eq(gift_signature_verify(buf, 1025,
                                           (const unsigned char *) BODY,
                                           sizeof(BODY) - 1, &new_key, 1,
                                           NOW, WINDOW), GIFT_SIG_INVALID);
}
END_TEST

/* Tolerated: spaces around elements, unknown schemes, and a header that is
 * not NUL-terminated (only hlen bytes are read). */
START_TEST(test_tolerated)
{
    char   hdr[128], buf[512];
    char  *exact;
    size_t n;

    make(&new_key, NOW, hdr, sizeof(hdr));

    snprintf(buf, sizeof(buf), " t=1700000000 ,\tv1=%s ", v1_of(hdr));
    ck_assert_int_eq(verify(buf), GIFT_SIG_OK);

    snprintf(buf, sizeof(buf), "v0=whatever,t=1700000000,v2=x=y,v1=%s",
             v1_of(hdr));
    ck_assert_int_eq(verify(buf), GIFT_SIG_OK);

    /* the header in a buffer of exactly its length, followed by nothing */
    n = strlen(hdr);
    exact = malloc(n);
    ck_assert_ptr_nonnull(exact);
    memcpy(exact, hdr, n);
    ck_assert_int_eq(gift_signature_verify(exact, n,
                                           (const unsigned char *) BODY,
                                           sizeof(BODY) - 1, &new_key, 1,
                                           NOW, WINDOW), GIFT_SIG_OK);
    free(exact);

    /* hlen cuts off trailing garbage */
    snprintf(buf, sizeof(buf), "%s,garbage", hdr);
    ck_assert_int_eq(gift_signature_verify(buf, strlen(hdr),
                                           (const unsigned char *) BODY,
                                           sizeof(BODY) - 1, &new_key, 1,
                                           NOW, WINDOW), GIFT_SIG_OK);
}
END_TEST

/* The future is bounded by the skew, the past by the window. */
START_TEST(test_skew)
{
    char  hdr[128];

#define SKEWED() gift_signature_verify_skew(hdr, strlen(hdr),              \
                      (const unsigned char *) BODY, sizeof(BODY) - 1,       \
                      &new_key, 1, NOW, 300, 30)

    make(&new_key, NOW + 30, hdr, sizeof(hdr));
    ck_assert_int_eq(SKEWED(), GIFT_SIG_OK);
    make(&new_key, NOW + 31, hdr, sizeof(hdr));
    ck_assert_int_eq(SKEWED(), GIFT_SIG_EXPIRED);
    make(&new_key, NOW - 300, hdr, sizeof(hdr));
    ck_assert_int_eq(SKEWED(), GIFT_SIG_OK);
    make(&new_key, NOW - 301, hdr, sizeof(hdr));
    ck_assert_int_eq(SKEWED(), GIFT_SIG_EXPIRED);
    make(&other_key, NOW + 31, hdr, sizeof(hdr));
    ck_assert_int_eq(SKEWED(), GIFT_SIG_INVALID);

#undef SKEWED
}
END_TEST

START_TEST(test_no_usable_key)
{
    char                 hdr[128];
    static const gift_secret_t  empty = { (const unsigned char *) "", 0 };

    make(&new_key, NOW, hdr, sizeof(hdr));
    ck_assert_int_eq(gift_signature_verify(hdr, strlen(hdr),
                                           (const unsigned char *) BODY,
                                           sizeof(BODY) - 1, NULL, 0, NOW,
                                           WINDOW), GIFT_SIG_INVALID);
    ck_assert_int_eq(gift_signature_verify(hdr, strlen(hdr),
                                           (const unsigned char *) BODY,
                                           sizeof(BODY) - 1, &empty, 1, NOW,
                                           WINDOW), GIFT_SIG_INVALID);

    /* nor can one sign with an empty key */
    ck_assert_uint_eq(gift_signature_make(&empty, NOW,
                                          (const unsigned char *) BODY,
                                          sizeof(BODY) - 1, hdr,
                                          sizeof(hdr)), 0);
}
END_TEST

START_TEST(test_empty_body_and_small_buffer)
{
    char  hdr[128];
    size_t n;

    n = gift_signature_make(&new_key, NOW, NULL, 0, hdr, sizeof(hdr));
    ck_assert_uint_gt(n, 0);
    ck_assert_int_eq(gift_signature_verify(hdr, n, NULL, 0, &new_key, 1,
                                           NOW, WINDOW), GIFT_SIG_OK);

    /* cap must hold the header and its NUL */
    ck_assert_uint_eq(gift_signature_make(&new_key, NOW, NULL, 0, hdr, n),
                      0);
    ck_assert_uint_eq(gift_signature_make(&new_key, NOW, NULL, 0, hdr,
                                          n + 1), n);
}
END_TEST

static Suite *
signature_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("gift_signature");
    tc = tcase_create("verify");
    tcase_add_test(tc, test_good);
    tcase_add_test(tc, test_known_vector);
    tcase_add_test(tc, test_upper_case_hex);
    tcase_add_test(tc, test_wrong_key);
    tcase_add_test(tc, test_rotation);
    tcase_add_test(tc, test_stale_and_future);
    tcase_add_test(tc, test_tampered_body);
    tcase_add_test(tc, test_missing);
    tcase_add_test(tc, test_malformed);
    tcase_add_test(tc, test_tolerated);
    tcase_add_test(tc, test_no_usable_key);
    tcase_add_test(tc, test_skew);
    tcase_add_test(tc, test_empty_body_and_small_buffer);
    suite_add_tcase(s, tc);

    return s;
}

int
main(void)
{
    SRunner  *sr;
    int       failed;

    sr = srunner_create(signature_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);

    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
