#include "lua/host.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>
#include <stdlib.h>
#include <string.h>

#include "buf/buf.h"
#include "io/channel.h"
#include "io/worker.h"
#include "proxy/config.h"
#include "util/common.h"
#include "util/log.h"

/* Event codes beyond sl_event, known to lua/sluice/host.lua. */
#define SL_LEV_ADDED 100
#define SL_LEV_REMOVED 101

typedef struct sl_lua_pending {
  sl_ctx *ctx;      /* its channel is referenced until delivery */
  int ev;
  void *ptr;        /* a buffer for READ and WRITE (owned by the entry) */
  int n;
  char *str;        /* ERROR and CLOSE text, malloc'd */
} sl_lua_pending;

struct sl_lua_host {
  lua_State *L;
  struct sl_worker *w;
  int dispatch_ref;       /* registry: sluice.host.dispatch */
  int traceback_ref;      /* registry: debug.traceback */
  int depth;              /* > 0 while Lua runs */
  sl_lua_pending *q;      /* ring of deferred events */
  size_t qhead, qlen, qcap;
  double next_id;
  uint32_t *masks;        /* per loaded stage key: events it handles */
  int nstages;            /* highest key loaded */
  int load_ref;           /* registry: sluice.host.load_stage */
  int unload_ref;         /* registry: sluice.host.unload_stage */
  int loaded_any;         /* a configuration's stages were loaded before */
};

static sl_lua_host *sl_lua_host_of(const sl_ctx *ctx) { return sl_ctx_channel(ctx)->w->lua; }

/* ---- dispatch ---- */

static void sl_lua_run(sl_lua_host *h, sl_ctx *ctx, int ev, void *ptr, int n, const char *str) {
  lua_State *L = h->L;
  sl_channel *ch = sl_ctx_channel(ctx);
  sl_channel_ref(ch);
  h->depth++;
  /* The dispatcher catches stage errors itself (with a traceback); this
   * pcall only contains a failure of the dispatcher (out of Lua memory).
   * Only the arguments the event uses are pushed: dispatch(ev, id, ptr, n, str). */
  lua_rawgeti(L, LUA_REGISTRYINDEX, h->dispatch_ref);
  lua_pushinteger(L, ev);
  lua_pushnumber(L, ctx->lua_id);
  int nargs = 2;
  if (ptr || n || str) {
    /* Pointers go as numbers: LuaJIT compiles casting a number to a pointer,
     * not a lightuserdata (user-space addresses are exact in a double). */
    if (ptr) lua_pushnumber(L, (lua_Number)(uintptr_t)ptr);
    else lua_pushnil(L);
    nargs = 3;
    if (n || str) {
      lua_pushinteger(L, n);
      nargs = 4;
      if (str) {
        lua_pushstring(L, str);
        nargs = 5;
      }
    }
  }
  if (lua_pcall(L, nargs, 0, 0) != 0) {
    /* The dispatcher catches stage errors itself; this is the host failing
     * (out of memory in Lua). Contain it to this connection. */
    sl_log(SL_LOG_ERROR, "%s: Lua dispatch failed: %s", sl_channel_describe(ch),
           lua_tostring(L, -1));
    lua_pop(L, 1);
    sl_channel_close(ch, "Lua dispatch failed", 1);
  }
  h->depth--;
  sl_channel_unref(ch);
}

static int sl_lua_enqueue(sl_lua_host *h, sl_ctx *ctx, int ev, void *ptr, int n, const char *str) {
  if (h->qlen == h->qcap) {
    size_t cap = h->qcap ? h->qcap * 2 : 16;
    sl_lua_pending *q = malloc(sizeof(*q) * cap);
    if (q == NULL) return SL_ERROR;
    for (size_t i = 0; i < h->qlen; i++) q[i] = h->q[(h->qhead + i) % h->qcap];
    free(h->q);
    h->q = q;
    h->qcap = cap;
    h->qhead = 0;
  }
  sl_lua_pending *e = &h->q[(h->qhead + h->qlen) % h->qcap];
  e->ctx = ctx;
  e->ev = ev;
  e->ptr = ptr;
  e->n = n;
  e->str = str ? strdup(str) : NULL;
  h->qlen++;
  sl_channel_ref(sl_ctx_channel(ctx));
  return SL_OK;
}

