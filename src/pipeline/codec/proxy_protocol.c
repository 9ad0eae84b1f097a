/*
 * sluice.proxy_protocol: reads the PROXY protocol header (versions 1 and 2,
 * as HAProxy defines them) that a load balancer in front of sluice sends
 * first on each connection, and makes the address it carries the
 * connection's client address: logs, the access log, `hash` balancing and
 * ctx:channel() then see the real client. It must be the first stage.
 *
 * The stage holds channel_active back until the header is complete, so the
 * stages after it (and the upstream connect) start with the real address.
 * Bytes after the header are passed on unchanged; after the header the
 * stage only passes reads on. A header that is malformed closes the
 * connection with the reason "bad PROXY protocol header (...)"; so does
 * the end of input before the header is complete. A v2 LOCAL command or a
 * v1 UNKNOWN keeps the socket's own address (health checks of the balancer).
 *
 * sl_proxy_header writes the same headers for upstreams with `send_proxy`.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#include "pipeline/codec/proxy_protocol.h"

#include "buf/buf.h"
#include "io/channel.h"
#include "pipeline/stages.h"
#include "util/common.h"
#include "util/log.h"

static const uint8_t sl_pp_v2_sig[12] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d,
                                         0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a};

typedef struct sl_pp_state {
  sl_proxy_parser parser;         /* the header, until done */
  int done;                       /* the header went by: reads pass through */
  int failed;                     /* a bad header closed the connection */
} sl_pp_state;

/* One field of a v1 line: its bytes (not NUL-terminated) and length. */
typedef struct sl_pp_field {
  const char *p;
  size_t len;
} sl_pp_field;

/* A port: decimal 0-65535, digits only, no leading zero (but "0"). */
static int sl_pp_v1_port(sl_pp_field f, uint16_t *port) {
  if (f.len == 0 || f.len > 5 || (f.p[0] == '0' && f.len > 1)) return SL_ERROR;
  uint32_t v = 0;
  for (size_t i = 0; i < f.len; i++) {
    if (f.p[i] < '0' || f.p[i] > '9') return SL_ERROR;
    v = v * 10 + (uint32_t)(f.p[i] - '0');
  }
  if (v > 65535) return SL_ERROR;
  *port = (uint16_t)v;
  return SL_OK;
}

/* An address of the family (AF_INET or AF_INET6) with a port, into a. */
static int sl_pp_v1_addr(sl_pp_field f, int family, uint16_t port, sl_addr *a) {
  char text[INET6_ADDRSTRLEN];
  if (f.len == 0 || f.len >= sizeof(text)) return SL_ERROR;
  memcpy(text, f.p, f.len);
  text[f.len] = '\0';
  memset(a, 0, sizeof(*a));
  if (family == AF_INET6) {
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&a->ss;
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons(port);
    if (inet_pton(AF_INET6, text, &s6->sin6_addr) != 1) return SL_ERROR;
    a->len = sizeof(*s6);
  } else {
    struct sockaddr_in *s4 = (struct sockaddr_in *)&a->ss;
    s4->sin_family = AF_INET;
    s4->sin_port = htons(port);
    if (inet_pton(AF_INET, text, &s4->sin_addr) != 1) return SL_ERROR;
    a->len = sizeof(*s4);
  }
  return SL_OK;
}

/* The client address of a v1 line without its CRLF, into *client, as the
 * PROXY protocol defines it: "PROXY TCP4 src dst sport dport", fields
 * separated by single spaces, both addresses of the family, ports 0-65535
 * in decimal; after "PROXY UNKNOWN" anything may follow (and *client stays
 * without an address). NULL, or what is wrong. */
