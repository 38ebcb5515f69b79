/*
 * gift_normalize: turn one webhook body (JSON) into a validated GiftEvent.
 *
 * Pure C (jansson + OpenSSL), no nginx types, so that the module, the unit
 * tests and the fuzzers share one copy.  Accepted shapes and limits are those
 * of docs/input.md: the canonical shape and TikTok-Live-Connector's gift
 * event in its flat 1.x form and its 2.x form.
 */
#ifndef GIFT_NORMALIZE_H
#define GIFT_NORMALIZE_H

#include <stddef.h>
#include <stdint.h>

#define GIFT_ID_MAX        128   /* event id: [A-Za-z0-9._:-]{1,128} */
#define GIFT_PLATFORM_MAX  32    /* platform: [a-z0-9_-]{1,32} */
#define GIFT_STR_MAX       256   /* user, gift, room strings: UTF-8 bytes */
#define GIFT_DIAMOND_MAX   1000000
#define GIFT_QUANTITY_MAX  100000

/* One normalized gift.  Strings are NUL-terminated; empty means absent. */
typedef struct {
    char      event_id[GIFT_ID_MAX + 1];
    char      platform[GIFT_PLATFORM_MAX + 1];
    char      room_id[GIFT_STR_MAX + 1];
    char      user_id[GIFT_STR_MAX + 1];
    char      user_name[GIFT_STR_MAX + 1];
    char      gift_id[GIFT_STR_MAX + 1];
    char      gift_name[GIFT_STR_MAX + 1];
    uint32_t  diamond;
    uint32_t  quantity;
    int64_t   occurred_at_ms;
    char      streak_id[GIFT_STR_MAX + 1];
    uint32_t  streak_count;
    int       streak_end;          /* 0 or 1 */
} gift_event_t;

/* Why a body was refused: an HTTP status, the error code of docs/design.md,
 * the JSON field at fault (empty when none) and a human sentence. */
typedef struct {
    int       status;              /* 400 or 422 */
    const char *code;              /* "invalid_json" or "invalid_field" */
    char      field[64];
    char      message[192];
} gift_norm_error_t;

/*
 * Parse and validate `len` bytes of JSON.  On success fills `ev` and returns
 * 0; on failure fills `err` and returns -1.  `ev` is fully written on
 * success (no need to zero it first).  Never reads past `len`; the body need
 * not be NUL-terminated.
 */
int gift_normalize(const char *body, size_t len, gift_event_t *ev,
    gift_norm_error_t *err);

/*
 * Pack `ev` as a gift.v1.GiftEvent with received_at_ms set.  Returns the
 * number of bytes written, or 0 if `cap` is too small.  gift_event_packed_max()
 * is an upper bound for any valid event.
 */
size_t gift_event_pack(const gift_event_t *ev, int64_t received_at_ms,
    uint8_t *out, size_t cap);
size_t gift_event_packed_max(void);

#endif /* GIFT_NORMALIZE_H */
