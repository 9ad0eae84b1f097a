/*
 * The Lua host: one lua_State per worker, the Lua stage vtable, and
 * dispatch of pipeline events into Lua.
 *
 * Re-entrancy: Lua reaches C only through FFI shims, and a shim must never
 * call back into Lua. So while Lua runs (depth > 0), an event that a C stage
 * or the channel sends to a Lua stage is queued, with a reference on its
 * channel, and delivered in order as soon as the outermost dispatch
 * returns. Between Lua stages, events go directly in Lua (one C-to-Lua
 * transition per read, however many Lua stages follow each other).
 */
#ifndef SL_LUA_HOST_H
#define SL_LUA_HOST_H

#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "lua/ffi.h"
#include "pipeline/pipeline.h"

struct sl_worker;
struct sl_config;
struct sl_stage_spec;
struct sl_channel;
struct lua_State;

/* Replaces os.exit in L (borrowed) by a function that raises "os.exit is
 * refused ...": a configuration file or a stage that calls it must not end
 * every connection of the process. For sluice's own states only (the
 * workers', the configuration check's), never a state it does not own. */
void sl_lua_refuse_exit(struct lua_State *L);

/* Creates the worker's state, loads sluice's Lua library and every Lua stage
 * of every listener (with its options copied from the config). Returns NULL
 * with a message in err on failure. */
sl_lua_host *sl_lua_host_create(struct sl_worker *w, const struct sl_config *cfg,
                                char *err, size_t errlen);

/* Loads the Lua stages of cfg (a reloaded configuration) into h's state
 * under their keys; modules loaded before are run anew, and the stages of
 * earlier configurations stay for the connections that use them. Borrows
 * cfg (its Lua state is read: one thread at a time). The modules run under
 * the larger of h's limit and cfg's lua_memory_limit (none if either is
 * none); h's limit stays as it was. SL_OK, or SL_ERROR with a message in
 * err and nothing of cfg left loaded. */
int sl_lua_host_load(sl_lua_host *h, const struct sl_config *cfg, char *err, size_t errlen);

/* Forgets the stages with keys first..first+n-1 (a configuration that no
 * connection of this worker uses any more, or a reload that failed). */
void sl_lua_host_unload(sl_lua_host *h, int first, int n);

/* Closes the state: finalizers run and reclaim what scripts leaked. */
void sl_lua_host_destroy(sl_lua_host *h);

/* Appends a Lua stage to p. Returns the context or NULL on ENOMEM. */
sl_ctx *sl_lua_host_add_stage(sl_lua_host *h, sl_pipeline *p, const struct sl_stage_spec *spec);

/* Inserts Lua stage `key` before `before` in p; announce != 0 queues the
 * ADDED event that creates its Lua side. NULL on ENOMEM. */
sl_ctx *sl_lua_host_insert(sl_lua_host *h, sl_pipeline *p, sl_ctx *before, int key,
                           const char *name, int announce);

/* Delivers every queued event in one call into Lua (a worker does this once
 * per loop iteration; without a loop, after each event). */
void sl_lua_host_drain(sl_lua_host *h);

/* Events wait in the queue until sl_lua_host_drain (a driver without a
 * loop that batches by itself). */
void sl_lua_host_defer(sl_lua_host *h);

/* How many times C entered Lua to deliver events (metrics, benchmarks). */
uint64_t sl_lua_host_entries(const sl_lua_host *h);

/* Bytes the Lua state's heap uses now (lua_gc LUA_GCCOUNT); 0 without a
 * state of its own. */
size_t sl_lua_host_memory(const sl_lua_host *h);

/* Times lua_memory_limit stopped Lua: stages stopped between events with
 * the heap above it, allocations refused past twice it, stage modules that
 * did not fit (each a "not enough memory"). */
uint64_t sl_lua_host_memory_refusals(const sl_lua_host *h);

/* The limit those refusals come from (lua_memory_limit; 0: none). */
size_t sl_lua_host_memory_limit(const sl_lua_host *h);

/* Sets lua_memory_limit (0: none) for the state's allocations from now on:
 * at creation, and when a reload's configuration is committed. The heap
 * may be above it already; it then only shrinks until it is below. h may
 * be NULL (nothing happens). */
void sl_lua_host_set_memory_limit(sl_lua_host *h, size_t limit);

/* ---- lua_timeout_ms (the mechanism; the watchdog is proxy/watchdog.c) ---- */

/* The signal that interrupts a worker's Lua; sluice reserves it (a
 * realtime one: SIGUSR2 is the binary upgrade's, proxy/upgrade.h; the one
 * before it is proxy/resolver.h's). */
#define SL_LUA_SIGNAL (SIGRTMIN + 1)

/* Installs the process's handler for SL_LUA_SIGNAL (sigaction, SA_RESTART).
 * SL_OK, or SL_ERROR with errno. A signal sent to a thread that is not in a
 * callback the watchdog asked to stop does nothing. */
int sl_lua_timeout_install(void);

/* On a worker's thread, before its loop runs: the signal handler finds the
 * worker's Lua state through w (borrowed for the life of the thread). */
void sl_lua_host_bind_thread(struct sl_worker *w);

/* Sets lua_timeout_ms as the error text gives it (the watchdog keeps the
 * time). h may be NULL. */
void sl_lua_host_set_timeout(sl_lua_host *h, int ms);

/* Any thread: h's step, which changes each time the worker enters Lua and
 * each time Lua takes the next event; *busy is 1 while the worker is in
 * Lua. A step that stays the same while busy is one callback running. */
uint64_t sl_lua_host_progress(const sl_lua_host *h, int *busy);

/* Any thread: asks thread (h's worker) to stop the callback of step
 * (sl_lua_host_progress) by raising an error in the stage's code at its
 * next interpreted instruction. Nothing happens if that callback has
 * returned meanwhile. SL_OK, or SL_ERROR (pthread_kill failed). */
int sl_lua_host_interrupt(sl_lua_host *h, uint64_t step, pthread_t thread);

/* Any thread, after sl_lua_host_interrupt(h, step): the stage the event of
 * step was delivered to and its callback, as the signal found them. SL_OK,
 * or SL_DECLINED when the signal has not been handled for that step.
 * stage and cb may be NULL with their lengths 0 (only asking). */
int sl_lua_host_where(const sl_lua_host *h, uint64_t step, char *stage, size_t slen, char *cb,
                      size_t cblen);

/* Callbacks stopped by lua_timeout_ms (the worker's thread). */
uint64_t sl_lua_host_timeouts(const sl_lua_host *h);

/* A write promise completed (err NULL) or failed: queues it for Lua. */
void sl_lua_host_promise_done(struct sl_channel *ch, uint32_t pid, const char *err);


#endif
