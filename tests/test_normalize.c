/*
 * Unit tests for gift_normalize: a table of payloads (recorded
 * TikTok-Live-Connector fixtures and hand-written bodies, good and bad), each
 * with its expected status, error code and field, then retries, packing and
 * robustness.  Run from the repository root (fixtures are read from
 * t/fixtures/tiktok/).  Every body is handed over in a buffer of exactly its
 * length, without a NUL, so that a sanitizer catches any read past it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <check.h>

#include "gift_normalize.h"
#include "gift.pb-c.h"

#define FIX  "t/fixtures/tiktok/"

/* -------------------------------------------------------------- helpers */

#define S16   "abcdefghijklmnop"
#define S64   S16 S16 S16 S16
#define S128  S64 S64
#define S256  S128 S128
#define STAR8 "\xf0\x9f\x8c\x9f\xf0\x9f\x8c\x9f"          /* 2 x U+1F31F */
#define STAR64 STAR8 STAR8 STAR8 STAR8 STAR8 STAR8 STAR8 STAR8
#define STAR256 STAR64 STAR64 STAR64 STAR64        /* 256 bytes, 64 chars */

/* The canonical example of docs/design.md, one member at a time, so that a case
 * can swap one for a bad value (duplicates would be refused). */
#define EV   "\"event\":\"gift\""
#define PL   "\"platform\":\"tiktok\""
#define UI   "\"userId\":\"user_123\""
#define GN   "\"giftName\":\"Motor\""
#define DI   "\"diamond\":10"
#define QU   "\"quantity\":1"
#define TS   "\"timestamp\":1700000000000"
#define NONE "\"unused\":0"
#define CANON(ev, pl, ui, gn, di, qu, ts, more) \
    "{" ev "," pl "," ui "," gn "," di "," qu "," ts more "}"
#define OK_CANON(more) CANON(EV, PL, UI, GN, DI, QU, TS, more)

/* A TikTok 1.x flat event, reduced to what matters. */
#define FLAT(uid, more) \
    "{\"userId\":" uid ",\"uniqueId\":\"zerodytester\"," \
    "\"nickname\":\"Zerody\",\"giftId\":5655," \
    "\"repeatEnd\":false,\"groupId\":\"1661887131074\"," \
    "\"createTime\":\"1661887134397\"" more "}"
#define FLAT_OK(more) \
    FLAT("\"6813181309701719620\"", ",\"giftName\":\"Rose\"," \
         "\"diamondCount\":1,\"repeatCount\":2,\"giftType\":1," \
         "\"msgId\":\"7137749190944230150\"" more)

/* A TikTok 2.x event (2.3+ names), reduced. */
#define V2(user, gift, common, more) \
    "{\"common\":" common ",\"giftId\":\"5655\",\"repeatCount\":3," \
    "\"repeatEnd\":0,\"groupId\":\"1731000000000\",\"user\":" user \
    ",\"gift\":" gift more "}"
#define V2_USER   "{\"idStr\":\"6813181309701719620\",\"nickname\":\"Zerody\"}"
#define V2_GIFT   "{\"id\":\"5655\",\"name\":\"Rose\",\"diamondCount\":1," \
                  "\"type\":1}"
#define V2_COMMON "{\"msgId\":\"7435990123456789012\"," \
                  "\"roomId\":\"7435987243521837870\"," \
                  "\"createTime\":\"1731000000123\"}"

/* Bodies with a NUL byte: their length is given, not measured. */
#define NUL_IN     CANON(EV, "\"platform\":\"tik\0tok\"", UI, GN, DI, QU, TS, \
                          "")
#define NUL_AFTER  OK_CANON("") "\0"

typedef struct {
    const char  *name;
    const char  *body;     /* inline JSON ... */
    const char  *file;     /* ... or a fixture, relative to the repo root */
    size_t       len;      /* 0: strlen(body) (set for bodies with a NUL) */
    int          status;   /* 0: accepted; else 400 or 422 */
    const char  *field;    /* expected field of a 422 */

    /* on success; NULL: not checked */
    const char  *event_id; /* a value ending in '*' is a prefix */
    const char  *user_id;
    const char  *user_name;
    const char  *gift_id;
    const char  *gift_name;
    const char  *room_id;
    const char  *streak_id;
    const char  *diamond;  /* numbers in decimal, to tell 0 from unset */
    const char  *quantity;
    const char  *streak_end;
    const char  *occurred;
} ncase_t;

#define GOOD(...)  { .status = 0, __VA_ARGS__ }
#define BAD(st, fld, ...)  { .status = (st), .field = (fld), __VA_ARGS__ }

