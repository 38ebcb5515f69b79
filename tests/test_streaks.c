/*
 * test_streaks: the arithmetic of streak frames (dispatcher/streaks.c)
 * and the KV key encoding of ids (common/gift_kvkey.c).
 *
 * A frame carries the running total of its streak; it counts only what it
 * adds.  Here the KV value is kept in a string and round-tripped through
 * streak_format()/streak_parse() between frames, as kv.c does between
 * dispatchers.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"
#include "gift_kvkey.h"

/* One streak's KV value, as a string, and what each frame added. */
typedef struct {
    char      val[STREAK_VALUE_MAX];
    size_t    len;
    uint64_t  total;
} kvsim_t;

/* A frame `eid` with running total `count` reaches a dispatcher: read the
 * value, apply, write it back when it changed.  Returns the increment. */
static uint32_t
frame(kvsim_t *kv, const char *eid, uint32_t count, dstreak_rc *how)
{
    dstreak_t   s;
    uint32_t    inc = 99999;
    dstreak_rc  rc;

    if (kv->len > 0) {
        ck_assert_int_eq(streak_parse(kv->val, kv->len, &s), 0);
    } else {
        memset(&s, 0, sizeof(s));
    }
    rc = streak_apply(&s, streak_event_hash(eid), count, &inc);
    if (rc == STREAK_NEW) {
        kv->len = streak_format(&s, kv->val, sizeof(kv->val));
        ck_assert_uint_gt(kv->len, 0);
        ck_assert_uint_gt(inc, 0);
    }
    if (how) {
        *how = rc;
    }
    kv->total += inc;
    return inc;
}

START_TEST(in_order)
{
    kvsim_t kv = { "", 0, 0 };

    ck_assert_uint_eq(frame(&kv, "tt:1", 1, NULL), 1);
    ck_assert_uint_eq(frame(&kv, "tt:2", 2, NULL), 1);
    ck_assert_uint_eq(frame(&kv, "tt:3", 5, NULL), 3);     /* a jump */
    ck_assert_uint_eq(frame(&kv, "tt:4", 10, NULL), 5);    /* the end */
    ck_assert_uint_eq(kv.total, 10);
}
END_TEST

START_TEST(duplicates)
{
    kvsim_t     kv = { "", 0, 0 };
    dstreak_rc  how;

    ck_assert_uint_eq(frame(&kv, "tt:1", 3, NULL), 3);
    /* the same event again (a redelivery, a retry): the same claim back,
     * never a second one; the caller turns nothing twice because the
     * device and GIFT_DONE deduplicate the event id */
    ck_assert_uint_eq(frame(&kv, "tt:1", 3, &how), 3);
    ck_assert_int_eq(how, STREAK_KNOWN);
    kv.total -= 3;                         /* the same claim, not new */
    /* the same count under another id (TikTok repeats frames): nothing */
    ck_assert_uint_eq(frame(&kv, "tt:1b", 3, &how), 0);
    ck_assert_int_eq(how, STREAK_STALE);
    ck_assert_uint_eq(frame(&kv, "tt:2", 4, NULL), 1);
    ck_assert_uint_eq(kv.total, 4);
}
END_TEST

START_TEST(reorder)
{
    kvsim_t     kv = { "", 0, 0 };
    dstreak_rc  how;

    ck_assert_uint_eq(frame(&kv, "tt:5", 5, NULL), 5);
    ck_assert_uint_eq(frame(&kv, "tt:3", 3, &how), 0);     /* late */
    ck_assert_int_eq(how, STREAK_STALE);
    ck_assert_uint_eq(frame(&kv, "tt:4", 4, NULL), 0);
    ck_assert_uint_eq(frame(&kv, "tt:7", 7, NULL), 2);
    ck_assert_uint_eq(frame(&kv, "tt:6", 6, NULL), 0);
    ck_assert_uint_eq(kv.total, 7);                         /* max(count) */
}
END_TEST

START_TEST(missing_end)
{
    kvsim_t  kv = { "", 0, 0 };
    char     id[16];
    uint32_t i;

    /* 1..37, and the final frame ("repeatEnd") never comes */
    for (i = 1; i <= 37; i++) {
        snprintf(id, sizeof(id), "tt:%u", i);
        frame(&kv, id, i, NULL);
    }
    ck_assert_uint_eq(kv.total, 37);
}
END_TEST

START_TEST(zero_increments)
{
    kvsim_t     kv = { "", 0, 0 };
    dstreak_rc  how;

    ck_assert_uint_eq(frame(&kv, "tt:a", 2, NULL), 2);
    ck_assert_uint_eq(frame(&kv, "tt:b", 2, &how), 0);
    ck_assert_int_eq(how, STREAK_STALE);
    ck_assert_uint_eq(frame(&kv, "tt:c", 1, &how), 0);
    ck_assert_int_eq(how, STREAK_STALE);
    ck_assert_uint_eq(kv.total, 2);
}
END_TEST

