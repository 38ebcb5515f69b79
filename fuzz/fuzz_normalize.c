/*
 * libFuzzer target: the webhook body normalizer and the GiftEvent packer.
 * Any input must give either a valid event that packs within its bound and
 * decodes back to the same fields, or a refusal with an HTTP status and a
 * code; never a crash, a leak or an out-of-bounds access.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gift.pb-c.h"
#include "gift_normalize.h"

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    gift_event_t          ev;
    gift_norm_error_t     err;
    uint8_t              *buf;
    size_t                cap, n;
    Gift__V1__GiftEvent  *back;

    if (gift_normalize((const char *) data, size, &ev, &err) != 0) {
        if ((err.status != 400 && err.status != 422) || err.code == NULL) {
            abort();
        }
        return 0;
    }

    cap = gift_event_packed_max();
    buf = malloc(cap);
    if (buf == NULL) {
        return 0;
    }

    n = gift_event_pack(&ev, 1700000000000LL, buf, cap);
    if (n == 0) {
        abort();                        /* a valid event must fit */
    }

    back = gift__v1__gift_event__unpack(NULL, n, buf);
    if (back == NULL || strcmp(back->event_id, ev.event_id) != 0
        || strcmp(back->platform, ev.platform) != 0
        || back->diamond != ev.diamond || back->quantity != ev.quantity
        || ev.diamond < 1 || ev.diamond > GIFT_DIAMOND_MAX
        || ev.quantity < 1 || ev.quantity > GIFT_QUANTITY_MAX)
    {
        abort();
    }

    gift__v1__gift_event__free_unpacked(back, NULL);
    free(buf);
    return 0;
}