static void sl_lua_drain(sl_lua_host *h) {
  while (h->qlen > 0) {
    sl_lua_pending e = h->q[h->qhead];
    h->qhead = (h->qhead + 1) % h->qcap;
    h->qlen--;
    sl_lua_run(h, e.ctx, e.ev, e.ptr, e.n, e.str);
    free(e.str);
    sl_channel_unref(sl_ctx_channel(e.ctx));
  }
}

static void sl_lua_call(sl_ctx *ctx, int ev, void *ptr, int n, const char *str) {
  sl_lua_host *h = sl_lua_host_of(ctx);
  if (h->depth > 0) {
    if (sl_lua_enqueue(h, ctx, ev, ptr, n, str) != SL_OK) {
      if (ptr && (ev == SL_EV_READ || ev == SL_EV_WRITE)) sl_buf_release(ptr);
      sl_channel_close(sl_ctx_channel(ctx), "out of memory queueing a Lua event", 1);
    }
    return;
  }
  sl_lua_run(h, ctx, ev, ptr, n, str);
  sl_lua_drain(h);
}

/* ---- the Lua stage vtable ---- */

static void sl_lua_on_active(sl_ctx *ctx) { sl_lua_call(ctx, SL_EV_ACTIVE, NULL, 0, NULL); }
static void sl_lua_on_inactive(sl_ctx *ctx) { sl_lua_call(ctx, SL_EV_INACTIVE, NULL, 0, NULL); }
static void sl_lua_on_read(sl_ctx *ctx, sl_buf *b) { sl_lua_call(ctx, SL_EV_READ, b, 0, NULL); }
static void sl_lua_on_read_complete(sl_ctx *ctx) {
  sl_lua_call(ctx, SL_EV_READ_COMPLETE, NULL, 0, NULL);
}
static void sl_lua_on_writability(sl_ctx *ctx, int w) {
  sl_lua_call(ctx, SL_EV_WRITABILITY, NULL, w, NULL);
}
static void sl_lua_on_user_event(sl_ctx *ctx, int e) {
  sl_lua_call(ctx, SL_EV_USER_EVENT, NULL, e, NULL);
}
static void sl_lua_on_error(sl_ctx *ctx, const char *err) {
  sl_lua_call(ctx, SL_EV_ERROR, NULL, 0, err);
}
static void sl_lua_write(sl_ctx *ctx, sl_buf *b) { sl_lua_call(ctx, SL_EV_WRITE, b, 0, NULL); }
static void sl_lua_flush(sl_ctx *ctx) { sl_lua_call(ctx, SL_EV_FLUSH, NULL, 0, NULL); }
static void sl_lua_close(sl_ctx *ctx, const char *reason) {
  sl_lua_call(ctx, SL_EV_CLOSE, NULL, 0, reason);
}
static void sl_lua_on_removed(sl_ctx *ctx) { sl_lua_call(ctx, SL_LEV_REMOVED, NULL, 0, NULL); }

static const sl_stage_ops sl_lua_stage_ops = {
    .name = "lua",
    .on_active = sl_lua_on_active,
    .on_inactive = sl_lua_on_inactive,
    .on_read = sl_lua_on_read,
    .on_read_complete = sl_lua_on_read_complete,
    .on_writability = sl_lua_on_writability,
    .on_user_event = sl_lua_on_user_event,
    .on_error = sl_lua_on_error,
    .write = sl_lua_write,
    .flush = sl_lua_flush,
    .close = sl_lua_close,
    .on_removed = sl_lua_on_removed,
};

