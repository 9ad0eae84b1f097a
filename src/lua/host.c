#include "lua/host.h"

#include <lauxlib.h>
#include <lua.h>
#include <errno.h>
#include <lualib.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "alloc/pool.h"
#include "buf/buf.h"
#include "io/channel.h"
#include "io/worker.h"
#include "lua/ffi.h"
#include "proxy/config.h"
#include "util/common.h"
#include "util/log.h"

/* Event codes beyond sl_event, known to lua/sluice/host.lua. */
#define SL_LEV_ADDED 100
#define SL_LEV_REMOVED 101
/* In a stage's mask from host.lua (never in a context's): it has an added callback. */
#define SL_LUA_HAS_ADDED 0x40000000u
#define SL_LEV_PROMISE 102
#define SL_LEV_TIMER 103

struct sl_lua_host {
  lua_State *L;           /* NULL: the Lua side drives the queue (sluice.testing) */
  struct sl_worker *w;
  int run_ref;            /* registry: sluice.host.run */
  int failed_ref;         /* registry: sluice.host.failed */
  int traceback_ref;      /* registry: debug.traceback */
  int depth;              /* > 0 while Lua drains the queue */
  uint64_t entries;       /* transitions from C into Lua */
  int deferred;           /* events wait for an explicit drain (no loop) */
  int hold;               /* > 0: a read loop is running; drain at its end */
  sl_lua_event *q;        /* ring of pending events */
  size_t qhead, qlen, qcap;
  sl_lua_event cur;       /* the event Lua is handling (its channel referenced) */
  int has_cur;
  double next_id;
  uint32_t *masks;        /* per loaded stage key: events it handles */
  int nstages;            /* highest configuration key loaded */
  int load_ref;           /* registry: sluice.host.load_stage */
  int unload_ref;         /* registry: sluice.host.unload_stage */
  int loaded_any;         /* a configuration's stages were loaded before */
  uint32_t *adhoc;        /* stages added while running: key SL_LUA_ADHOC_KEY + i */
  int nadhoc, capadhoc;
  ev_timer timer;         /* the earliest Lua timer (keeps no loop running) */
  int timer_unref;        /* timer was started and the loop unreferenced for it */
  lua_Alloc base_alloc;   /* the state's own allocator, behind sl_lua_alloc */
  void *base_ud;
  size_t heap;            /* bytes the state's allocator holds now */
  size_t heap_limit;      /* lua_memory_limit; 0: none */
  size_t heap_gc_mark;    /* a drain that ends above it runs a full collection */
  uint64_t heap_refusals; /* stages stopped at the limit, allocations refused at twice it */
  int32_t heap_over;      /* 1: the heap grew past the limit since sluice.host last looked */
  /* lua_timeout_ms. The worker writes step and depth, the watchdog (another
   * thread) reads them: relaxed atomics (SL_LUA_BUMP), plain moves on x86. */
  uint64_t step;          /* + 1 at each entry into Lua and each event it pops */
  uint64_t int_step;      /* the step the watchdog asked to interrupt */
  uint64_t raised_step;   /* the step after the hook's last raise */
  volatile sig_atomic_t hooked; /* the timeout hook is set (by the signal handler) */
  int timeout_ms;         /* lua_timeout_ms, for the error text */
  uint64_t timeouts;      /* callbacks stopped by lua_timeout_ms */
  char lib[256];          /* source prefix of sluice's own Lua library ("@.../sluice/") */
  size_t nlib;
  char where[128];        /* stage and callback the interrupt found (signal handler) */
  uint64_t where_step;    /* the step where[] is for (release store) */
};

/* Written by the worker's thread only, read by the watchdog's. */
#define SL_LUA_BUMP(p, d) \
  __atomic_store_n((p), __atomic_load_n((p), __ATOMIC_RELAXED) + (d), __ATOMIC_RELAXED)

static sl_lua_host *sl_lua_host_of(const sl_ctx *ctx) { return sl_ctx_channel(ctx)->w->lua; }

/* ---- the Lua heap ---- */

/* The worker state's allocator once it has a limit: LuaJIT's own
 * (luaL_newstate's), wrapped to count its bytes. lua_memory_limit is kept between events, not here:
 * growing past it only raises heap_over, and sluice.host, once the event
 * is done, collects in full and stops the stage whose event it was if the
 * heap is still above the limit. A refusal inside LuaJIT is not safe: the
 * collector allocates too (the finalizer table, the string table), also
 * in a step run at a JIT trace's exit, where an error crashes the process.
 * Only growth past twice the limit is refused, which raises "not enough
 * memory" in whatever runs (a stage's callback: that connection closes).
 * Shrinking and freeing never fail (Lua relies on it). */
