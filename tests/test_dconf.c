/*
 * test_dconf: the configuration file (dispatcher/conf.c): every bad value is
 * reported as FILE:LINE: KEY: why, all of them, and nothing starts.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dispatcher.h"

static char dir[64];
static char path[128];
static char err[8192];

static void
setup(void)
{
    snprintf(dir, sizeof(dir), "/tmp/test_dconf-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/d.conf", dir);
}

static void
teardown(void)
{
    char cmd[128];

    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

static void
write_file(const char *p, const char *text)
{
    FILE *f = fopen(p, "w");

    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

/* Load `text` as the configuration; returns dconf_load's result. */
static int
load(const char *text, dconf_t **c)
{
    write_file(path, text);
    *c = NULL;
    return dconf_load(path, c, err, sizeof(err));
}

/* err holds "PATH:LINE: WHAT" (WHAT a prefix of the rest of the line). */
static void
has_error(int line, const char *what)
{
    char want[512];

    snprintf(want, sizeof(want), "%s:%d: %s", path, line, what);
    ck_assert_msg(strstr(err, want) != NULL, "expected \"%s\" in:\n%s", want,
                  err);
}

START_TEST(example_is_valid)
{
    dconf_t *c = NULL;
    int      rc;

    rc = dconf_load("dispatcher/gift-dispatcher.conf.example", &c, err,
                    sizeof(err));
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_str_eq(c->nats_urls[0], "nats://127.0.0.1:14222");
    ck_assert_int_eq(c->mqtt_port, 11883);
    ck_assert_str_eq(c->rules->default_device, "motor_01");
    ck_assert_uint_eq(c->rules->ncat, 4);
    dconf_free(c);
}
END_TEST

START_TEST(defaults)
{
    dconf_t *c;

    ck_assert_int_eq(load("# nothing\n", &c), 0);
    ck_assert_str_eq(c->nats_urls[0], "nats://127.0.0.1:4222");
    ck_assert_str_eq(c->mqtt_request_topic, "v1/devices/me/rpc/request/{n}");
    ck_assert_str_eq(c->mqtt_response_topic,
                     "v1/devices/me/rpc/response/{n}");
    ck_assert_str_eq(c->mqtt_method, "rotate");
    ck_assert_int_eq(c->mqtt_qos, 1);
    ck_assert_int_eq(c->dev_max_inflight, 1);
    ck_assert_int_eq(c->rpc_id_bits, 31);
    ck_assert_int_eq(c->provision, 1);
    ck_assert_ptr_null(c->rules->default_device);
    ck_assert_uint_eq(c->nretry_delays, 4);
    ck_assert_int_eq(c->lease_ms, 5000);          /* one active owner */
    dconf_free(c);
}
END_TEST

START_TEST(lease)
{
    dconf_t *c;

    ck_assert_int_eq(load("nats = {\n  lease_ms = 0;\n};\n", &c), 0);
    ck_assert_int_eq(c->lease_ms, 0);             /* every one active */
    dconf_free(c);
    ck_assert_int_eq(load("nats = {\n  lease_ms = 500;\n};\n", &c), -1);
    has_error(1, "nats.lease_ms: must be 0");
}
END_TEST

START_TEST(syntax_error_names_the_line)
{
    dconf_t *c;

    ck_assert_int_eq(load("nats = {\n  url = \"x\"\n  fetch_batch = ;\n};\n",
                          &c), -1);
    ck_assert_ptr_null(c);
    has_error(3, "syntax error");
}
END_TEST

