/*
 * Protobuf round trips of both messages, and their JSON forms.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "gift.pb-c.h"
#include "gift_json.h"
#include "gift_normalize.h"

START_TEST(event_round_trip)
{
    Gift__V1__GiftEvent  ev = GIFT__V1__GIFT_EVENT__INIT, *back;
    uint8_t              buf[4096];
    size_t               n;

    ev.event_id = "evt-1";
    ev.platform = "tiktok";
    ev.room_id = "room_9";
    ev.user_id = "user_123";
    ev.user_name = "Al\xc3\xad\"ce";
    ev.gift_id = "5655";
    ev.gift_name = "Motor";
    ev.diamond = 10;
    ev.quantity = 3;
    ev.occurred_at_ms = 1700000000000LL;
    ev.received_at_ms = 1700000000123LL;
    ev.streak_id = "tiktok:user_123:5655:77";
    ev.streak_count = 3;
    ev.streak_end = 1;

    n = gift__v1__gift_event__get_packed_size(&ev);
    ck_assert_uint_le(n, sizeof(buf));
    ck_assert_uint_eq(gift__v1__gift_event__pack(&ev, buf), n);

    back = gift__v1__gift_event__unpack(NULL, n, buf);
    ck_assert_ptr_nonnull(back);
    ck_assert_str_eq(back->event_id, "evt-1");
    ck_assert_str_eq(back->platform, "tiktok");
    ck_assert_str_eq(back->room_id, "room_9");
    ck_assert_str_eq(back->user_id, "user_123");
    ck_assert_str_eq(back->user_name, "Al\xc3\xad\"ce");
    ck_assert_str_eq(back->gift_id, "5655");
    ck_assert_str_eq(back->gift_name, "Motor");
    ck_assert_uint_eq(back->diamond, 10);
    ck_assert_uint_eq(back->quantity, 3);
    ck_assert_int_eq(back->occurred_at_ms, 1700000000000LL);
    ck_assert_int_eq(back->received_at_ms, 1700000000123LL);
    ck_assert_str_eq(back->streak_id, "tiktok:user_123:5655:77");
    ck_assert_uint_eq(back->streak_count, 3);
    ck_assert(back->streak_end);
    gift__v1__gift_event__free_unpacked(back, NULL);
}
END_TEST

START_TEST(ack_round_trip_and_json)
{
    Gift__V1__GiftAck  a = GIFT__V1__GIFT_ACK__INIT, *back;
    uint8_t            buf[4096];
    char               json[GIFT_JSON_MAX];
    size_t             n;

    a.event_id = "evt-1";
    a.device_id = "motor_01";
    a.rounds = 20;
    a.status = GIFT__V1__ACK_STATUS__ACK_STATUS_DEAD_LETTER;
    a.reason = "timeout";
    a.attempts = 5;
    a.rpc_latency_us = 1234;
    a.completed_at_ms = 1700000000250LL;
    a.platform = "tiktok";
    a.room_id = "r";
    a.user_id = "u";
    a.user_name = "line\nbreak";
    a.gift_name = "Motor";
    a.diamond = 10;
    a.quantity = 2;
    a.received_at_ms = 1700000000000LL;

    n = gift__v1__gift_ack__pack(&a, buf);
    back = gift__v1__gift_ack__unpack(NULL, n, buf);
    ck_assert_ptr_nonnull(back);
    ck_assert_str_eq(back->device_id, "motor_01");
    ck_assert_uint_eq(back->rounds, 20);
    ck_assert_int_eq(back->status, GIFT__V1__ACK_STATUS__ACK_STATUS_DEAD_LETTER);
    ck_assert_uint_eq(back->rpc_latency_us, 1234);

    n = gift_ack_json(back, 42, json, sizeof(json));
    ck_assert_uint_gt(n, 0);
    json[n] = '\0';
    ck_assert_str_eq(json,
        "{\"seq\":42,\"eventId\":\"evt-1\",\"deviceId\":\"motor_01\","
        "\"rounds\":20,\"status\":\"dead_letter\",\"reason\":\"timeout\","
        "\"attempts\":5,\"platform\":\"tiktok\",\"roomId\":\"r\","
        "\"userId\":\"u\",\"userName\":\"line\\nbreak\",\"giftName\":\"Motor\","
        "\"diamond\":10,\"quantity\":2,\"latencyMs\":250,"
        "\"ts\":1700000000250}");

    /* too small a buffer is refused, never overrun */
    ck_assert_uint_eq(gift_ack_json(back, 42, json, 40), 0);

    /* a capped, split gift says so: rounds executed, rounds requested */
    back->status = GIFT__V1__ACK_STATUS__ACK_STATUS_OK;
    back->rounds = 100000;
    back->rounds_requested = 100000000000ULL;
    back->capped = 1;
    back->parts = 100;
    n = gift_ack_json(back, 43, json, sizeof(json));
    ck_assert_uint_gt(n, 0);
    json[n] = '\0';
    ck_assert_ptr_nonnull(strstr(json, "\"rounds\":100000,\"status\":\"ok\","
        "\"roundsRequested\":100000000000,\"capped\":true,\"parts\":100,"));
    gift__v1__gift_ack__free_unpacked(back, NULL);
}
END_TEST

START_TEST(normalized_event_packs)
{
    static const char  body[] =
        "{\"event\":\"gift\",\"platform\":\"tiktok\",\"userId\":\"user_123\","
        "\"giftName\":\"Motor\",\"diamond\":10,\"quantity\":1,"
        "\"timestamp\":1700000000000}";
    gift_event_t          ev;
    gift_norm_error_t     err;
    uint8_t               buf[8192];
    size_t                n;
    Gift__V1__GiftEvent  *back;

    ck_assert_int_eq(gift_normalize(body, sizeof(body) - 1, &ev, &err), 0);
    ck_assert_uint_le(gift_event_packed_max(), sizeof(buf));
    n = gift_event_pack(&ev, 1700000000500LL, buf, sizeof(buf));
    ck_assert_uint_gt(n, 0);
    back = gift__v1__gift_event__unpack(NULL, n, buf);
    ck_assert_ptr_nonnull(back);
    ck_assert_str_eq(back->platform, "tiktok");
    ck_assert_str_eq(back->user_id, "user_123");
    ck_assert_str_eq(back->gift_name, "Motor");
    ck_assert_uint_eq(back->diamond, 10);
    ck_assert_uint_eq(back->quantity, 1);
    ck_assert_int_eq(back->received_at_ms, 1700000000500LL);
    ck_assert_int_eq(back->occurred_at_ms, 1700000000000LL);
    ck_assert_uint_gt(strlen(back->event_id), 0);
    gift__v1__gift_event__free_unpacked(back, NULL);
}
END_TEST

int
main(void)
{
    Suite   *s = suite_create("proto");
    TCase   *tc = tcase_create("core");
    SRunner *sr;
    int      failed;

    tcase_add_test(tc, event_round_trip);
    tcase_add_test(tc, ack_round_trip_and_json);
    tcase_add_test(tc, normalized_event_packs);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
