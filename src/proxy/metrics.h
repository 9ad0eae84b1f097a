/*
 * Per-worker metrics for the admin endpoint (src/proxy/admin.c), and the
 * snapshots through which another thread reads them.
 *
 * Threading: every counter here is written by its worker's thread only,
 * with plain (non-atomic) increments on the paths that already run there:
 * accept and close (connections and bytes by listener), connect completion
 * and close (upstreams and their servers), a server marked down, a Lua
 * stage's failure (stage errors). No other thread reads
 * them in place. The admin thread asks for a snapshot instead
 * (sl_metrics_ask, sl_metrics_wait): an ev_async wakes the worker, which copies its
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
#include <time.h>

#include "alloc/pool.h"
#include "io/worker.h"

struct sl_channel;

#define SL_METRICS_NAME 96
/* Upper bounds (seconds) of the connect time histogram's buckets. */
#define SL_METRICS_NBUCKETS 12
extern const double sl_metrics_buckets[SL_METRICS_NBUCKETS];

typedef struct sl_metrics sl_metrics;

/* Why a connect to a server failed (sluice_upstream_server_connect_failures_total). */
enum { SL_METRICS_REFUSED, SL_METRICS_TIMEOUT, SL_METRICS_OTHER, SL_METRICS_TLS,
       SL_METRICS_NREASONS };
extern const char *const sl_metrics_reasons[SL_METRICS_NREASONS];

/* The upstream label of connections that ctx:connect("host:port") makes
 * to a plain address (no upstream of the configuration): parentheses are
 * not allowed in upstream names, so it cannot name one. Its servers are
 * the addresses connected to, up to SL_METRICS_MAX_DIRECT per worker; the
 * addresses past those are counted together as SL_METRICS_DIRECT_OTHER. */
#define SL_METRICS_DIRECT "(direct)"
#define SL_METRICS_DIRECT_OTHER "other"
#define SL_METRICS_MAX_DIRECT 256

/* What marked a server down. */
enum { SL_METRICS_DOWN_PASSIVE, SL_METRICS_DOWN_CHECK, SL_METRICS_NCAUSES };
extern const char *const sl_metrics_causes[SL_METRICS_NCAUSES];

/*
 * One server of one upstream (by name: "back", "127.0.0.1:7001") on one
 * worker. Every configuration (generation) that lists the server holds a
 * reference (sl_upstreams, through sl_peer.m), so its counters go on across
 * reloads that keep it, and it is dropped, its series with it, once no
 * generation that lists it is left (a removed server: once the last
 * connection of the old generation has closed). Its bytes and resumed
 * sessions then stay in its upstream's totals, which never go down. A
 * plain address of ctx:connect (SL_METRICS_DIRECT) is a server that no
 * configuration lists: it lives as long as the worker's metrics.
 */
typedef struct sl_metrics_server sl_metrics_server;

typedef struct sl_metrics_listener_snap {
  char name[SL_METRICS_NAME];
  uint64_t opened, closed;       /* client connections accepted, closed */
  uint64_t limited;              /* of those, closed at once by max_connections_per_client */
  uint64_t rate_pauses;          /* times a worker paused accepting at max_connection_rate */
  uint64_t tls_done, tls_failed; /* TLS handshakes done, failed */
  uint64_t bytes_in, bytes_out;  /* from and to clients, closed and open connections */
  uint64_t outq_bytes;           /* pending in the outbound queues of its connections */
  uint64_t held_bufs, held_bytes;/* live buffers of its connections (memory summary) */
} sl_metrics_listener_snap;

/* One upstream as one worker sees it: its counters are the sums over its
 * servers, those dropped since included (the servers' rows without them). */
typedef struct sl_metrics_upstream_snap {
  char name[SL_METRICS_NAME];
  uint64_t connects, failures;
  uint64_t reasons[SL_METRICS_NREASONS]; /* failures by reason */
  uint64_t buckets[SL_METRICS_NBUCKETS]; /* connects at most that long (not cumulative) */
  double seconds;                /* sum of connect times */
  uint64_t open;                 /* connections open now */
  uint64_t bytes_to, bytes_from; /* written to its servers, read from them (open connections too) */
  uint64_t tls_resumed;
} sl_metrics_upstream_snap;

/* One server as one worker sees it. The state comes from the newest
 * generation that lists it. */
typedef struct sl_metrics_server_snap {
  char upstream[SL_METRICS_NAME];
  char server[SL_METRICS_NAME];  /* its address as the configuration writes it */
  int direct;                    /* 1: an address of ctx:connect (SL_METRICS_DIRECT) */
  int balance;                   /* sl_balance of its upstream */
  int retired;                   /* 1: not in the configuration new connections use */
  int weight;
  int backup;                    /* 1: a backup server (balance.h) */
  unsigned uindex, index;        /* its upstream's index in the configuration, its own */
  int down;                      /* 0: available, else SL_METRICS_DOWN_* + 1 */
  double down_until, now;        /* passive: skipped until (Unix time); the worker's now */
  uint64_t opened, open;         /* connections opened (connects completed), open now */
  uint64_t failures[SL_METRICS_NREASONS];
  uint64_t buckets[SL_METRICS_NBUCKETS]; /* connects at most that long (not cumulative) */
  double seconds;                /* sum of connect times */
  uint64_t bytes_to, bytes_from; /* written to it, read from it (open connections too) */
  uint64_t downs[SL_METRICS_NCAUSES]; /* times marked down */
  uint64_t tls_resumed;          /* of opened, TLS handshakes that resumed a session */
} sl_metrics_server_snap;

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
  uint64_t lua_refusals;         /* Lua allocations refused at lua_memory_limit */
  uint64_t lua_limit;            /* lua_memory_limit (0: none) */
  uint64_t lua_timeouts;         /* Lua callbacks stopped by lua_timeout_ms */
  int has_lua;
  uint64_t channels;             /* open or closing */
  uint64_t outq_bytes;           /* every outbound queue of the worker */
  uint64_t pipe_bytes;           /* in its connections' splice pipes, not yet sent */
  sl_metrics_listener_snap *listeners;
  size_t nlisteners;
  sl_metrics_upstream_snap *upstreams;
  size_t nupstreams;
  sl_metrics_server_snap *servers;
  size_t nservers;
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

