/*
 * gift_wsframe: the header of one WebSocket frame sent by a client
 * (RFC 6455 section 5.2), checked the way the server must: masked, no RSV
 * bits, a known opcode, control frames final and at most 125 bytes, and a
 * payload no larger than the caller allows.  Pure C, so that the module and
 * the fuzzer share it.
 */
#ifndef GIFT_WSFRAME_H
#define GIFT_WSFRAME_H

#include <stddef.h>
#include <stdint.h>

#define GIFT_WS_MORE       0      /* not enough bytes yet */
#define GIFT_WS_OK         1      /* *f describes a complete frame */
/* otherwise: the close code to answer with (1002, 1009) */

typedef struct {
    unsigned        fin;
    unsigned        opcode;
    uint64_t        payload_len;
    size_t          header_len;   /* including the 4-byte mask */
    const uint8_t  *mask;
    const uint8_t  *payload;      /* still masked */
} gift_ws_frame_t;

/*
 * Parse the frame at buf[0..len).  GIFT_WS_OK only when the whole frame
 * (header and payload) is in the buffer; GIFT_WS_MORE when more bytes are
 * needed; 1002 (protocol error) or 1009 (payload over max_payload) as soon
 * as the header shows it, before the payload arrives.
 */
int gift_ws_parse(const uint8_t *buf, size_t len, uint64_t max_payload,
    gift_ws_frame_t *f);

/* Unmask a payload in place. */
void gift_ws_unmask(uint8_t *payload, uint64_t len, const uint8_t *mask);

#endif /* GIFT_WSFRAME_H */