static const ncase_t cases[] = {

    /* ---- recorded TikTok-Live-Connector events: 1.x flat form ---- */
    GOOD(.name = "1.x flat, streak in progress",
         .file = "flat_v1_rose_progress",
         .event_id = "tt:7137749190944230150",
         .user_id = "6813181309701719620", .user_name = "Zerody Tester",
         .gift_id = "5655", .gift_name = "Rose", .room_id = "",
         .diamond = "1", .quantity = "2", .streak_end = "0",
         .streak_id = "tiktok:6813181309701719620:5655:1661887131074",
         .occurred = "1661887134397"),
    GOOD(.name = "1.x flat, streak end", .file = "flat_v1_rose_end",
         .event_id = "tt:7137749190944230222", .quantity = "4",
         .streak_end = "1",
         .streak_id = "tiktok:6813181309701719620:5655:1661887131074"),
    GOOD(.name = "1.x flat, non-streakable gift", .file = "flat_v1_galaxy",
         .event_id = "tt:7137749190944239001",
         .user_id = "7230000000000000001",
         .user_name = "\xc3\x9cn\xc3\xaf" "code \xf0\x9f\x8c\x9f fan",
         .gift_id = "11046", .gift_name = "Galaxy", .diamond = "1000",
         .quantity = "1", .streak_end = "1", .streak_id = ""),
    GOOD(.name = "1.x flat, 64-bit ids as JSON numbers",
         .file = "flat_v1_numeric_ids",
         .event_id = "tt:7137749190944230222",
         .user_id = "6813181309701719620", .gift_id = "5655",
         .quantity = "4", .streak_end = "1", .occurred = "1661887136011",
         .streak_id = "tiktok:6813181309701719620:5655:1661887131074"),

    /* ---- 2.x legacy WebcastPushConnection (flat, gift struct lost) ---- */
    GOOD(.name = "2.x legacy flat + extendedGiftInfo, streak",
         .file = "flat_legacy25_rose_progress",
         .event_id = "tt:7435990123456789012",
         .user_id = "6813181309701719620", .user_name = "Zerody Tester",
         .gift_name = "Rose", .room_id = "7435987243521837870",
         .diamond = "1", .quantity = "3", .streak_end = "0",
         .streak_id = "tiktok:6813181309701719620:5655:1731000000000",
         .occurred = "1731000000123"),
    GOOD(.name = "2.x legacy flat + extendedGiftInfo, non-streak",
         .file = "flat_legacy25_galaxy", .gift_name = "Galaxy",
         .diamond = "1000", .streak_end = "1", .streak_id = ""),
    BAD(422, "diamondCount", .name = "2.x legacy flat without extended info",
        .file = "flat_legacy25_no_extended"),

    /* ---- 2.x TikTokLiveConnection (decoded WebcastGiftMessage) ---- */
    GOOD(.name = "2.x, streak in progress", .file = "v2_rose_progress",
         .event_id = "tt:7435990123456789012",
         .user_id = "6813181309701719620", .user_name = "Zerody Tester",
         .gift_id = "5655", .gift_name = "Rose",
         .room_id = "7435987243521837870", .diamond = "1", .quantity = "3",
         .streak_end = "0",
         .streak_id = "tiktok:6813181309701719620:5655:1731000000000",
         .occurred = "1731000000123"),
    GOOD(.name = "2.x, streak end", .file = "v2_rose_end",
         .event_id = "tt:7435990123456789099", .quantity = "5",
         .streak_end = "1",
         .streak_id = "tiktok:6813181309701719620:5655:1731000000000"),
    GOOD(.name = "2.x, non-streakable gift", .file = "v2_galaxy",
         .gift_name = "Galaxy", .gift_id = "11046", .diamond = "1000",
         .quantity = "1", .streak_end = "1", .streak_id = ""),
    GOOD(.name = "2.x, 64-bit ids as JSON numbers", .file = "v2_numeric_ids",
         .event_id = "tt:7435990123456789099",
         .user_id = "6813181309701719620", .gift_id = "5655",
         .room_id = "7435987243521837870", .quantity = "5", .streak_end = "1",
         .occurred = "1731000002456"),
    GOOD(.name = "2.0 form (event{}, giftDetails{}, numeric giftId)",
         .file = "v2_0_finger_heart_end",
         .event_id = "tt:7300000000000000777",
         .user_id = "6813181309701719620", .user_name = "Zerody Tester",
         .gift_id = "5487", .gift_name = "Finger Heart", .room_id = "",
         .diamond = "5", .quantity = "7", .streak_end = "1",
         .streak_id = "tiktok:6813181309701719620:5487:1700000000001",
         .occurred = "1700000000456"),
    GOOD(.name = "2.1 form (common{}, giftDetails{})",
         .file = "v2_1_perfume_progress",
         .event_id = "tt:7400000000000000321",
         .user_id = "7111111111111111111", .user_name = "Perfume Giver",
         .gift_name = "Perfume", .room_id = "7399999999999999999",
         .diamond = "20", .quantity = "1", .streak_end = "0",
         .streak_id = "tiktok:7111111111111111111:5658:1720000000000"),

    /* ---- canonical, accepted ---- */
    GOOD(.name = "canonical example of docs/design.md", .body = OK_CANON(""),
         .event_id = "h:*", .user_id = "user_123", .gift_name = "Motor",
         .user_name = "", .gift_id = "", .room_id = "", .streak_id = "",
         .diamond = "10", .quantity = "1", .streak_end = "1",
         .occurred = "1700000000000"),
    GOOD(.name = "canonical with eventId and optional fields",
         .body = OK_CANON(",\"eventId\":\"abc-123:x.y_Z\","
                          "\"userName\":\"Ann\",\"giftId\":\"g1\","
                          "\"roomId\":7435987243521837870"),
         .event_id = "abc-123:x.y_Z", .user_name = "Ann", .gift_id = "g1",
         .room_id = "7435987243521837870"),
    GOOD(.name = "canonical without event and timestamp",
         .body = CANON(NONE, PL, UI, GN, DI, QU, "\"x\":1", ""),
         .occurred = "0", .event_id = "h:*"),
    GOOD(.name = "userId as an integer",
         .body = CANON(EV, PL, "\"userId\":123", GN, DI, QU, TS, ""),
         .user_id = "123"),
    GOOD(.name = "diamond and quantity at their minimum",
         .body = CANON(EV, PL, UI, GN, "\"diamond\":1", "\"quantity\":1", TS,
                       ""), .diamond = "1", .quantity = "1"),
    GOOD(.name = "diamond and quantity at their maximum",
         .body = CANON(EV, PL, UI, GN, "\"diamond\":1000000",
                       "\"quantity\":100000", TS, ""),
         .diamond = "1000000", .quantity = "100000"),
    GOOD(.name = "platform of 32 characters",
         .body = CANON(EV, "\"platform\":\"a-b_c0123456789abcdefghijklmnopq\"",
                       UI, GN, DI, QU, TS, "")),
    GOOD(.name = "eventId of 128 characters",
         .body = OK_CANON(",\"eventId\":\"" S128 "\""), .event_id = S128),
    GOOD(.name = "giftName of 256 bytes",
         .body = CANON(EV, PL, UI, "\"giftName\":\"" S256 "\"", DI, QU, TS,
                       ""), .gift_name = S256),
    GOOD(.name = "giftName of 256 bytes of 4-byte UTF-8",
         .body = CANON(EV, PL, UI, "\"giftName\":\"" STAR256 "\"", DI, QU,
                       TS, ""), .gift_name = STAR256),
    GOOD(.name = "userId of 256 bytes",
         .body = CANON(EV, PL, "\"userId\":\"" S256 "\"", GN, DI, QU, TS, ""),
         .user_id = S256),
    GOOD(.name = "timestamp 0",
         .body = CANON(EV, PL, UI, GN, DI, QU, "\"timestamp\":0", ""),
         .occurred = "0"),
    GOOD(.name = "timestamp at the last millisecond before 3000",
         .body = CANON(EV, PL, UI, GN, DI, QU, "\"timestamp\":32503679999999",
                       ""), .occurred = "32503679999999"),
    GOOD(.name = "unknown fields ignored, nesting below the limit",
         .body = OK_CANON(",\"extra\":{\"a\":[1,2.5,\"x\",null,true,"
                          "{\"b\":[[[[[[[[[[1]]]]]]]]]]}]},\"zz\":1.5e3"),
         .diamond = "10"),
    GOOD(.name = "canonical streak frame",
         .body = OK_CANON(",\"streakId\":\"s-1\",\"streakEnd\":false"),
         .streak_id = "s-1", .streak_end = "0"),
    GOOD(.name = "canonical streak end as 1",
         .body = OK_CANON(",\"streakId\":\"s-1\",\"streakEnd\":1"),
         .streak_id = "s-1", .streak_end = "1"),
    GOOD(.name = "optional fields as null or empty are absent",
         .body = OK_CANON(",\"userName\":\"\",\"roomId\":null,\"giftId\":\"\""),
         .user_name = "", .room_id = "", .gift_id = ""),
    GOOD(.name = "surrounding whitespace",
         .body = " \n\t" OK_CANON("") "\r\n "),

    /* ---- canonical: platform ---- */
    BAD(422, "platform", .name = "platform with upper case",
        .body = CANON(EV, "\"platform\":\"TikTok\"", UI, GN, DI, QU, TS, "")),
    BAD(422, "platform", .name = "platform with a dot (subject injection)",
        .body = CANON(EV, "\"platform\":\"tiktok.x\"", UI, GN, DI, QU, TS,
                      "")),
    BAD(422, "platform", .name = "platform with a space",
        .body = CANON(EV, "\"platform\":\"tik tok\"", UI, GN, DI, QU, TS,
                      "")),
    BAD(422, "platform", .name = "platform *",
        .body = CANON(EV, "\"platform\":\"*\"", UI, GN, DI, QU, TS, "")),
    BAD(422, "platform", .name = "platform >",
        .body = CANON(EV, "\"platform\":\">\"", UI, GN, DI, QU, TS, "")),
    BAD(422, "platform", .name = "platform of 33 characters",
        .body = CANON(EV, "\"platform\":\"a-b_c0123456789abcdefghijklmnopqr\"",
                      UI, GN, DI, QU, TS, "")),
    BAD(422, "platform", .name = "platform empty",
        .body = CANON(EV, "\"platform\":\"\"", UI, GN, DI, QU, TS, "")),
    BAD(422, "platform", .name = "platform missing",
        .body = CANON(EV, NONE, UI, GN, DI, QU, TS, "")),
    BAD(422, "platform", .name = "platform a number",
        .body = CANON(EV, "\"platform\":1", UI, GN, DI, QU, TS, "")),

    /* ---- eventId ---- */
    BAD(422, "eventId", .name = "eventId with CR LF (header injection)",
        .body = OK_CANON(",\"eventId\":\"a\\r\\nNats-Msg-Id: b\"")),
    BAD(422, "eventId", .name = "eventId of 129 characters",
        .body = OK_CANON(",\"eventId\":\"" S128 "x\"")),
    BAD(422, "eventId", .name = "eventId empty",
        .body = OK_CANON(",\"eventId\":\"\"")),
    BAD(422, "eventId", .name = "eventId with a space",
        .body = OK_CANON(",\"eventId\":\"a b\"")),
    BAD(422, "eventId", .name = "eventId a number",
        .body = OK_CANON(",\"eventId\":12")),

    /* ---- user and gift strings ---- */
    BAD(422, "userId", .name = "userId missing",
        .body = CANON(EV, PL, NONE, GN, DI, QU, TS, "")),
    BAD(422, "userId", .name = "userId empty",
        .body = CANON(EV, PL, "\"userId\":\"\"", GN, DI, QU, TS, "")),
    BAD(422, "userId", .name = "userId of 257 bytes",
        .body = CANON(EV, PL, "\"userId\":\"" S256 "x\"", GN, DI, QU, TS,
                      "")),
    BAD(422, "userId", .name = "userId negative",
        .body = CANON(EV, PL, "\"userId\":-1", GN, DI, QU, TS, "")),
    BAD(422, "userId", .name = "userId a float",
        .body = CANON(EV, PL, "\"userId\":1.5", GN, DI, QU, TS, "")),
    BAD(422, "giftName", .name = "giftName missing",
        .body = CANON(EV, PL, UI, NONE, DI, QU, TS, "")),
    BAD(422, "giftName", .name = "giftName of 257 bytes",
        .body = CANON(EV, PL, UI, "\"giftName\":\"" S256 "x\"", DI, QU, TS,
                      "")),
    BAD(422, "giftName", .name = "giftName of 257 bytes, UTF-8",
        .body = CANON(EV, PL, UI, "\"giftName\":\"" STAR256 "x\"", DI, QU,
                      TS, "")),
    BAD(422, "giftName", .name = "giftName a number",
        .body = CANON(EV, PL, UI, "\"giftName\":7", DI, QU, TS, "")),
    BAD(422, "userName", .name = "userName of 257 bytes",
        .body = OK_CANON(",\"userName\":\"" S256 "x\"")),
    BAD(422, "giftName", .name = "invalid UTF-8 in giftName",
        .body = CANON(EV, PL, UI, "\"giftName\":\"Mo\xfftor\"", DI, QU, TS,
                      "")),
    BAD(422, "userName", .name = "truncated UTF-8 sequence in userName",
        .body = OK_CANON(",\"userName\":\"Ann\xc3\"")),
    BAD(422, "userId", .name = "overlong UTF-8 in userId",
        .body = CANON(EV, PL, "\"userId\":\"a\xc0\xaf\"", GN, DI, QU, TS,
                      "")),
    BAD(422, "giftName", .name = "UTF-16 surrogate encoded in UTF-8",
        .body = CANON(EV, PL, UI, "\"giftName\":\"\xed\xa0\x80\"", DI, QU,
                      TS, "")),

    /* ---- diamond ---- */
    BAD(422, "diamond", .name = "diamond 0",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":0", QU, TS, "")),
    BAD(422, "diamond", .name = "diamond 1000001",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":1000001", QU, TS, "")),
    BAD(422, "diamond", .name = "diamond negative",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":-1", QU, TS, "")),
    BAD(422, "diamond", .name = "diamond 10.0 (a float)",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":10.0", QU, TS, "")),
    BAD(422, "diamond", .name = "diamond 1e1 (a float)",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":1e1", QU, TS, "")),
    BAD(422, "diamond", .name = "diamond a numeric string",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":\"10\"", QU, TS, "")),
    BAD(422, "diamond", .name = "diamond true",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":true", QU, TS, "")),
    BAD(422, "diamond", .name = "diamond null",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":null", QU, TS, "")),
    BAD(422, "diamond", .name = "diamond \"NaN\"",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":\"NaN\"", QU, TS, "")),
    BAD(422, "diamond", .name = "diamond beyond 64 bits",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":99999999999999999999", QU,
                      TS, "")),
    BAD(422, "diamond", .name = "diamond beyond 64 bits, negative",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":-99999999999999999999",
                      QU, TS, "")),
    BAD(422, "diamond", .name = "diamond 1e400 (float overflow)",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":1e400", QU, TS, "")),
    BAD(422, "diamond", .name = "diamond INT64_MAX",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":9223372036854775807", QU,
                      TS, "")),
    BAD(422, "diamond", .name = "diamond 2^32 + 10 (no wrap-around)",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":4294967306", QU, TS, "")),

    /* ---- quantity, timestamp, event, streak ---- */
    BAD(422, "quantity", .name = "quantity 0",
        .body = CANON(EV, PL, UI, GN, DI, "\"quantity\":0", TS, "")),
    BAD(422, "quantity", .name = "quantity 100001",
        .body = CANON(EV, PL, UI, GN, DI, "\"quantity\":100001", TS, "")),
    BAD(422, "quantity", .name = "quantity a numeric string",
        .body = CANON(EV, PL, UI, GN, DI, "\"quantity\":\"1\"", TS, "")),
    BAD(422, "quantity", .name = "quantity 1.5",
        .body = CANON(EV, PL, UI, GN, DI, "\"quantity\":1.5", TS, "")),
    BAD(422, "quantity", .name = "quantity missing",
        .body = CANON(EV, PL, UI, GN, DI, NONE, TS, "")),
    BAD(422, "timestamp", .name = "timestamp negative",
        .body = CANON(EV, PL, UI, GN, DI, QU, "\"timestamp\":-1", "")),
    BAD(422, "timestamp", .name = "timestamp a numeric string",
        .body = CANON(EV, PL, UI, GN, DI, QU, "\"timestamp\":\"1700000000000\"",
                      "")),
    BAD(422, "timestamp", .name = "timestamp at the year 3000",
        .body = CANON(EV, PL, UI, GN, DI, QU, "\"timestamp\":32503680000000",
                      "")),
    BAD(422, "event", .name = "event not a gift",
        .body = CANON("\"event\":\"like\"", PL, UI, GN, DI, QU, TS, "")),
    BAD(422, "streakId", .name = "streakId with a space",
        .body = OK_CANON(",\"streakId\":\"s 1\"")),
    BAD(422, "streakId", .name = "streakId of 129 characters",
        .body = OK_CANON(",\"streakId\":\"" S128 "x\"")),
    BAD(422, "streakEnd", .name = "streakEnd a string",
        .body = OK_CANON(",\"streakId\":\"s1\",\"streakEnd\":\"yes\"")),

    /* ---- duplicates ---- */
    BAD(422, "diamond", .name = "duplicate key",
        .body = OK_CANON(",\"diamond\":1000")),
    BAD(422, "extra.a", .name = "duplicate key in a nested object",
        .body = OK_CANON(",\"extra\":{\"a\":1,\"a\":2}")),

    /* ---- malformed JSON ---- */
    BAD(400, NULL, .name = "truncated object", .body = "{\"platform\":"),
    BAD(400, NULL, .name = "empty body", .body = ""),
    BAD(400, NULL, .name = "trailing garbage", .body = OK_CANON("") "x"),
    BAD(400, NULL, .name = "two objects", .body = OK_CANON("") OK_CANON("")),
    BAD(400, NULL, .name = "NaN token",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":NaN", QU, TS, "")),
    BAD(400, NULL, .name = "Infinity token",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":Infinity", QU, TS, "")),
    BAD(400, NULL, .name = "leading + sign",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":+10", QU, TS, "")),
    BAD(400, NULL, .name = "hex number",
        .body = CANON(EV, PL, UI, GN, "\"diamond\":0x10", QU, TS, "")),
    BAD(400, NULL, .name = "raw NUL byte inside a string",
        .body = NUL_IN, .len = sizeof(NUL_IN) - 1),
    BAD(400, NULL, .name = "raw NUL byte after the object",
        .body = NUL_AFTER, .len = sizeof(NUL_AFTER) - 1),
    BAD(400, NULL, .name = "escaped NUL (\\u0000) in giftName",
        .body = CANON(EV, PL, UI, "\"giftName\":\"Mo\\u0000tor\"", DI, QU, TS,
                      "")),
    BAD(400, NULL, .name = "lone surrogate escape",
        .body = CANON(EV, PL, UI, "\"giftName\":\"\\ud800\"", DI, QU, TS,
                      "")),
    BAD(400, NULL, .name = "invalid UTF-8 in a key",
        .body = OK_CANON(",\"a\xff\":1")),
    BAD(400, NULL, .name = "an array", .body = "[" OK_CANON("") "]"),
    BAD(400, NULL, .name = "a bare string", .body = "\"gift\""),
    BAD(400, NULL, .name = "single quotes", .body = "{'platform':'tiktok'}"),
    BAD(400, NULL, .name = "comment", .body = "{/* x */}"),

    /* ---- TikTok forms, field by field ---- */
    BAD(422, "userId", .name = "flat: userId missing",
        .body = "{\"giftName\":\"Rose\",\"diamondCount\":1,"
                "\"repeatCount\":1}"),
    BAD(422, "userId", .name = "flat: userId negative",
        .body = FLAT("-5", ",\"giftName\":\"Rose\",\"diamondCount\":1")),
    BAD(422, "diamondCount", .name = "flat: diamondCount a string",
        .body = FLAT("\"1\"", ",\"giftName\":\"Rose\",\"diamondCount\":\"1\"")),
    BAD(422, "diamondCount", .name = "flat: diamondCount 1000001",
        .body = FLAT("\"1\"", ",\"giftName\":\"Rose\","
                     "\"diamondCount\":1000001")),
    BAD(422, "repeatCount", .name = "flat: repeatCount 0",
        .body = "{\"userId\":\"1\",\"giftName\":\"Rose\",\"diamondCount\":1,"
                "\"repeatCount\":0}"),
    BAD(422, "repeatEnd", .name = "flat: repeatEnd 2",
        .body = "{\"userId\":\"1\",\"giftName\":\"Rose\",\"diamondCount\":1,"
                "\"repeatCount\":1,\"repeatEnd\":2}"),
    BAD(422, "repeatEnd", .name = "flat: repeatEnd \"true\"",
        .body = "{\"userId\":\"1\",\"giftName\":\"Rose\",\"diamondCount\":1,"
                "\"repeatCount\":1,\"repeatEnd\":\"true\"}"),
    GOOD(.name = "flat: repeatEnd 1, repeatCount absent",
         .body = "{\"userId\":\"1\",\"giftName\":\"Rose\",\"diamondCount\":1,"
                 "\"giftType\":1,\"repeatEnd\":1,\"groupId\":7}",
         .quantity = "1", .streak_end = "1", .streak_id = "tiktok:1:0:7",
         .event_id = "h:*"),
    BAD(422, "msgId", .name = "flat: msgId with a space",
        .body = FLAT("\"1\"", ",\"giftName\":\"Rose\",\"diamondCount\":1,"
                     "\"msgId\":\"7137 749\"")),
    BAD(422, "msgId", .name = "flat: msgId beyond 64 bits",
        .body = FLAT("\"1\"", ",\"giftName\":\"Rose\",\"diamondCount\":1,"
                     "\"msgId\":18446744073709551615")),
    GOOD(.name = "flat: msgId of 125 characters",
         .body = FLAT("\"1\"", ",\"giftName\":\"Rose\",\"diamondCount\":1,"
                      "\"msgId\":\"" S64 S16 S16 S16 "abcdefghijklm\""),
         .event_id = "tt:" S64 S16 S16 S16 "abcdefghijklm"),
    BAD(422, "msgId", .name = "flat: msgId of 126 characters",
        .body = FLAT("\"1\"", ",\"giftName\":\"Rose\",\"diamondCount\":1,"
                     "\"msgId\":\"" S64 S16 S16 S16 "abcdefghijklmn\"")),
    BAD(422, "repeatCount", .name = "flat: repeatCount 100001",
        .body = FLAT("\"1\"", ",\"giftName\":\"Rose\",\"diamondCount\":1,"
                     "\"repeatCount\":100001")),
    GOOD(.name = "flat: msgId \"0\" (unset) gives a content id",
         .body = FLAT("\"1\"", ",\"giftName\":\"Rose\",\"diamondCount\":1,"
                      "\"msgId\":\"0\""), .event_id = "h:*"),
    GOOD(.name = "flat: eventId wins over msgId",
         .body = FLAT_OK(",\"eventId\":\"mine-1\""), .event_id = "mine-1"),
    BAD(422, "createTime", .name = "flat: createTime not digits",
        .body = "{\"userId\":\"1\",\"giftName\":\"Rose\",\"diamondCount\":1,"
                "\"createTime\":\"-5\"}"),
    GOOD(.name = "flat: no name, falls back to giftId",
         .body = FLAT("\"1\"", ",\"diamondCount\":3"),
         .gift_name = "5655", .gift_id = "5655", .diamond = "3",
         .streak_end = "1", .streak_id = ""),
    BAD(422, "platform", .name = "flat: platform contradicts the shape",
        .body = FLAT_OK(",\"platform\":\"youtube\"")),
    GOOD(.name = "flat: odd user id gives a hashed streak id",
         .body = FLAT("\"user 1\"", ",\"giftName\":\"Rose\","
                      "\"diamondCount\":1,\"giftType\":1"),
         .user_id = "user 1", .streak_id = "tiktok:h:*", .streak_end = "0"),
    BAD(422, "user.userId", .name = "2.x: user.userId a boolean",
        .body = V2("{\"userId\":true}", V2_GIFT, V2_COMMON, "")),
    BAD(422, "user.userId", .name = "2.x: no user id at all",
        .body = V2("{\"nickname\":\"x\",\"id\":\"0\"}", V2_GIFT, V2_COMMON,
                   "")),
    BAD(422, "gift.diamondCount", .name = "2.x: gift.diamondCount 1000001",
        .body = V2(V2_USER, "{\"name\":\"Rose\",\"diamondCount\":1000001}",
                   V2_COMMON, "")),
    BAD(422, "common.msgId", .name = "2.x: common.msgId a float",
        .body = V2(V2_USER, V2_GIFT, "{\"msgId\":1.5}", "")),
    BAD(422, "common.createTime", .name = "2.x: createTime a float",
        .body = V2(V2_USER, V2_GIFT, "{\"createTime\":1.5}", "")),
    BAD(422, "gift.type", .name = "2.x: gift.type negative",
        .body = V2(V2_USER, "{\"name\":\"Rose\",\"diamondCount\":1,"
                   "\"type\":-1}", V2_COMMON, "")),
    GOOD(.name = "2.x: minimal, hand-built",
         .body = V2(V2_USER, V2_GIFT, V2_COMMON, ""),
         .event_id = "tt:7435990123456789012",
         .user_id = "6813181309701719620", .user_name = "Zerody",
         .quantity = "3", .streak_end = "0",
         .streak_id = "tiktok:6813181309701719620:5655:1731000000000"),
};

