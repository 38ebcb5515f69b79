/*
 * streaks.c: the arithmetic of TikTok streaks (pure; unit-tested).
 *
 * A streak is a run of frames that share a streak_id; each frame carries
 * the running total so far (repeatCount, as streak_count).  Frames can be
 * repeated, reordered, or stop before the one marked "end".  A frame
 * therefore counts only what it adds over what is already counted for its
 * streak: inc = count - counted when positive, else 0.  Counting each
 * increment as its frame arrives means a streak whose final frame never
 * comes is still fully counted, and max(count) is the streak's total
 * whatever the order.
 *
 * The state lives in KV GIFT_STREAKS under "s.<streak id>" and is changed
 * only by compare-and-set (kv.c), so dispatchers sharing the consumer, or
 * one restarted after a crash, continue from the same count.  It also
 * remembers the last STREAK_RECENT claims (a hash of the event id and its
 * increment): a frame delivered again (a retry, a redelivery after a
 * crash) gets the same increment back instead of 0 -- so a retried frame
 * is never lost -- and never a second one.  Older claims are kept, one
 * key each, as "e.<event id>" (written by kv.c after the CAS); the recent
 * list only covers the moment between the two writes.
 *
 * Value, text: "v1 <counted>[e] <hash>=<inc> <hash>=<inc> ..." (oldest
 * first; hash: 16 hex digits, the first 8 bytes of SHA-256(event id); "e":
 * the streak's end frame was counted).
 *
 * Streak ids without a groupId ("...:0") repeat for a user's next streak
 * of the same gift: streak_apply_ex() tells the two apart.
 */
#include <inttypes.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dispatcher.h"

uint64_t
streak_event_hash(const char *event_id)
{
    unsigned char md[SHA256_DIGEST_LENGTH];
    uint64_t      h = 0;
    int           i;

    SHA256((const unsigned char *) event_id, strlen(event_id), md);
    for (i = 0; i < 8; i++) {
        h = h << 8 | md[i];
    }
    return h;
}

int
streak_parse(const char *v, size_t len, dstreak_t *s)
{
    char                buf[STREAK_VALUE_MAX];
    char               *p, *end;
    unsigned long long  x, inc;

    memset(s, 0, sizeof(*s));
    if (len == 0 || len >= sizeof(buf)) {
        return -1;
    }
    memcpy(buf, v, len);
    buf[len] = '\0';
    if (strncmp(buf, "v1 ", 3) != 0) {
        return -1;
    }
    p = buf + 3;
    x = strtoull(p, &end, 10);
    if (end == p || x > UINT32_MAX
        || (*end != ' ' && *end != '\0' && *end != 'e'))
    {
        return -1;
    }
    s->counted = (uint32_t) x;
    if (*end == 'e') {
        s->ended = 1;
        end++;
        if (*end != ' ' && *end != '\0') {
            return -1;
        }
    }
    p = end;
    while (*p == ' ') {
        p++;
        if (*p == '\0') {
            break;
        }
        x = strtoull(p, &end, 16);
        if (end - p != 16 || *end != '=') {
            return -1;
        }
        p = end + 1;
        inc = strtoull(p, &end, 10);
        if (end == p || inc > UINT32_MAX || (*end != ' ' && *end != '\0')) {
            return -1;
        }
        p = end;
        if (s->n == STREAK_RECENT) {
            memmove(&s->recent[0], &s->recent[1],
                    (STREAK_RECENT - 1) * sizeof(s->recent[0]));
            s->n--;
        }
        s->recent[s->n].h = (uint64_t) x;
        s->recent[s->n].inc = (uint32_t) inc;
        s->n++;
    }
    return *p == '\0' ? 0 : -1;
}

size_t
streak_format(const dstreak_t *s, char *out, size_t cap)
{
    size_t i, o;
    int    w;

    w = snprintf(out, cap, "v1 %" PRIu32 "%s", s->counted,
                 s->ended ? "e" : "");
    if (w < 0 || (size_t) w >= cap) {
        return 0;
    }
    o = (size_t) w;
    for (i = 0; i < s->n; i++) {
        w = snprintf(out + o, cap - o, " %016" PRIx64 "=%" PRIu32,
                     s->recent[i].h, s->recent[i].inc);
        if (w < 0 || (size_t) w >= cap - o) {
            return 0;
        }
        o += (size_t) w;
    }
    return o;
}

dstreak_rc
streak_apply(dstreak_t *s, uint64_t eh, uint32_t count, uint32_t *inc)
{
    size_t i;

    for (i = 0; i < s->n; i++) {
        if (s->recent[i].h == eh) {
            *inc = s->recent[i].inc;
            return STREAK_KNOWN;
        }
    }
    if (count <= s->counted) {
        *inc = 0;
        return STREAK_STALE;
    }
    *inc = count - s->counted;
    s->counted = count;
    if (s->n == STREAK_RECENT) {
        memmove(&s->recent[0], &s->recent[1],
                (STREAK_RECENT - 1) * sizeof(s->recent[0]));
        s->n--;
    }
    s->recent[s->n].h = eh;
    s->recent[s->n].inc = *inc;
    s->n++;
    return STREAK_NEW;
}

dstreak_rc
streak_apply_ex(dstreak_t *s, uint64_t eh, uint32_t count, int nogroup,
    int end, uint32_t *inc)
{
    size_t     i;
    dstreak_rc rc;

    for (i = 0; i < s->n; i++) {
        if (s->recent[i].h == eh) {
            *inc = s->recent[i].inc;
            return STREAK_KNOWN;
        }
    }
    if (s->counted > 0 && nogroup && (s->ended || count < s->counted))
    {
        /* the user's next streak under the same id: from 0 (the recent
         * claims stay, so repeats of the last streak's frames still find
         * theirs) */
        s->counted = 0;
        s->ended = 0;
    }
    rc = streak_apply(s, eh, count, inc);
    if (end && nogroup) {
        /* TikTok's end frame repeats the last count: STALE, yet the
         * streak is over all the same */
        s->ended = 1;
    }
    return rc;
}