static const char *sl_pp_v1(sl_addr *client, const char *line, size_t len) {
  if (len < 6 || memcmp(line, "PROXY ", 6) != 0) return "not a PROXY line";
  if (len >= 13 && memcmp(line + 6, "UNKNOWN", 7) == 0 && (len == 13 || line[13] == ' '))
    return NULL;
  sl_pp_field f[5]; /* protocol, source, destination, source port, destination port */
  size_t n = 0;
  for (size_t at = 6;;) {
    const char *sp = memchr(line + at, ' ', len - at);
    size_t end = sp ? (size_t)(sp - line) : len;
    if (end == at) return "not one space between fields";
    if (n == 5) return "too many fields";
    f[n].p = line + at;
    f[n].len = end - at;
    n++;
    if (sp == NULL) break;
    at = end + 1;
  }
  int family;
  if (f[0].len == 4 && memcmp(f[0].p, "TCP4", 4) == 0) family = AF_INET;
  else if (f[0].len == 4 && memcmp(f[0].p, "TCP6", 4) == 0) family = AF_INET6;
  else return "unknown protocol";
  if (n != 5) return "missing fields";
  uint16_t sport = 0, dport = 0;
  int sport_ok = sl_pp_v1_port(f[3], &sport) == SL_OK;
  int dport_ok = sl_pp_v1_port(f[4], &dport) == SL_OK;
  sl_addr src, dst;
  if (sl_pp_v1_addr(f[1], family, sport, &src) != SL_OK) return "bad source address";
  if (sl_pp_v1_addr(f[2], family, dport, &dst) != SL_OK) return "bad destination address";
  if (!sport_ok) return "bad source port";
  if (!dport_ok) return "bad destination port";
  *client = src;
  return NULL;
}

/* The client address of a complete v2 header's first bytes, into *client
 * (left without one for LOCAL, UNSPEC and UNIX). */
static const char *sl_pp_v2(sl_addr *client, const uint8_t *h, uint32_t total) {
  if ((h[12] >> 4) != 2) return "unknown version";
  int cmd = h[12] & 0x0f;
  if (cmd == 0) return NULL; /* LOCAL: the balancer's own connection */
  if (cmd != 1) return "unknown command";
  int fam = h[13] >> 4;
  sl_addr a;
  memset(&a, 0, sizeof(a));
  if (fam == 1) { /* AF_INET: src, dst, sport, dport */
    if (total < SL_PP_V2_FIXED + 12) return "address block too short";
    struct sockaddr_in *s4 = (struct sockaddr_in *)&a.ss;
    s4->sin_family = AF_INET;
    memcpy(&s4->sin_addr, h + 16, 4);
    memcpy(&s4->sin_port, h + 24, 2);
    a.len = sizeof(*s4);
  } else if (fam == 2) {
    if (total < SL_PP_V2_FIXED + 36) return "address block too short";
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&a.ss;
    s6->sin6_family = AF_INET6;
    memcpy(&s6->sin6_addr, h + 16, 16);
    memcpy(&s6->sin6_port, h + 48, 2);
    a.len = sizeof(*s6);
  } else {
    return NULL; /* UNSPEC or UNIX: nothing sluice can use */
  }
  *client = a;
  return NULL;
}

int sl_proxy_parse(sl_proxy_parser *st, const uint8_t *p, size_t n, size_t *used,
                   sl_addr *client, const char **why) {
  size_t before = st->have;
  *used = 0;
  if (n == 0) return 0;
  if (st->have == 0 && p[0] != 'P' && p[0] != sl_pp_v2_sig[0]) {
    *why = "not a PROXY protocol header";
    return -1;
  }
  if (st->have > 0 ? st->hdr[0] == 'P' : p[0] == 'P') {
    size_t take = n < SL_PP_V1_MAX - st->have ? n : SL_PP_V1_MAX - st->have;
    memcpy(st->hdr + st->have, p, take);
    st->have += (uint32_t)take;
    /* The line ends at its first LF, which must follow a CR: were a bare
     * LF taken as part of the line, the client's bytes after it would be. */
    const uint8_t *lf = memchr(st->hdr + before, '\n', st->have - before);
    if (lf != NULL) {
      size_t i = (size_t)(lf - st->hdr);
      if (i == 0 || st->hdr[i - 1] != '\r') {
        *why = "v1 line not ended by CRLF";
        return -1;
      }
      *used = i + 1 - before;
      memset(client, 0, sizeof(*client));
      *why = sl_pp_v1(client, (const char *)st->hdr, i - 1);
      return *why ? -1 : 1;
    }
    if (st->have == SL_PP_V1_MAX) {
      *why = "v1 line longer than 107 bytes";
      return -1;
    }
    *used = n;
    return 0;
  }
  /* v2: keep the fixed part and the addresses, count the rest (TLVs). */
  size_t taken = 0;
  for (;;) {
    if (st->total == 0 && st->have >= SL_PP_V2_FIXED) {
      if (memcmp(st->hdr, sl_pp_v2_sig, sizeof(sl_pp_v2_sig)) != 0) {
        *why = "bad v2 signature";
        return -1;
      }
      st->total = SL_PP_V2_FIXED + ((uint32_t)st->hdr[14] << 8 | st->hdr[15]);
    }
    if (st->total != 0 && st->consumed == st->total) break;
    if (taken == n) {
      *used = taken;
      return 0;
    }
    size_t want = st->total ? st->total - st->consumed : SL_PP_V2_FIXED - st->have;
    size_t chunk = n - taken < want ? n - taken : want;
    size_t room = sizeof(st->hdr) - st->have;
    size_t keep = chunk < room ? chunk : room;
    memcpy(st->hdr + st->have, p + taken, keep);
    st->have += (uint32_t)keep;
    st->consumed += (uint32_t)chunk;
    taken += chunk;
  }
  *used = taken;
  memset(client, 0, sizeof(*client));
  *why = sl_pp_v2(client, st->hdr, st->total);
  return *why ? -1 : 1;
}

