/*
 * giftnkey: NATS NKeys and JWTs for tests and small set-ups, where nsc
 * (not packaged in Debian) is not at hand.
 *
 *   giftnkey gen user|account|operator      a new seed and its public key
 *   giftnkey public SEED                    the public key of a seed
 *   giftnkey jwt operator OP_SEED NAME      a self-signed operator JWT
 *   giftnkey jwt account OP_SEED ACC_PUBLIC NAME
 *                                           an account JWT (JetStream on)
 *   giftnkey jwt system OP_SEED ACC_PUBLIC NAME
 *                                           the system account's (no JetStream)
 *   giftnkey jwt user ACC_SEED USER_PUBLIC NAME
 *                                           a user JWT
 *   giftnkey creds USER_JWT USER_SEED       a .creds file, as nsc writes it
 *
 * JWTs in the v2 form nats-server 2.9 takes: header {"typ":"JWT","alg":
 * "ed25519-nkey"}, claims with "iss" (the signer's public key), "sub",
 * "iat", "jti" and "nats" (type, version 2, limits), signed with Ed25519 by
 * the issuer over "<header>.<claims>", each part base64url.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <openssl/rand.h>

#include "gift_nkey.h"


static int
usage(void)
{
    fprintf(stderr,
        "usage: giftnkey gen user|account|operator\n"
        "       giftnkey public SEED\n"
        "       giftnkey jwt operator OP_SEED NAME\n"
        "       giftnkey jwt account OP_SEED ACC_PUBLIC NAME\n"
        "       giftnkey jwt system OP_SEED ACC_PUBLIC NAME\n"
        "       giftnkey jwt user ACC_SEED USER_PUBLIC NAME\n"
        "       giftnkey creds USER_JWT USER_SEED\n");
    return 2;
}


static int
seed_of(const char *s, gift_nkey_t *k)
{
    const char  *err;

    if (gift_nkey_from_seed(s, strlen(s), k, &err) != 0) {
        fprintf(stderr, "giftnkey: %s\n", err);
        return -1;
    }
    return 0;
}


/* "<header>.<claims>.<signature>", each base64url, signed by k */
static int
jwt_print(json_t *claims, const gift_nkey_t *k)
{
    static const char  hdr[] = "{\"typ\":\"JWT\",\"alg\":\"ed25519-nkey\"}";
    char               *c, *buf, jti[64];
    unsigned char       sig[64], rnd[20];
    size_t              n, clen;

    if (RAND_bytes(rnd, sizeof(rnd)) != 1) {
        return -1;
    }
    gift_base64url(rnd, sizeof(rnd), jti);
    json_object_set_new(claims, "jti", json_string(jti));
    json_object_set_new(claims, "iat", json_integer((json_int_t) time(NULL)));
    json_object_set_new(claims, "iss", json_string(k->public_key));

    c = json_dumps(claims, JSON_COMPACT);
    if (c == NULL) {
        return -1;
    }
    clen = strlen(c);

    buf = malloc(2 * (sizeof(hdr) + clen) + 200);
    if (buf == NULL) {
        free(c);
        return -1;
    }

    n = gift_base64url((const unsigned char *) hdr, sizeof(hdr) - 1, buf);
    buf[n++] = '.';
    n += gift_base64url((const unsigned char *) c, clen, buf + n);
    free(c);

    if (gift_nkey_sign(k, (unsigned char *) buf, n, sig) != 0) {
        free(buf);
        return -1;
    }

    buf[n++] = '.';
    gift_base64url(sig, 64, buf + n);
    printf("%s\n", buf);
    free(buf);

    return 0;
}


