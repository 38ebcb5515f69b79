/*
 * NATS NKeys: Ed25519 keys written in NATS's base32 form, with a type
 * prefix and a CRC-16 (as nats-io/nkeys defines them), and the pieces of a
 * NATS credentials file.  For the nginx module (it signs the server's nonce
 * at CONNECT) and for the tools that make keys and JWTs in tests.
 */

#ifndef GIFT_NKEY_H
#define GIFT_NKEY_H

#include <stddef.h>
#include <stdint.h>

/* the first byte of an encoded key (its first letter) */
#define GIFT_NKEY_SEED      (18 << 3)      /* 'S' */
#define GIFT_NKEY_OPERATOR  (14 << 3)      /* 'O' */
#define GIFT_NKEY_ACCOUNT   0              /* 'A' */
#define GIFT_NKEY_USER      (20 << 3)      /* 'U' */

#define GIFT_NKEY_SEED_LEN    58           /* base32 of 2 + 32 + 2 bytes */
#define GIFT_NKEY_PUBLIC_LEN  56           /* base32 of 1 + 32 + 2 bytes */

typedef struct {
    int            type;                     /* GIFT_NKEY_USER, ... */
    unsigned char  seed[32];                 /* the Ed25519 private key */
    unsigned char  pub[32];
    char           public_key[GIFT_NKEY_PUBLIC_LEN + 1];   /* "U..." */
} gift_nkey_t;

/*
 * Decode an encoded seed ("SU...", 58 characters): base32, CRC-16 and
 * prefixes checked, public key derived.  0, or -1 with *err set to a
 * static reason.
 */
int gift_nkey_from_seed(const char *s, size_t len, gift_nkey_t *k,
                        const char **err);

/* A new key of `type` (random seed).  0 or -1. */
int gift_nkey_generate(int type, gift_nkey_t *k);

/* The encoded seed of k into out (NUL-terminated).  0 or -1. */
int gift_nkey_encode_seed(const gift_nkey_t *k,
                          char out[GIFT_NKEY_SEED_LEN + 1]);

/* Sign msg with Ed25519; sig gets 64 bytes.  0 or -1. */
int gift_nkey_sign(const gift_nkey_t *k, const unsigned char *msg,
                   size_t len, unsigned char sig[64]);

/* base64url without padding into out (room for 4 * len / 3 + 4); length. */
size_t gift_base64url(const unsigned char *in, size_t len, char *out);

/*
 * In a seed file or a credentials file, the first seed (a word starting
 * with 'S' of 58 base32 characters); in a credentials file, the user JWT
 * (the first line after "-----BEGIN NATS USER JWT-----").  0, or -1 with
 * *err set when it holds none.
 */
int gift_nkey_find_seed(const char *text, size_t len, const char **seed,
                        const char **err);

/* The key of the seed in FILE (a seed file or a .creds file), for the
 * programs that read it themselves (giftctl, the dispatcher); *err says why
 * not.  0 or -1. */
int gift_nkey_read_file(const char *file, gift_nkey_t *k, const char **err);
int gift_nkey_find_jwt(const char *text, size_t len, const char **jwt,
                       size_t *jwt_len, const char **err);

#endif