#define NCASES  (sizeof(cases) / sizeof(cases[0]))

static char *
read_file(const char *name, size_t *len)
{
    char    path[256];
    FILE   *f;
    char   *buf;
    long    n;

    snprintf(path, sizeof(path), FIX "%s.json", name);
    f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s (run from the repo root)", path);
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    n = ftell(f);
    ck_assert_int_ge(n, 1);
    rewind(f);
    buf = malloc((size_t) n);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(fread(buf, 1, (size_t) n, f), (size_t) n);
    fclose(f);
    *len = (size_t) n;
    return buf;
}

/* The case's body in a heap buffer of exactly its length, no NUL. */
static char *
case_body(const ncase_t *c, size_t *len)
{
    const char  *src;
    char        *buf;
    size_t       n;

    if (c->file != NULL) {
        return read_file(c->file, len);
    }

    src = c->body;
    n = c->len ? c->len : strlen(src);
    buf = malloc(n ? n : 1);
    ck_assert_ptr_nonnull(buf);
    memcpy(buf, src, n);
    *len = n;
    return buf;
}

static void
check_str(const char *name, const char *what, const char *got,
    const char *want)
{
    size_t  n;

    if (want == NULL) {
        return;
    }
    n = strlen(want);
    if (n > 0 && want[n - 1] == '*') {
        ck_assert_msg(strncmp(got, want, n - 1) == 0,
                      "%s: %s is \"%s\", want prefix \"%.*s\"", name, what,
                      got, (int) n - 1, want);
        return;
    }
    ck_assert_msg(strcmp(got, want) == 0, "%s: %s is \"%s\", want \"%s\"",
                  name, what, got, want);
}

