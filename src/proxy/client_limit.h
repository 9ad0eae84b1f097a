/*
 * A listener's max_connections_per_client: how many connections each
 * client address has open on one listen address, over all workers. A
 * table keyed by IP address (the port aside; an IPv4-mapped IPv6 address
 * counts as its IPv4 one) under a mutex: one short lock per accepted and
 * per closed connection of a listener that has the limit. The table grows
 * with the number of distinct clients and shrinks as they leave.
 */
#ifndef SL_CLIENT_LIMIT_H
#define SL_CLIENT_LIMIT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include "io/addr.h"

typedef struct sl_client_entry {
  sl_addr_key key;
  uint32_t open;               /* 0: a free slot */
} sl_client_entry;

typedef struct sl_client_limit {
  pthread_mutex_t mu;
  _Atomic uint32_t max;        /* connections per client; 0: no limit (may change on reload) */
  sl_client_entry *slots;      /* open addressing, linear probing; cap a power of two */
  size_t cap, n;               /* slots, clients with connections open */
} sl_client_limit;

void sl_client_limit_init(sl_client_limit *cl, uint32_t max);
/* Frees the table (no connection may be counted any more). */
void sl_client_limit_free(sl_client_limit *cl);

enum { SL_CLIENT_COUNTED = 0, SL_CLIENT_REFUSED = 1, SL_CLIENT_UNCOUNTED = 2 };

/* A connection from k opens: SL_CLIENT_COUNTED (the caller calls
 * sl_client_limit_leave when it closes), SL_CLIENT_REFUSED (k has max
 * connections open already: the caller closes it, nothing counted), or
 * SL_CLIENT_UNCOUNTED (no limit now, a key of no family, or out of memory:
 * it is let in and not counted). Any thread. */
int sl_client_limit_enter(sl_client_limit *cl, const sl_addr_key *k);

/* A counted connection from k closed. Any thread. */
void sl_client_limit_leave(sl_client_limit *cl, const sl_addr_key *k);

/* Connections counted for k now (tests, metrics). */
uint32_t sl_client_limit_open(sl_client_limit *cl, const sl_addr_key *k);

#endif