START_TEST(bad_values_name_file_line_key)
{
    dconf_t *c;

    ck_assert_int_eq(load(
        "log_level = \"loud\";\n"                          /* 1 */
        "nats = {\n"                                        /* 2 */
        "  fetch_batch = 0;\n"                              /* 3 */
        "  max_inflight = \"many\";\n"                      /* 4 */
        "};\n"
        "mqtt = {\n"                                        /* 6 */
        "  port = 70000;\n"                                 /* 7 */
        "  request_topic = \"a/+/{n}\";\n"                  /* 8 */
        "  response_topic = \"a/b\";\n"                     /* 9 */
        "  qos = 2;\n"                                      /* 10 */
        "};\n", &c), -1);
    has_error(1, "log_level: \"loud\" is not");
    has_error(3, "nats.fetch_batch: 0 is out of range (1 to 4096)");
    has_error(4, "nats.max_inflight: expected an integer");
    has_error(7, "mqtt.port: 70000 is out of range");
    has_error(8, "mqtt.request_topic: must not contain the wildcards");
    has_error(9, "mqtt.response_topic: must contain {n}");
    has_error(10, "mqtt.qos: 2 is out of range");
}
END_TEST

START_TEST(unknown_keys)
{
    dconf_t *c;

    ck_assert_int_eq(load("nats = {\n  fetch_bach = 10;\n};\n"
                          "colour = \"blue\";\n", &c), -1);
    has_error(2, "nats.fetch_bach: unknown setting");
    has_error(4, "colour: unknown setting");
}
END_TEST

START_TEST(rule_errors)
{
    dconf_t *c;

    ck_assert_int_eq(load(
        "rules = {\n"                                              /* 1 */
        "  default_device = \"motor 1\";\n"                        /* 2 */
        "  rule = (\n"                                             /* 3 */
        "    { gift = \"Rose\"; },\n"                              /* 4 */
        "    { device = \"m2\"; },\n"                              /* 5 */
        "    { gift = \"x\"; device = \"m.3\"; },\n"               /* 6 */
        "    { gift = \"x\"; device = \"m\"; multiplier = -1; },\n" /* 7 */
        "    { gift = [ ]; device = \"m\"; },\n"                   /* 8 */
        "    { gift = 5; device = \"m\"; devise = \"n\"; }\n"      /* 9 */
        "  );\n"
        "  catalogue = ( { gift_id = \"1\"; diamond = 1; },\n"     /* 11 */
        "                { gift_id = \"1\"; diamond = 2; },\n"     /* 12 */
        "                { diamond = 2; } );\n"                    /* 13 */
        "};\n", &c), -1);
    has_error(2, "rules.default_device: \"motor 1\" is not a device id");
    has_error(4, "rules.rule[0]: missing device");
    has_error(5, "rules.rule[1]: a rule needs gift, gift_id, platform or room");
    has_error(6, "rules.rule[2].device: \"m.3\" is not a device id");
    has_error(7, "rules.rule[3].multiplier: -1 is out of range");
    has_error(8, "rules.rule[4].gift: must not be an empty list");
    has_error(9, "rules.rule[5].gift: expected a string or a list");
    has_error(9, "rules.rule[5].devise: unknown setting");
    has_error(11, "rules.catalogue: gift_id \"1\" is listed twice");
    has_error(13, "rules.catalogue[2]: missing gift_id");
}
END_TEST

START_TEST(include_reports_the_included_file)
{
    dconf_t *c;
    char     inc[160], want[256];

    snprintf(inc, sizeof(inc), "%s/rules.conf", dir);
    write_file(inc, "# rules\n"
                    "rule = ( { gift = \"Rose\"; device = \"bad device\"; } );\n");
    ck_assert_int_eq(load("rules = {\n  @include \"rules.conf\"\n};\n", &c),
                     -1);
    snprintf(want, sizeof(want), "%s:2: rules.rule[0].device", inc);
    ck_assert_msg(strstr(err, want) != NULL, "expected %s in %s", want, err);

    write_file(inc, "rule = ( { gift = \"Rose\"; device = \"m2\"; } );\n");
    ck_assert_int_eq(load("rules = {\n  @include \"rules.conf\"\n};\n", &c),
                     0);
    ck_assert_uint_eq(c->rules->nrule, 1);
    ck_assert_str_eq(c->rules->rule[0].device, "m2");
    dconf_free(c);
}
END_TEST

