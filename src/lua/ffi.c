#include "lua/ffi.h"

#include <arpa/inet.h>
#include <string.h>
#include <sys/socket.h>

#include "alloc/arena.h"
#include "alloc/pool.h"
#include "buf/buf.h"
#include "buf/leak.h"
#include "io/channel.h"
#include "io/tls.h"
#include "io/worker.h"
#include "lua/host.h"
#include "pipeline/stages.h"
#include "proxy/bridge.h"
#include "util/common.h"
#include "util/log.h"

int sl_ffi_abi(void) { return SL_FFI_ABI; }

void sl_ffi_buf_finalize(sl_lbuf *h) {
  sl_buf *b = h->b;
  if (h->refs <= 0 || b == NULL) return;
  /* A handle that outlived its pool (a tool that closed the pool first)
   * points at unmapped memory: leave it. */
  sl_pool *cur = sl_pool_current();
  if (cur == NULL || (uintptr_t)b - (uintptr_t)cur->hdr_base >= SL_HDR_REGION_SPAN) return;
  if (b->gen != h->gen) return;
  const char *err = NULL;
  sl_buf *r = b->root;
  sl_pool *p = sl_pool_of(r);
  uint32_t refs = (uint32_t)h->refs;
  if (refs > r->refcnt) refs = r->refcnt;
  sl_leak_report(p, r, "its Lua handle was garbage-collected");
  p->leaks++;
  p->leaked_bytes += sl_leak_block_bytes(r);
  h->refs = 0;
  sl_buf_release_site(p, "leak detection, when its Lua handle was garbage-collected");
  sl_buf_release_n(b, refs, &err);
  sl_buf_release_site(p, NULL);
}

void sl_ffi_buf_touch(sl_buf *b, const char *hint) { sl_leak_touch(b, hint, 0); }

void sl_ffi_buf_set_site(sl_buf *b, const char *site) { sl_leak_set_site(b, site); }

int sl_ffi_leak_level(void) {
  sl_pool *p = sl_pool_current();
  return p ? p->leak_level : -1;
}

int sl_ffi_buf_outstanding(sl_ctx *ctx, uint64_t *count, uint64_t *bytes) {
  if (ctx != NULL) {
    sl_channel *ch = sl_ctx_channel(ctx);
    *count = ch->owned.count;
    *bytes = ch->owned.bytes;
    return 0;
  }
  sl_pool *p = sl_pool_current();
  if (p == NULL) return -1;
  sl_pool_stats st;
  sl_pool_get_stats(p, &st);
  *count = st.blocks_in_use;
  *bytes = st.bytes_in_use;
  return 0;
}

int sl_ffi_buf_retain(sl_buf *b, uint32_t n, const char **err) { return sl_buf_retain_n(b, n, err); }

int sl_ffi_buf_release(sl_buf *b, uint32_t n, const char **err) {
  return sl_buf_release_n(b, n, err);
}

int sl_ffi_buf_release_by(sl_buf *b, uint32_t n, sl_ctx *by, const char *where,
                          const char **err) {
  sl_pool *p = sl_pool_of(b->root);
  const char *site = NULL;
  if (where != NULL) {
    /* A ring of recent sites: enough for the errors that follow soon. */
    char *slot = p->release_ring[p->release_ring_next++ % 64];
    snprintf(slot, sizeof(p->release_ring[0]), "stage %s at %s", by ? by->name : "?", where);
    site = slot;
  } else if (by != NULL) {
    site = by->name;   /* the config keeps stage names for the process's life */
  } else {
    site = "Lua code outside a stage";
  }
  sl_buf_release_site(p, site);
  sl_pool_quarantine_next(p, 1);   /* a script may use its handle again by mistake */
  int rc = sl_buf_release_n(b, n, err);
  sl_pool_quarantine_next(p, 0);
  sl_buf_release_site(p, NULL);
  return rc;
}

const char *sl_ffi_buf_released_by(sl_buf *b, uint32_t gen) { return sl_buf_released_by(b, gen); }

