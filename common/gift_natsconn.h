/*
 * gift_natsconn: natsConnection_Connect() for the daemon and the tools, with
 * the work-around for a cnats bug that refuses 1 signed connection in 256
 * (see gift_natsconn.c).
 */
#ifndef GIFT_NATSCONN_H
#define GIFT_NATSCONN_H

#include <nats/nats.h>

/* Tries before giving up when a signed CONNECT is refused (cnats < 3.10). */
#define GIFT_NATS_SIGNED_TRIES  4

/*
 * natsConnection_Connect(nc, o).  `signs` is non-zero when the options sign
 * the server's nonce (a .creds file or an NKey seed): then an
 * "Authorization Violation" from a cnats that may have sent no signature is
 * retried on a new connection, up to GIFT_NATS_SIGNED_TRIES times in all.
 */
natsStatus gift_nats_connect(natsConnection **nc, natsOptions *o, int signs);

#endif /* GIFT_NATSCONN_H */
