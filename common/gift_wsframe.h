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

/* Whether p[0..len) is well-formed UTF-8 (RFC 3629: no overlongs, no
 * surrogates, nothing above U+10FFFF).  Text frames must be (else 1007). */
int gift_ws_utf8_valid(const uint8_t *p, size_t len);

/*
 * Whether a close code received from a peer may be sent on the wire
 * (RFC 6455 section 7.4): 1000-1003, 1007-1014 and 3000-4999.  1005, 1006
 * and 1015 are reserved for reporting, never sent; the rest is unassigned.
 */
int gift_ws_close_code_valid(unsigned code);

/*
 * The action a close frame's payload calls for: 0 with *code set to the
 * code to echo (1000 for an empty payload), else the close code to fail
 * the connection with: 1002 (one byte, or an invalid code), 1007 (the
 * reason is not UTF-8).
 */
unsigned gift_ws_close_check(const uint8_t *payload, size_t len,
    unsigned *code);

/*
 * Whether an Origin header ("scheme://host[:port]") names the same origin
 * as a request's Host header ("host[:port]") on a connection that is TLS
 * (`https` 1) or not: scheme, host (any case) and port (80 or 443 when
 * absent) all equal.  "null", paths, user info and anything malformed are
 * not the same origin.
 */
int gift_ws_origin_same(const char *origin, size_t olen, const char *host,
    size_t hlen, int https);

/*
 * A client's frames turned into what the server must do: reassembly of
 * fragmented text, UTF-8 and close-frame checks, control frames.  No
 * sockets, no allocation: the caller owns the input buffer and the
 * reassembly buffer `msg` (max_message bytes).  The module and the fuzzer
 * share it.
 */
typedef struct {
    uint8_t        *msg;
    size_t          max_message;
    size_t          msg_len;
    unsigned        fragmented;
} gift_ws_reader_t;

typedef enum {
    GIFT_WS_EV_MORE = 0,        /* no complete frame yet */
    GIFT_WS_EV_NONE,            /* a frame taken, nothing to do (fragment) */
    GIFT_WS_EV_TEXT,            /* a whole UTF-8 text message: data, len */
    GIFT_WS_EV_PING,            /* answer with a pong of data, len */
    GIFT_WS_EV_PONG,
    GIFT_WS_EV_CLOSE,           /* the peer closes: echo `code` */
    GIFT_WS_EV_FAIL             /* close with `code` (1002, 1003, 1007,
                                 * 1009), `reason` for the log */
} gift_ws_ev_type_e;

typedef struct {
    gift_ws_ev_type_e   type;
    unsigned            code;
    const char         *reason;
    const uint8_t      *data;       /* in buf (unmasked) or in rd->msg */
    size_t              len;
    size_t              consumed;   /* bytes of buf this frame took */
} gift_ws_event_t;

/*
 * Take the next frame from buf[0..len) (unmasking it in place).  The
 * caller acts on *ev, then drops ev->consumed bytes from its buffer
 * (ev->data may point into them).  After GIFT_WS_EV_FAIL the connection
 * is failed: feed nothing more.
 */
void gift_ws_read(gift_ws_reader_t *rd, uint8_t *buf, size_t len,
    gift_ws_event_t *ev);

#endif /* GIFT_WSFRAME_H */
