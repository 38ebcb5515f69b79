/*
 * gift_util: clocks and leveled logging for the daemon and the tools.
 */
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "gift_util.h"

static gift_log_level_t  log_level = GIFT_LOG_INFO;
static const char       *log_program = "gift";

static const char *level_names[] = { "error", "warning", "info", "debug" };

int64_t
gift_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t
gift_mono_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void
gift_log_set_level(gift_log_level_t level)
{
    log_level = level;
}

int
gift_log_level_parse(const char *s)
{
    size_t i;

    for (i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
        if (strcasecmp(s, level_names[i]) == 0) {
            return (int) i;
        }
    }
    if (strcasecmp(s, "warn") == 0) {
        return GIFT_LOG_WARN;
    }
    return -1;
}

void
gift_log_set_program(const char *name)
{
    log_program = name;
}

void
gift_vlog(gift_log_level_t level, const char *fmt, va_list ap)
{
    char             line[2048];
    size_t           n;
    struct timespec  ts;
    struct tm        tm;
    int              w;

    if (level > log_level) {
        return;
    }

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
    w = snprintf(line + n, sizeof(line) - n, ".%03ldZ %s %s: ",
                 ts.tv_nsec / 1000000, level_names[level], log_program);
    if (w > 0) {
        n += (size_t) w;
    }
    if (n < sizeof(line)) {
        w = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
        if (w > 0) {
            n += (size_t) w;
        }
    }
    if (n >= sizeof(line) - 1) {
        n = sizeof(line) - 2;
    }
    line[n++] = '\n';

    /* one write per line, so lines from threads do not interleave */
    fwrite(line, 1, n, stderr);
    fflush(stderr);
}

void
gift_log(gift_log_level_t level, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    gift_vlog(level, fmt, ap);
    va_end(ap);
}
