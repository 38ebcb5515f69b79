/*
 * libFuzzer target: a client's byte stream through gift_ws_read(), as the
 * module reads it: arriving in pieces (the first byte picks their size),
 * kept in a buffer of the module's size, frames dropped once handled.
 * Reassembly, UTF-8, close codes and control frames must hold their
 * promises: a text message is UTF-8 and fits, a close code echoed is one
 * that may be sent, a failure is one of the close codes the server uses,
 * a pong fits a control frame, and nothing is read outside the buffer.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gift_wsframe.h"

#define MAX_MESSAGE  4096
#define BUF_SIZE     (MAX_MESSAGE + 14)

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t             len, off, piece, take;
    uint8_t            buf[BUF_SIZE], msg[MAX_MESSAGE];
    gift_ws_event_t    ev;
    gift_ws_reader_t   rd;

    if (size == 0) {
        return 0;
    }

    piece = (size_t) data[0] % 64 + 1;
    data++;
    size--;

    memset(&rd, 0, sizeof(rd));
    rd.msg = msg;
    rd.max_message = MAX_MESSAGE;

    len = 0;
    off = 0;

    while (off < size || len >= 2) {
        take = size - off < piece ? size - off : piece;
        if (take > BUF_SIZE - len) {
            take = BUF_SIZE - len;
        }
        memcpy(buf + len, data + off, take);
        len += take;
        off += take;

        for ( ;; ) {
            gift_ws_read(&rd, buf, len, &ev);

            if (ev.type == GIFT_WS_EV_MORE) {
                if (len == BUF_SIZE) {
                    abort();            /* a full buffer must hold a frame */
                }
                break;
            }

            if (ev.type == GIFT_WS_EV_FAIL) {
                if (ev.code != 1002 && ev.code != 1003 && ev.code != 1007
                    && ev.code != 1009)
                {
                    abort();
                }
                return 0;
            }

            if (ev.consumed == 0 || ev.consumed > len) {
                abort();
            }

            switch (ev.type) {
            case GIFT_WS_EV_TEXT:
                if (ev.len > MAX_MESSAGE
                    || !gift_ws_utf8_valid(ev.data, ev.len))
                {
                    abort();
                }
                break;
            case GIFT_WS_EV_CLOSE:
                if (!gift_ws_close_code_valid(ev.code)) {
                    abort();
                }
                return 0;
            case GIFT_WS_EV_PING:
                if (ev.len > 125) {
                    abort();
                }
                break;
            default:
                break;
            }

            len -= ev.consumed;
            memmove(buf, buf + ev.consumed, len);

            if (len < 2) {
                break;
            }
        }

        if (off == size && (len < 2 || ev.type == GIFT_WS_EV_MORE)) {
            break;
        }
    }

    return 0;
}
