/*
 * test_rpc: the MQTT side's data (dispatcher/rpc.c): topic templates, the
 * rotate payload of docs/design.md, reply parsing, RPC ids; and dmap, the table
 * the dispatcher keys RPCs and gifts by.
 */
#include <check.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"
#include "gift_normalize.h"

START_TEST(topic_check)
{
    ck_assert_ptr_null(rpc_topic_check("v1/devices/me/rpc/request/{n}", 1));
    ck_assert_ptr_null(rpc_topic_check("m/{device}/rpc/{n}", 1));
    ck_assert_ptr_null(rpc_topic_check("{device}/{n}", 1));
    ck_assert_ptr_nonnull(rpc_topic_check("", 1));
    ck_assert_ptr_nonnull(rpc_topic_check("a/b", 1));            /* no {n} */
    ck_assert_ptr_nonnull(rpc_topic_check("a/+/{n}", 1));
    ck_assert_ptr_nonnull(rpc_topic_check("a/#", 0));
    ck_assert_ptr_nonnull(rpc_topic_check("a/x{n}", 1));         /* part */
    ck_assert_ptr_nonnull(rpc_topic_check("a/{n}x", 1));
    ck_assert_ptr_nonnull(rpc_topic_check("a/{id}/{n}", 1));
    ck_assert_ptr_nonnull(rpc_topic_check("a/{n}/{n}", 1));
    ck_assert_ptr_nonnull(rpc_topic_check("a/}/{n}", 1));
}
END_TEST

START_TEST(topic_expand_filter_match)
{
    char     out[128];
    uint64_t n = 0;

    ck_assert_int_gt(rpc_topic_expand("v1/devices/me/rpc/request/{n}",
                                      2147483647, "motor_01", out,
                                      sizeof(out)), 0);
    ck_assert_str_eq(out, "v1/devices/me/rpc/request/2147483647");
    ck_assert_int_gt(rpc_topic_expand("m/{device}/req/{n}", 7, "motor_02",
                                      out, sizeof(out)), 0);
    ck_assert_str_eq(out, "m/motor_02/req/7");
    ck_assert_int_eq(rpc_topic_expand("m/{device}/req/{n}", 7, "motor_02",
                                      out, 10), -1);

    ck_assert_int_gt(rpc_topic_filter("v1/devices/me/rpc/response/{n}", out,
                                      sizeof(out)), 0);
    ck_assert_str_eq(out, "v1/devices/me/rpc/response/+");
    ck_assert_int_gt(rpc_topic_filter("m/{device}/res/{n}", out,
                                      sizeof(out)), 0);
    ck_assert_str_eq(out, "m/+/res/+");

    ck_assert_int_eq(rpc_topic_match("v1/devices/me/rpc/response/{n}",
                                     "v1/devices/me/rpc/response/123", &n), 0);
    ck_assert_uint_eq(n, 123);
    ck_assert_int_eq(rpc_topic_match("m/{device}/res/{n}", "m/motor_9/res/42",
                                     &n), 0);
    ck_assert_uint_eq(n, 42);
    /* not ours: other prefixes, non-numbers, extra levels, overflow */
    ck_assert_int_eq(rpc_topic_match("a/{n}", "b/1", &n), -1);
    ck_assert_int_eq(rpc_topic_match("a/{n}", "a/x1", &n), -1);
    ck_assert_int_eq(rpc_topic_match("a/{n}", "a/1x", &n), -1);
    ck_assert_int_eq(rpc_topic_match("a/{n}", "a/", &n), -1);
    ck_assert_int_eq(rpc_topic_match("a/{n}", "a/1/2", &n), -1);
    ck_assert_int_eq(rpc_topic_match("a/{n}", "a/99999999999999999999", &n),
                     -1);
    ck_assert_int_eq(rpc_topic_match("m/{device}/{n}", "m//1", &n), -1);
}
END_TEST

