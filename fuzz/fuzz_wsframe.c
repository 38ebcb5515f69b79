/*
 * libFuzzer target: the WebSocket client frame parser.  Walks the input as
 * a stream of frames, as the module does; every frame it accepts must lie
 * inside the input, and a refusal must be a close code.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gift_wsframe.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t          *buf;
    size_t            off;
    int               rc;
    gift_ws_frame_t   f;

    buf = malloc(size ? size : 1);
    if (buf == NULL) {
        return 0;
    }
    memcpy(buf, data, size);

    off = 0;
    for ( ;; ) {
        rc = gift_ws_parse(buf + off, size - off, 4096, &f);
        if (rc == GIFT_WS_MORE) {
            break;
        }
        if (rc != GIFT_WS_OK) {
            if (rc != 1002 && rc != 1009) {
                abort();
            }
            break;
        }
        if (f.header_len + f.payload_len > size - off
            || f.payload_len > 4096 || f.opcode > 0xa)
        {
            abort();
        }
        gift_ws_unmask((uint8_t *) f.payload, f.payload_len, f.mask);
        off += f.header_len + f.payload_len;
    }

    free(buf);
    return 0;
}
