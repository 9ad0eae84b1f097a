/*
 * What the admin endpoint answers: /metrics in Prometheus text format, the
 * /memory summary and the /upstreams document, formatted from the workers' snapshots
 * (proxy/metrics.h) and the arenas' counters. The names, meanings and the
 * summary's layout are documented in docs/operations.md.
 */
#ifndef SL_ADMIN_FORMAT_H
#define SL_ADMIN_FORMAT_H

#include <stddef.h>
#include <stdint.h>

#include "io/dns.h"
#include "proxy/metrics.h"

struct sl_alloc;
struct sl_metrics_snap;

/* A growing text. failed is set (and stays) when memory ran out. */
typedef struct sl_text {
  char *p;
  size_t len, cap;
  int failed;
} sl_text;

void sl_text_append(sl_text *t, const char *s, size_t n);
void sl_text_printf(sl_text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Frees the text and makes it empty. */
void sl_text_reset(sl_text *t);

typedef struct sl_admin_report {
  struct sl_metrics_snap **snaps;   /* one per worker; NULL: it did not answer */
  int nworkers;
  struct sl_alloc *alloc;
  int draining;
  int stuck;                        /* workers stuck in Lua (proxy/watchdog.h) */
  uint64_t reloads_applied, reloads_refused;
  int last_reload_ok;               /* 1 at start, then the last reload's outcome */
  double last_applied;              /* Unix time of the start or the last applied reload */
  uint64_t dns_changes;             /* server sets changed by host names resolved again */
  sl_dns_stats dns;                 /* the process's host name lookups */
} sl_admin_report;

void sl_admin_format_metrics(sl_text *out, const sl_admin_report *r);
void sl_admin_format_memory(sl_text *out, const sl_admin_report *r);
/* The /upstreams JSON document (admin_upstreams.c). */
void sl_admin_format_upstreams(sl_text *out, const sl_admin_report *r);

/* One server of one upstream over every answering worker. */
typedef struct sl_admin_server {
  sl_metrics_server_snap sum;  /* counters summed; names; balance, weight and indexes from a
                                  worker where it is current; retired: on every worker */
  unsigned ndown;              /* workers that hold it down */
  uint64_t rank;               /* its upstream's place in the order */
} sl_admin_server;

/* The servers of r's snapshots summed by (upstream, server), in the
 * configuration's order (those only old connections still use after, the
 * addresses of ctx:connect last). Returns a new array of *n rows (free
 * it), or NULL out of memory. */
sl_admin_server *sl_admin_servers_sum(const sl_admin_report *r, size_t *n);

/* The upstreams of r's snapshots summed by name, in the order they first
 * appear, worker by worker. Returns a new array of *n rows (free it),
 * or NULL out of memory. */
sl_metrics_upstream_snap *sl_admin_upstreams_sum(const sl_admin_report *r, size_t *n);

#endif
