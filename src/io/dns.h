/*
 * Host names looked up on named DNS servers (the configuration's
 * `resolver`), with the answers' TTLs, through c-ares; or, with no servers
 * named, through the system's resolver (getaddrinfo), whose answers carry
 * no TTL.
 *
 * A lookup blocks its caller until the servers answer or every try has
 * timed out (timeout_ms per try, tries in all): it runs on the resolver's
 * threads and on the main thread at a load, never on a worker.
 */
#ifndef SL_DNS_H
#define SL_DNS_H

#include "io/addr.h"

#define SL_DNS_SERVERS_MAX 512   /* "ip:port,[ip6]:port,..." as c-ares takes them */
#define SL_DNS_MIN_TTL_MS 1000   /* an answer is kept at least this long */

typedef struct sl_dns {
  char servers[SL_DNS_SERVERS_MAX];   /* "": the system's resolver */
  int timeout_ms;              /* per try */
  int tries;                   /* tries of each server */
  int valid_ms;                /* answers kept this long whatever their TTL; 0: the TTL */
} sl_dns;

/* Looks name up as sl_addr_resolve does (the same order and limit), on
 * d's servers (A and AAAA; no search domains, no /etc/hosts), or with the
 * system's resolver when d is NULL or names none. *ttl_ms: how long the
 * answer may be kept: d's valid_ms, else the smallest TTL of its records
 * (CNAMEs included), at least SL_DNS_MIN_TTL_MS; -1 from the system's
 * resolver. SL_OK, or SL_ERROR with *why (static storage). Thread-safe. */
int sl_dns_resolve(const sl_dns *d, const char *name, char out[][46], int *family, int *n,
                   int *ttl_ms, const char **why);

/* What the lookups of the process came to (sluice_dns_lookups_total). */
typedef enum sl_dns_result {
  SL_DNS_OK,
  SL_DNS_NOT_FOUND,            /* no such name, or no address for it */
  SL_DNS_TIMEOUT,              /* no answer in time (EAI_AGAIN: the system's resolver gave up) */
  SL_DNS_FAILED,               /* anything else (refused, malformed, out of memory) */
  SL_DNS_NRESULTS
} sl_dns_result;

extern const char *const sl_dns_result_names[SL_DNS_NRESULTS];   /* "ok", "not_found", ... */

typedef struct sl_dns_stats {
  uint64_t lookups[SL_DNS_NRESULTS];
  double seconds;              /* spent in lookups, all threads */
} sl_dns_stats;

/* The counts since the process started (every sl_dns_resolve). */
void sl_dns_stats_get(sl_dns_stats *out);

#endif
