/*
 * test_rules: gift -> device and rounds (dispatcher/rules.c), with rules
 * loaded through the real configuration parser, as an operator writes them.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dispatcher.h"

static char conf_path[64];

/* Load a configuration whose rules group body is `rules`. */
static dconf_t *
load_rules(const char *rules)
{
    dconf_t *c = NULL;
    char     err[4096];
    FILE    *f;
    int      fd;

    snprintf(conf_path, sizeof(conf_path), "/tmp/test_rules-XXXXXX");
    fd = mkstemp(conf_path);
    ck_assert_int_ge(fd, 0);
    f = fdopen(fd, "w");
    fprintf(f, "rules = {\n%s\n};\n", rules);
    fclose(f);
    if (dconf_load(conf_path, &c, err, sizeof(err)) != 0) {
        unlink(conf_path);
        ck_abort_msg("configuration refused: %s", err);
    }
    unlink(conf_path);
    return c;
}

static droute_rc
route(const dconf_t *c, const char *platform, const char *room,
    const char *gift_id, const char *name, uint32_t diamond, uint32_t qty,
    droute_t *rt)
{
    return rules_route(c->rules, platform, room, gift_id, name, diamond, qty,
                       rt);
}

START_TEST(first_match_wins)
{
    dconf_t *c = load_rules(
        "default_device = \"motor_01\";\n"
        "rule = (\n"
        "  { gift = \"Rose\"; room = \"r1\"; device = \"motor_05\"; },\n"
        "  { gift = \"Rose\"; device = \"motor_02\"; },\n"
        "  { gift = \"Rose\"; platform = \"tiktok\"; device = \"motor_03\"; },\n"
        "  { gift_id = \"5655\"; device = \"motor_04\"; }\n"
        ");");
    droute_t rt;

    /* the room rule comes first and matches only in that room */
    ck_assert_int_eq(route(c, "tiktok", "r1", "5655", "Rose", 1, 1, &rt),
                     ROUTE_OK);
    ck_assert_str_eq(rt.device, "motor_05");
    ck_assert_int_eq(rt.rule->line, 4);
    /* elsewhere the second rule wins, though the third matches too */
    ck_assert_int_eq(route(c, "tiktok", "r2", "5655", "Rose", 1, 1, &rt),
                     ROUTE_OK);
    ck_assert_str_eq(rt.device, "motor_02");
    /* by id when the name differs */
    ck_assert_int_eq(route(c, "tiktok", "", "5655", "Rosa", 1, 1, &rt),
                     ROUTE_OK);
    ck_assert_str_eq(rt.device, "motor_04");
    dconf_free(c);
}
END_TEST

START_TEST(names_ignore_case_ids_do_not)
{
    dconf_t *c = load_rules(
        "rule = ( { gift = [ \"Motor\", \"Lion\" ]; device = \"m1\"; },\n"
        "         { gift_id = \"ABC\"; device = \"m2\"; } );");
    droute_t rt;

    ck_assert_int_eq(route(c, "tiktok", "", "", "MOTOR", 1, 1, &rt), ROUTE_OK);
    ck_assert_str_eq(rt.device, "m1");
    ck_assert_int_eq(route(c, "tiktok", "", "", "lion", 1, 1, &rt), ROUTE_OK);
    ck_assert_str_eq(rt.device, "m1");
    ck_assert_int_eq(route(c, "tiktok", "", "abc", "x", 1, 1, &rt),
                     ROUTE_NO_DEVICE);
    ck_assert_int_eq(route(c, "tiktok", "", "ABC", "x", 1, 1, &rt), ROUTE_OK);
    ck_assert_str_eq(rt.device, "m2");
    dconf_free(c);
}
END_TEST

START_TEST(platform_and_room)
{
    dconf_t *c = load_rules(
        "default_device = \"d0\";\n"
        "rule = ( { platform = \"youtube\"; device = \"yt\"; },\n"
        "         { room = [ \"a\", \"b\" ]; gift = \"Rose\"; device = \"ab\"; } );");
    droute_t rt;

    route(c, "youtube", "a", "", "Rose", 1, 1, &rt);
    ck_assert_str_eq(rt.device, "yt");
    route(c, "tiktok", "b", "", "Rose", 1, 1, &rt);
    ck_assert_str_eq(rt.device, "ab");
    route(c, "tiktok", "c", "", "Rose", 1, 1, &rt);
    ck_assert_str_eq(rt.device, "d0");
    /* an absent room (empty) does not match a room rule */
    route(c, "tiktok", "", "", "Rose", 1, 1, &rt);
    ck_assert_str_eq(rt.device, "d0");
    ck_assert_ptr_eq(rt.rule, NULL);
    dconf_free(c);
}
END_TEST

START_TEST(default_device_and_none)
{
    dconf_t *c = load_rules("default_device = \"motor_09\";"
                            "default_multiplier = 2;");
    droute_t rt;

    ck_assert_int_eq(route(c, "tiktok", "", "", "Anything", 5, 3, &rt),
                     ROUTE_OK);
    ck_assert_str_eq(rt.device, "motor_09");
    ck_assert_uint_eq(rt.rounds, 30);
    dconf_free(c);

    c = load_rules("rule = ( { gift = \"Rose\"; device = \"m\"; } );");
    ck_assert_int_eq(route(c, "tiktok", "", "", "Lion", 5, 3, &rt),
                     ROUTE_NO_DEVICE);
    dconf_free(c);
}
END_TEST