sl_buf *sl_ffi_ctx_alloc(sl_ctx *ctx, size_t cap, size_t max_cap) {
  sl_channel *ch = sl_ctx_channel(ctx);
  sl_buf *b = sl_buf_alloc(ch->w->pool, cap, max_cap);
  if (b) sl_buf_set_owner(b, &ch->owned);
  return b;
}

sl_buf *sl_ffi_ctx_from(sl_ctx *ctx, const char *src, size_t len) {
  sl_channel *ch = sl_ctx_channel(ctx);
  sl_buf *b = sl_buf_from(ch->w->pool, src, len);
  if (b) sl_buf_set_owner(b, &ch->owned);
  return b;
}

double sl_ffi_ctx_next(sl_ctx *ctx, int ev) {
  if (ev < 0 || ev >= SL_EV_COUNT) return 0;
  return sl_ctx_next_handler(ctx, (sl_event)ev)->lua_id;
}

void sl_ffi_ctx_fire_read(sl_ctx *ctx, sl_buf *b) { sl_ctx_fire_read(ctx, b); }

void sl_ffi_ctx_write(sl_ctx *ctx, sl_buf *b) { sl_ctx_write(ctx, b); }

void sl_ffi_ctx_write_p(sl_ctx *ctx, sl_buf *b, uint32_t pid) {
  sl_channel *ch = sl_ctx_channel(ctx);
  uint64_t mark = sl_channel_promise_mark(ch);
  sl_ctx_write(ctx, b);
  sl_channel_promise_attach(ch, mark, pid);
}

void sl_ffi_ctx_fire(sl_ctx *ctx, int ev, int n) {
  switch (ev) {
    case SL_EV_ACTIVE: sl_ctx_fire_active(ctx); break;
    case SL_EV_INACTIVE: sl_ctx_fire_inactive(ctx); break;
    case SL_EV_READ_COMPLETE: sl_ctx_fire_read_complete(ctx); break;
    case SL_EV_WRITABILITY: sl_ctx_fire_writability(ctx, n); break;
    case SL_EV_USER_EVENT: sl_ctx_fire_user_event(ctx, n); break;
    case SL_EV_FLUSH: sl_ctx_flush(ctx); break;
    case SL_EV_READ_REQUEST: sl_ctx_read(ctx); break;
    default: break;
  }
}

void sl_ffi_ctx_fire_text(sl_ctx *ctx, int ev, const char *text) {
  /* The text becomes a close reason, which the log writes on one line (and
   * keeps to 159 bytes): a control character from a stage must not start a
   * line of its own that reads as another record. */
  char line[160];
  size_t n = 0;
  for (; text[n] != '\0' && n < sizeof(line) - 1; n++) {
    unsigned char c = (unsigned char)text[n];
    line[n] = c < 0x20 || c == 0x7f ? ' ' : (char)c;
  }
  line[n] = '\0';
  if (ev == SL_EV_ERROR) sl_ctx_fire_error(ctx, line);
  else if (ev == SL_EV_CLOSE) sl_ctx_close(ctx, line);
}

int sl_ffi_ctx_is_writable(sl_ctx *ctx) { return sl_channel_is_writable(sl_ctx_channel(ctx)); }

void sl_ffi_ctx_set_autoread(sl_ctx *ctx, int on) {
  sl_channel_set_autoread(sl_ctx_channel(ctx), on);
}

const char *sl_ffi_ctx_describe(sl_ctx *ctx) { return sl_channel_describe(sl_ctx_channel(ctx)); }

int sl_ffi_ctx_connect(sl_ctx *ctx, const char *target, const char **err) {
  return sl_bridge_connect(sl_ctx_channel(ctx), target, err) == SL_OK ? 0 : -1;
}

_Static_assert(SL_SC_MAX_CLASSES <= 80, "sl_ffi_pool_stats holds 80 classes");