static int
is_id(const char *s)
{
    if (*s == '\0') {
        return 0;
    }
    for ( /* void */ ; *s; s++) {
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z')
              || (*s >= '0' && *s <= '9') || strchr("._:-", *s) != NULL))
        {
            return 0;
        }
    }
    return 1;
}

static int
is_printable(const char *s)
{
    for ( /* void */ ; *s; s++) {
        if ((unsigned char) *s < 0x20 || (unsigned char) *s > 0x7e) {
            return 0;
        }
    }
    return 1;
}

/* -------------------------------------------------------------- tests */

START_TEST(test_table)
{
    const ncase_t      *c = &cases[_i];
    gift_event_t        ev;
    gift_norm_error_t   err;
    char               *body, num[32];
    size_t              len;
    int                 rc;

    body = case_body(c, &len);
    memset(&ev, 0xa5, sizeof(ev));          /* prove ev is fully written */
    rc = gift_normalize(body, len, &ev, &err);
    free(body);

    if (c->status == 0) {
        ck_assert_msg(rc == 0, "%s: refused %d %s field=%s: %s", c->name,
                      err.status, err.code, err.field, err.message);
        check_str(c->name, "event_id", ev.event_id, c->event_id);
        check_str(c->name, "user_id", ev.user_id, c->user_id);
        check_str(c->name, "user_name", ev.user_name, c->user_name);
        check_str(c->name, "gift_id", ev.gift_id, c->gift_id);
        check_str(c->name, "gift_name", ev.gift_name, c->gift_name);
        check_str(c->name, "room_id", ev.room_id, c->room_id);
        check_str(c->name, "streak_id", ev.streak_id, c->streak_id);
        snprintf(num, sizeof(num), "%u", (unsigned) ev.diamond);
        check_str(c->name, "diamond", num, c->diamond);
        snprintf(num, sizeof(num), "%u", (unsigned) ev.quantity);
        check_str(c->name, "quantity", num, c->quantity);
        snprintf(num, sizeof(num), "%d", ev.streak_end);
        check_str(c->name, "streak_end", num, c->streak_end);
        snprintf(num, sizeof(num), "%lld", (long long) ev.occurred_at_ms);
        check_str(c->name, "occurred_at_ms", num, c->occurred);

        /* invariants of every accepted event */
        ck_assert_msg(is_id(ev.event_id), "%s: event id \"%s\"", c->name,
                      ev.event_id);
        ck_assert_msg(strlen(ev.event_id) <= GIFT_ID_MAX, "%s", c->name);
        ck_assert_msg(ev.platform[0] != '\0', "%s: platform", c->name);
        ck_assert_msg(strspn(ev.platform, "abcdefghijklmnopqrstuvwxyz"
                             "0123456789_-") == strlen(ev.platform),
                      "%s: platform", c->name);
        ck_assert_msg(ev.user_id[0] && ev.gift_name[0], "%s", c->name);
        ck_assert_msg(ev.diamond >= 1 && ev.diamond <= GIFT_DIAMOND_MAX,
                      "%s", c->name);
        ck_assert_msg(ev.quantity >= 1 && ev.quantity <= GIFT_QUANTITY_MAX,
                      "%s", c->name);
        ck_assert_msg(ev.streak_count == ev.quantity, "%s", c->name);
        ck_assert_msg(ev.streak_end == 0 || ev.streak_end == 1, "%s",
                      c->name);
        ck_assert_msg(ev.streak_end == 1 || ev.streak_id[0] != '\0',
                      "%s: an open streak needs an id", c->name);
        ck_assert_msg(ev.streak_id[0] == '\0' || is_id(ev.streak_id),
                      "%s: streak id \"%s\"", c->name, ev.streak_id);
        return;
    }

    ck_assert_msg(rc == -1, "%s: accepted, want %d", c->name, c->status);
    ck_assert_msg(err.status == c->status, "%s: status %d (%s: %s), want %d",
                  c->name, err.status, err.field, err.message, c->status);
    ck_assert_str_eq(err.code, c->status == 400 ? "invalid_json"
                                                : "invalid_field");
    if (c->status == 422) {
        ck_assert_msg(strcmp(err.field, c->field) == 0,
                      "%s: field \"%s\" (%s), want \"%s\"", c->name,
                      err.field, err.message, c->field);
    } else {
        ck_assert_msg(err.field[0] == '\0', "%s: field \"%s\" on a 400",
                      c->name, err.field);
    }
    ck_assert_msg(err.message[0] != '\0', "%s: no message", c->name);
    ck_assert_msg(is_printable(err.message) && is_printable(err.field),
                  "%s: message not printable ASCII", c->name);
}
END_TEST