START_TEST(payload_is_designs)
{
    drpc_event_t ev[2] = { { "evt-1", 10 }, { "evt-2", 5 } };
    char         out[512];
    size_t       len;

    len = rpc_payload_build(out, sizeof(out), "rotate", "motor_01", 10, ev, 1);
    ck_assert_uint_gt(len, 0);
    ck_assert_str_eq(out, "{\"method\":\"rotate\",\"params\":{\"deviceId\":"
                     "\"motor_01\",\"rounds\":10,\"events\":[{\"id\":\"evt-1\","
                     "\"rounds\":10}]}}");
    ck_assert_uint_eq(len, strlen(out));

    /* coalesced: total rounds, every event listed */
    len = rpc_payload_build(out, sizeof(out), "rotate", "m", 15, ev, 2);
    ck_assert_str_eq(out, "{\"method\":\"rotate\",\"params\":{\"deviceId\":"
                     "\"m\",\"rounds\":15,\"events\":[{\"id\":\"evt-1\","
                     "\"rounds\":10},{\"id\":\"evt-2\",\"rounds\":5}]}}");

    /* too small: 0, never a truncated payload */
    ck_assert_uint_eq(rpc_payload_build(out, 40, "rotate", "m", 15, ev, 2), 0);
    ck_assert_uint_le(strlen(out) + 1,
                      rpc_payload_max("rotate", "m", ev, 2));
}
END_TEST

START_TEST(payload_escapes_and_parses)
{
    drpc_event_t  ev[1] = { { "a\"b\\c\x01", 9007199254740991ULL } };
    char          out[512];
    size_t        len, max;
    json_t       *j;
    json_error_t  je;

    max = rpc_payload_max("ro\"tate", "dev\n", ev, 1);
    ck_assert_uint_le(max, sizeof(out));
    len = rpc_payload_build(out, max, "ro\"tate", "dev\n", 3, ev, 1);
    ck_assert_uint_gt(len, 0);
    j = json_loadb(out, len, 0, &je);
    ck_assert_msg(j != NULL, "not JSON: %s: %s", je.text, out);
    ck_assert_str_eq(json_string_value(json_object_get(j, "method")),
                     "ro\"tate");
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(
        json_object_get(json_object_get(j, "params"), "events"), 0), "id")),
        "a\"b\\c\x01");
    json_decref(j);
}
END_TEST

START_TEST(reply_parse)
{
    char err[64];

#define P(s) rpc_reply_parse(s, strlen(s), err, sizeof(err))
    ck_assert_int_eq(P("{\"ok\":true}"), RPC_REPLY_OK);
    ck_assert_int_eq(P(" {\"ok\": true, \"extra\": [1,2]} "), RPC_REPLY_OK);
    ck_assert_int_eq(P("{\"ok\":false,\"error\":\"jammed\"}"),
                     RPC_REPLY_ERROR);
    ck_assert_str_eq(err, "jammed");
    ck_assert_int_eq(P("{\"ok\":false}"), RPC_REPLY_ERROR);
    ck_assert_str_eq(err, "device error");
    ck_assert_int_eq(P("{\"ok\":\"true\"}"), RPC_REPLY_MALFORMED);
    ck_assert_int_eq(P("{\"ok\":1}"), RPC_REPLY_MALFORMED);
    ck_assert_int_eq(P("{}"), RPC_REPLY_MALFORMED);
    ck_assert_int_eq(P("[true]"), RPC_REPLY_MALFORMED);
    ck_assert_int_eq(P("true"), RPC_REPLY_MALFORMED);
    ck_assert_int_eq(P(""), RPC_REPLY_MALFORMED);
    ck_assert_int_eq(P("{\"ok\":true"), RPC_REPLY_MALFORMED);
    ck_assert_int_eq(P("{\"ok\":true,\"ok\":false}"), RPC_REPLY_MALFORMED);
    /* a long error text is cut, never overflowing */
    ck_assert_int_eq(P("{\"ok\":false,\"error\":\"0123456789012345678901234"
                       "5678901234567890123456789012345678901234567890123456"
                       "78901234567890\"}"), RPC_REPLY_ERROR);
    ck_assert_uint_eq(strlen(err), sizeof(err) - 1);
#undef P
    /* not NUL-terminated: the length is what counts */
    ck_assert_int_eq(rpc_reply_parse("{\"ok\":true}garbage", 11, err,
                                     sizeof(err)), RPC_REPLY_OK);
}
END_TEST