static void *sl_lua_alloc(void *ud, void *p, size_t osize, size_t nsize) {
  sl_lua_host *h = ud;
  if (p == NULL) osize = 0;
  if (h->heap_limit != 0 && nsize > osize && h->heap - osize + nsize > h->heap_limit) {
    if (h->heap - osize + nsize - h->heap_limit > h->heap_limit) {
      h->heap_refusals++;
      return NULL;
    }
    h->heap_over = 1;
  }
  void *q = h->base_alloc(h->base_ud, p, osize, nsize);
  if (q != NULL || nsize == 0) h->heap = h->heap - osize + nsize;
  return q;
}

/* Puts sl_lua_alloc in front of L's allocator; the heap so far is what
 * the collector counts. */
static void sl_lua_alloc_wrap(sl_lua_host *h, lua_State *L) {
  h->base_alloc = lua_getallocf(L, &h->base_ud);
  h->heap = (size_t)lua_gc(L, LUA_GCCOUNT, 0) * 1024 + (size_t)lua_gc(L, LUA_GCCOUNTB, 0);
  lua_setallocf(L, sl_lua_alloc, h);
}

/* With a limit, garbage should rarely be what reaches it: a drain that
 * ends above three quarters of the limit collects in full, and not again
 * until the heap has grown by an eighth of the limit (or after a refusal,
 * or once a stage stopped for memory has left: sl_ffi_host_collect). */
static void sl_lua_heap_check(sl_lua_host *h) {
  if (h->heap_limit == 0 || h->heap <= h->heap_gc_mark) return;
  lua_gc(h->L, LUA_GCCOLLECT, 0);
  size_t floor = h->heap_limit / 4 * 3;
  h->heap_gc_mark = SL_MAX(floor, h->heap + h->heap_limit / 8);
}

void sl_lua_host_set_memory_limit(sl_lua_host *h, size_t limit) {
  if (h == NULL) return;
  /* Counted from the first limit on (a state without one pays nothing). */
  if (limit != 0 && h->L != NULL && h->base_alloc == NULL) sl_lua_alloc_wrap(h, h->L);
  h->heap_limit = limit;
  h->heap_gc_mark = limit / 4 * 3;
}

int32_t *sl_ffi_host_heap_over(sl_lua_host *h) { return &h->heap_over; }

int sl_ffi_host_heap_above(sl_lua_host *h) { return h->heap_limit != 0 && h->heap > h->heap_limit; }

void sl_ffi_host_heap_stopped(sl_lua_host *h) { h->heap_refusals++; }

void sl_ffi_host_collect(sl_lua_host *h) { h->heap_gc_mark = 0; }

/* ---- lua_timeout_ms ----
 *
 * The watchdog (proxy/watchdog.c, on the main thread) sees a worker's step
 * stay the same while it is in Lua for longer than lua_timeout_ms and
 * sends the worker's thread SL_LUA_SIGNAL. The handler, on the worker's
 * thread, sets a hook on every instruction, call and return, as luajit.c
 * does for Ctrl-C (lua_sethook is the one call the Lua manual allows
 * asynchronously). The hook raises in the stage's own code only: sluice's
 * library (sluice.host, sluice.buf) does bookkeeping in steps that an error
 * between them would leave half done, so there the hook waits for the next
 * instruction of a stage. The error then goes the way of any stage error
 * (sluice.host: logged with its traceback, what the stage was handed
 * released, its connection closed). Compiled traces do not run hooks: a
 * loop the JIT compiled, or a C function that does not return, is not
 * stopped; the watchdog then reports the worker stuck. */

static _Thread_local struct sl_worker *sl_lua_thread_worker;

static const char *const sl_lua_callbacks[] = {
    "channel_active", "channel_inactive", "channel_read", "channel_read_complete",
    "channel_writability_changed", "user_event", "error", "write", "flush", "close", "read"};

static const char *sl_lua_callback_name(int ev) {
  if (ev >= 0 && ev < (int)(sizeof(sl_lua_callbacks) / sizeof(sl_lua_callbacks[0])))
    return sl_lua_callbacks[ev];
  switch (ev) {
    case SL_LEV_ADDED: return "added";
    case SL_LEV_REMOVED: return "removed";
    case SL_LEV_PROMISE: return "a promise callback";
    case SL_LEV_TIMER: return "a timer";
    default: return "an event";
  }
}

static void sl_lua_unhook(sl_lua_host *h) {
  lua_sethook(h->L, NULL, 0, 0);
  h->hooked = 0;
}