static void sl_pp_fail(sl_ctx *ctx, const char *why) {
  ((sl_pp_state *)ctx->state)->failed = 1;
  sl_channel *ch = sl_ctx_channel(ctx);
  char reason[128];
  snprintf(reason, sizeof(reason), "bad PROXY protocol header (%s)", why);
  sl_log(SL_LOG_WARN, "%s: %s", ch ? sl_channel_describe(ch) : "a connection", reason);
  sl_ctx_close(ctx, reason);
}

static void sl_pp_active(sl_ctx *ctx) {
  SL_UNUSED(ctx); /* held back until the header is complete */
}

static void sl_pp_read(sl_ctx *ctx, sl_buf *b) {
  sl_pp_state *st = ctx->state;
  if (st->done) {
    sl_ctx_fire_read(ctx, b);
    return;
  }
  if (st->failed) { /* closing: nothing more is looked at */
    sl_buf_release(b);
    return;
  }
  size_t used = 0;
  const char *why = NULL;
  sl_addr client;
  int r = sl_proxy_parse(&st->parser, sl_buf_rptr(b), sl_buf_readable(b), &used, &client, &why);
  if (r < 0) {
    sl_buf_release(b);
    sl_pp_fail(ctx, why);
    return;
  }
  if (r == 0) {
    sl_buf_release(b);
    return;
  }
  st->done = 1;
  b->rd += (uint32_t)used;
  sl_channel *ch = sl_ctx_channel(ctx); /* NULL in a pipeline without one (tests) */
  if (ch && client.len > 0) sl_channel_set_remote(ch, &client);
  if (ch) sl_channel_ref(ch);
  sl_ctx_fire_active(ctx);
  if (sl_buf_readable(b) > 0 && !(ch && sl_channel_is_closed(ch))) sl_ctx_fire_read(ctx, b);
  else sl_buf_release(b);
  if (ch) sl_channel_unref(ch);
}

static void sl_pp_read_complete(sl_ctx *ctx) {
  sl_pp_state *st = ctx->state;
  if (st->done) sl_ctx_fire_read_complete(ctx);
}

static void sl_pp_user_event(sl_ctx *ctx, int event) {
  sl_pp_state *st = ctx->state;
  if (!st->done && event == SL_UEV_INPUT_CLOSED) {
    if (st->failed) return;
    sl_pp_fail(ctx, "the client closed before the header was complete");
    return;
  }
  sl_ctx_fire_user_event(ctx, event);
}

static void sl_pp_inactive(sl_ctx *ctx) {
  sl_pp_state *st = ctx->state;
  if (st->done) sl_ctx_fire_inactive(ctx); /* the stages after it never saw active */
}

const sl_stage_ops sl_stage_proxy_protocol = {
    .name = "sluice.proxy_protocol",
    .state_size = sizeof(sl_pp_state),
    .on_active = sl_pp_active,
    .on_inactive = sl_pp_inactive,
    .on_read = sl_pp_read,
    .on_read_complete = sl_pp_read_complete,
    .on_user_event = sl_pp_user_event,
};

/* ---- writing a header ---- */

