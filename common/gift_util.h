/*
 * gift_util: small helpers shared by the daemon and the tools (not the
 * module, which has nginx's own): clocks and leveled logging to stderr.
 */
#ifndef GIFT_UTIL_H
#define GIFT_UTIL_H

#include <stdarg.h>
#include <stdint.h>

typedef enum {
    GIFT_LOG_ERR = 0,
    GIFT_LOG_WARN,
    GIFT_LOG_INFO,
    GIFT_LOG_DEBUG
} gift_log_level_t;

/* Milliseconds since the epoch (wall clock). */
int64_t gift_now_ms(void);
/* Microseconds from CLOCK_MONOTONIC: for durations only. */
int64_t gift_mono_us(void);

/* Messages above this level are dropped.  Default GIFT_LOG_INFO. */
void gift_log_set_level(gift_log_level_t level);
/* Parse "error", "warning", "info", "debug"; -1 when unknown. */
int  gift_log_level_parse(const char *s);
/* "2026-11-22T03:13:40.123Z <level> <program>: message\n" on stderr. */
void gift_log_set_program(const char *name);
void gift_log(gift_log_level_t level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void gift_vlog(gift_log_level_t level, const char *fmt, va_list ap);

#endif /* GIFT_UTIL_H */