START_TEST(multiplier)
{
    dconf_t *c = load_rules(
        "rule = ( { gift = \"Lion\"; device = \"m\"; multiplier = 3; },\n"
        "         { gift = \"Zero\"; device = \"m\"; multiplier = 0; },\n"
        "         { gift = \"One\"; device = \"m\"; } );");
    droute_t rt;

    route(c, "tiktok", "", "", "Lion", 10, 2, &rt);
    ck_assert_uint_eq(rt.rounds, 60);
    ck_assert_uint_eq(rt.multiplier, 3);
    route(c, "tiktok", "", "", "Zero", 10, 2, &rt);
    ck_assert_uint_eq(rt.rounds, 0);
    route(c, "tiktok", "", "", "One", 10, 2, &rt);
    ck_assert_uint_eq(rt.rounds, 20);
    ck_assert_uint_eq(rt.multiplier, 1);
    dconf_free(c);
}
END_TEST

START_TEST(overflow)
{
    dconf_t *c = load_rules(
        "default_device = \"m\"; max_rounds = 9007199254740991L;\n"
        "rule = ( { gift = \"Big\"; device = \"m\"; multiplier = 1000000; } );");
    droute_t rt;

    /* 1e6 x 1e5 x 1e6 = 1e17 > 2^53 - 1: refused, not wrapped */
    ck_assert_int_eq(route(c, "t", "", "", "Big", 1000000, 100000, &rt),
                     ROUTE_OVERFLOW);
    /* the largest values that pass: 2^32-1 squared overflows 2^53 too */
    ck_assert_int_eq(route(c, "t", "", "", "x", 4294967295U, 4294967295U,
                           &rt), ROUTE_OVERFLOW);
    ck_assert_int_eq(route(c, "t", "", "", "x", 1000000, 100000, &rt),
                     ROUTE_OK);
    ck_assert_uint_eq(rt.rounds, 100000000000ULL);
    dconf_free(c);

    /* finite by default (the dispatcher clamps above it) */
    c = load_rules("default_device = \"m\";");
    ck_assert_int_eq(route(c, "t", "", "", "x", 100, 100, &rt), ROUTE_OK);
    ck_assert_int_eq(route(c, "t", "", "", "x", 1000000, 100000, &rt),
                     ROUTE_OVERFLOW);
    dconf_free(c);

    /* an operator's cap */
    c = load_rules("default_device = \"m\"; max_rounds = 100;");
    ck_assert_int_eq(route(c, "t", "", "", "x", 10, 10, &rt), ROUTE_OK);
    ck_assert_int_eq(route(c, "t", "", "", "x", 10, 11, &rt), ROUTE_OVERFLOW);
    dconf_free(c);
}
END_TEST

START_TEST(catalogue_override_and_fill)
{
    dconf_t *c = load_rules(
        "default_device = \"m\";\n"
        "catalogue = ( { gift_id = \"5655\"; name = \"Rose\"; diamond = 1; },\n"
        "              { gift_id = \"7934\"; diamond = 99; } );");
    droute_t rt;

    /* override: the catalogue wins over the sender's value */
    route(c, "t", "", "5655", "Rose", 50, 3, &rt);
    ck_assert_uint_eq(rt.diamond, 1);
    ck_assert_uint_eq(rt.rounds, 3);
    route(c, "t", "", "7934", "X", 0, 2, &rt);
    ck_assert_uint_eq(rt.rounds, 198);
    /* not listed: the sender's value */
    route(c, "t", "", "1", "Y", 7, 2, &rt);
    ck_assert_uint_eq(rt.rounds, 14);
    ck_assert_ptr_nonnull(rules_catalogue(c->rules, "7934"));
    ck_assert_ptr_null(rules_catalogue(c->rules, "7935"));
    dconf_free(c);

    c = load_rules(
        "default_device = \"m\"; catalogue_override = false;\n"
        "catalogue = ( { gift_id = \"5655\"; diamond = 1; } );");
    /* fill only: a sender's non-zero value stays */
    route(c, "t", "", "5655", "Rose", 50, 1, &rt);
    ck_assert_uint_eq(rt.rounds, 50);
    route(c, "t", "", "5655", "Rose", 0, 4, &rt);
    ck_assert_uint_eq(rt.rounds, 4);
    dconf_free(c);
}
END_TEST

START_TEST(device_ids)
{
    ck_assert(rules_device_valid("motor_01"));
    ck_assert(rules_device_valid("A-b_9"));
    ck_assert(!rules_device_valid(""));
    ck_assert(!rules_device_valid("motor 1"));
    ck_assert(!rules_device_valid("motor.1"));      /* a subject token */
    ck_assert(!rules_device_valid("motor*"));
    ck_assert(!rules_device_valid("m>"));
    ck_assert(rules_device_valid(
        "0123456789012345678901234567890123456789012345678901234567890123"));
    ck_assert(!rules_device_valid(
        "01234567890123456789012345678901234567890123456789012345678901234"));
}
END_TEST

static Suite *
suite(void)
{
    Suite *s = suite_create("rules");
    TCase *t = tcase_create("route");

    tcase_add_test(t, first_match_wins);
    tcase_add_test(t, names_ignore_case_ids_do_not);
    tcase_add_test(t, platform_and_room);
    tcase_add_test(t, default_device_and_none);
    tcase_add_test(t, multiplier);
    tcase_add_test(t, overflow);
    tcase_add_test(t, catalogue_override_and_fill);
    tcase_add_test(t, device_ids);
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