int sl_ffi_pool_stats_get(sl_ffi_pool_stats *o) {
  sl_pool *p = sl_pool_current();
  if (p == NULL) return -1;
  sl_pool_stats st;
  sl_arena_stats as;
  sl_pool_get_stats(p, &st);
  sl_arena_get_stats(p->arena, &as);
  memset(o, 0, sizeof(*o));
  o->bytes_in_use = st.bytes_in_use;
  o->blocks_in_use = st.blocks_in_use;
  o->allocs = st.allocs;
  o->frees = st.frees;
  o->alloc_failures = st.alloc_failures;
  o->cache_hits = st.cache_hits;
  o->cache_misses = st.cache_misses;
  o->cached_blocks = st.cached_blocks;
  o->cached_bytes = st.cached_bytes;
  o->trims = st.trims;
  o->idle_trims = st.idle_trims;
  o->headers_total = st.headers_total;
  o->headers_free = st.headers_free;
  o->recycler_size = st.recycler_size;
  o->recycler_cap = st.recycler_cap;
  o->recycler_overflows = st.recycler_overflows;
  o->region_resets = st.region_resets;
  o->remote_queued = st.remote_queued;
  o->remote_direct = st.remote_direct;
  o->return_queue_cap = st.return_queue_cap;
  o->reserved_bytes = atomic_load(&p->alloc->reserved);
  o->chunks = as.chunks;
  o->chunks_created = as.chunks_created;
  o->chunks_released = as.chunks_released;
  o->chunk_bytes = as.chunk_bytes;
  o->chunk_used_bytes = as.used_bytes;
  o->huge_allocs = as.huge_allocs;
  o->huge_frees = as.huge_frees;
  o->huge_bytes = as.huge_bytes;
  o->nclasses = as.nclasses;
  for (unsigned i = 0; i < as.nclasses; i++) {
    o->class_size[i] = sl_sc_size(i);
    o->class_allocs[i] = sl_pool_class_allocs(p, i);
    o->class_frees[i] = sl_pool_class_frees(p, i) + sl_pool_class_frees_direct(p, i);
    o->arena_allocs[i] = as.cls[i].allocs;
    o->arena_frees[i] = as.cls[i].frees;
  }
  o->leaks = p->leaks;
  o->leaked_bytes = p->leaked_bytes;
  o->leak_recorded = p->leak_recorded;
  o->leak_level = p->leak_level;
  o->leak_sample = (int32_t)p->leak_sample;
  o->arena = p->arena->id;
  o->unpooled = p->alloc->cfg.type == SL_ALLOC_UNPOOLED;
  return 0;
}

sl_buf *sl_ffi_pool_alloc(size_t cap, size_t max_cap) {
  sl_pool *p = sl_pool_current();
  return p ? sl_buf_alloc(p, cap, max_cap) : NULL;
}

sl_buf *sl_ffi_pool_from(const char *src, size_t len) {
  sl_pool *p = sl_pool_current();
  return p ? sl_buf_from(p, src, len) : NULL;
}

int sl_ffi_pool_open(void) {
  if (sl_pool_current() != NULL) return 0;
  return sl_pool_create(NULL, 0) != NULL ? 0 : -1;
}

uint64_t sl_ffi_pool_close(void) {
  sl_pool *p = sl_pool_current();
  if (p == NULL) return 0;
  sl_ffi_embedded_shutdown(); /* sluice.testing's worker lives on this pool */
  sl_buf_drain(p);
  sl_pool_stats st;
  sl_pool_get_stats(p, &st);
  sl_pool_destroy(p);
  return st.blocks_in_use;
}

void sl_ffi_log(int level, const char *msg) {
  if (level < SL_LOG_DEBUG) level = SL_LOG_DEBUG;
  if (level > SL_LOG_ERROR) level = SL_LOG_ERROR;
  sl_log_text((sl_log_level)level, msg);
}

int sl_ffi_log_enabled(int level) { return sl_log_enabled((sl_log_level)level); }

sl_opts *sl_ffi_opts_new(void) { return sl_opts_new(); }

void sl_ffi_opts_free(sl_opts *o) { sl_opts_free(o); }