START_TEST(test_table_size)
{
    /* issue 3 asks for at least 60 payloads */
    ck_assert_uint_ge(NCASES, 60);
}
END_TEST

/* Nesting deeper than jansson's limit (2048) is a clean 400, no crash. */
START_TEST(test_deep_nesting)
{
    static const size_t  depths[] = { 2047, 2049, 100000 };
    gift_event_t         ev;
    gift_norm_error_t    err;
    char                *body;
    size_t               d, i, n;

    for (d = 0; d < sizeof(depths) / sizeof(depths[0]); d++) {
        n = 2 * depths[d] + 16;
        body = malloc(n);
        ck_assert_ptr_nonnull(body);
        memcpy(body, "{\"a\":", 5);
        n = 5;
        for (i = 1; i < depths[d]; i++) {
            body[n++] = '[';
        }
        for (i = 1; i < depths[d]; i++) {
            body[n++] = ']';
        }
        body[n++] = '}';

        ck_assert_int_eq(gift_normalize(body, n, &ev, &err), -1);
        /* below the limit it parses, then fails on the missing fields */
        ck_assert_int_eq(err.status, depths[d] < 2048 ? 422 : 400);
        free(body);
    }
}
END_TEST

/* An identical retry gets the same content id, whatever the key order or
 * spacing; any change of content gives another. */
