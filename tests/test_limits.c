/*
 * test_limits: what a device may be sent (dispatcher/limits.c): the
 * rounds-per-minute window, coalescing caps, and the retry back-off.
 */
#include <check.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"

#define S  1000000LL      /* one second in microseconds */

START_TEST(no_limit)
{
    drate_t r;

    memset(&r, 0, sizeof(r));
    ck_assert_int_eq(rate_fits(&r, 0, 0, UINT64_MAX), 1);
    ck_assert_int_eq(rate_next(&r, 0, 5, 1000000), 5);
    rate_free(&r);
}
END_TEST

START_TEST(window)
{
    drate_t r;
    int64_t t = 1000 * S;

    memset(&r, 0, sizeof(r));
    /* 100 rounds per minute: 60 now, 40 ten seconds later, then full */
    ck_assert_int_eq(rate_fits(&r, 100, t, 60), 1);
    rate_add(&r, t, 60);
    ck_assert_int_eq(rate_fits(&r, 100, t + 10 * S, 40), 1);
    rate_add(&r, t + 10 * S, 40);
    ck_assert_uint_eq(rate_sum(&r, t + 10 * S), 100);
    ck_assert_int_eq(rate_fits(&r, 100, t + 20 * S, 1), 0);
    /* one more round fits when the first 60 leave the minute */
    ck_assert_int_eq(rate_next(&r, 100, t + 20 * S, 1), t + 60 * S);
    /* 61 only when the second batch leaves too */
    ck_assert_int_eq(rate_next(&r, 100, t + 20 * S, 61), t + 70 * S);
    ck_assert_int_eq(rate_fits(&r, 100, t + 60 * S - 1, 1), 0);
    ck_assert_int_eq(rate_fits(&r, 100, t + 60 * S, 60), 1);
    ck_assert_int_eq(rate_fits(&r, 100, t + 60 * S, 61), 0);
    ck_assert_uint_eq(rate_sum(&r, t + 70 * S), 0);
    rate_free(&r);
}
END_TEST

/* The window handed to a new owner in the lease value (lease.c): one
 * entry a second at its latest time, oldest first, wall-clock ms. */
START_TEST(window_handover)
{
    drate_t r;
    char    buf[256];
    int64_t t = 1000 * S, wall = 5000000;   /* wall ms at t */

    memset(&r, 0, sizeof(r));
    ck_assert_uint_eq(rate_format(&r, t, wall, buf, sizeof(buf)), 0);
    rate_add(&r, t - 70 * S, 5);            /* out of the minute */
    rate_add(&r, t - 30 * S, 10);
    rate_add(&r, t - 30 * S + 300000, 2);   /* same second: merged */
    rate_add(&r, t - 10 * S, 7);
    ck_assert_uint_gt(rate_format(&r, t, wall, buf, sizeof(buf)), 0);
    ck_assert_str_eq(buf, "4970300:12,4990000:7");
    /* too small a buffer: nothing rather than a cut window */
    ck_assert_uint_eq(rate_format(&r, t, wall, buf, 10), 0);
    rate_free(&r);
}
END_TEST

START_TEST(oversized_goes_alone)
{
    drate_t r;
    int64_t t = 5 * S;

    memset(&r, 0, sizeof(r));
    /* a gift of 500 under a limit of 100: alone, in an empty minute */
    ck_assert_int_eq(rate_fits(&r, 100, t, 500), 1);
    rate_add(&r, t, 500);
    /* then the device rests a full minute */
    ck_assert_int_eq(rate_fits(&r, 100, t + 59 * S, 1), 0);
    ck_assert_int_eq(rate_next(&r, 100, t + S, 1), t + 60 * S);
    ck_assert_int_eq(rate_next(&r, 100, t + S, 500), t + 60 * S);
    ck_assert_int_eq(rate_fits(&r, 100, t + 60 * S, 100), 1);
    rate_free(&r);
}
END_TEST

/* Over ten simulated minutes of a device that sends as soon as it may,
 * no minute ever sees more than the limit, and nothing is lost. */
START_TEST(sliding_minute_holds)
{
    drate_t   r;
    int64_t   t = 0, when;
    uint64_t  limit = 600, sent = 0, want = 0, queued[4000];
    int64_t   at[4000];
    size_t    n = 0, i, j, qh = 0, qt = 0;

    memset(&r, 0, sizeof(r));
    srand(3);
    for (i = 0; i < 4000; i++) {
        queued[qt++] = 1 + (uint64_t) (rand() % 5);
        want += queued[qt - 1];
    }
    while (qh < qt && t < 3600 * S) {
        if (!rate_fits(&r, limit, t, queued[qh])) {
            when = rate_next(&r, limit, t, queued[qh]);
            ck_assert_int_gt(when, t);
            t = when;
            continue;
        }
        /* one RPC: coalesce what fits */
        {
            uint64_t room = limit - rate_sum(&r, t), rounds = 0;
            size_t   k = 0;

            while (qh < qt && coalesce_more(k, rounds, queued[qh], 64,
                                            1000000, room))
            {
                rounds += queued[qh++];
                k++;
            }
            rate_add(&r, t, rounds);
            sent += rounds;
            at[n] = t;
            queued[n] = rounds;     /* reuse: what went at t (n <= qh) */
            n++;
        }
        t += 50000;                 /* the RPC's round trip */
    }
    ck_assert_uint_eq(sent, want);
    /* every minute-long window, starting at each send */
    for (i = 0; i < n; i++) {
        uint64_t sum = 0;

        for (j = i; j < n && at[j] < at[i] + RATE_WINDOW_US; j++) {
            sum += queued[j];
        }
        ck_assert_uint_le(sum, limit);
    }
    /* and it was not much slower than the limit allows */
    ck_assert_int_lt(t, (int64_t) (want / limit + 2) * 60 * S);
    rate_free(&r);
}
END_TEST

