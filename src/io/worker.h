/*
 * A worker: one thread, one ev_loop, one pool, one Lua state, and the
 * channels that live on it. Nothing here is shared between workers; a
 * client connection and its upstream connection stay on one worker.
 */
#ifndef SL_WORKER_H
#define SL_WORKER_H

#include <ev.h>
#include <stdint.h>

struct sl_pool;
struct sl_alloc;
struct sl_channel;
struct sl_lua_host;

typedef struct sl_worker_stats {
  uint64_t unhandled_inbound;   /* buffers released by the tail */
  uint64_t channels_opened;
  uint64_t channels_closed;
  uint64_t bytes_in;
  uint64_t bytes_out;
} sl_worker_stats;

typedef struct sl_worker sl_worker;

struct sl_worker {
  struct ev_loop *loop;
  struct sl_pool *pool;
  struct sl_lua_host *lua;        /* NULL when no listener has a Lua stage */
  struct sl_channel *channels;    /* every open or closing channel */
  uint64_t nchannels;
  int id;
  int stopping;
  ev_async stop_watcher;          /* another thread asks the worker to stop */
  ev_timer pool_timer;            /* drains returned buffers, trims when idle */
  void (*on_stop)(sl_worker *w);  /* closes listeners and channels */
  /* Write promises of this worker's channels: err NULL (written) or an
   * SL_PROMISE_* reason. See io/channel.h. NULL: ids are dropped. */
  void (*promise_done)(struct sl_channel *ch, uint32_t pid, const char *err);
  void *app;                      /* the proxy's per-worker state */
  sl_worker_stats stats;
};

/* Creates a worker with its own loop and a pool on alloc. NULL on failure. */
sl_worker *sl_worker_create(int id, struct sl_alloc *alloc);

/* Runs the loop until it is stopped and every channel is gone. The calling
 * thread becomes the pool's owner. */
void sl_worker_run(sl_worker *w);

/* Thread-safe: asks the worker's loop to stop. */
void sl_worker_request_stop(sl_worker *w);

/* Closes every channel with reason (used when stopping). */
void sl_worker_close_channels(sl_worker *w, const char *reason);

/* Frees the loop and the pool; logs a leak report when buffers are still
 * outstanding. Returns the number of leaked buffers. */
uint64_t sl_worker_destroy(sl_worker *w);

#endif