static int
jwt(int argc, char **argv)
{
    json_t       *claims, *nats;
    gift_nkey_t   k;

    if (argc < 5) {
        return usage();
    }

    if (seed_of(argv[3], &k) != 0) {
        return 1;
    }

    if (strcmp(argv[2], "operator") == 0) {
        nats = json_pack("{s:s, s:i}", "type", "operator", "version", 2);
        claims = json_pack("{s:s, s:s}", "name", argv[4],
                           "sub", k.public_key);

    } else if (strcmp(argv[2], "account") == 0 && argc == 6) {
        nats = json_pack("{s:{s:i, s:i, s:i, s:i, s:i, s:b, s:i, s:i,"
                         "   s:i, s:i, s:i, s:i},"
                         " s:{s:{}, s:{}}, s:s, s:i}",
                         "limits", "subs", -1, "data", -1, "payload", -1,
                         "imports", -1, "exports", -1, "wildcards", 1,
                         "conn", -1, "leaf", -1, "mem_storage", -1,
                         "disk_storage", -1, "streams", -1, "consumer", -1,
                         "default_permissions", "pub", "sub",
                         "type", "account", "version", 2);
        claims = json_pack("{s:s, s:s}", "name", argv[5], "sub", argv[4]);

    } else if (strcmp(argv[2], "system") == 0 && argc == 6) {
        nats = json_pack("{s:{s:i, s:i, s:i, s:i, s:i, s:b, s:i, s:i},"
                         " s:{s:{}, s:{}}, s:s, s:i}",
                         "limits", "subs", -1, "data", -1, "payload", -1,
                         "imports", -1, "exports", -1, "wildcards", 1,
                         "conn", -1, "leaf", -1,
                         "default_permissions", "pub", "sub",
                         "type", "account", "version", 2);
        claims = json_pack("{s:s, s:s}", "name", argv[5], "sub", argv[4]);

    } else if (strcmp(argv[2], "user") == 0 && argc == 6) {
        nats = json_pack("{s:{}, s:{}, s:i, s:i, s:i, s:s, s:i}",
                         "pub", "sub", "subs", -1, "data", -1,
                         "payload", -1, "type", "user", "version", 2);
        claims = json_pack("{s:s, s:s}", "name", argv[5], "sub", argv[4]);

    } else {
        return usage();
    }

    if (nats == NULL || claims == NULL) {
        fprintf(stderr, "giftnkey: out of memory\n");
        return 1;
    }

    json_object_set_new(claims, "nats", nats);

    if (jwt_print(claims, &k) != 0) {
        fprintf(stderr, "giftnkey: cannot sign\n");
        json_decref(claims);
        return 1;
    }

    json_decref(claims);

    return 0;
}


int
main(int argc, char **argv)
{
    int           type;
    char          seed[GIFT_NKEY_SEED_LEN + 1];
    gift_nkey_t   k;

    if (argc < 2) {
        return usage();
    }

    if (strcmp(argv[1], "gen") == 0 && argc == 3) {
        if (strcmp(argv[2], "user") == 0) {
            type = GIFT_NKEY_USER;
        } else if (strcmp(argv[2], "account") == 0) {
            type = GIFT_NKEY_ACCOUNT;
        } else if (strcmp(argv[2], "operator") == 0) {
            type = GIFT_NKEY_OPERATOR;
        } else {
            return usage();
        }

        if (gift_nkey_generate(type, &k) != 0
            || gift_nkey_encode_seed(&k, seed) != 0)
        {
            fprintf(stderr, "giftnkey: cannot make a key\n");
            return 1;
        }
        printf("%s\n%s\n", seed, k.public_key);
        return 0;
    }

    if (strcmp(argv[1], "public") == 0 && argc == 3) {
        if (seed_of(argv[2], &k) != 0) {
            return 1;
        }
        printf("%s\n", k.public_key);
        return 0;
    }

    if (strcmp(argv[1], "jwt") == 0) {
        return jwt(argc, argv);
    }

    if (strcmp(argv[1], "creds") == 0 && argc == 4) {
        printf("-----BEGIN NATS USER JWT-----\n%s\n"
               "------END NATS USER JWT------\n\n"
               "************************* IMPORTANT "
               "*************************\n"
               "NKEY Seed printed below can be used to sign and prove "
               "identity.\n"
               "NKEYs are sensitive and should be treated as secrets.\n\n"
               "-----BEGIN USER NKEY SEED-----\n%s\n"
               "------END USER NKEY SEED------\n\n"
               "*************************************************************"
               "\n", argv[2], argv[3]);
        return 0;
    }

    return usage();
}