/* a as IPv6: itself, or an IPv4 address mapped (::ffff:a.b.c.d), port kept. */
static void sl_pp_as_v6(const sl_addr *a, sl_addr *out) {
  if (a->ss.ss_family == AF_INET6) {
    *out = *a;
    return;
  }
  const struct sockaddr_in *s4 = (const struct sockaddr_in *)&a->ss;
  struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&out->ss;
  memset(out, 0, sizeof(*out));
  s6->sin6_family = AF_INET6;
  s6->sin6_port = s4->sin_port;
  s6->sin6_addr.s6_addr[10] = 0xff;
  s6->sin6_addr.s6_addr[11] = 0xff;
  memcpy(&s6->sin6_addr.s6_addr[12], &s4->sin_addr, 4);
  out->len = sizeof(*s6);
}

size_t sl_proxy_header(int version, const sl_addr *src, const sl_addr *dst, uint8_t *out) {
  int fam = AF_UNSPEC;
  sl_addr src6, dst6;
  if (src && dst) {
    int sf = src->ss.ss_family, df = dst->ss.ss_family;
    if ((sf == AF_INET || sf == AF_INET6) && (df == AF_INET || df == AF_INET6)) fam = sf;
    /* A client behind sluice.proxy_protocol may have an address of the
     * other family than the socket it reached: both go as IPv6, the IPv4
     * one mapped, rather than losing the client's address to UNKNOWN. */
    if (fam != AF_UNSPEC && sf != df) {
      sl_pp_as_v6(src, &src6);
      sl_pp_as_v6(dst, &dst6);
      src = &src6;
      dst = &dst6;
      fam = AF_INET6;
    }
  }
  if (version == 1) {
    if (fam == AF_UNSPEC) {
      memcpy(out, "PROXY UNKNOWN\r\n", 15);
      return 15;
    }
    char a[INET6_ADDRSTRLEN], b[INET6_ADDRSTRLEN];
    unsigned sp, dp;
    if (fam == AF_INET) {
      const struct sockaddr_in *s4 = (const struct sockaddr_in *)&src->ss;
      const struct sockaddr_in *d4 = (const struct sockaddr_in *)&dst->ss;
      inet_ntop(AF_INET, &s4->sin_addr, a, sizeof(a));
      inet_ntop(AF_INET, &d4->sin_addr, b, sizeof(b));
      sp = ntohs(s4->sin_port);
      dp = ntohs(d4->sin_port);
    } else {
      const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&src->ss;
      const struct sockaddr_in6 *d6 = (const struct sockaddr_in6 *)&dst->ss;
      inet_ntop(AF_INET6, &s6->sin6_addr, a, sizeof(a));
      inet_ntop(AF_INET6, &d6->sin6_addr, b, sizeof(b));
      sp = ntohs(s6->sin6_port);
      dp = ntohs(d6->sin6_port);
    }
    int n = snprintf((char *)out, SL_PROXY_HEADER_MAX, "PROXY %s %s %s %u %u\r\n",
                     fam == AF_INET ? "TCP4" : "TCP6", a, b, sp, dp);
    return n > 0 && n < SL_PROXY_HEADER_MAX ? (size_t)n : 0;
  }
  memcpy(out, sl_pp_v2_sig, sizeof(sl_pp_v2_sig));
  if (fam == AF_UNSPEC) {
    out[12] = 0x20; /* version 2, LOCAL */
    out[13] = 0x00;
    out[14] = out[15] = 0;
    return SL_PP_V2_FIXED;
  }
  out[12] = 0x21; /* version 2, PROXY */
  size_t len;
  if (fam == AF_INET) {
    const struct sockaddr_in *s4 = (const struct sockaddr_in *)&src->ss;
    const struct sockaddr_in *d4 = (const struct sockaddr_in *)&dst->ss;
    out[13] = 0x11; /* TCP over IPv4 */
    memcpy(out + 16, &s4->sin_addr, 4);
    memcpy(out + 20, &d4->sin_addr, 4);
    memcpy(out + 24, &s4->sin_port, 2);
    memcpy(out + 26, &d4->sin_port, 2);
    len = 12;
  } else {
    const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&src->ss;
    const struct sockaddr_in6 *d6 = (const struct sockaddr_in6 *)&dst->ss;
    out[13] = 0x21; /* TCP over IPv6 */
    memcpy(out + 16, &s6->sin6_addr, 16);
    memcpy(out + 32, &d6->sin6_addr, 16);
    memcpy(out + 48, &s6->sin6_port, 2);
    memcpy(out + 50, &d6->sin6_port, 2);
    len = 36;
  }
  out[14] = (uint8_t)(len >> 8);
  out[15] = (uint8_t)len;
  return SL_PP_V2_FIXED + len;
}
