/*
 * A worker: one thread, one ev_loop, one pool, one Lua state, and the
 * channels that live on it. Nothing here is shared between workers; a
 * client connection and its upstream connection stay on one worker.
 *
 * Other threads reach a worker only through its ev_async watchers: stop
 * (drain, then close), wake (a listener may accept again), a control call
 * (sl_worker_call: run a function on the worker's thread and wait for its
 * result, used by reloads), and posts (sl_worker_post: a function the
 * worker runs soon, without the poster waiting: host name lookups that
 * finished). None of them is on the data path.
 *
 * Generations: each configuration a worker runs is a generation. A channel
 * belongs to the generation that was current when it was created; once an
 * older generation has no channel left, on_gen_done retires it (outside any
 * event callback).
 */
#ifndef SL_WORKER_H
#define SL_WORKER_H

#include <ev.h>
#include <pthread.h>
#include <stdint.h>

#include "io/splice.h"

struct sl_pool;
struct sl_alloc;
struct sl_channel;
struct sl_lua_host;
struct sl_metrics;

typedef struct sl_worker_stats {
  uint64_t unhandled_inbound;   /* buffers released by the tail */
  uint64_t channels_opened;
  uint64_t channels_closed;
  uint64_t bytes_in;
  uint64_t bytes_out;
  uint64_t writability_changes; /* outbound queues crossing a water mark */
  uint64_t write_timeouts;      /* channels closed by their write timeout */
  uint64_t spliced_bytes;       /* bytes_out that went socket to socket through a pipe */
  uint64_t splice_pipes;        /* pipes open now (in use and idle) */
  uint64_t splice_refused;      /* connections that wanted a pipe and got none (max_pipes
                                   reached, or pipe2 failed): buffers from then on */
} sl_worker_stats;

typedef struct sl_worker sl_worker;

typedef struct sl_worker_gen {
  uint64_t channels;              /* channels created under it, not yet freed */
  struct sl_worker_gen *older;    /* the generation before (still in use) */
  void *app;                      /* the proxy's per-generation state */
} sl_worker_gen;

typedef int (*sl_worker_call_fn)(sl_worker *w, void *arg);

/* Something another thread hands a worker (sl_worker_post), embedded in
 * the poster's own structure: fn runs once on the worker's thread with w,
 * or with w NULL when the worker is destroyed before it ran (fn then only
 * frees what it must). */
typedef struct sl_worker_msg {
  void (*fn)(sl_worker *w, struct sl_worker_msg *p);
  struct sl_worker_msg *next;
} sl_worker_msg;

