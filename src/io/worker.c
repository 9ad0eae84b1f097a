#include "io/worker.h"

#include <stdlib.h>

#include "alloc/pool.h"
#include "alloc/arena.h"
#include "buf/buf.h"
#include "io/channel.h"
#include "util/common.h"
#include "util/log.h"

static void sl_worker_on_stop(struct ev_loop *loop, ev_async *a, int revents) {
  SL_UNUSED(revents);
  sl_worker *w = SL_CONTAINER_OF(a, sl_worker, stop_watcher);
  w->stopping = 1;
  ev_async_stop(loop, a);
  ev_ref(loop);
  ev_timer_stop(loop, &w->pool_timer);
  if (w->on_stop) w->on_stop(w);
  sl_worker_close_channels(w, "shutdown");
  /* The loop ends by itself once no watcher is left. */
}

static void sl_worker_on_pool_timer(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(revents);
  sl_worker *w = SL_CONTAINER_OF(t, sl_worker, pool_timer);
  sl_buf_drain(w->pool);
  SL_UNUSED(loop);
  sl_pool_trim_report r;
  if (sl_pool_tick(w->pool, sl_alloc_now_ms(), &r)) {
    sl_log(SL_LOG_INFO,
           "worker %d: pool idle: gave back %llu cached blocks, %u chunks%s; %zu bytes mapped now",
           w->id, (unsigned long long)r.blocks, r.chunks, r.headers ? ", header memory" : "",
           (size_t)atomic_load(&w->pool->alloc->reserved));
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
  ev_async_init(&w->stop_watcher, sl_worker_on_stop);
  ev_async_start(w->loop, &w->stop_watcher);
  /* Often enough to notice trim_idle_ms of idleness, at most once a second. */
  double every = SL_MAX(0.01, SL_MIN(1.0, alloc ? alloc->cfg.trim_idle_ms / 2000.0 : 1.0));
  ev_timer_init(&w->pool_timer, sl_worker_on_pool_timer, every, every);
  ev_timer_start(w->loop, &w->pool_timer);
  ev_unref(w->loop); /* the timer alone does not keep the loop running */
  return w;
}

void sl_worker_run(sl_worker *w) {
  sl_pool_bind_thread(w->pool);
  ev_run(w->loop, 0);
}

void sl_worker_request_stop(sl_worker *w) { ev_async_send(w->loop, &w->stop_watcher); }

void sl_worker_close_channels(sl_worker *w, const char *reason) {
  /* Closing one channel may close its peer: restart from the list head. */
  for (;;) {
    sl_channel *ch = w->channels;
    while (ch != NULL && sl_channel_is_closed(ch)) ch = ch->next;
    if (ch == NULL) break;
    sl_channel_close(ch, reason, 0);
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
  } else {
    sl_log(SL_LOG_INFO, "worker %d: pool clean at exit (0 buffers outstanding, %llu allocated in all)",
           w->id, (unsigned long long)st.allocs);
  }
  ev_loop_destroy(w->loop);
  sl_pool_destroy(w->pool);
  free(w);
  return st.bufs_active;
}
