/*
 * The system's resolver, off the workers: upstream host names resolved
 * again while sluice runs (resolve_interval_ms), and host names given to
 * ctx:connect (lookups, with answers cached for resolve_cache_ms).
 *
 * One thread of its own looks up each host name the running
 * configuration's upstreams have (sl_dns_resolve: on the configuration's
 * resolver servers, else the system's resolver; it blocks for as long as
 * DNS takes) every resolve_interval_ms (the smallest of the upstreams that
 * name it), or when the answer's TTL runs out first (a resolver's answers
 * only), and keeps the latest answer of each. When an
 * answer differs from the one before, or is a name's first, it sends a
 * signal to the main thread, which builds a configuration with the new
 * servers from the kept answers (sl_config_derive, no resolving there) and
 * switches new connections to it if any server changed. A name that stops
 * resolving keeps its last answer (a warning is logged once).
 *
 * A lookup (ctx:connect("name:port")) is queued by a worker and answered
 * on the same thread before any periodic resolution, every queued lookup
 * of the same name by one call; the answer is posted back to the worker
 * (sl_worker_post) and kept for resolve_cache_ms (or its TTL, when
 * shorter), during which workers
 * take its addresses in turn without asking again. A lookup queued while
 * every thread is busy starts another thread that only answers lookups
 * (up to SL_RESOLVER_THREADS in all), so that a DNS server that does not
 * answer one name holds one thread, not the names queued behind it; two
 * threads never look up the same name at once.
 *
 * Threads: sl_resolver_watch and sl_resolver_lookup are the main thread's,
 * sl_resolver_cached and sl_resolver_start_lookup any worker's; the
 * answers, the queue and the cache are under one mutex.
 */
#ifndef SL_RESOLVER_H
#define SL_RESOLVER_H

#include <lua.h>
#include <pthread.h>
#include <signal.h>

#include "io/addr.h"
#include "io/worker.h"

/* The signal the resolver sends the main thread (blocked there, taken
 * with sigwait). */
#define SL_SIG_RESOLVED SIGRTMIN

struct sl_config;
typedef struct sl_resolver sl_resolver;

#define SL_RESOLVER_MAX_LOOKUPS 4096   /* lookups waiting at once, all workers */

/* A host name lookup for a worker. The caller owns it and sets msg.fn, w
 * and host; the answer (rc SL_OK with n addresses, sorted as
 * sl_addr_resolve sorts them, or SL_ERROR with why) is filled in before
 * msg.fn runs on w (or with w NULL, when sluice stops first). */
typedef struct sl_lookup {
  sl_worker_msg msg;
  struct sl_worker *w;
  char host[256];
  int rc;
  const char *why;             /* static storage */
  int pick;                    /* the address this lookup's connect takes (in turn) */
  int n;
  char text[SL_ADDR_RESOLVE_MAX][46];
  int family[SL_ADDR_RESOLVE_MAX];
  struct sl_lookup *next;      /* the resolver's queue */
} sl_lookup;

/* A resolver that signals `thread` with signo (pthread_kill) when answers
 * change. Its thread starts with the first name to watch. NULL on ENOMEM. */
sl_resolver *sl_resolver_create(pthread_t thread, int signo);

/* Watches the host names of cfg's upstreams whose resolve_interval_ms is
 * not 0, instead of those watched before: each name's answer becomes the
 * addresses cfg has for it (cfg was just loaded: resolved), a name kept
 * keeps its schedule, a new one is resolved at once, and a resolution
 * under way for the list before is dropped. Lookups forget their cached
 * answers, and cfg's resolve_cache_ms holds for them from then on. SL_OK,
 * or SL_ERROR when the thread cannot start or memory is short (logged;
 * names are then not resolved again). */
int sl_resolver_watch(sl_resolver *r, const struct sl_config *cfg);

/* A resolve function for sl_config_derive (its upvalue: the sl_resolver):
 * the kept answer of a watched name, { { host, family }, ... }, or nil and
 * why when there is none. */
int sl_resolver_lookup(lua_State *L);

/* Any thread: an address of host from an answer younger than
 * resolve_cache_ms, each call the next of its addresses (text, family):
 * SL_OK, or SL_ERROR when there is none. */
int sl_resolver_cached(sl_resolver *r, const char *host, char text[46], int *family);

/* Any worker: queues l. SL_OK, or SL_ERROR (l untouched) with *why: r
 * stops, SL_RESOLVER_MAX_LOOKUPS wait already, or its thread cannot start. */
int sl_resolver_start_lookup(sl_resolver *r, sl_lookup *l, const char **why);

/* The resolver ctx:connect asks (the running process's), or NULL. */
sl_resolver *sl_resolver_shared(void);
void sl_resolver_share(sl_resolver *r);

/* Asks the thread to stop (no more resolutions or signals), without
 * waiting for it. NULL is fine. */
void sl_resolver_stop(sl_resolver *r);

/* Stops the thread, ends the lookups still queued (their msg.fn runs with
 * w NULL: their workers are gone) and frees r: SL_OK (NULL is fine). Once
 * every worker has stopped. SL_ERROR when the thread is still waiting for
 * the system's resolver after a second: it is left to end with the
 * process, and r with it. */
int sl_resolver_destroy(sl_resolver *r);

#endif