START_TEST(test_retry_id)
{
    static const char  *same[] = {
        OK_CANON(""),
        "{ \"timestamp\" : 1700000000000, \"quantity\":1, \"diamond\":10,"
        "\"giftName\":\"Motor\",\"userId\":\"user_123\","
        "\"platform\":\"tiktok\", \"event\":\"gift\", \"extra\":[1] }",
    };
    static const char  *other[] = {
        CANON(EV, PL, UI, GN, DI, "\"quantity\":2", TS, ""),
        CANON(EV, PL, UI, GN, DI, QU, "\"timestamp\":1700000000001", ""),
        CANON(EV, PL, "\"userId\":\"user_124\"", GN, DI, QU, TS, ""),
        CANON(EV, "\"platform\":\"youtube\"", UI, GN, DI, QU, TS, ""),
        OK_CANON(",\"roomId\":\"r1\""),
    };
    gift_event_t        ev;
    gift_norm_error_t   err;
    char                first[GIFT_ID_MAX + 1];
    size_t              i;

    ck_assert_int_eq(gift_normalize(same[0], strlen(same[0]), &ev, &err), 0);
    strcpy(first, ev.event_id);
    ck_assert_uint_eq(strlen(first), 2 + 32);

    ck_assert_int_eq(gift_normalize(same[1], strlen(same[1]), &ev, &err), 0);
    ck_assert_str_eq(ev.event_id, first);

    for (i = 0; i < sizeof(other) / sizeof(other[0]); i++) {
        ck_assert_int_eq(gift_normalize(other[i], strlen(other[i]), &ev,
                                        &err), 0);
        ck_assert_str_ne(ev.event_id, first);
    }
}
END_TEST

