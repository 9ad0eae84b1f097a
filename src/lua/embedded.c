/*
 * The in-memory channel behind sluice.testing (Netty's EmbeddedChannel):
 * a real channel and pipeline with C and Lua stages, without a socket.
 * The busted process is its worker: its pool is the one sl_ffi_pool_open
 * made, its Lua state the one running the specs, which pops the host's
 * events itself (no C-to-Lua calls at all).
 */
#include "lua/ffi.h"

#include <ev.h>
#include <stdlib.h>
#include <string.h>

#include "alloc/pool.h"
#include "buf/buf.h"
#include "buf/leak.h"
#include "io/channel.h"
#include "io/worker.h"
#include "lua/host.h"
#include "pipeline/stages.h"
#include "util/common.h"
#include "util/log.h"

static __thread sl_worker *sl_emb_worker;

sl_lua_host *sl_ffi_embedded_host(void) {
  if (sl_emb_worker != NULL) return sl_emb_worker->lua;
  if (sl_ffi_pool_open() != 0) return NULL;
  sl_worker *w = calloc(1, sizeof(*w));
  if (w == NULL) return NULL;
  w->loop = ev_loop_new(EVFLAG_AUTO);
  w->pool = sl_pool_current();
  if (w->loop == NULL || sl_ffi_host_open(w) == NULL) {
    if (w->loop) ev_loop_destroy(w->loop);
    free(w);
    return NULL;
  }
  sl_emb_worker = w;
  return w->lua;
}

sl_channel *sl_ffi_embedded_open(const char *name, size_t low, size_t high) {
  if (sl_ffi_embedded_host() == NULL) return NULL;
  sl_channel_config cc = {.low_water_mark = low, .high_water_mark = high};
  sl_channel *ch = sl_channel_embedded(sl_emb_worker, &cc, name);
  if (ch) sl_channel_ref(ch); /* the harness's: the struct outlives a close */
  return ch;
}

double sl_ffi_embedded_add_lua(sl_channel *ch, int key, const char *name, sl_ctx **out) {
  sl_ctx *ctx = sl_lua_host_insert(ch->w->lua, &ch->pipe, &ch->pipe.tail, key, name, 0);
  *out = ctx;
  return ctx ? ctx->lua_id : 0;
}

sl_ctx *sl_ffi_embedded_add_c(sl_channel *ch, const char *name, const void *conf,
                              const char **err) {
  const sl_stage_ops *ops = sl_stage_builtin(name);
  if (ops == NULL) {
    *err = "no builtin stage of that name";
    return NULL;
  }
  if (ops->configure != NULL && conf == NULL) {
    *err = "its options were not parsed";
    return NULL;
  }
  sl_ctx *ctx = sl_stage_add(&ch->pipe, ops, ops->name, conf);
  if (ctx == NULL) *err = "out of memory";
  return ctx;
}

void sl_ffi_embedded_activate(sl_channel *ch) { sl_channel_activate(ch); }

void sl_ffi_embedded_fire(sl_channel *ch, int ev, sl_buf *b, int n, const char *text) {
  if (sl_channel_is_closed(ch)) {
    if (b) sl_buf_release(b);
    return;
  }
  sl_pipeline *p = &ch->pipe;
  switch (ev) {
    case SL_EV_READ:
      sl_buf_set_owner(b, &ch->owned);
      ch->bytes_in += sl_buf_readable(b);
      sl_pipeline_fire_read(p, b);
      break;
    case SL_EV_READ_COMPLETE: sl_pipeline_fire_read_complete(p); break;
    case SL_EV_USER_EVENT: sl_pipeline_fire_user_event(p, n); break;
    case SL_EV_ERROR: sl_pipeline_fire_error(p, text); break;
    case SL_EV_WRITE: sl_pipeline_write(p, b); break;
    case SL_EV_FLUSH: sl_pipeline_flush(p); break;
    case SL_EV_CLOSE: sl_pipeline_close(p, text); break;
    default:
      if (b) sl_buf_release(b);
      break;
  }
}

sl_buf *sl_ffi_embedded_take(sl_channel *ch) {
  sl_buf *b = sl_outq_take(&ch->outq);
  if (b) ch->bytes_out += sl_buf_readable(b);
  return b;
}

void sl_ffi_embedded_set_writable(sl_channel *ch, int on) { sl_channel_set_writable(ch, on); }

int sl_ffi_embedded_is_open(sl_channel *ch) { return !sl_channel_is_closed(ch); }

const char *sl_ffi_embedded_reason(sl_channel *ch) { return ch->reason; }

void sl_ffi_embedded_close(sl_channel *ch, const char *reason) {
  sl_channel_close(ch, reason ? reason : "closed by the test", 0);
}

void sl_ffi_embedded_owned(sl_channel *ch, uint64_t *count, uint64_t *bytes) {
  *count = ch->owned.count;
  *bytes = ch->owned.bytes;
}

size_t sl_ffi_embedded_release(sl_channel *ch, char *report, size_t size) {
  sl_log_capture(report, size);
  sl_channel_unref(ch); /* frees it: what it still owns is reported, reclaimed */
  size_t n = sl_log_captured();
  sl_log_capture(NULL, 0);
  return n;
}

void sl_ffi_embedded_shutdown(void) {
  sl_worker *w = sl_emb_worker;
  if (w == NULL) return;
  sl_emb_worker = NULL;
  sl_lua_host_destroy(w->lua);
  sl_channel_spares_free(w);
  ev_loop_destroy(w->loop);
  free(w);
}