START_TEST(missing_file)
{
    dconf_t *c = NULL;

    ck_assert_int_eq(dconf_load("/nonexistent/d.conf", &c, err, sizeof(err)),
                     -1);
    ck_assert_ptr_null(c);
    ck_assert_msg(strstr(err, "/nonexistent/d.conf: cannot read") != NULL,
                  "%s", err);
}
END_TEST

START_TEST(tls_and_ids)
{
    dconf_t *c;

    ck_assert_int_eq(load(
        "mqtt = {\n"
        "  rpc_id_bits = 32;\n"                                   /* 2 */
        "  instance_id = 4096;\n"                                 /* 3 */
        "  tls = { cert_file = \"/nonexistent.pem\"; };\n"        /* 4 */
        "};\n", &c), -1);
    has_error(2, "mqtt.rpc_id_bits: must be 31 (ThingsBoard) or 63");
    has_error(3, "mqtt.instance_id: 4096 is out of range (0 to 2047)");
    has_error(4, "mqtt.tls.cert_file: cannot read /nonexistent.pem");
    has_error(4, "mqtt.tls.ca_file: TLS needs ca_file or ca_path");

    ck_assert_int_eq(load("mqtt = { rpc_id_bits = 63; instance_id = 4096; };",
                          &c), 0);
    ck_assert_int_eq(c->instance_id, 4096);
    dconf_free(c);
}
END_TEST

START_TEST(values_are_taken)
{
    dconf_t *c;

    ck_assert_int_eq(load(
        "log_level = \"debug\";\n"
        "nats = { urls = [ \"nats://a:1\", \"nats://b:2\" ];\n"
        "         retry_delays_ms = [ 10, 20 ]; max_inflight = 7;\n"
        "         provision = false; replicas = 3; };\n"
        "mqtt = { host = \"tb\"; port = 1884; access_token = \"TOKEN\";\n"
        "         request_topic = \"m/{device}/req/{n}\"; method = \"spin\"; };\n"
        "devices = { max_inflight = 2; coalesce_max_events = 8;\n"
        "            coalesce_max_rounds = 10000000000L; };\n", &c), 0);
    ck_assert_int_eq(c->log_level, 3);
    ck_assert_uint_eq(c->nnats_urls, 2);
    ck_assert_str_eq(c->nats_urls[1], "nats://b:2");
    ck_assert_uint_eq(c->nretry_delays, 2);
    ck_assert_int_eq(c->retry_delays_ms[1], 20);
    ck_assert_int_eq(c->max_inflight, 7);
    ck_assert_int_eq(c->provision, 0);
    ck_assert_int_eq(c->prov.replicas, 3);
    ck_assert_str_eq(c->mqtt_host, "tb");
    ck_assert_str_eq(c->mqtt_token, "TOKEN");
    ck_assert_str_eq(c->mqtt_request_topic, "m/{device}/req/{n}");
    ck_assert_str_eq(c->mqtt_method, "spin");
    ck_assert_int_eq(c->dev_max_inflight, 2);
    ck_assert_int_eq(c->coalesce_max_events, 8);
    ck_assert_uint_eq(c->coalesce_max_rounds, 10000000000ULL);
    dconf_free(c);
}
END_TEST