int sl_ffi_opts_add(sl_opts *o, const char *key, int type, double num, const char *s, size_t len) {
  switch (type) {
    case 0: return sl_opts_list_push(o, key, s, len);
    case SL_OPT_NUMBER: return sl_opts_add_number(o, key, num);
    case SL_OPT_STRING: return sl_opts_add_string(o, key, s, len);
    case SL_OPT_BOOLEAN: return sl_opts_add_boolean(o, key, num != 0);
    case SL_OPT_LIST: return sl_opts_add_list(o, key);
    case SL_OPT_TABLE: return sl_opts_add_table(o, key);
    default: return SL_ERROR;
  }
}

int sl_ffi_stage_configure(const char *module, const sl_opts *o, void **conf, char *err,
                           size_t errlen) {
  const sl_stage_ops *ops = sl_stage_builtin(module);
  *conf = NULL;
  if (ops == NULL) {
    snprintf(err, errlen, "no C stage named \"%s\"", module);
    return SL_ERROR;
  }
  return sl_stage_configure(ops, o, conf, err, errlen);
}

void sl_ffi_stage_unconfigure(const char *module, void *conf) {
  const sl_stage_ops *ops = sl_stage_builtin(module);
  if (ops != NULL) sl_stage_unconfigure(ops, conf);
}

/* ---- running pipelines ---- */

double sl_ffi_ctx_insert_lua(sl_ctx *ctx, int after, int key, const char *name, sl_ctx **out) {
  sl_ctx *n = sl_lua_host_insert(sl_ctx_channel(ctx)->w->lua, ctx->pipe, after ? ctx->next : ctx,
                                 key, name, 0);
  *out = n;
  return n ? n->lua_id : 0;
}

sl_ctx *sl_ffi_ctx_insert_c(sl_ctx *ctx, int after, const char *name, const void *conf,
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
  sl_ctx *n = sl_stage_insert(ctx->pipe, after ? ctx->next : ctx, ops, ops->name, conf);
  if (n == NULL) *err = "out of memory";
  return n;
}

void sl_ffi_ctx_remove(sl_ctx *ctx) { sl_pipeline_remove(ctx); }

int sl_ffi_ctx_stages(sl_ctx *ctx, const char **names, sl_ctx **ctxs, int max) {
  int n = 0;
  sl_pipeline *p = ctx->pipe;
  for (sl_ctx *c = p->head.next; c != &p->tail; c = c->next, n++) {
    if (n < max) {
      names[n] = c->name;
      ctxs[n] = c;
    }
  }
  return n;
}

const char *sl_ffi_ctx_address(sl_ctx *ctx, int remote) {
  static __thread char text[INET6_ADDRSTRLEN + 8];
  sl_channel *ch = sl_ctx_channel(ctx);
  text[0] = '\0';
  if (remote) {
    if (ch->remote.len > 0) sl_addr_format((const struct sockaddr *)&ch->remote.ss, text, sizeof(text));
  } else if (ch->fd >= 0) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    if (getsockname(ch->fd, (struct sockaddr *)&ss, &len) == 0)
      sl_addr_format((const struct sockaddr *)&ss, text, sizeof(text));
  }
  return text;
}

const char *sl_ffi_ctx_tls_version(sl_ctx *ctx) {
  return sl_channel_tls_version(sl_ctx_channel(ctx));
}

const char *sl_ffi_ctx_tls_server_name(sl_ctx *ctx) {
  return sl_tls_server_name(sl_ctx_channel(ctx)->ssl);
}

const char *sl_ffi_ctx_tls_peer_subject(sl_ctx *ctx) {
  return sl_tls_peer_subject(sl_ctx_channel(ctx)->ssl);
}

double sl_ffi_ctx_now(sl_ctx *ctx) { return ev_now(sl_ctx_channel(ctx)->w->loop) * 1000.0; }

int sl_ffi_ctx_is_open(sl_ctx *ctx) { return !sl_channel_is_closed(sl_ctx_channel(ctx)); }

void sl_ffi_ctx_unhandled(sl_ctx *ctx) { sl_channel_note_unhandled(sl_ctx_channel(ctx)); }