START_TEST(recent_window)
{
    kvsim_t     kv = { "", 0, 0 };
    dstreak_rc  how;
    dstreak_t   s;
    char        id[16];
    uint32_t    i;

    for (i = 1; i <= STREAK_RECENT + 1; i++) {
        snprintf(id, sizeof(id), "tt:%u", i);
        ck_assert_uint_eq(frame(&kv, id, i, NULL), 1);
    }
    ck_assert_int_eq(streak_parse(kv.val, kv.len, &s), 0);
    ck_assert_uint_eq(s.n, STREAK_RECENT);
    ck_assert_uint_eq(s.counted, STREAK_RECENT + 1);
    /* the second is still remembered, the first fell out of the value
     * (kv.c then asks its own "e.<event id>" key) */
    ck_assert_uint_eq(frame(&kv, "tt:2", 2, &how), 1);
    ck_assert_int_eq(how, STREAK_KNOWN);
    ck_assert_uint_eq(frame(&kv, "tt:1", 1, &how), 0);
    ck_assert_int_eq(how, STREAK_STALE);
}
END_TEST

/* Two dispatchers race on one streak: each reads, one CAS wins, the loser
 * reads again and recomputes.  Whatever the interleaving, the total is
 * max(count). */
START_TEST(cas_race)
{
    kvsim_t     kv = { "", 0, 0 };
    dstreak_t   a, b;
    uint32_t    ia, ib;
    dstreak_rc  ra, rb;

    frame(&kv, "tt:1", 2, NULL);
    /* both read the same revision */
    ck_assert_int_eq(streak_parse(kv.val, kv.len, &a), 0);
    ck_assert_int_eq(streak_parse(kv.val, kv.len, &b), 0);
    ra = streak_apply(&a, streak_event_hash("tt:5"), 5, &ia);
    rb = streak_apply(&b, streak_event_hash("tt:4"), 4, &ib);
    ck_assert_int_eq(ra, STREAK_NEW);
    ck_assert_int_eq(rb, STREAK_NEW);
    /* A's CAS wins */
    kv.len = streak_format(&a, kv.val, sizeof(kv.val));
    kv.total += ia;
    /* B's fails on the revision: B reads again */
    ck_assert_uint_eq(frame(&kv, "tt:4", 4, &rb), 0);
    ck_assert_uint_eq(kv.total, 5);
}
END_TEST

START_TEST(value_format)
{
    dstreak_t s;
    char      buf[STREAK_VALUE_MAX];
    size_t    len;
    uint32_t  inc, i;

    memset(&s, 0, sizeof(s));
    len = streak_format(&s, buf, sizeof(buf));
    ck_assert_str_eq(buf, "v1 0");
    ck_assert_int_eq(streak_parse(buf, len, &s), 0);
    streak_apply(&s, 0x0123456789abcdefULL, 4294967295U, &inc);
    ck_assert_uint_eq(inc, 4294967295U);
    streak_format(&s, buf, sizeof(buf));
    ck_assert_str_eq(buf, "v1 4294967295 0123456789abcdef=4294967295");
    /* the largest value fits */
    memset(&s, 0, sizeof(s));
    for (i = 0; i < STREAK_RECENT; i++) {
        streak_apply(&s, ~(uint64_t) i, 4294967295U - STREAK_RECENT + i + 1,
                     &inc);
    }
    ck_assert_uint_gt(streak_format(&s, buf, sizeof(buf)), 0);
    ck_assert_uint_eq(streak_format(&s, buf, 20), 0);        /* too small */

    ck_assert_int_eq(streak_parse("", 0, &s), -1);
    ck_assert_int_eq(streak_parse("v2 1", 4, &s), -1);
    ck_assert_int_eq(streak_parse("v1 x", 4, &s), -1);
    ck_assert_int_eq(streak_parse("v1 1 12=3", 9, &s), -1);
    ck_assert_int_eq(streak_parse("v1 99999999999", 14, &s), -1);
    ck_assert_int_eq(streak_parse("v1 3 0123456789abcdef=", 22, &s), -1);
    ck_assert_int_eq(streak_parse("v1 3 0123456789abcdef=2", 23, &s), 0);
    ck_assert_uint_eq(s.counted, 3);
    ck_assert_uint_eq(s.n, 1);
    ck_assert_uint_eq(s.recent[0].inc, 2);
}
END_TEST

START_TEST(event_hash)
{
    ck_assert_uint_ne(streak_event_hash("tt:1"), streak_event_hash("tt:2"));
    ck_assert_uint_eq(streak_event_hash("tt:1"), streak_event_hash("tt:1"));
}
END_TEST