sl_ctx *sl_lua_host_add_stage(sl_lua_host *h, sl_pipeline *p, const sl_stage_spec *spec) {
  SL_ASSERT(spec->lua_key > 0 && spec->lua_key <= h->nstages, "unknown Lua stage key");
  sl_ctx *ctx = sl_pipeline_add_last(p, &sl_lua_stage_ops, spec->module);
  if (ctx == NULL) return NULL;
  ctx->lua_stage = spec->lua_key;
  ctx->mask = h->masks[spec->lua_key - 1];
  ctx->lua_id = ++h->next_id;
  sl_lua_call(ctx, SL_LEV_ADDED, ctx, spec->lua_key, NULL);
  return ctx;
}

/* ---- state set-up ---- */

/* Copies the plain-data value at index idx of `from` onto the top of `to`. */
static int sl_lua_copy(lua_State *from, int idx, lua_State *to, int depth, const char **err) {
  if (depth > 32) {
    *err = "options nest too deep";
    return SL_ERROR;
  }
  idx = idx < 0 ? lua_gettop(from) + idx + 1 : idx;
  switch (lua_type(from, idx)) {
    case LUA_TNIL: lua_pushnil(to); return SL_OK;
    case LUA_TBOOLEAN: lua_pushboolean(to, lua_toboolean(from, idx)); return SL_OK;
    case LUA_TNUMBER: lua_pushnumber(to, lua_tonumber(from, idx)); return SL_OK;
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(from, idx, &len);
      lua_pushlstring(to, s, len);
      return SL_OK;
    }
    case LUA_TTABLE:
      lua_newtable(to);
      lua_pushnil(from);
      while (lua_next(from, idx) != 0) {
        if (sl_lua_copy(from, -2, to, depth + 1, err) != SL_OK ||
            sl_lua_copy(from, -1, to, depth + 1, err) != SL_OK) {
          lua_pop(from, 2);
          return SL_ERROR;
        }
        lua_rawset(to, -3);
        lua_pop(from, 1);
      }
      return SL_OK;
    default:
      *err = "stage options must be plain data (strings, numbers, booleans, tables)";
      return SL_ERROR;
  }
}

static int sl_lua_load_stage(sl_lua_host *h, int load_ref, const sl_config *cfg,
                             const sl_stage_spec *spec, char *err, size_t errlen) {
  lua_State *L = h->L;
  const char *cerr = NULL;
  lua_rawgeti(L, LUA_REGISTRYINDEX, h->traceback_ref);
  lua_rawgeti(L, LUA_REGISTRYINDEX, load_ref);
  lua_pushstring(L, spec->module);
  lua_pushstring(L, spec->file);
  lua_rawgeti(cfg->L, LUA_REGISTRYINDEX, spec->options_ref);
  int rc = sl_lua_copy(cfg->L, -1, L, 0, &cerr);
  lua_pop(cfg->L, 1);
  if (rc != SL_OK) {
    snprintf(err, errlen, "stage %s: %s", spec->module, cerr);
    lua_settop(L, 0);
    return SL_ERROR;
  }
  lua_pushinteger(L, spec->lua_key);
  if (lua_pcall(L, 4, 2, -6) != 0) {
    snprintf(err, errlen, "stage %s: %s", spec->module, lua_tostring(L, -1));
    lua_settop(L, 0);
    return SL_ERROR;
  }
  int key = (int)lua_tointeger(L, -2);
  uint32_t mask = (uint32_t)lua_tointeger(L, -1);
  lua_settop(L, 0);
  SL_ASSERT(key == spec->lua_key, "Lua stage keys out of step with the config");
  h->masks[key - 1] = mask;
  return SL_OK;
}

