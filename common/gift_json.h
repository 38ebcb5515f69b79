/*
 * gift_json: JSON text for acknowledgements and events, written by hand
 * into a caller's buffer (the module frames each acknowledgement once per
 * worker; no allocation).
 */
#ifndef GIFT_JSON_H
#define GIFT_JSON_H

#include <stddef.h>
#include <stdint.h>
#include "gift.pb-c.h"

/* Upper bound of any text these functions produce for valid messages. */
#define GIFT_JSON_MAX  16384

/*
 * The acknowledgement JSON of docs/design.md:
 * {"seq","eventId","deviceId","rounds","status","reason"(dead_letter only),
 *  "attempts","platform","roomId","userId","userName","giftName","diamond",
 *  "quantity","latencyMs","ts"}.  `seq` is the GIFT_ACKS sequence.
 * Returns the length written (no NUL counted), or 0 when `cap` is too small.
 */
size_t gift_ack_json(const Gift__V1__GiftAck *a, uint64_t seq, char *out,
    size_t cap);

/* A GiftEvent as JSON with its proto field names in camelCase. */
size_t gift_event_json(const Gift__V1__GiftEvent *e, char *out, size_t cap);

/* "ok", "dead_letter" or "unspecified". */
const char *gift_ack_status_name(Gift__V1__AckStatus s);

/* Append `s` as a quoted JSON string at out[*len]; 0 on success, -1 if full. */
int gift_json_str(char *out, size_t cap, size_t *len, const char *s);

#endif /* GIFT_JSON_H */
