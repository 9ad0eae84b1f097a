/*
 * The PROXY protocol (HAProxy's, versions 1 and 2): its parser, which the
 * decoding stage sluice.proxy_protocol (stages.h) and a TLS listener's
 * `proxy_protocol` (io/channel_tls.c, before the handshake) both use, and
 * the header sluice sends first on an upstream connection when the
 * upstream says `send_proxy`.
 */
#ifndef SL_PROXY_PROTOCOL_H
#define SL_PROXY_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#include "io/addr.h"

#define SL_PROXY_HEADER_MAX 108   /* the longest header sl_proxy_header writes */
#define SL_PP_V1_MAX 107          /* the longest v1 line, "\r\n" included */
#define SL_PP_V2_FIXED 16         /* v2: signature, version and command, family, length */

/* A header being read: zeroed to start, then fed bytes as they come. */
typedef struct sl_proxy_parser {
  uint8_t hdr[SL_PP_V1_MAX + 1];  /* the header's first bytes */
  uint32_t have;                  /* bytes in hdr */
  uint32_t total;                 /* v2: the header's whole length, once known */
  uint32_t consumed;              /* v2: bytes of the header seen (TLVs are skipped) */
} sl_proxy_parser;

/* Feeds pp the n bytes at p (borrowed), the next ones of a connection.
 * Returns 1 when the header is complete: *used is how many bytes of p it
 * took (what follows is the client's), *client the address it carries, or
 * len 0 when it carries none (v2 LOCAL, UNSPEC or UNIX, v1 UNKNOWN: the
 * balancer's own connections). Returns 0 when it needs more (all of p
 * taken, *used = n), or -1 with *why (a static string) when the bytes are
 * not a valid header: "not a PROXY protocol header", "bad v2 signature"... */
int sl_proxy_parse(sl_proxy_parser *pp, const uint8_t *p, size_t n, size_t *used,
                   sl_addr *client, const char **why);

/* Writes the header of `version` (1 or 2) saying that a connection from src
 * to dst is being proxied into out (SL_PROXY_HEADER_MAX bytes). src and dst
 * NULL, or of different families or neither IPv4 nor IPv6: a header that
 * carries no address (v1 "PROXY UNKNOWN", v2 LOCAL), for connections sluice
 * makes itself (health checks). Returns the header's length. */
size_t sl_proxy_header(int version, const sl_addr *src, const sl_addr *dst, uint8_t *out);

#endif