static void sl_lua_timeout_hook(lua_State *L, lua_Debug *ar) {
  SL_UNUSED(ar);
  struct sl_worker *w = sl_lua_thread_worker;
  sl_lua_host *h = w != NULL ? w->lua : NULL;
  /* (L is the running coroutine's state, not always h->L: LuaJIT's hooks
   * are the whole VM's, and a stage may loop inside a coroutine.) */
  if (h == NULL || h->L == NULL) {
    lua_sethook(L, NULL, 0, 0);
    return;
  }
  /* The callback it was meant for has returned: nothing to stop. */
  if (h->step != __atomic_load_n(&h->int_step, __ATOMIC_RELAXED)) {
    sl_lua_unhook(h);
    return;
  }
  lua_Debug d;
  if (!lua_getstack(L, 0, &d) || !lua_getinfo(L, "Sl", &d)) return;
  if (d.what[0] == 'C' || (h->nlib > 0 && strncmp(d.source, h->lib, h->nlib) == 0)) return;
  /* Raised again every thousand instructions while the same event runs,
   * in case the stage catches it (pcall) and carries on. The containment
   * that follows is a step of its own: the watchdog does not take it for
   * the callback still running (and declare the worker stuck), and the
   * hook keeps to it. */
  lua_sethook(L, sl_lua_timeout_hook, LUA_MASKCOUNT, 1000);
  /* Only the first raise of an event is a step: raised again (the stage
   * caught it), the step stays, so that the watchdog's clock runs on and
   * a stage that catches the error in a loop is declared stuck at twice
   * lua_timeout_ms like any callback that does not return; a second
   * interrupt (for that same step) is still acknowledged. */
  if (h->step != h->raised_step) {
    SL_LUA_BUMP(&h->step, 1);
    __atomic_store_n(&h->int_step, h->step, __ATOMIC_RELAXED);
    h->raised_step = h->step;
    h->timeouts++;   /* one callback stopped, however often it is raised at */
  }
  /* The loop's clock stood still for the whole callback: the close that
   * follows (its log line, the access log's duration) takes the time now. */
  if (h->w != NULL && h->w->loop != NULL) ev_now_update(h->w->loop);
  lua_pushfstring(L, "%s:%d: ran longer than lua_timeout_ms (%d ms)", d.short_src,
                  d.currentline, h->timeout_ms);
  lua_error(L);
}

/* Notes the stage and callback of the event being handled, for the
 * watchdog's report (async-signal-safe: plain copies). */
static void sl_lua_note_where(sl_lua_host *h, uint64_t step) {
  const char *stage = "sluice", *cb = "its dispatch";
  if (h->has_cur) {
    atomic_signal_fence(memory_order_seq_cst);
    if (h->cur.ctx != NULL && h->cur.ctx->name != NULL) stage = h->cur.ctx->name;
    cb = sl_lua_callback_name(h->cur.ev);
  }
  size_t n = 0;
  for (const char *p = stage; *p && n < sizeof(h->where) / 2; p++) h->where[n++] = *p;
  h->where[n++] = '\0';
  for (const char *p = cb; *p && n < sizeof(h->where) - 1; p++) h->where[n++] = *p;
  h->where[n] = '\0';
  __atomic_store_n(&h->where_step, step, __ATOMIC_RELEASE);
}

static void sl_lua_on_interrupt(int sig) {
  SL_UNUSED(sig);
  int saved = errno;
  struct sl_worker *w = sl_lua_thread_worker;
  sl_lua_host *h = w != NULL ? w->lua : NULL;
  uint64_t step = h != NULL ? h->step : 0;
  /* Also when the hook is set already (re-armed every 1000 instructions
   * after a raise the stage caught): the watchdog learns that this thread
   * took the interrupt, and the hook runs at every instruction again. */
  if (h != NULL && h->L != NULL && h->depth > 0 &&
      step == __atomic_load_n(&h->int_step, __ATOMIC_RELAXED)) {
    sl_lua_note_where(h, step);
    h->hooked = 1;
    lua_sethook(h->L, sl_lua_timeout_hook, LUA_MASKCOUNT | LUA_MASKCALL | LUA_MASKRET, 1);
  }
  errno = saved;
}

int sl_lua_timeout_install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = sl_lua_on_interrupt;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  return sigaction(SL_LUA_SIGNAL, &sa, NULL) == 0 ? SL_OK : SL_ERROR;
}

void sl_lua_host_bind_thread(struct sl_worker *w) { sl_lua_thread_worker = w; }

void sl_lua_host_set_timeout(sl_lua_host *h, int ms) {
  if (h != NULL) h->timeout_ms = ms;
}