sl_lua_host *sl_lua_host_create(struct sl_worker *w, const sl_config *cfg, char *err,
                                size_t errlen) {
  sl_lua_host *h = calloc(1, sizeof(*h));
  if (h == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  h->w = w;
  h->masks = calloc(1, sizeof(uint32_t));
  h->L = luaL_newstate();
  if (h->L == NULL || h->masks == NULL) {
    snprintf(err, errlen, "out of memory");
    sl_lua_host_destroy(h);
    return NULL;
  }
  lua_State *L = h->L;
  luaL_openlibs(L);
  lua_getglobal(L, "package");
  lua_pushstring(L, cfg->search_path);
  lua_setfield(L, -2, "path");
  lua_pop(L, 1);
  lua_getglobal(L, "debug");
  lua_getfield(L, -1, "traceback");
  h->traceback_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, 1);

  lua_getglobal(L, "require");
  lua_pushstring(L, "sluice.host");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    snprintf(err, errlen, "loading sluice.host: %s", lua_tostring(L, -1));
    sl_lua_host_destroy(h);
    return NULL;
  }
  lua_getfield(L, -1, "dispatch");
  h->dispatch_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_getfield(L, -1, "load_stage");
  h->load_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_getfield(L, -1, "unload_stage");
  h->unload_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_getfield(L, -1, "init");
  lua_pushinteger(L, w->id);
  lua_call(L, 1, 0);
  lua_settop(L, 0);
  h->loaded_any = 0;
  if (sl_lua_host_load(h, cfg, err, errlen) != SL_OK) {
    sl_lua_host_destroy(h);
    return NULL;
  }
  return h;
}

int sl_lua_host_load(sl_lua_host *h, const sl_config *cfg, char *err, size_t errlen) {
  lua_State *L = h->L;
  int last = cfg->lua_key_first + cfg->nlua_stages - 1;
  if (last > h->nstages) {
    uint32_t *m = realloc(h->masks, ((size_t)last + 1) * sizeof(uint32_t));
    if (m == NULL) {
      snprintf(err, errlen, "out of memory");
      return SL_ERROR;
    }
    memset(m + h->nstages, 0, ((size_t)last + 1 - (size_t)h->nstages) * sizeof(uint32_t));
    h->masks = m;
    h->nstages = last;
  }
  /* A later configuration runs its stage modules anew: connections that
   * are still open keep the tables of the earlier run. */
  if (h->loaded_any) {
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    for (size_t i = 0; i < cfg->nlisteners; i++) {
      const sl_listener_cfg *lc = &cfg->listeners[i];
      for (size_t j = 0; j < lc->nstages; j++) {
        if (lc->stages[j].ops != NULL) continue;
        lua_pushnil(L);
        lua_setfield(L, -2, lc->stages[j].module);
      }
    }
    lua_settop(L, 0);
  }
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const sl_listener_cfg *lc = &cfg->listeners[i];
    for (size_t j = 0; j < lc->nstages; j++) {
      if (lc->stages[j].ops != NULL) continue;
      if (sl_lua_load_stage(h, h->load_ref, cfg, &lc->stages[j], err, errlen) != SL_OK) {
        sl_lua_host_unload(h, cfg->lua_key_first, cfg->nlua_stages);
        return SL_ERROR;
      }
    }
  }
  h->loaded_any = 1;
  return SL_OK;
}

void sl_lua_host_unload(sl_lua_host *h, int first, int n) {
  lua_State *L = h->L;
  for (int key = first; key < first + n && key <= h->nstages; key++) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->unload_ref);
    lua_pushinteger(L, key);
    if (lua_pcall(L, 1, 0, 0) != 0) lua_pop(L, 1);
    h->masks[key - 1] = 0;
  }
}

void sl_lua_host_destroy(sl_lua_host *h) {
  if (h == NULL) return;
  SL_ASSERT(h->qlen == 0, "Lua host destroyed with events pending");
  if (h->L) lua_close(h->L);
  free(h->q);
  free(h->masks);
  free(h);
}

