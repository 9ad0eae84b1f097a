/*
 * Per-worker metrics for the admin endpoint (src/proxy/admin.c), and the
 * snapshots through which another thread reads them.
 *
 * Threading: every counter here is written by its worker's thread only,
 * with plain (non-atomic) increments on the paths that already run there:
 * accept and close (connections and bytes by listener), connect completion
 * (upstreams), a Lua stage's failure (stage errors). No other thread reads
 * them in place. The admin thread asks for a snapshot instead
 * (sl_metrics_collect): an ev_async wakes the worker, which copies its
 * counters, its pool's statistics and, for the memory summary, the bytes
 * its live buffers hold by listener and by stage, into a new
 * sl_metrics_snap, on its own thread, between two events. The data path
 * pays nothing for being observed, and a snapshot is consistent within one
 * worker.
 *
 * While a worker drains, it still answers; once its loop has ended
 * (sl_metrics_gone), or when it does not answer within the timeout, the
 * collector gets NULL for it.
 */
#ifndef SL_METRICS_H
#define SL_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "alloc/pool.h"
#include "io/worker.h"

struct sl_channel;

#define SL_METRICS_NAME 96
/* Upper bounds (seconds) of the connect time histogram's buckets. */
#define SL_METRICS_NBUCKETS 12
extern const double sl_metrics_buckets[SL_METRICS_NBUCKETS];

typedef struct sl_metrics sl_metrics;

typedef struct sl_metrics_listener_snap {
  char name[SL_METRICS_NAME];
  uint64_t opened, closed;       /* client connections accepted, closed */
  uint64_t bytes_in, bytes_out;  /* from and to clients, closed and open connections */
  uint64_t outq_bytes;           /* pending in the outbound queues of its connections */
  uint64_t held_bufs, held_bytes;/* live buffers of its connections (memory summary) */
} sl_metrics_listener_snap;

typedef struct sl_metrics_upstream_snap {
  char name[SL_METRICS_NAME];
  uint64_t connects, failures;
  uint64_t buckets[SL_METRICS_NBUCKETS]; /* connects at most that long (not cumulative) */
  double seconds;                /* sum of connect times */
} sl_metrics_upstream_snap;

typedef struct sl_metrics_stage_snap {
  char name[SL_METRICS_NAME];
  uint64_t errors;
} sl_metrics_stage_snap;

/* Live buffers by (listener, holder): the memory summary's rows. */
typedef struct sl_metrics_held_snap {
  char listener[SL_METRICS_NAME]; /* "-": no connection answers for it */
  char stage[SL_METRICS_NAME];    /* stage name, "outbound queue", or "-": no holder known */
  uint64_t bufs, bytes;
} sl_metrics_held_snap;

typedef struct sl_metrics_snap {
  int worker;
  int draining;                  /* the worker has been asked to stop */
  sl_worker_stats stats;
  sl_pool_stats pool;
  uint64_t leaks, leaked_bytes;
  uint64_t class_blocks[SL_SC_MAX_CLASSES]; /* blocks held by buffers, by size class */
  uint64_t lua_bytes;            /* the Lua heap (0: no Lua state) */
  int has_lua;
  uint64_t channels;             /* open or closing */
  uint64_t outq_bytes;           /* every outbound queue of the worker */
  sl_metrics_listener_snap *listeners;
  size_t nlisteners;
  sl_metrics_upstream_snap *upstreams;
  size_t nupstreams;
  sl_metrics_stage_snap *stages;
  size_t nstages;
  sl_metrics_held_snap *held;    /* memory summary only */
  size_t nheld;
  uint64_t held_bufs, held_bytes;/* every live buffer walked (memory summary only) */
} sl_metrics_snap;

/* Main thread, before w runs (and before its Lua state is created): gives w
 * its metrics, and with holders != 0 starts recording buffer holders in
 * its pool (the memory summary's stage rows; a store or two per pipeline
 * hop, so only when an admin endpoint can show them). SL_OK or SL_ERROR
 * (out of memory). */
int sl_metrics_attach(sl_worker *w, int holders);

/* After w's loop has ended and nobody collects any more: frees them. */
void sl_metrics_detach(sl_worker *w);

/* Any thread: w's loop has ended; collecting from it returns NULL at once. */
void sl_metrics_gone(sl_worker *w);

/* Any thread but w's: a snapshot of w (memory != 0: with the walk of its
 * live buffers), or NULL when w does not answer within timeout seconds or
 * has ended. Returns a new snapshot: free it with sl_metrics_snap_free. */
sl_metrics_snap *sl_metrics_collect(sl_worker *w, int memory, double timeout);
void sl_metrics_snap_free(sl_metrics_snap *s);

/* ---- hooks, on the worker's thread; all do nothing without metrics ---- */

/* The 1-based index of listener `name` in w's table (added on first use;
 * 0 on ENOMEM or without metrics). Stored in channels (mlistener). */
uint16_t sl_metrics_listener(sl_worker *w, const char *name);

/* A client connection of listener index li was accepted / has closed (its
 * bytes are added to the listener's). */
void sl_metrics_client_opened(sl_worker *w, uint16_t li);
void sl_metrics_client_closed(sl_worker *w, uint16_t li, struct sl_channel *ch);

/* A connect to upstream `name` completed after seconds (err 0) or failed. */
void sl_metrics_connect_done(sl_worker *w, const char *upstream, double seconds, int err);

/* A stage named `name` raised. */
void sl_metrics_stage_error(sl_worker *w, const char *name);

#endif
