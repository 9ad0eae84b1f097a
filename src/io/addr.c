#include "io/addr.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

#include "util/common.h"

int sl_addr_parse(sl_addr *a, const char *host, int port) {
  memset(a, 0, sizeof(*a));
  if (port < 0 || port > 65535) return SL_ERROR;
  struct sockaddr_in *in4 = (struct sockaddr_in *)&a->ss;
  if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
    in4->sin_family = AF_INET;
    in4->sin_port = htons((uint16_t)port);
    a->len = sizeof(*in4);
    return SL_OK;
  }
  struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&a->ss;
  if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    a->len = sizeof(*in6);
    return SL_OK;
  }
  return SL_ERROR;
}

int sl_addr_is_loopback(const struct sockaddr *sa) {
  if (sa->sa_family == AF_INET)
    return (ntohl(((const struct sockaddr_in *)(const void *)sa)->sin_addr.s_addr) >> 24) == 127;
  if (sa->sa_family != AF_INET6) return 0;
  const struct in6_addr *a = &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr;
  if (IN6_IS_ADDR_LOOPBACK(a)) return 1;
  return IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127;
}

int sl_addr_same_host(const struct sockaddr *a, const struct sockaddr *b) {
  if (a->sa_family != b->sa_family) return 0;
  if (a->sa_family == AF_INET)
    return ((const struct sockaddr_in *)(const void *)a)->sin_addr.s_addr ==
           ((const struct sockaddr_in *)(const void *)b)->sin_addr.s_addr;
  if (a->sa_family != AF_INET6) return 0;
  return memcmp(&((const struct sockaddr_in6 *)(const void *)a)->sin6_addr,
                &((const struct sockaddr_in6 *)(const void *)b)->sin6_addr,
                sizeof(struct in6_addr)) == 0;
}

int sl_addr_same(const struct sockaddr *a, const struct sockaddr *b) {
  if (!sl_addr_same_host(a, b)) return 0;
  if (a->sa_family == AF_INET)
    return ((const struct sockaddr_in *)(const void *)a)->sin_port ==
           ((const struct sockaddr_in *)(const void *)b)->sin_port;
  const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
  return x->sin6_port == y->sin6_port && x->sin6_scope_id == y->sin6_scope_id;
}

/* Writes v (below 100000: a byte or a port) in decimal at p; returns the end. */
static char *sl_addr_decimal(char *p, unsigned v) {
  char *end = p + (v < 10 ? 1 : v < 100 ? 2 : v < 1000 ? 3 : v < 10000 ? 4 : 5);
  char *q = end;
  do {
    *--q = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  return end;
}

char *sl_addr_format(const struct sockaddr *sa, char *out, size_t outlen) {
  if (sa->sa_family == AF_INET) {
    /* By hand: this runs for every connection (inet_ntop and snprintf
     * both go through vfprintf). */
    const struct sockaddr_in *in4 = (const struct sockaddr_in *)(const void *)sa;
    const unsigned char *b = (const unsigned char *)&in4->sin_addr;
    char text[sizeof("255.255.255.255:65535")], *p = text;
    for (int i = 0; i < 4; i++) {
      p = sl_addr_decimal(p, b[i]);
      *p++ = i < 3 ? '.' : ':';
    }
    p = sl_addr_decimal(p, ntohs(in4->sin_port));
    *p = '\0';
    if (outlen) out[0] = '\0';
    sl_str_append(out, outlen, 0, text);
  } else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
    char ip[INET6_ADDRSTRLEN] = "?";
    inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
    snprintf(out, outlen, "[%s]:%u", ip, ntohs(in6->sin6_port));
  } else {
    snprintf(out, outlen, "?");
  }
  return out;
}

int sl_addr_insert(char out[][46], int *family, uint8_t keys[][17], int *n, int fam,
                   const void *bytes) {
  if (*n >= SL_ADDR_RESOLVE_MAX || (fam != AF_INET && fam != AF_INET6)) return 0;
  char text[46];
  if (inet_ntop(fam, bytes, text, sizeof(text)) == NULL) return 0;
  for (int i = 0; i < *n; i++)
    if (family[i] == fam && strcmp(out[i], text) == 0) return 0;
  /* In order (IPv4 first, then by address): an answer whose order
   * rotates, as round-robin DNS does, is the same answer. */
  uint8_t key[17] = {fam == AF_INET ? 4 : 6};
  memcpy(key + 1, bytes, fam == AF_INET ? 4 : 16);
  int at = *n;
  while (at > 0 && memcmp(keys[at - 1], key, sizeof(key)) > 0) {
    memcpy(keys[at], keys[at - 1], sizeof(key));
    memcpy(out[at], out[at - 1], sizeof(text));
    family[at] = family[at - 1];
    at--;
  }
  memcpy(keys[at], key, sizeof(key));
  memcpy(out[at], text, sizeof(text));
  family[at] = fam;
  (*n)++;
  return 1;
}

int sl_addr_resolve(const char *name, char out[][46], int *family, int *n, const char **why) {
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_ADDRCONFIG;
  *n = 0;
  uint8_t keys[SL_ADDR_RESOLVE_MAX][17];
  int rc = getaddrinfo(name, NULL, &hints, &res);
  if (rc != 0) {
    *why = rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc);
    return SL_ERROR;
  }
  for (struct addrinfo *ai = res; ai != NULL && *n < SL_ADDR_RESOLVE_MAX; ai = ai->ai_next) {
    if (ai->ai_family == AF_INET)
      sl_addr_insert(out, family, keys, n, AF_INET,
                     &((const struct sockaddr_in *)(const void *)ai->ai_addr)->sin_addr);
    else if (ai->ai_family == AF_INET6)
      sl_addr_insert(out, family, keys, n, AF_INET6,
                     &((const struct sockaddr_in6 *)(const void *)ai->ai_addr)->sin6_addr);
  }
  freeaddrinfo(res);
  if (*n == 0) {
    *why = "no IPv4 or IPv6 address";
    return SL_ERROR;
  }
  return SL_OK;
}

int sl_addr_is_host_name(const char *s) {
  size_t len = strlen(s);
  if (len > 0 && s[len - 1] == '.') len--;   /* a final dot */
  if (len == 0 || len > 253) return 0;
  int letter = 0;
  size_t label = 0;
  for (size_t i = 0; i <= len; i++) {
    char c = i < len ? s[i] : '.';
    if (c == '.') {
      if (label == 0 || label > 63 || s[i - 1] == '-') return 0;
      label = 0;
      continue;
    }
    int alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    if (!alpha && !(c >= '0' && c <= '9') && c != '-') return 0;
    if (c == '-' && label == 0) return 0;
    letter |= alpha || c == '-';
    label++;
  }
  return letter;   /* only digits and dots: a malformed IPv4 address */
}

void sl_addr_key_of(const struct sockaddr *sa, sl_addr_key *k) {
  memset(k, 0, sizeof(*k));
  if (sa->sa_family == AF_INET) {
    k->family = AF_INET;
    memcpy(k->addr, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, 4);
  } else if (sa->sa_family == AF_INET6) {
    const struct in6_addr *a = &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr;
    if (IN6_IS_ADDR_V4MAPPED(a)) {
      k->family = AF_INET;
      memcpy(k->addr, &a->s6_addr[12], 4);
    } else {
      k->family = AF_INET6;
      memcpy(k->addr, a, 16);
    }
  }
}