struct sl_worker {
  struct ev_loop *loop;
  struct sl_pool *pool;
  struct sl_lua_host *lua;        /* NULL while no configuration has a Lua stage */
  void (*lua_hold)(struct sl_lua_host *h, int on); /* batches a read loop's reads */
  /* The worker went idle (its pool gave memory back): the Lua state
   * collects its garbage. Returns the heap's bytes before and after. */
  void (*lua_idle)(struct sl_lua_host *h, size_t *before, size_t *after);
  struct sl_channel *channels;    /* every open or closing channel */
  uint64_t nchannels;
  struct sl_channel *spare_channels;  /* freed channels kept for reuse (io/channel.c) */
  uint32_t nspare_channels;
  int id;
  int stopping;                   /* 1: draining; 2: closing everything */
  int ran;                        /* sl_worker_run was called (its exit is reported) */
  double drain_timeout;           /* seconds a stop waits for open channels */
  sl_worker_gen *gen;             /* the current generation (NULL: none yet) */
  ev_async stop_watcher;          /* another thread asks the worker to stop */
  ev_async wake_watcher;          /* a listener may accept again (gate room, socket back) */
  ev_async call_watcher;          /* a control call is waiting */
  ev_async post_watcher;          /* posts are waiting (it keeps no loop running) */
  pthread_mutex_t post_lock;
  sl_worker_msg *posts;          /* post_lock: oldest first */
  sl_worker_msg **posts_tail;
  ev_timer pool_timer;            /* drains returned buffers, trims when idle */
  ev_timer drain_timer;           /* the drain deadline */
  ev_timer gen_timer;             /* retires generations that became unused */
  pthread_mutex_t call_lock;
  pthread_cond_t call_cond;
  sl_worker_call_fn call_fn;      /* the pending call, NULL when none */
  void *call_arg;
  int call_rc;
  int call_done;
  void (*on_stop)(sl_worker *w);  /* stops accepting */
  void (*on_wake)(sl_worker *w);  /* retries paused listeners (io/listener.h) */
  void (*on_gen_done)(sl_worker *w, sl_worker_gen *g); /* g has no channel left */
  /* Write promises of this worker's channels: err NULL (written) or an
   * SL_PROMISE_* reason. See io/channel.h. NULL: ids are dropped. */
  void (*promise_done)(struct sl_channel *ch, uint32_t pid, const char *err);
  void *app;                      /* the proxy's per-worker state */
  /* SO_SNDBUF of the first accepted [0] and connected [1] socket, 0 until
   * asked: the adaptive gather's start for every channel of that kind (one
   * getsockopt per kind and worker instead of one per connection). */
  int sndbuf[2];
  /* Channels whose FIN waits for the end of this loop iteration (see
   * channel.c, sl_channel_output_done), linked through fin_next; the
   * prepare watcher sends them before the loop polls again. */
  struct sl_channel *fin_list;
  ev_prepare fin_watcher;
  /* A read burst that ends at its peer's FIN holds the writes its
   * read_complete and input_closed ask for, so that a FIN passed on leaves
   * with the last bytes in one segment (channel.c, sl_channel_read). */
  int write_hold;
  struct sl_channel *held_list;   /* linked through held_next */
  sl_pipe_pool pipes;             /* kernel pipes for splicing (io/splice.h) */
  struct sl_metrics *metrics;     /* the admin endpoint's counters (proxy/metrics.h), or NULL */
  /* Counts an error raised by the named stage (set with metrics). */
  void (*stage_error)(struct sl_worker *w, const char *stage);
  sl_worker_stats stats;
};

/* Creates a worker with its own loop and a pool on alloc. NULL on failure. */
sl_worker *sl_worker_create(int id, struct sl_alloc *alloc);

/* Runs the loop until it is stopped and every channel is gone. The calling
 * thread becomes the pool's owner. */
void sl_worker_run(sl_worker *w);

/* Thread-safe: asks the worker to stop: it stops accepting, lets open
 * channels finish for drain_timeout seconds, then closes what is left with
 * reason "shutdown". A second request closes everything at once. */
void sl_worker_request_stop(sl_worker *w);

/* Thread-safe: the worker calls on_wake soon. */
void sl_worker_wake(sl_worker *w);

/* Thread-safe: the worker runs p->fn(w, p) soon on its thread, in the order
 * posted (even while it drains); one destroyed first runs p->fn(NULL, p).
 * p (the caller's) must stay valid until then. The caller must not post
 * once sl_worker_destroy may have begun. */
void sl_worker_post(sl_worker *w, sl_worker_msg *p);

/* From another thread: runs fn(w, arg) on the worker's thread and returns
 * its result, blocking until then. One caller at a time. */
int sl_worker_call(sl_worker *w, sl_worker_call_fn fn, void *arg);

/* The same, calling tick(ud) every period seconds while it waits (the main
 * thread keeps its Lua watchdog running while a reload waits for a worker
 * that is in a long callback). period <= 0: no ticks. */
int sl_worker_call_ticking(sl_worker *w, sl_worker_call_fn fn, void *arg, void (*tick)(void *ud),
                           void *ud, double period);

/* Closes every channel with reason (used when stopping). */
void sl_worker_close_channels(sl_worker *w, const char *reason);

/* Makes g the current generation; the previous one becomes g->older. */
void sl_worker_push_gen(sl_worker *w, sl_worker_gen *g);

/* The channel layer: a channel of g was freed. */
void sl_worker_channel_freed(sl_worker *w, sl_worker_gen *g);

/* Frees the loop and the pool; logs a leak report when buffers are still
 * outstanding. Returns the number of leaked buffers. */
uint64_t sl_worker_destroy(sl_worker *w);

#endif