START_TEST(ids_fit_thingsboard)
{
    drpc_ids_t ids, other;
    uint64_t   a, b;
    int        i, too_big = 0, wrong_tag = 0;

    /* plain checks in the loop, one assertion after it: a Check assertion
     * per iteration costs a system call, 3 million of them time out on a
     * loaded machine */
    rpc_ids_init(&ids, 31, -1, 12345);
    for (i = 0; i < 3000000; i++) {           /* wraps the 20-bit counter */
        a = rpc_ids_next(&ids);
        too_big += a > 2147483647ULL;         /* a Java int */
        wrong_tag += (a >> 20) != ids.tag;
    }
    ck_assert_int_eq(too_big, 0);
    ck_assert_int_eq(wrong_tag, 0);
    /* an instance id fixes the tag; ids differ across tags */
    rpc_ids_init(&ids, 31, 5, 1);
    rpc_ids_init(&other, 31, 6, 1);
    a = rpc_ids_next(&ids);
    b = rpc_ids_next(&other);
    ck_assert_uint_eq(a >> 20, 5);
    ck_assert_uint_eq(b >> 20, 6);
    ck_assert_uint_ne(a, b);
    ck_assert_uint_eq(rpc_ids_next(&ids), a + 1);

    rpc_ids_init(&ids, 63, 4000000000LL, 1);
    a = rpc_ids_next(&ids);
    ck_assert_uint_eq(a >> 31, 4000000000ULL);
    ck_assert_uint_le(a, 9223372036854775807ULL);
}
END_TEST

START_TEST(dmap_churn)
{
    dmap_t   m;
    uint64_t k;
    int      v = 1;

    ck_assert_int_eq(dmap_init(&m, 4), 0);
    ck_assert_ptr_null(dmap_get(&m, 0));
    for (k = 0; k < 100000; k++) {
        ck_assert_int_eq(dmap_put(&m, k * 7919, &v), 0);
        if (k >= 1000) {                       /* a sliding window of 1000 */
            ck_assert_ptr_eq(dmap_del(&m, (k - 1000) * 7919), &v);
        }
    }
    ck_assert_uint_eq(m.n, 1000);
    for (k = 0; k < 100000; k++) {
        if (k < 99000) {
            ck_assert_ptr_null(dmap_get(&m, k * 7919));
        } else {
            ck_assert_ptr_eq(dmap_get(&m, k * 7919), &v);
        }
    }
    ck_assert_ptr_null(dmap_del(&m, 12345));
    ck_assert_int_eq(dmap_put(&m, 5, NULL), -1);
    dmap_free(&m);
}
END_TEST

