/*
 * libFuzzer target: an acknowledgement from GIFT_ACKS (GiftAck protobuf,
 * any bytes in its strings: viewers choose their names) to its JSON and
 * its SSE frame, as the module frames it ("id: <seq>\nevent: ack\n
 * data: <json>\n\n").  No input may put a line break inside the data: line
 * (EventSource would split the event, and a name could forge fields), and
 * the frame must be exactly one event of four lines.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gift_json.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int                  lines;
    char                 json[GIFT_JSON_MAX], *frame;
    size_t               jlen, flen, i;
    uint64_t             seq;
    Gift__V1__GiftAck   *a;

    if (size < 8) {
        return 0;
    }

    memcpy(&seq, data, 8);

    a = gift__v1__gift_ack__unpack(NULL, size - 8, data + 8);
    if (a == NULL) {
        return 0;
    }

    jlen = gift_ack_json(a, seq, json, sizeof(json));
    gift__v1__gift_ack__free_unpacked(a, NULL);

    if (jlen == 0) {
        return 0;                       /* too large: the module drops it */
    }

    if (jlen >= sizeof(json) || json[0] != '{' || json[jlen - 1] != '}') {
        abort();
    }

    frame = malloc(jlen + 64);
    if (frame == NULL) {
        return 0;
    }

    flen = (size_t) snprintf(frame, 64, "id: %llu\nevent: ack\ndata: ",
                             (unsigned long long) seq);
    memcpy(frame + flen, json, jlen);
    flen += jlen;
    memcpy(frame + flen, "\n\n", 2);
    flen += 2;

    lines = 0;
    for (i = 0; i < flen; i++) {
        if (frame[i] == '\r') {
            abort();                    /* CR ends a line too */
        }
        if (frame[i] == '\n') {
            lines++;
        }
    }

    if (lines != 4 || memchr(json, '\n', jlen) != NULL) {
        abort();
    }

    free(frame);
    return 0;
}