uint64_t sl_lua_host_progress(const sl_lua_host *h, int *busy) {
  *busy = h != NULL && __atomic_load_n(&h->depth, __ATOMIC_RELAXED) > 0;
  return h != NULL ? __atomic_load_n(&h->step, __ATOMIC_RELAXED) : 0;
}

int sl_lua_host_interrupt(sl_lua_host *h, uint64_t step, pthread_t thread) {
  __atomic_store_n(&h->int_step, step, __ATOMIC_RELAXED);
  return pthread_kill(thread, SL_LUA_SIGNAL) == 0 ? SL_OK : SL_ERROR;
}

int sl_lua_host_where(const sl_lua_host *h, uint64_t step, char *stage, size_t slen, char *cb,
                      size_t cblen) {
  if (h == NULL || __atomic_load_n(&h->where_step, __ATOMIC_ACQUIRE) != step) return SL_DECLINED;
  snprintf(stage, slen, "%s", h->where);
  snprintf(cb, cblen, "%s", h->where + strlen(h->where) + 1);
  return SL_OK;
}

void sl_ffi_host_step(sl_lua_host *h) { SL_LUA_BUMP(&h->step, 1); }

uint64_t sl_lua_host_timeouts(const sl_lua_host *h) {
  return h != NULL && h->L != NULL ? h->timeouts : 0;
}

/* Notes where sluice's own library lives: the folder of sluice.host's
 * source (on the stack at idx). */
static void sl_lua_note_lib(sl_lua_host *h, lua_State *L, int idx) {
  lua_getfield(L, idx, "run");
  lua_Debug d;
  if (!lua_getinfo(L, ">S", &d) || d.source == NULL || d.source[0] != '@') return;
  const char *slash = strrchr(d.source, '/');
  size_t n = slash != NULL ? (size_t)(slash - d.source) + 1 : 0;
  if (n == 0 || n >= sizeof(h->lib)) return;
  memcpy(h->lib, d.source, n);
  h->lib[n] = '\0';
  h->nlib = n;
}

/* ---- the event queue ----
 *
 * Every event for a Lua stage goes through one ring. Lua pops the events
 * itself through sl_ffi_host_next (an FFI call the JIT compiles), so one
 * C-to-Lua transition delivers every event that is waiting: in a worker,
 * everything one loop iteration produced; between Lua stages, events never
 * leave Lua at all. Each queued event holds a reference on its channel until
 * Lua is done with it. */

static int sl_lua_enqueue(sl_lua_host *h, sl_channel *ch, sl_ctx *ctx, int ev, void *ptr,
                          int n, const char *str) {
  if (h->qlen == h->qcap) {
    size_t cap = h->qcap ? h->qcap * 2 : 64;
    sl_lua_event *q = malloc(sizeof(*q) * cap);
    if (q == NULL) return SL_ERROR;
    for (size_t i = 0; i < h->qlen; i++) q[i] = h->q[(h->qhead + i) % h->qcap];
    free(h->q);
    h->q = q;
    h->qcap = cap;
    h->qhead = 0;
  }
  char *copy = NULL;
  if (str != NULL && (copy = strdup(str)) == NULL) return SL_ERROR;
  sl_lua_event *e = &h->q[(h->qhead + h->qlen) % h->qcap];
  e->ctx = ctx;
  e->ch = ch;
  e->ptr = ptr;
  e->str = copy;
  e->id = ctx ? ctx->lua_id : 0;
  e->ev = ev;
  e->n = n;
  h->qlen++;
  if (ch) sl_channel_ref(ch);
  return SL_OK;
}

/* Lets go of the event Lua finished with. */
static void sl_lua_settle(sl_lua_host *h) {
  if (!h->has_cur) return;
  h->has_cur = 0;
  atomic_signal_fence(memory_order_seq_cst);
  free(h->cur.str);
  if (h->cur.ch) sl_channel_unref(h->cur.ch);
}

int sl_ffi_host_next(sl_lua_host *h, sl_lua_event *out) {
  sl_lua_settle(h);
  SL_LUA_BUMP(&h->step, 1);
  if (h->qlen == 0) return 0;
  h->cur = h->q[h->qhead];
  atomic_signal_fence(memory_order_seq_cst); /* cur before has_cur (sl_lua_on_interrupt) */
  h->has_cur = 1;
  h->qhead = (h->qhead + 1) % h->qcap;
  h->qlen--;
  *out = h->cur;
  return 1;
}

int sl_ffi_host_pending(sl_lua_host *h) { return h->qlen > 0 || h->has_cur; }