START_TEST(device_limits_and_metrics)
{
    dconf_t *c;

    ck_assert_int_eq(load(
        "devices = {\n"                                            /* 1 */
        "  rounds_per_minute = -1;\n"                              /* 2 */
        "  device = (\n"                                           /* 3 */
        "    { id = \"motor 1\"; },\n"                             /* 4 */
        "    { rounds_per_minute = 5; },\n"                         /* 5 */
        "    { id = \"m2\"; paused = 1; },\n"                      /* 6 */
        "    { id = \"m3\"; pause = true; },\n"                    /* 7 */
        "    { id = \"m3\"; }\n"                                   /* 8 */
        "  );\n"
        "};\n"
        "metrics = { listen = \"127.0.0.1\"; };\n", &c), -1);    /* 11 */
    has_error(2, "devices.rounds_per_minute: expected a number of rounds >= 1, "
              "\"unlimited\" or \"stopped\"");
    has_error(4, "devices.device[0].id: \"motor 1\" is not a device id");
    has_error(5, "devices.device[1]: missing id");
    has_error(6, "devices.device[2].paused: expected true or false");
    has_error(7, "devices.device[3].pause: unknown setting");
    has_error(8, "devices.device[4].id: device \"m3\" is listed twice");
    has_error(11, "metrics.listen: \"127.0.0.1\" is not ADDRESS:PORT");

    ck_assert_int_eq(load(
        "devices = { rounds_per_minute = 600; control = false;\n"
        "  device = ( { id = \"m1\"; rounds_per_minute = \"unlimited\"; },\n"
        "             { id = \"m2\"; paused = true; } ); };\n"
        "metrics = { listen = \"0.0.0.0:9100\"; };\n", &c), 0);
    ck_assert_uint_eq(c->rounds_per_minute, 600);
    ck_assert_int_eq(c->control, 0);
    ck_assert_uint_eq(c->ndevconf, 2);
    ck_assert_int_eq(c->devconf[0].rounds_per_minute, 0);
    ck_assert_int_eq(c->devconf[1].rounds_per_minute, -1);
    ck_assert_int_eq(c->devconf[1].paused, 1);
    ck_assert_str_eq(c->metrics_listen, "0.0.0.0:9100");
    dconf_free(c);

    ck_assert_int_eq(load("metrics = { enabled = false; };\n", &c), 0);
    ck_assert_ptr_null(c->metrics_listen);
    dconf_free(c);
    ck_assert_int_eq(load("# defaults\n", &c), 0);
    ck_assert_str_eq(c->metrics_listen, "127.0.0.1:19464");
    ck_assert_int_eq(c->control, 1);
    /* finite by default: motors are physical */
    ck_assert_uint_eq(c->rounds_per_minute, DSP_DEF_RPM);
    ck_assert_uint_eq(c->coalesce_max_rounds, DSP_DEF_CMD_ROUNDS);
    ck_assert_uint_eq(c->rules->max_rounds, DSP_DEF_GIFT_ROUNDS);
    dconf_free(c);

    /* 0 is refused: "unlimited" or "stopped" say what is meant */
    ck_assert_int_eq(load("devices = { rounds_per_minute = 0; };\n", &c), -1);
    has_error(1, "devices.rounds_per_minute: expected a number of rounds");
    ck_assert_int_eq(load("devices = { rounds_per_minute = \"stopped\";\n"
                          "  device = ( { id = \"m1\"; rounds_per_minute = "
                          "\"stopped\"; } ); };\n", &c), 0);
    ck_assert_uint_eq(c->rounds_per_minute, DSP_RPM_STOPPED);
    ck_assert_int_eq(c->devconf[0].rounds_per_minute, -2);
    dconf_free(c);
    ck_assert_int_eq(load("devices = { rounds_per_minute = \"unlimited\"; };\n"
                          "rules = { max_rounds = 100; over_max_rounds = "
                          "\"dead_letter\"; };\n", &c), 0);
    ck_assert_uint_eq(c->rounds_per_minute, 0);
    ck_assert_uint_eq(c->rules->max_rounds, 100);
    ck_assert_int_eq(c->rules->over_dead_letter, 1);
    dconf_free(c);
}
END_TEST

static Suite *
suite(void)
{
    Suite *s = suite_create("dconf");
    TCase *t = tcase_create("load");

    tcase_add_checked_fixture(t, setup, teardown);
    tcase_add_test(t, example_is_valid);
    tcase_add_test(t, defaults);
    tcase_add_test(t, lease);
    tcase_add_test(t, syntax_error_names_the_line);
    tcase_add_test(t, bad_values_name_file_line_key);
    tcase_add_test(t, unknown_keys);
    tcase_add_test(t, rule_errors);
    tcase_add_test(t, include_reports_the_included_file);
    tcase_add_test(t, missing_file);
    tcase_add_test(t, tls_and_ids);
    tcase_add_test(t, values_are_taken);
    tcase_add_test(t, device_limits_and_metrics);
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
