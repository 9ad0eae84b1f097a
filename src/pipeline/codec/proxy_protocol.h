/*
 * The PROXY protocol (HAProxy's, versions 1 and 2): the decoding stage
 * sluice.proxy_protocol (stages.h) and the header sluice sends first on an
 * upstream connection when the upstream says `send_proxy`.
 */
#ifndef SL_PROXY_PROTOCOL_H
#define SL_PROXY_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#include "io/addr.h"

#define SL_PROXY_HEADER_MAX 108   /* the longest header sl_proxy_header writes */

/* Writes the header of `version` (1 or 2) saying that a connection from src
 * to dst is being proxied into out (SL_PROXY_HEADER_MAX bytes). src and dst
 * NULL, or of different families or neither IPv4 nor IPv6: a header that
 * carries no address (v1 "PROXY UNKNOWN", v2 LOCAL), for connections sluice
 * makes itself (health checks). Returns the header's length. */
size_t sl_proxy_header(int version, const sl_addr *src, const sl_addr *dst, uint8_t *out);

#endif
