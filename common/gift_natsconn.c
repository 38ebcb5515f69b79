/*
 * gift_natsconn: connecting with signed credentials despite cnats < 3.10.
 *
 * cnats signs the server's nonce with the user's NKey (Ed25519, 64 bytes)
 * and puts the signature, base64url, in CONNECT as "sig".  Up to 3.9 its
 * base64 encoder (src/util.c _base64Encode) returns nothing when the first
 * input byte is 0: it tested src[0] == '\0' as if the input were a string.
 * So when a signature begins with a zero byte, 1 nonce in 256, CONNECT
 * goes without "sig" and the server answers "Authorization Violation"
 * ("Signature missing" in its debug log), for valid credentials.  Fixed in
 * cnats 3.10.0 (nats-io/nats.c#705, "Fix random authentication error due
 * to missing signature"); Debian 12 ships 3.4.1.
 *
 * Nothing in the credentials can avoid it: the signature is of the nonce,
 * which the server draws anew for each connection.  A new connection gets
 * a new nonce, so retrying makes the failure 1 in 256^n.  A wrong
 * credential costs GIFT_NATS_SIGNED_TRIES refusals instead of one.  The
 * module has its own client (gift_base64url()) and is not affected.
 */

#include "gift_natsconn.h"

#define GIFT_CNATS_SIG_FIXED  0x030A00     /* 3.10.0 */


natsStatus
gift_nats_connect(natsConnection **nc, natsOptions *o, int signs)
{
    int         i, tries = 1;
    natsStatus  s;

    if (signs && nats_GetVersionNumber() < GIFT_CNATS_SIG_FIXED) {
        tries = GIFT_NATS_SIGNED_TRIES;
    }

    for (i = 1; ; i++) {
        s = natsConnection_Connect(nc, o);
        if (s != NATS_CONNECTION_AUTH_FAILED || i >= tries) {
            return s;
        }
    }
}
