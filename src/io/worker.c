#include "io/worker.h"

#include <stdlib.h>
#include <time.h>

#include "alloc/pool.h"
#include "alloc/arena.h"
#include "buf/buf.h"
#include "io/channel.h"
#include "util/common.h"
#include "util/log.h"

static void sl_worker_on_stop(struct ev_loop *loop, ev_async *a, int revents) {
  SL_UNUSED(revents);
  sl_worker *w = SL_CONTAINER_OF(a, sl_worker, stop_watcher);
  if (w->stopping) {
    /* Asked again while draining: close everything now. */
    if (w->stopping == 1 && w->nchannels > 0) {
      sl_log(SL_LOG_INFO, "worker %d: stopping at once: closing %llu open sockets", w->id,
             (unsigned long long)w->nchannels);
      w->stopping = 2;
      ev_timer_stop(loop, &w->drain_timer);
      sl_worker_close_channels(w, "shutdown");
    }
    return;
  }
  w->stopping = 1;
  ev_unref(loop); /* a second stop request is still heard, but keeps nothing alive */
  ev_async_stop(loop, &w->wake_watcher);
  ev_async_stop(loop, &w->call_watcher);
  if (w->on_stop) w->on_stop(w);
  if (w->nchannels == 0) return; /* the loop ends by itself once no watcher is left */
  if (w->drain_timeout > 0) {
    sl_log(SL_LOG_INFO, "worker %d: draining %llu open sockets (at most %.3g s)", w->id,
           (unsigned long long)w->nchannels, w->drain_timeout);
    ev_timer_set(&w->drain_timer, w->drain_timeout, 0.);
    ev_timer_start(loop, &w->drain_timer);
  } else {
    w->stopping = 2;
    sl_worker_close_channels(w, "shutdown");
  }
}

static void sl_worker_on_drain_deadline(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_worker *w = SL_CONTAINER_OF(t, sl_worker, drain_timer);
  sl_log(SL_LOG_INFO, "worker %d: drain deadline: closing %llu open sockets", w->id,
         (unsigned long long)w->nchannels);
  w->stopping = 2;
  sl_worker_close_channels(w, "shutdown");
}

static void sl_worker_on_wake(struct ev_loop *loop, ev_async *a, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_worker *w = SL_CONTAINER_OF(a, sl_worker, wake_watcher);
  if (w->on_wake && !w->stopping) w->on_wake(w);
}

/* Takes every waiting post, oldest first. */
static sl_worker_msg *sl_worker_take_posts(sl_worker *w) {
  pthread_mutex_lock(&w->post_lock);
  sl_worker_msg *p = w->posts;
  w->posts = NULL;
  w->posts_tail = &w->posts;
  pthread_mutex_unlock(&w->post_lock);
  return p;
}

static void sl_worker_on_post(struct ev_loop *loop, ev_async *a, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_worker *w = SL_CONTAINER_OF(a, sl_worker, post_watcher);
  for (sl_worker_msg *p = sl_worker_take_posts(w), *next; p != NULL; p = next) {
    next = p->next;
    p->fn(w, p);
  }
}

void sl_worker_post(sl_worker *w, sl_worker_msg *p) {
  p->next = NULL;
  pthread_mutex_lock(&w->post_lock);
  *w->posts_tail = p;
  w->posts_tail = &p->next;
  pthread_mutex_unlock(&w->post_lock);
  ev_async_send(w->loop, &w->post_watcher);
}

static void sl_worker_on_call(struct ev_loop *loop, ev_async *a, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_worker *w = SL_CONTAINER_OF(a, sl_worker, call_watcher);
  pthread_mutex_lock(&w->call_lock);
  sl_worker_call_fn fn = w->call_fn;
  void *arg = w->call_arg;
  pthread_mutex_unlock(&w->call_lock);
  if (fn == NULL) return;
  int rc = fn(w, arg);
  pthread_mutex_lock(&w->call_lock);
  w->call_fn = NULL;
  w->call_rc = rc;
  w->call_done = 1;
  pthread_cond_signal(&w->call_cond);
  pthread_mutex_unlock(&w->call_lock);
}