void sl_ffi_host_abandon(sl_lua_host *h, const char *why) {
  if (!h->has_cur) return;
  sl_lua_event *e = &h->cur;
  if (e->ptr && (e->ev == SL_EV_READ || e->ev == SL_EV_WRITE)) sl_buf_release(e->ptr);
  e->ptr = NULL;
  if (e->ch == NULL || sl_channel_is_closed(e->ch)) return;
  char reason[128];
  int n = (int)strcspn(why, "\n");
  snprintf(reason, sizeof(reason), "Lua dispatch failed: %.*s", n, why);
  sl_channel_close(e->ch, reason, 1);
}

/* Drops every pending event (the state is closing): buffers are released. */
static void sl_lua_discard(sl_lua_host *h) {
  sl_lua_event e;
  while (sl_ffi_host_next(h, &e)) {
    if (e.ptr && (e.ev == SL_EV_READ || e.ev == SL_EV_WRITE)) sl_buf_release(e.ptr);
  }
  sl_lua_settle(h);
}

void sl_lua_host_drain(sl_lua_host *h) {
  if (h == NULL || h->L == NULL || h->depth > 0 || h->qlen == 0) return;
  lua_State *L = h->L;
  SL_LUA_BUMP(&h->depth, 1);
  SL_LUA_BUMP(&h->step, 1);
  h->entries++;
  lua_rawgeti(L, LUA_REGISTRYINDEX, h->traceback_ref);
  int tb = lua_gettop(L);
  for (;;) {
    /* run() delivers every queued event and returns; a stage that raises
     * stops it with the traceback, failed() contains the error (logs it,
     * releases what the stage was handed, closes its connection), and run()
     * goes on with the next event. */
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->run_ref);
    uint64_t refused = h->heap_refusals;
    if (lua_pcall(L, 0, 0, tb) == 0) break;
    /* Refused past twice the limit: what the failed code held is garbage
     * now, and failed() needs room to log it. */
    if (h->heap_refusals != refused) {
      lua_gc(L, LUA_GCCOLLECT, 0);
      h->heap_gc_mark = SL_MAX(h->heap_limit / 4 * 3, h->heap + h->heap_limit / 8);
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, h->failed_ref);
    lua_insert(L, -2);
    if (lua_pcall(L, 1, 0, 0) != 0) {
      /* The host itself failed (out of Lua memory). What is still queued
       * cannot be delivered: release it, close the channels it belonged to. */
      sl_log(SL_LOG_ERROR, "Lua dispatch failed: %s", lua_tostring(L, -1));
      lua_pop(L, 1);
      sl_lua_event e;
      while (sl_ffi_host_next(h, &e)) {
        if (e.ptr && (e.ev == SL_EV_READ || e.ev == SL_EV_WRITE)) sl_buf_release(e.ptr);
        if (e.ch) sl_channel_close(e.ch, "Lua dispatch failed", 1);
      }
      break;
    }
  }
  lua_settop(L, tb - 1);
  sl_lua_heap_check(h);
  sl_lua_settle(h);
  SL_LUA_BUMP(&h->depth, -1);
  /* The interrupt sets the hook only while depth > 0: one that came too
   * late for the callback it was meant for is cleared here. */
  atomic_signal_fence(memory_order_seq_cst);
  if (h->hooked) sl_lua_unhook(h);
}

/* Queues an event for Lua; with drain, delivers the queue now unless the
 * host is held or deferred (or already in Lua). */
static void sl_lua_post(sl_lua_host *h, sl_channel *ch, sl_ctx *ctx, int ev, void *ptr, int n,
                        const char *str, int drain) {
  if (sl_lua_enqueue(h, ch, ctx, ev, ptr, n, str) != SL_OK) {
    if (ptr && (ev == SL_EV_READ || ev == SL_EV_WRITE)) sl_buf_release(ptr);
    sl_channel_close(ch, "out of memory queueing a Lua event", 1);
    return;
  }
  if (drain && !h->deferred && h->hold == 0) sl_lua_host_drain(h);
}

static void sl_lua_call_ch(sl_lua_host *h, sl_channel *ch, sl_ctx *ctx, int ev, void *ptr, int n,
                           const char *str) {
  sl_lua_post(h, ch, ctx, ev, ptr, n, str, 1);
}

/* A channel's read loop holds the queue, so that every read of one wake-up
 * reaches Lua in one transition; it lets go (and the queue drains) before
 * it fires anything but reads, so no event overtakes the queued ones. */
/* A full collection when the worker is idle: modules of retired
 * configurations and the garbage of the last burst go, and LuaJIT's
 * allocator can give their memory back. Never inside Lua (a timer calls it). */