START_TEST(merge_bounds_memory)
{
    drate_t r;
    int64_t t;

    memset(&r, 0, sizeof(r));
    for (t = 0; t < 60 * S; t += 1000) {          /* 60,000 sends */
        rate_add(&r, t, 1);
    }
    ck_assert_uint_le(r.n, 601);
    ck_assert_uint_eq(rate_sum(&r, 60 * S - 1), 60000);
    rate_free(&r);
}
END_TEST

START_TEST(coalescing_caps)
{
    uint64_t q[] = { 5, 5, 5, 5, 5, 5 };
    size_t   k;
    uint64_t sum;

    /* events cap */
    for (k = 0, sum = 0; k < 6 && coalesce_more(k, sum, q[k], 4, 1000,
                                                UINT64_MAX); k++)
    {
        sum += q[k];
    }
    ck_assert_uint_eq(k, 4);
    /* rounds cap */
    for (k = 0, sum = 0; k < 6 && coalesce_more(k, sum, q[k], 64, 12,
                                                UINT64_MAX); k++)
    {
        sum += q[k];
    }
    ck_assert_uint_eq(k, 2);
    /* a first gift bigger than every cap still goes, alone */
    ck_assert_int_eq(coalesce_more(0, 0, 5000, 1, 10, 3), 1);
    ck_assert_int_eq(coalesce_more(1, 5000, 1, 64, 100000, UINT64_MAX), 1);
    ck_assert_int_eq(coalesce_more(1, 5000, 1, 64, 100, UINT64_MAX), 0);
    /* rate room */
    ck_assert_int_eq(coalesce_more(1, 5, 5, 64, 1000, 9), 0);
    ck_assert_int_eq(coalesce_more(1, 5, 4, 64, 1000, 9), 1);
    /* one gift per RPC */
    ck_assert_int_eq(coalesce_more(1, 1, 1, 1, 1000, UINT64_MAX), 0);
}
END_TEST

START_TEST(backoff)
{
    int64_t d[] = { 1000, 2000, 5000, 10000 };

    ck_assert_int_eq(retry_delay_ms(d, 4, 1), 1000);
    ck_assert_int_eq(retry_delay_ms(d, 4, 2), 2000);
    ck_assert_int_eq(retry_delay_ms(d, 4, 3), 5000);
    ck_assert_int_eq(retry_delay_ms(d, 4, 4), 10000);
    ck_assert_int_eq(retry_delay_ms(d, 4, 9), 10000);     /* the last */
    ck_assert_int_eq(retry_delay_ms(d, 4, 0), 1000);
    ck_assert_int_eq(retry_delay_ms(d, 1, 3), 1000);
    ck_assert_int_eq(retry_delay_ms(d, 0, 3), 0);
}
END_TEST

/* The defaults: growing delays, and the configuration parser's. */
START_TEST(backoff_config)
{
    dconf_t *c = NULL;
    char     err[1024], path[] = "/tmp/test_limits-XXXXXX";
    FILE    *f;
    int      fd = mkstemp(path);

    ck_assert_int_ge(fd, 0);
    f = fdopen(fd, "w");
    fprintf(f, "devices = { rounds_per_minute = 600; device = ( { id = "
            "\"motor_01\"; rounds_per_minute = 60; paused = true; } ); };\n");
    fclose(f);
    ck_assert_msg(dconf_load(path, &c, err, sizeof(err)) == 0, "%s", err);
    unlink(path);
    ck_assert_uint_eq(c->nretry_delays, 4);
    ck_assert_int_lt(retry_delay_ms(c->retry_delays_ms, c->nretry_delays,
                                      1),
                       retry_delay_ms(c->retry_delays_ms, c->nretry_delays,
                                      2));
    ck_assert_int_lt(retry_delay_ms(c->retry_delays_ms, c->nretry_delays,
                                      3),
                       retry_delay_ms(c->retry_delays_ms, c->nretry_delays,
                                      4));
    ck_assert_uint_eq(c->rounds_per_minute, 600);
    ck_assert_uint_eq(c->ndevconf, 1);
    ck_assert_str_eq(c->devconf[0].id, "motor_01");
    ck_assert_int_eq(c->devconf[0].rounds_per_minute, 60);
    ck_assert_int_eq(c->devconf[0].paused, 1);
    dconf_free(c);
}
END_TEST

int
main(void)
{
    Suite   *s = suite_create("limits");
    TCase   *tc = tcase_create("core");
    SRunner *sr;
    int      failed;

    tcase_add_test(tc, no_limit);
    tcase_add_test(tc, window);
    tcase_add_test(tc, window_handover);
    tcase_add_test(tc, oversized_goes_alone);
    tcase_add_test(tc, sliding_minute_holds);
    tcase_add_test(tc, merge_bounds_memory);
    tcase_add_test(tc, coalescing_caps);
    tcase_add_test(tc, backoff);
    tcase_add_test(tc, backoff_config);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