START_TEST(kvkey)
{
    char out[GIFT_KVKEY_SIZE(128)], back[256];

    ck_assert_int_eq(gift_kvkey_encode("motor_01-x", out, sizeof(out)), 10);
    ck_assert_str_eq(out, "motor_01-x");
    ck_assert_int_gt(gift_kvkey_encode("tiktok:123:5655:9", out,
                                       sizeof(out)), 0);
    ck_assert_str_eq(out, "tiktok=3A123=3A5655=3A9");
    ck_assert_int_gt(gift_kvkey_encode(".a..b.", out, sizeof(out)), 0);
    ck_assert_str_eq(out, "=2Ea=2E=2Eb=2E");               /* no '.' left */
    ck_assert_int_gt(gift_kvkey_encode("a=b c/\xc3\xa9*>", out,
                                       sizeof(out)), 0);
    ck_assert_str_eq(out, "a=3Db=20c=2F=C3=A9=2A=3E");
    ck_assert_int_gt(gift_kvkey_decode(out, back, sizeof(back)), 0);
    ck_assert_str_eq(back, "a=b c/\xc3\xa9*>");
    /* injective where it matters: "=3A" as text vs ':' */
    ck_assert_int_gt(gift_kvkey_encode("=3A", out, sizeof(out)), 0);
    ck_assert_str_eq(out, "=3D3A");
    /* refusals */
    ck_assert_int_eq(gift_kvkey_encode("", out, sizeof(out)), -1);
    ck_assert_int_eq(gift_kvkey_encode("a:b", out, 4), -1);
    ck_assert_str_eq(out, "");
    ck_assert_int_eq(gift_kvkey_encode("a:b", out, 6), 5);
    ck_assert_int_eq(gift_kvkey_decode("=4", back, sizeof(back)), -1);
    ck_assert_int_eq(gift_kvkey_decode("a.b", back, sizeof(back)), -1);
}
END_TEST

START_TEST(nogroup_next_streak)
{
    dstreak_t s;
    uint32_t  inc;
    char      buf[STREAK_VALUE_MAX];
    size_t    len;

    memset(&s, 0, sizeof(s));
    /* streak 1: 1, 2, 3 (end) */
    ck_assert_int_eq(streak_apply_ex(&s, 1, 1, 1, 0, &inc), STREAK_NEW);
    ck_assert_int_eq(streak_apply_ex(&s, 2, 2, 1, 0, &inc), STREAK_NEW);
    ck_assert_int_eq(streak_apply_ex(&s, 3, 3, 1, 1, &inc), STREAK_NEW);
    ck_assert_uint_eq(inc, 1);
    ck_assert_int_eq(s.ended, 1);
    /* the state survives a KV round trip */
    len = streak_format(&s, buf, sizeof(buf));
    ck_assert_int_eq(streak_parse(buf, len, &s), 0);
    ck_assert_int_eq(s.ended, 1);
    ck_assert_uint_eq(s.counted, 3);
    /* a repeat of the end frame: its own claim, not a new streak */
    ck_assert_int_eq(streak_apply_ex(&s, 3, 3, 1, 1, &inc), STREAK_KNOWN);
    ck_assert_uint_eq(inc, 1);
    /* the same user's next streak of the same gift: 1, then 2 */
    ck_assert_int_eq(streak_apply_ex(&s, 4, 1, 1, 0, &inc), STREAK_NEW);
    ck_assert_uint_eq(inc, 1);
    ck_assert_int_eq(streak_apply_ex(&s, 5, 2, 1, 0, &inc), STREAK_NEW);
    ck_assert_uint_eq(inc, 1);
    /* without an end frame: a lower count starts one too */
    ck_assert_int_eq(streak_apply_ex(&s, 6, 1, 1, 0, &inc), STREAK_NEW);
    ck_assert_uint_eq(inc, 1);
    /* the same count again (no end seen): a repeat, nothing */
    ck_assert_int_eq(streak_apply_ex(&s, 7, 1, 1, 0, &inc), STREAK_STALE);
    /* with a groupId a lower count is a late frame: nothing */
    memset(&s, 0, sizeof(s));
    ck_assert_int_eq(streak_apply_ex(&s, 1, 5, 0, 1, &inc), STREAK_NEW);
    ck_assert_int_eq(streak_apply_ex(&s, 2, 3, 0, 0, &inc), STREAK_STALE);
    ck_assert_uint_eq(inc, 0);
}
END_TEST

int
main(void)
{
    Suite   *s = suite_create("streaks");
    TCase   *tc = tcase_create("core");
    SRunner *sr;
    int      failed;

    tcase_add_test(tc, in_order);
    tcase_add_test(tc, nogroup_next_streak);
    tcase_add_test(tc, duplicates);
    tcase_add_test(tc, reorder);
    tcase_add_test(tc, missing_end);
    tcase_add_test(tc, zero_increments);
    tcase_add_test(tc, recent_window);
    tcase_add_test(tc, cas_race);
    tcase_add_test(tc, value_format);
    tcase_add_test(tc, event_hash);
    tcase_add_test(tc, kvkey);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