static void sl_lua_host_idle(struct sl_lua_host *h, size_t *before, size_t *after) {
  *before = *after = 0;
  if (h == NULL || h->L == NULL || h->depth > 0) return;
  *before = sl_lua_host_memory(h);
  lua_gc(h->L, LUA_GCCOLLECT, 0);
  *after = sl_lua_host_memory(h);
}

static void sl_lua_host_hold(struct sl_lua_host *h, int on) {
  if (on) {
    h->hold++;
    return;
  }
  if (--h->hold == 0 && !h->deferred) sl_lua_host_drain(h);
}

static void sl_lua_call(sl_ctx *ctx, int ev, void *ptr, int n, const char *str) {
  sl_lua_call_ch(sl_lua_host_of(ctx), sl_ctx_channel(ctx), ctx, ev, ptr, n, str);
}

void sl_lua_host_promise_done(sl_channel *ch, uint32_t pid, const char *err) {
  sl_lua_host *h = ch->w->lua;
  if (h == NULL || pid == 0) return;
  sl_lua_call_ch(h, ch, NULL, SL_LEV_PROMISE, NULL, (int)pid, err);
}

/* Timers: Lua keeps them (a heap per worker) and asks for one wake-up at
 * the earliest deadline. The wake-up keeps no loop running (ev_unref once
 * started): a worker's loop ends once its listeners and connections are
 * gone (io/worker.h), and a timer is only ever for a connection's stage,
 * whose open socket (or, while stopping, the drain deadline) keeps the loop
 * running as long as the timer matters. Each ev_unref is paired with one
 * ev_ref: before the timer is stopped, or in its callback (libev stops a
 * timer that does not repeat before calling it). */
static void sl_lua_timer_stop(sl_lua_host *h) {
  if (h->timer_unref) {
    ev_ref(h->w->loop);
    h->timer_unref = 0;
  }
  ev_timer_stop(h->w->loop, &h->timer);
}

static void sl_lua_on_timer(struct ev_loop *loop, ev_timer *t, int revents) {
  (void)revents;
  sl_lua_host *h = t->data;
  if (h->timer_unref) {
    ev_ref(loop);
    h->timer_unref = 0;
  }
  if (sl_lua_enqueue(h, NULL, NULL, SL_LEV_TIMER, NULL, 0, NULL) == SL_OK && !h->deferred &&
      h->hold == 0)
    sl_lua_host_drain(h);
}

void sl_ffi_host_arm_timer(sl_lua_host *h, double delay_ms) {
  if (h->w == NULL || h->w->loop == NULL) return;
  sl_lua_timer_stop(h);
  if (delay_ms < 0) return;
  ev_timer_set(&h->timer, delay_ms / 1000.0, 0.);
  ev_timer_start(h->w->loop, &h->timer);
  ev_unref(h->w->loop);
  h->timer_unref = 1;
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
static void sl_lua_read(sl_ctx *ctx) { sl_lua_call(ctx, SL_EV_READ_REQUEST, NULL, 0, NULL); }
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
    .read = sl_lua_read,
    .on_removed = sl_lua_on_removed,
};

static uint32_t sl_lua_mask_of(const sl_lua_host *h, int key);

sl_ctx *sl_lua_host_insert(sl_lua_host *h, sl_pipeline *p, sl_ctx *before, int key,
                           const char *name, int announce) {
  uint32_t mask = sl_lua_mask_of(h, key);
  sl_ctx *ctx = sl_pipeline_insert(p, before, &sl_lua_stage_ops, name);
  if (ctx == NULL) return NULL;
  ctx->lua_stage = key;
  ctx->mask = mask & ~SL_LUA_HAS_ADDED;
  ctx->lua_id = ++h->next_id;
  /* A stage without an added callback learns of its context with the
   * next event Lua gets (which comes after this one in the queue): one
   * entry into Lua less per connection. */
  if (announce)
    sl_lua_post(h, sl_ctx_channel(ctx), ctx, SL_LEV_ADDED, ctx, key, NULL,
                (mask & SL_LUA_HAS_ADDED) != 0);
  return ctx;
}