int sl_worker_call_ticking(sl_worker *w, sl_worker_call_fn fn, void *arg, void (*tick)(void *ud),
                           void *ud, double period) {
  pthread_mutex_lock(&w->call_lock);
  w->call_fn = fn;
  w->call_arg = arg;
  w->call_done = 0;
  pthread_mutex_unlock(&w->call_lock);
  ev_async_send(w->loop, &w->call_watcher);
  pthread_mutex_lock(&w->call_lock);
  while (!w->call_done) {
    if (tick == NULL || period <= 0) {
      pthread_cond_wait(&w->call_cond, &w->call_lock);
      continue;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long ns = ts.tv_nsec + (long)(period * 1e9);
    ts.tv_sec += ns / 1000000000L;
    ts.tv_nsec = ns % 1000000000L;
    if (pthread_cond_timedwait(&w->call_cond, &w->call_lock, &ts) == 0 || w->call_done) continue;
    pthread_mutex_unlock(&w->call_lock);
    tick(ud);
    pthread_mutex_lock(&w->call_lock);
  }
  int rc = w->call_rc;
  pthread_mutex_unlock(&w->call_lock);
  return rc;
}

int sl_worker_call(sl_worker *w, sl_worker_call_fn fn, void *arg) {
  return sl_worker_call_ticking(w, fn, arg, NULL, NULL, 0);
}

/* Retires the older generations that have no channel left. */
static void sl_worker_on_gen_timer(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_worker *w = SL_CONTAINER_OF(t, sl_worker, gen_timer);
  if (w->gen == NULL) return;
  sl_worker_gen **pp = &w->gen->older;
  while (*pp != NULL) {
    sl_worker_gen *g = *pp;
    if (g->channels == 0) {
      *pp = g->older;
      g->older = NULL;
      if (w->on_gen_done) w->on_gen_done(w, g);
    } else {
      pp = &g->older;
    }
  }
}

void sl_worker_push_gen(sl_worker *w, sl_worker_gen *g) {
  g->older = w->gen;
  w->gen = g;
  if (g->older && !ev_is_active(&w->gen_timer)) ev_timer_start(w->loop, &w->gen_timer);
}

void sl_worker_channel_freed(sl_worker *w, sl_worker_gen *g) {
  if (g != NULL && --g->channels == 0 && g != w->gen && !ev_is_active(&w->gen_timer))
    ev_timer_start(w->loop, &w->gen_timer);
  if (w->stopping && w->nchannels == 0) {
    if (ev_is_active(&w->drain_timer)) sl_log(SL_LOG_INFO, "worker %d: drained", w->id);
    ev_timer_stop(w->loop, &w->drain_timer);
  }
}

static void sl_worker_on_pool_timer(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(revents);
  sl_worker *w = SL_CONTAINER_OF(t, sl_worker, pool_timer);
  sl_buf_drain(w->pool);
  SL_UNUSED(loop);
  sl_pool_trim_report r;
  int64_t now_ms = sl_alloc_now_ms();
  if (sl_pipe_pool_tick(&w->pipes, now_ms, w->pool->alloc->cfg.trim_idle_ms) > 0)
    w->stats.splice_pipes = w->pipes.open;
  if (sl_pool_tick(w->pool, now_ms, &r)) {
    sl_channel_spares_free(w);
    size_t lua_before = 0, lua_after = 0;
    if (w->lua && w->lua_idle) w->lua_idle(w->lua, &lua_before, &lua_after);
    sl_log(SL_LOG_INFO,
           "worker %d: pool idle: gave back %llu cached blocks, %u chunks%s; %zu bytes mapped now; "
           "Lua heap %zu KiB -> %zu KiB",
           w->id, (unsigned long long)r.blocks, r.chunks, r.headers ? ", header memory" : "",
           (size_t)atomic_load(&w->pool->alloc->reserved), lua_before / 1024, lua_after / 1024);
  }
}

sl_worker *sl_worker_create(int id, struct sl_alloc *alloc) {
  sl_worker *w = calloc(1, sizeof(*w));
  if (w == NULL) return NULL;
  w->id = id;
  w->loop = ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
  w->pool = sl_pool_create(alloc, id);
  if (w->loop == NULL || w->pool == NULL) {
    if (w->loop) ev_loop_destroy(w->loop);
    sl_pool_destroy(w->pool);
    free(w);
    return NULL;
  }
  pthread_mutex_init(&w->call_lock, NULL);
  pthread_cond_init(&w->call_cond, NULL);
  sl_pipe_pool_init(&w->pipes);
  ev_async_init(&w->stop_watcher, sl_worker_on_stop);
  ev_async_start(w->loop, &w->stop_watcher);
  ev_async_init(&w->wake_watcher, sl_worker_on_wake);
  ev_async_start(w->loop, &w->wake_watcher);
  ev_async_init(&w->call_watcher, sl_worker_on_call);
  ev_async_start(w->loop, &w->call_watcher);
  pthread_mutex_init(&w->post_lock, NULL);
  w->posts_tail = &w->posts;
  ev_async_init(&w->post_watcher, sl_worker_on_post);
  ev_async_start(w->loop, &w->post_watcher);
  ev_unref(w->loop); /* a post is for a channel, which keeps the loop running itself */
  ev_timer_init(&w->drain_timer, sl_worker_on_drain_deadline, 0., 0.);
  ev_timer_init(&w->gen_timer, sl_worker_on_gen_timer, 0., 0.);
  /* Often enough to notice trim_idle_ms of idleness, at most once a second. */
  double every = SL_MAX(0.01, SL_MIN(1.0, alloc ? alloc->cfg.trim_idle_ms / 2000.0 : 1.0));
  ev_timer_init(&w->pool_timer, sl_worker_on_pool_timer, every, every);
  ev_timer_start(w->loop, &w->pool_timer);
  ev_unref(w->loop); /* the timer alone does not keep the loop running */
  return w;
}

void sl_worker_run(sl_worker *w) {
  w->ran = 1;
  sl_pool_bind_thread(w->pool);
  ev_run(w->loop, 0);
}

void sl_worker_request_stop(sl_worker *w) { ev_async_send(w->loop, &w->stop_watcher); }

void sl_worker_wake(sl_worker *w) { ev_async_send(w->loop, &w->wake_watcher); }

void sl_worker_close_channels(sl_worker *w, const char *reason) {
  /* Client connections first, so that theirs (in the log and the access
   * log) is the reason, and their upstreams close as "peer closed"; then
   * anything left. Closing one channel may close its peer: each pass
   * restarts from the list head. */
  for (int clients_only = 1; clients_only >= 0; clients_only--) {
    for (;;) {
      sl_channel *ch = w->channels;
      while (ch != NULL && (sl_channel_is_closed(ch) || (clients_only && !ch->mclient)))
        ch = ch->next;
      if (ch == NULL) break;
      sl_channel_close(ch, reason, 0);
    }
  }
}

uint64_t sl_worker_destroy(sl_worker *w) {
  sl_pool_bind_thread(w->pool);
  sl_buf_drain(w->pool);
  sl_pool_stats st;
  sl_pool_get_stats(w->pool, &st);
  if (st.bufs_active > 0) {
    sl_log(SL_LOG_ERROR,
           "LEAK: worker %d: %llu buffers (%llu bytes) still outstanding at exit",
           w->id, (unsigned long long)st.bufs_active,
           (unsigned long long)st.bufs_active_bytes);
  } else if (w->ran) {
    /* Buffers never cross workers: one freed by another thread shows here.
     * (A worker that never ran, after a failed start, has nothing to say.) */
    sl_log(SL_LOG_INFO,
           "worker %d: pool clean at exit (0 buffers outstanding, %llu allocated in all, "
           "%llu freed by other threads)",
           w->id, (unsigned long long)st.allocs,
           (unsigned long long)(st.remote_queued + st.remote_direct + st.remote_stacked));
  }
  for (sl_worker_msg *p = sl_worker_take_posts(w), *next; p != NULL; p = next) {
    next = p->next;
    p->fn(NULL, p);   /* never ran: its poster frees it */
  }
  pthread_mutex_destroy(&w->post_lock);
  sl_pipe_pool_trim(&w->pipes);   /* every channel is gone: every pipe is idle */
  sl_channel_spares_free(w);
  ev_loop_destroy(w->loop);
  sl_pool_destroy(w->pool);
  pthread_mutex_destroy(&w->call_lock);
  pthread_cond_destroy(&w->call_cond);
  free(w);
  return st.bufs_active;
}
