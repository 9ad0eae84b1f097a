#include "io/dns.h"

#include <ares.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <netdb.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

#include "util/common.h"

const char *const sl_dns_result_names[SL_DNS_NRESULTS] = {"ok", "not_found", "timeout",
                                                          "failed"};
static _Atomic uint64_t sl_dns_counts[SL_DNS_NRESULTS];
static _Atomic uint64_t sl_dns_nanos;

void sl_dns_stats_get(sl_dns_stats *out) {
  for (int i = 0; i < SL_DNS_NRESULTS; i++) out->lookups[i] = atomic_load(&sl_dns_counts[i]);
  out->seconds = (double)atomic_load(&sl_dns_nanos) / 1e9;
}

static uint64_t sl_dns_clock(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Counts one lookup that began at start (sl_dns_clock) and came to r. */
static void sl_dns_count(sl_dns_result r, uint64_t start) {
  atomic_fetch_add(&sl_dns_counts[r], 1);
  atomic_fetch_add(&sl_dns_nanos, sl_dns_clock() - start);
}

/* The result of the system resolver's failure, from its message (static
 * strings: gai_strerror's own, or sl_addr_resolve's). */
static sl_dns_result sl_dns_system_result(const char *why) {
  if (why == gai_strerror(EAI_NONAME) || why == gai_strerror(EAI_NODATA) ||
      strcmp(why, "no IPv4 or IPv6 address") == 0)
    return SL_DNS_NOT_FOUND;
  return why == gai_strerror(EAI_AGAIN) ? SL_DNS_TIMEOUT : SL_DNS_FAILED;
}

static sl_dns_result sl_dns_ares_result(int status) {
  switch (status) {
  case ARES_SUCCESS: return SL_DNS_OK;
  case ARES_ENOTFOUND:
  case ARES_ENODATA: return SL_DNS_NOT_FOUND;
  case ARES_ETIMEOUT: return SL_DNS_TIMEOUT;
  default: return SL_DNS_FAILED;
  }
}

static pthread_once_t sl_dns_once = PTHREAD_ONCE_INIT;
static int sl_dns_init_rc = ARES_SUCCESS;

static void sl_dns_init(void) { sl_dns_init_rc = ares_library_init(ARES_LIB_INIT_ALL); }

/* One lookup's answer, filled in by sl_dns_done. */
typedef struct sl_dns_answer {
  int done;
  int status;                  /* ARES_SUCCESS or c-ares' error */
  int ttl;                     /* seconds: the smallest of the records; INT_MAX: none */
  char (*out)[46];
  int *family;
  int *n;
  uint8_t keys[SL_ADDR_RESOLVE_MAX][17];
} sl_dns_answer;

static void sl_dns_done(void *arg, int status, int timeouts, struct ares_addrinfo *res) {
  (void)timeouts;
  sl_dns_answer *a = arg;
  a->done = 1;
  a->status = status;
  for (struct ares_addrinfo_node *node = res ? res->nodes : NULL; node; node = node->ai_next) {
    const struct sockaddr *sa = node->ai_addr;
    if (sa == NULL) continue;
    int added = 0;
    if (node->ai_family == AF_INET)
      added = sl_addr_insert(a->out, a->family, a->keys, a->n, AF_INET,
                             &((const struct sockaddr_in *)(const void *)sa)->sin_addr);
    else if (node->ai_family == AF_INET6)
      added = sl_addr_insert(a->out, a->family, a->keys, a->n, AF_INET6,
                             &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr);
    if (added && node->ai_ttl >= 0 && node->ai_ttl < a->ttl) a->ttl = node->ai_ttl;
  }
  for (struct ares_addrinfo_cname *c = res ? res->cnames : NULL; c; c = c->next)
    if (c->ttl >= 0 && c->ttl < a->ttl) a->ttl = c->ttl;
  if (res) ares_freeaddrinfo(res);
}

/* Runs ch until a->done or nothing is left to wait for. */
static void sl_dns_wait(ares_channel ch, sl_dns_answer *a) {
  while (!a->done) {
    ares_socket_t socks[ARES_GETSOCK_MAXNUM];
    /* Bit i: socks[i] to read; bit i + ARES_GETSOCK_MAXNUM: to write (tested
     * unsigned: c-ares' own macros shift an int into its sign bit). */
    unsigned bits = (unsigned)ares_getsock(ch, socks, ARES_GETSOCK_MAXNUM);
    struct pollfd p[ARES_GETSOCK_MAXNUM];
    nfds_t np = 0;
    for (int i = 0; i < ARES_GETSOCK_MAXNUM; i++) {
      short ev = (short)(((bits >> i) & 1u ? POLLIN : 0) |
                         ((bits >> (i + ARES_GETSOCK_MAXNUM)) & 1u ? POLLOUT : 0));
      if (ev == 0) continue;
      p[np].fd = socks[i];
      p[np].events = ev;
      p[np].revents = 0;
      np++;
    }
    struct timeval tv, *t = ares_timeout(ch, NULL, &tv);
    if (np == 0 && t == NULL) return;   /* nothing in flight: ares_destroy ends it */
    int ms = t ? (int)(tv.tv_sec * 1000 + (tv.tv_usec + 999) / 1000) : 1000;
    int k = poll(p, np, ms);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) {   /* timeouts: c-ares tries the next server or gives up */
      ares_process_fd(ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
      continue;
    }
    for (nfds_t i = 0; i < np; i++) {
      if (p[i].revents == 0) continue;
      ares_socket_t r = (p[i].revents & (POLLIN | POLLERR | POLLHUP)) ? p[i].fd : ARES_SOCKET_BAD;
      ares_socket_t w = (p[i].revents & POLLOUT) ? p[i].fd : ARES_SOCKET_BAD;
      ares_process_fd(ch, r, w);
    }
  }
}

int sl_dns_resolve(const sl_dns *d, const char *name, char out[][46], int *family, int *n,
                   int *ttl_ms, const char **why) {
  *n = 0;
  *ttl_ms = -1;
  uint64_t start = sl_dns_clock();
  if (d == NULL || d->servers[0] == '\0') {
    int rc = sl_addr_resolve(name, out, family, n, why);
    sl_dns_count(rc == SL_OK ? SL_DNS_OK : sl_dns_system_result(*why), start);
    return rc;
  }
  pthread_once(&sl_dns_once, sl_dns_init);
  if (sl_dns_init_rc != ARES_SUCCESS) {
    *why = ares_strerror(sl_dns_init_rc);
    sl_dns_count(SL_DNS_FAILED, start);
    return SL_ERROR;
  }
  /* Only the named servers: no /etc/hosts ("b": DNS), no search domains. */
  struct ares_options o;
  memset(&o, 0, sizeof(o));
  /* One try of each server per round, d->tries rounds (below): c-ares'
   * own tries double the wait at each round (timeout_ms, then 2x, 4x...),
   * so that tries = 10 would wait 1023 x timeout_ms. */
  o.timeout = d->timeout_ms;
  o.tries = 1;
  o.flags = ARES_FLAG_NOSEARCH;
  o.lookups = (char *)"b";
  o.ndomains = 0;
  o.domains = NULL;
  int mask = ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_FLAGS | ARES_OPT_LOOKUPS |
             ARES_OPT_DOMAINS;
  ares_channel ch;
  int rc = ares_init_options(&ch, &o, mask);
  if (rc != ARES_SUCCESS) {
    *why = ares_strerror(rc);
    sl_dns_count(SL_DNS_FAILED, start);
    return SL_ERROR;
  }
  rc = ares_set_servers_ports_csv(ch, d->servers);
  if (rc != ARES_SUCCESS) {
    ares_destroy(ch);
    *why = ares_strerror(rc);
    sl_dns_count(SL_DNS_FAILED, start);
    return SL_ERROR;
  }
  sl_dns_answer a;
  struct ares_addrinfo_hints h;
  memset(&h, 0, sizeof(h));
  h.ai_family = AF_UNSPEC;
  h.ai_flags = ARES_AI_NOSORT;   /* sorted here; c-ares' sort connects a UDP socket per address */
  for (int round = 0; round < (d->tries > 0 ? d->tries : 1); round++) {
    memset(&a, 0, sizeof(a));
    a.ttl = INT_MAX;
    a.out = out;
    a.family = family;
    a.n = n;
    *n = 0;
    ares_getaddrinfo(ch, name, NULL, &h, sl_dns_done, &a);
    sl_dns_wait(ch, &a);
    /* No server answered this round, or each failed as c-ares tries the
     * next server for (SERVFAIL, REFUSED, NOTIMP): the next round. */
    if (!a.done || (a.status != ARES_ETIMEOUT && a.status != ARES_ECONNREFUSED &&
                    a.status != ARES_ESERVFAIL && a.status != ARES_EREFUSED &&
                    a.status != ARES_ENOTIMP))
      break;
  }
  ares_destroy(ch);   /* a lookup still open ends here (ARES_EDESTRUCTION) */
  if (a.status != ARES_SUCCESS) {
    *n = 0;
    *why = ares_strerror(a.status);
    sl_dns_count(sl_dns_ares_result(a.status), start);
    return SL_ERROR;
  }
  if (*n == 0) {
    *why = "no IPv4 or IPv6 address";
    sl_dns_count(SL_DNS_NOT_FOUND, start);
    return SL_ERROR;
  }
  sl_dns_count(SL_DNS_OK, start);
  long ms = d->valid_ms > 0 ? d->valid_ms
            : a.ttl == INT_MAX ? SL_DNS_MIN_TTL_MS
            : (long)a.ttl * 1000;
  if (ms < SL_DNS_MIN_TTL_MS) ms = SL_DNS_MIN_TTL_MS;
  *ttl_ms = ms > INT_MAX ? INT_MAX : (int)ms;
  return SL_OK;
}