/* Each frame of a TikTok streak shares the streak id; the end frame
 * closes it. */
START_TEST(test_streak_frames)
{
    gift_event_t        a, b;
    gift_norm_error_t   err;
    char               *body;
    size_t              len;

    body = read_file("v2_rose_progress", &len);
    ck_assert_int_eq(gift_normalize(body, len, &a, &err), 0);
    free(body);
    body = read_file("v2_rose_end", &len);
    ck_assert_int_eq(gift_normalize(body, len, &b, &err), 0);
    free(body);

    ck_assert_str_eq(a.streak_id, b.streak_id);
    ck_assert_str_ne(a.event_id, b.event_id);
    ck_assert_int_eq(a.streak_end, 0);
    ck_assert_int_eq(b.streak_end, 1);
    ck_assert_uint_lt(a.streak_count, b.streak_count);
}
END_TEST

START_TEST(test_pack)
{
    static const char   *body = OK_CANON(",\"userName\":\"Ann\","
                                         "\"roomId\":\"r1\",\"giftId\":\"g\","
                                         "\"streakId\":\"s1\"");
    gift_event_t         ev;
    gift_norm_error_t    err;
    Gift__V1__GiftEvent *m;
    uint8_t              buf[4096];
    size_t               n;

    ck_assert_int_eq(gift_normalize(body, strlen(body), &ev, &err), 0);

    n = gift_event_pack(&ev, 1700000000123LL, buf, sizeof(buf));
    ck_assert_uint_gt(n, 0);
    ck_assert_uint_le(n, gift_event_packed_max());

    m = gift__v1__gift_event__unpack(NULL, n, buf);
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(m->event_id, ev.event_id);
    ck_assert_str_eq(m->platform, "tiktok");
    ck_assert_str_eq(m->room_id, "r1");
    ck_assert_str_eq(m->user_id, "user_123");
    ck_assert_str_eq(m->user_name, "Ann");
    ck_assert_str_eq(m->gift_id, "g");
    ck_assert_str_eq(m->gift_name, "Motor");
    ck_assert_uint_eq(m->diamond, 10);
    ck_assert_uint_eq(m->quantity, 1);
    ck_assert_int_eq(m->occurred_at_ms, 1700000000000LL);
    ck_assert_int_eq(m->received_at_ms, 1700000000123LL);
    ck_assert_str_eq(m->streak_id, "s1");
    ck_assert_uint_eq(m->streak_count, 1);
    ck_assert_int_eq(m->streak_end, 0);
    gift__v1__gift_event__free_unpacked(m, NULL);

    /* one byte short: refused, nothing written past cap */
    ck_assert_uint_eq(gift_event_pack(&ev, 1700000000123LL, buf, n - 1), 0);
}
END_TEST