/* One collector thread (the admin endpoint's) asks every worker at once,
 * then waits for each until one deadline: a worker that does not answer
 * costs one wait per request, not one per worker, and once it has failed
 * to answer, none until it has (a worker stuck in Lua is not waited for at
 * every scrape). */

/* Any thread but w's: asks w for a snapshot (memory != 0: with the walk of
 * its live buffers). Returns the ticket to wait for, or 0 when w has ended
 * or has not answered the question before yet (the answer is then NULL at
 * once). */
uint64_t sl_metrics_ask(sl_worker *w, int memory);

/* The answer to ticket, waiting until the CLOCK_MONOTONIC time until; NULL
 * when w does not answer by then, has ended, or ticket is 0. Returns a new
 * snapshot: free it with sl_metrics_snap_free. */
sl_metrics_snap *sl_metrics_wait(sl_worker *w, uint64_t ticket, const struct timespec *until);

/* until = now (CLOCK_MONOTONIC) + timeout seconds. */
void sl_metrics_deadline(double timeout, struct timespec *until);

void sl_metrics_snap_free(sl_metrics_snap *s);

/* On w's own thread: the snapshot sl_metrics_wait hands over (tests).
 * NULL without metrics or out of memory. */
sl_metrics_snap *sl_metrics_snapshot(sl_worker *w, int memory);

/* ---- hooks, on the worker's thread; all do nothing without metrics ---- */

/* The 1-based index of listener `name` in w's table (added on first use;
 * 0 on ENOMEM or without metrics). Stored in channels (mlistener). */
uint16_t sl_metrics_listener(sl_worker *w, const char *name);

/* A client connection of listener index li was accepted / has closed (its
 * bytes are added to the listener's). */
void sl_metrics_client_opened(sl_worker *w, uint16_t li);
void sl_metrics_client_closed(sl_worker *w, uint16_t li, struct sl_channel *ch);
/* One of them was closed at once: its client had max_connections_per_client open. */
void sl_metrics_client_limited(sl_worker *w, uint16_t li);
/* A TLS handshake on a client connection of listener li ended: done (ok
 * 1) or failed (a bad or plain-text client, a timeout). */
void sl_metrics_tls_handshake(sl_worker *w, uint16_t li, int ok);
/* A worker paused accepting on listener li at its max_connection_rate. */
void sl_metrics_rate_paused(sl_worker *w, uint16_t li);

/* The server `server` of `upstream`: returns a reference (found, or added
 * with zero counts), NULL without metrics or on ENOMEM (hooks take NULL). */
sl_metrics_server *sl_metrics_server_ref(sl_worker *w, const char *upstream, const char *server);

/* Drops a reference; at the last one the server and its series are gone
 * (its bytes and resumed sessions stay in its upstream's totals). NULL is
 * fine. */
void sl_metrics_server_unref(sl_worker *w, sl_metrics_server *e);

/* The server of SL_METRICS_DIRECT for the plain address `address`
 * ("127.0.0.1:7001"): found, or added with zero counts while the worker
 * tracks fewer than SL_METRICS_MAX_DIRECT addresses, else the one of
 * SL_METRICS_DIRECT_OTHER. Borrowed: it lives as long as w's metrics. NULL
 * without metrics or on ENOMEM. A lookup per connect, none per byte. */
sl_metrics_server *sl_metrics_direct(sl_worker *w, const char *address);

/* A connect to upstream `name` (its server e, NULL when none is known)
 * completed after seconds (err 0: a connection of e is open from now on)
 * or failed with errno value err. */
void sl_metrics_connect_done(sl_worker *w, const char *upstream, sl_metrics_server *e,
                             double seconds, int err);

/* SL_METRICS_REFUSED, _TIMEOUT, _TLS (EPROTO: a TLS handshake that
 * failed) or _OTHER for a connect's errno value. */
int sl_metrics_failure_reason(int err);

/* A connection of e has closed: its bytes (bytes_out went to the server,
 * bytes_in came from it) join e's, and it is open no more. e may be NULL. */
void sl_metrics_server_closed(sl_metrics_server *e, const struct sl_channel *ch);

/* A connection to e (an upstream with tls) resumed a TLS session. e may
 * be NULL. */
void sl_metrics_server_tls_resumed(sl_metrics_server *e);

/* e was marked down (cause SL_METRICS_DOWN_*). e may be NULL. */
void sl_metrics_server_down(sl_metrics_server *e, int cause);

/* A stage named `name` raised. */
void sl_metrics_stage_error(sl_worker *w, const char *name);

#endif
