/*
 * A GiftAck framed for the clients: JSON, SSE, SSE as an HTTP chunk and a
 * WebSocket frame, once per worker, shared by every client that gets it.
 * The follower makes them; the fan-out sends and releases them.
 */

#include "ngx_http_gift_module.h"

#include "gift.pb-c.h"
#include "gift_json.h"


/*
 * One GiftAck, stream sequence `seq`, decoded and framed once for every
 * protocol (JSON, SSE, SSE as an HTTP chunk, WebSocket) into one malloc'ed
 * block with refs = 1.  NULL if the bytes are not a GiftAck (or no memory).
 */
ngx_http_gift_frame_t *
ngx_http_gift_frame_create(uint64_t seq, const u_char *data, size_t len)
{
    u_char                 *p;
    char                    json[GIFT_JSON_MAX];
    size_t                  jlen, dlen, rlen, slen, wlen, hlen, clen;
    u_char                  sid[64], chunk[24];
    Gift__V1__GiftAck      *ack;
    ngx_http_gift_frame_t  *f;

    ack = gift__v1__gift_ack__unpack(NULL, len, data);
    if (ack == NULL) {
        return NULL;
    }

    jlen = gift_ack_json(ack, seq, json, sizeof(json));
    if (jlen == 0) {
        gift__v1__gift_ack__free_unpacked(ack, NULL);
        return NULL;
    }

    dlen = strlen(ack->device_id);
    rlen = strlen(ack->room_id);
    slen = ngx_sprintf(sid, "id: %uL\nevent: ack\ndata: ", seq) - sid;
    slen += jlen + 2;
    clen = ngx_sprintf(chunk, "%xz\r\n", slen) - chunk;
    hlen = jlen < 126 ? 2 : (jlen < 65536 ? 4 : 10);
    wlen = hlen + jlen;

    f = malloc(sizeof(ngx_http_gift_frame_t) + jlen + clen + slen + 2 + wlen
               + dlen + rlen + 2);
    if (f == NULL) {
        gift__v1__gift_ack__free_unpacked(ack, NULL);
        return NULL;
    }

    f->refs = 1;
    f->seq = seq;
    f->status = gift_ack_status_name(ack->status);

    p = (u_char *) (f + 1);

    f->json = p;
    f->json_len = jlen;
    p = ngx_cpymem(p, json, jlen);

    /*
     * SSE clients over HTTP/1.1 get the frame as one HTTP chunk that we
     * frame here, once: nginx's chunked filter would keep references to
     * each client's buffers (see ngx_http_gift_sse.c).
     */
    f->sse_chunk = p;
    p = ngx_cpymem(p, chunk, clen);
    f->sse = p;
    p = ngx_sprintf(p, "id: %uL\nevent: ack\ndata: ", seq);
    p = ngx_cpymem(p, json, jlen);
    *p++ = '\n';
    *p++ = '\n';
    f->sse_len = p - f->sse;
    *p++ = '\r';
    *p++ = '\n';
    f->sse_chunk_len = p - f->sse_chunk;

    /* RFC 6455: FIN + text, unmasked, 7/16/64-bit payload length */
    f->ws = p;
    *p++ = 0x81;
    if (jlen < 126) {
        *p++ = (u_char) jlen;
    } else if (jlen < 65536) {
        *p++ = 126;
        *p++ = (u_char) (jlen >> 8);
        *p++ = (u_char) jlen;
    } else {
        *p++ = 127;
        *p++ = 0; *p++ = 0; *p++ = 0; *p++ = 0;
        *p++ = (u_char) (jlen >> 24);
        *p++ = (u_char) (jlen >> 16);
        *p++ = (u_char) (jlen >> 8);
        *p++ = (u_char) jlen;
    }
    p = ngx_cpymem(p, json, jlen);
    f->ws_len = p - f->ws;

    f->device = (const char *) p;
    p = ngx_cpymem(p, ack->device_id, dlen + 1);
    f->room = (const char *) p;
    ngx_memcpy(p, ack->room_id, rlen + 1);

    gift__v1__gift_ack__free_unpacked(ack, NULL);

    return f;
}