START_TEST(ack_subject_metadata)
{
    uint64_t sseq = 0, dlv = 0, pend = 0;

    ck_assert_int_eq(js_ack_meta("$JS.ACK.GIFTS.dispatcher.3.1234.99."
                                 "1700000000000000000.42", &sseq, &dlv,
                                 &pend), 0);
    ck_assert_uint_eq(sseq, 1234);
    ck_assert_uint_eq(dlv, 3);
    ck_assert_uint_eq(pend, 42);
    /* the newer form: domain and account hash, and a random token */
    ck_assert_int_eq(js_ack_meta("$JS.ACK.hub.ACCHASH.GIFTS.dispatcher.1."
                                 "77.5.1700000000000000000.0.xyz", &sseq,
                                 &dlv, &pend), 0);
    ck_assert_uint_eq(sseq, 77);
    ck_assert_uint_eq(dlv, 1);
    ck_assert_uint_eq(pend, 0);
    ck_assert_int_eq(js_ack_meta(NULL, &sseq, &dlv, &pend), -1);
    ck_assert_int_eq(js_ack_meta("_INBOX.x.y", &sseq, &dlv, &pend), -1);
    ck_assert_int_eq(js_ack_meta("$JS.ACK.GIFTS.dispatcher.x.1.1.1.1",
                                 &sseq, &dlv, &pend), -1);
    ck_assert_int_eq(js_ack_meta("$JS.ACK.GIFTS.dispatcher.1.1.1.1", &sseq,
                                 &dlv, &pend), -1);
}
END_TEST

/* ThingsBoard: its error replies by name, and the byte budget that splits
 * a command before mqtt.max_payload (dispatch.c sums these bounds). */
START_TEST(thingsboard_errors_and_sizes)
{
    char          err[64], id[3][GIFT_ID_MAX + 1], *buf;
    drpc_event_t  ev[3];
    size_t        len, bound, cap = 1 << 16, i, k;
    uint64_t      rounds[3] = { 0, 7, 18446744073709551615ULL };

#define P(s) rpc_reply_parse(s, strlen(s), err, sizeof(err))
    ck_assert_int_eq(P("{\"error\":\"TIMEOUT\"}"), RPC_REPLY_ERROR);
    ck_assert_str_eq(err, "TIMEOUT");
    ck_assert_int_eq(P("{\"ok\":false,\"error\":\"NO_ACTIVE_CONNECTION\"}"),
                     RPC_REPLY_ERROR);
    ck_assert_str_eq(rpc_error_reason(err), "device_offline");
    ck_assert_int_eq(P("{\"error\":7}"), RPC_REPLY_MALFORMED);
#undef P
    ck_assert_str_eq(rpc_error_reason("TIMEOUT"), "device_timeout");
    ck_assert_str_eq(rpc_error_reason("jammed"), "device_error");
    ck_assert_str_eq(rpc_error_reason(NULL), "device_error");

    buf = malloc(cap);
    ck_assert_ptr_nonnull(buf);
    for (k = 0; k < 3; k++) {
        /* ids of 1, 64 and GIFT_ID_MAX characters of the id alphabet */
        size_t n = k == 0 ? 1 : k == 1 ? 64 : GIFT_ID_MAX;

        for (i = 0; i < n; i++) {
            id[k][i] = "Az09._:-"[i % 8];
        }
        id[k][n] = '\0';
        ev[k].id = id[k];
        ev[k].rounds = rounds[k];
    }
    for (k = 0; k <= 3; k++) {
        bound = rpc_payload_max("rotate", "motor_01", NULL, 0);
        for (i = 0; i < k; i++) {
            bound += rpc_event_bytes(ev[i].id);
        }
        len = rpc_payload_build(buf, cap, "rotate", "motor_01",
                                18446744073709551615ULL, ev, k);
        ck_assert_uint_gt(len, 0);
        ck_assert_uint_le(len, bound);
    }
    free(buf);
}
END_TEST

static Suite *
suite(void)
{
    Suite *s = suite_create("rpc");
    TCase *t = tcase_create("rpc");

    tcase_set_timeout(t, 30);
    tcase_add_test(t, topic_check);
    tcase_add_test(t, topic_expand_filter_match);
    tcase_add_test(t, payload_is_designs);
    tcase_add_test(t, payload_escapes_and_parses);
    tcase_add_test(t, reply_parse);
    tcase_add_test(t, ids_fit_thingsboard);
    tcase_add_test(t, dmap_churn);
    tcase_add_test(t, ack_subject_metadata);
    tcase_add_test(t, thingsboard_errors_and_sizes);
    suite_add_tcase(s, t);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(suite());
    int      failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