/* The bound holds for the largest event normalize can produce. */
START_TEST(test_pack_max)
{
    gift_event_t  ev;
    uint8_t      *buf;
    size_t        max, n;

    memset(&ev, 0, sizeof(ev));
    memset(ev.event_id, 'e', GIFT_ID_MAX);
    memset(ev.platform, 'p', GIFT_PLATFORM_MAX);
    memset(ev.room_id, 'r', GIFT_STR_MAX);
    memset(ev.user_id, 'u', GIFT_STR_MAX);
    memset(ev.user_name, 'n', GIFT_STR_MAX);
    memset(ev.gift_id, 'g', GIFT_STR_MAX);
    memset(ev.gift_name, 'G', GIFT_STR_MAX);
    memset(ev.streak_id, 's', GIFT_STR_MAX);
    ev.diamond = UINT32_MAX;
    ev.quantity = UINT32_MAX;
    ev.streak_count = UINT32_MAX;
    ev.occurred_at_ms = -1;            /* int64 -1: the longest varint */
    ev.streak_end = 1;

    max = gift_event_packed_max();
    buf = malloc(max);
    ck_assert_ptr_nonnull(buf);
    n = gift_event_pack(&ev, -1, buf, max);
    ck_assert_uint_gt(n, 0);
    ck_assert_uint_le(n, max);
    free(buf);
}
END_TEST

/* Every proper prefix of a valid body is refused cleanly (and, under a
 * sanitizer, without reading past its end). */
START_TEST(test_prefixes)
{
    static const char  *names[] = { "v2_rose_progress", "flat_v1_rose_end" };
    gift_event_t        ev;
    gift_norm_error_t   err;
    char               *body, *cut;
    size_t              len, i, k;

    for (k = 0; k < sizeof(names) / sizeof(names[0]); k++) {
        body = read_file(names[k], &len);
        /* the fixtures end in "}\n": the full object ends at len - 1 */
        for (i = 0; i < len - 1; i++) {
            cut = malloc(i ? i : 1);
            ck_assert_ptr_nonnull(cut);
            memcpy(cut, body, i);
            ck_assert_int_eq(gift_normalize(cut, i, &ev, &err), -1);
            ck_assert_int_eq(err.status, 400);
            free(cut);
        }
        free(body);
    }
}
END_TEST

/* A NULL body is an empty one. */
START_TEST(test_null_body)
{
    gift_event_t        ev;
    gift_norm_error_t   err;

    ck_assert_int_eq(gift_normalize(NULL, 0, &ev, &err), -1);
    ck_assert_int_eq(err.status, 400);
    ck_assert_str_eq(err.code, "invalid_json");
}
END_TEST

static Suite *
normalize_suite(void)
{
    Suite  *s;
    TCase  *tc;

    s = suite_create("gift_normalize");

    tc = tcase_create("table");
    tcase_add_test(tc, test_table_size);
    tcase_add_loop_test(tc, test_table, 0, (int) NCASES);
    suite_add_tcase(s, tc);

    tc = tcase_create("more");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_deep_nesting);
    tcase_add_test(tc, test_retry_id);
    tcase_add_test(tc, test_streak_frames);
    tcase_add_test(tc, test_pack);
    tcase_add_test(tc, test_pack_max);
    tcase_add_test(tc, test_prefixes);
    tcase_add_test(tc, test_null_body);
    suite_add_tcase(s, tc);

    return s;
}

int
main(void)
{
    SRunner  *sr;
    int       failed;

    sr = srunner_create(normalize_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);

    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