sl_ctx *sl_lua_host_add_stage(sl_lua_host *h, sl_pipeline *p, const sl_stage_spec *spec) {
  return sl_lua_host_insert(h, p, &p->tail, spec->lua_key, spec->module, 1);
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

static int sl_lua_load_stage(sl_lua_host *h, int load_ref, int tb_ref, const sl_config *cfg,
                             const sl_stage_spec *spec, char *err, size_t errlen) {
  lua_State *L = h->L;
  const char *cerr = NULL;
  lua_rawgeti(L, LUA_REGISTRYINDEX, tb_ref);
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
  uint64_t refused = h->heap_refusals;
  if (lua_pcall(L, 4, 2, -6) != 0) {
    /* "not enough memory" alone reads as the machine's. */
    char limit[64] = "";
    if (h->heap_refusals != refused)
      snprintf(limit, sizeof(limit), " (lua_memory_limit is %zu bytes)", h->heap_limit);
    snprintf(err, errlen, "stage %s: %s%s", spec->module, lua_tostring(L, -1), limit);
    lua_settop(L, 0);
    return SL_ERROR;
  }
  int key = (int)lua_tointeger(L, -2);
  uint32_t mask = (uint32_t)lua_tointeger(L, -1);
  lua_settop(L, 0);
  if (h->heap_limit != 0 && h->heap > h->heap_limit) {
    lua_gc(L, LUA_GCCOLLECT, 0);
    if (h->heap > h->heap_limit) {
      h->heap_refusals++;
      snprintf(err, errlen, "stage %s: not enough memory (lua_memory_limit is %zu bytes)",
               spec->module, h->heap_limit);
      return SL_ERROR;
    }
  }
  SL_ASSERT(key == spec->lua_key, "Lua stage keys out of step with the config");
  h->masks[key - 1] = mask;
  return SL_OK;
}

/* Stages added while running (ctx:pipeline(), sluice.testing) have keys of
 * their own, above any configuration's. */
#define SL_LUA_ADHOC_KEY (1 << 24)

int sl_ffi_host_register_stage(sl_lua_host *h, uint32_t mask) {
  if (h->nadhoc == h->capadhoc) {
    int cap = h->capadhoc ? h->capadhoc * 2 : 16;
    uint32_t *m = realloc(h->adhoc, sizeof(uint32_t) * (size_t)cap);
    if (m == NULL) return 0;
    h->adhoc = m;
    h->capadhoc = cap;
  }
  h->adhoc[h->nadhoc++] = mask;
  return SL_LUA_ADHOC_KEY + h->nadhoc;
}

static uint32_t sl_lua_mask_of(const sl_lua_host *h, int key) {
  if (key > SL_LUA_ADHOC_KEY) {
    SL_ASSERT(key - SL_LUA_ADHOC_KEY <= h->nadhoc, "unknown Lua stage key");
    return h->adhoc[key - SL_LUA_ADHOC_KEY - 1];
  }
  SL_ASSERT(key > 0 && key <= h->nstages, "unknown Lua stage key");
  return h->masks[key - 1];
}

static sl_lua_host *sl_lua_host_new(struct sl_worker *w) {
  sl_lua_host *h = calloc(1, sizeof(*h));
  if (h == NULL) return NULL;
  h->w = w;
  ev_init(&h->timer, sl_lua_on_timer);
  h->timer.data = h;
  w->promise_done = sl_lua_host_promise_done; /* write promises reach Lua */
  return h;
}

static int sl_lua_exit_refused(lua_State *L) {
  luaL_where(L, 1);
  lua_pushstring(L, "os.exit is refused: it would end every connection of sluice (a stage "
                    "closes its own with ctx:close; SIGTERM stops sluice)");
  lua_concat(L, 2);
  return lua_error(L);
}

void sl_lua_refuse_exit(lua_State *L) {
  lua_getglobal(L, "os");
  lua_pushcfunction(L, sl_lua_exit_refused);
  lua_setfield(L, -2, "exit");
  lua_pop(L, 1);
}

sl_lua_host *sl_lua_host_create(struct sl_worker *w, const sl_config *cfg, char *err,
                                size_t errlen) {
  sl_lua_host *h = sl_lua_host_new(w);
  sl_lua_host_set_memory_limit(h, cfg->lua_memory_limit);
  sl_lua_host_set_timeout(h, cfg->lua_timeout_ms);
  if (h == NULL || (h->masks = calloc(1, sizeof(uint32_t))) == NULL ||
      (h->L = luaL_newstate()) == NULL) {
    snprintf(err, errlen, "out of memory");
    sl_lua_host_destroy(h);
    return NULL;
  }
  w->lua = h;
  lua_State *L = h->L;
  if (h->heap_limit != 0) sl_lua_alloc_wrap(h, L);
  luaL_openlibs(L);
  sl_lua_refuse_exit(L);
  lua_getglobal(L, "package");
  lua_pushstring(L, cfg->search_path);
  lua_setfield(L, -2, "path");
  lua_pop(L, 1);

  lua_getglobal(L, "require");
  lua_pushstring(L, "sluice.host");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    snprintf(err, errlen, "loading sluice.host: %s%s", lua_tostring(L, -1),
             h->heap_refusals ? " (lua_memory_limit is too low)" : "");
    w->lua = NULL;
    sl_lua_host_destroy(h);
    return NULL;
  }
  sl_lua_note_lib(h, L, lua_gettop(L));
  lua_getfield(L, -1, "run");
  h->run_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_getfield(L, -1, "failed");
  h->failed_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_getglobal(L, "debug");
  lua_getfield(L, -1, "traceback");
  h->traceback_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, 1);
  lua_getfield(L, -1, "load_stage");
  h->load_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_getfield(L, -1, "unload_stage");
  h->unload_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_getfield(L, -1, "init");
  lua_pushinteger(L, w->id);
  lua_pushnumber(L, (lua_Number)(uintptr_t)h);
  lua_call(L, 2, 0);
  lua_settop(L, 0);
  h->loaded_any = 0;
  if (sl_lua_host_load(h, cfg, err, errlen) != SL_OK) {
    w->lua = NULL;
    sl_lua_host_destroy(h);
    return NULL;
  }
  w->lua_hold = sl_lua_host_hold;
  w->lua_idle = sl_lua_host_idle;
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
  /* The new stages load under the larger of the two limits (none if
   * either is none); the configuration's own applies from its commit
   * (sl_lua_host_set_memory_limit), so a refused reload keeps the old. */
  size_t limit = h->heap_limit;
  if (limit != 0) h->heap_limit = cfg->lua_memory_limit == 0 ? 0 : SL_MAX(limit, cfg->lua_memory_limit);
  lua_getglobal(L, "debug");
  lua_getfield(L, -1, "traceback");
  int tb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, 1);
  int rc = SL_OK;
  for (size_t i = 0; i < cfg->nlisteners && rc == SL_OK; i++) {
    const sl_listener_cfg *lc = &cfg->listeners[i];
    for (size_t j = 0; j < lc->nstages && rc == SL_OK; j++) {
      if (lc->stages[j].ops != NULL) continue;
      rc = sl_lua_load_stage(h, h->load_ref, tb_ref, cfg, &lc->stages[j], err, errlen);
    }
  }
  luaL_unref(L, LUA_REGISTRYINDEX, tb_ref);
  h->heap_limit = limit;
  if (rc != SL_OK) {
    sl_lua_host_unload(h, cfg->lua_key_first, cfg->nlua_stages);
    return SL_ERROR;
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

void sl_lua_host_defer(sl_lua_host *h) { h->deferred = 1; }

uint64_t sl_lua_host_entries(const sl_lua_host *h) { return h ? h->entries : 0; }

size_t sl_lua_host_memory(const sl_lua_host *h) {
  if (h == NULL || h->L == NULL) return 0;
  return (size_t)lua_gc(h->L, LUA_GCCOUNT, 0) * 1024 + (size_t)lua_gc(h->L, LUA_GCCOUNTB, 0);
}

uint64_t sl_lua_host_memory_refusals(const sl_lua_host *h) {
  return h != NULL && h->L != NULL ? h->heap_refusals : 0;
}

size_t sl_lua_host_memory_limit(const sl_lua_host *h) {
  return h != NULL && h->L != NULL ? h->heap_limit : 0;
}

struct sl_holder *sl_ffi_host_holders(sl_lua_host *h, uintptr_t *base) {
  if (h == NULL || h->w == NULL || h->w->pool == NULL || h->w->pool->holders == NULL) return NULL;
  *base = (uintptr_t)h->w->pool->hdr_base;
  return h->w->pool->holders;
}

void sl_ffi_host_stage_error(sl_lua_host *h, const char *name) {
  if (h != NULL && h->w != NULL && h->w->stage_error != NULL) h->w->stage_error(h->w, name);
}

sl_lua_host *sl_ffi_host_open(struct sl_worker *w) {
  sl_lua_host *h = sl_lua_host_new(w);
  if (h == NULL) return NULL;
  h->deferred = 1; /* the Lua side pops events itself */
  w->lua = h;
  return h;
}

void sl_lua_host_destroy(sl_lua_host *h) {
  if (h == NULL) return;
  if (h->L) sl_lua_host_drain(h);
  sl_lua_discard(h);
  if (h->w && h->w->loop) sl_lua_timer_stop(h);
  if (h->w && h->w->lua == h) h->w->lua = NULL;
  if (h->L) {
    /* LuaJIT releases its own allocator's memory only when it is the
     * state's allocator at close. */
    if (h->base_alloc != NULL) lua_setallocf(h->L, h->base_alloc, h->base_ud);
    lua_close(h->L);
  }
  free(h->q);
  free(h->masks);
  free(h->adhoc);
  free(h);
}
