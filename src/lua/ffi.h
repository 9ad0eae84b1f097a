/*
 * FFI shims: the only functions Lua calls on the data path. Declared again,
 * identically, in lua/sluice/cdef.lua.
 *
 * Rules (lua-resty-core's): plain C types, no lua_State, no structs by value,
 * at most 8 arguments, an int status and a const char **err for failures. A
 * shim never raises and never calls back into Lua: events it causes for
 * Lua stages are queued by the host and delivered after Lua returns.
 */
#ifndef SL_FFI_H
#define SL_FFI_H

#include <stddef.h>
#include <stdint.h>

#include "buf/buf_types.h"
#include "pipeline/pipeline.h"

#define SL_FFI_ABI 1

#if defined(__GNUC__)
#define SL_FFI_EXPORT __attribute__((visibility("default"), used))
#else
#define SL_FFI_EXPORT
#endif

SL_FFI_EXPORT int sl_ffi_abi(void);

/* Finalizer of a Lua handle: a handle collected while it still owns
 * references is a leak; it is reported and its references released. */
SL_FFI_EXPORT void sl_ffi_buf_finalize(sl_lbuf *h);

/* retain/release n references. release returns 1 when the memory went back,
 * 0 when still live, -1 with *err ("refcnt 0, decrement 1"). */
SL_FFI_EXPORT int sl_ffi_buf_retain(sl_buf *b, uint32_t n, const char **err);
SL_FFI_EXPORT int sl_ffi_buf_release(sl_buf *b, uint32_t n, const char **err);

/* release, noting who released it for later errors: the stage of ctx `by`
 * (may be NULL), and `where` ("file:line", may be NULL; copied). */
SL_FFI_EXPORT int sl_ffi_buf_release_by(sl_buf *b, uint32_t n, sl_ctx *by, const char *where,
                                        const char **err);

/* Who released the buffer of generation gen that header b held ("the
 * outbound queue, after writing it", a stage name, ...), or NULL when the
 * header was reused since. */
SL_FFI_EXPORT const char *sl_ffi_buf_released_by(sl_buf *b, uint32_t gen);

/* A new buffer for ctx's channel (returns +1), or NULL (out of memory).
 * With src, the buffer holds a copy of len bytes. */
SL_FFI_EXPORT sl_buf *sl_ffi_ctx_alloc(sl_ctx *ctx, size_t cap, size_t max_cap);
SL_FFI_EXPORT sl_buf *sl_ffi_ctx_from(sl_ctx *ctx, const char *src, size_t len);

/* The Lua id of the next handler of ev after (inbound) or before (outbound)
 * ctx when that handler is a Lua stage, else 0 (C goes on with the shims). */
SL_FFI_EXPORT double sl_ffi_ctx_next(sl_ctx *ctx, int ev);

/* ctx:fire_read(b) and ctx:write(b) toward a C handler: take ownership. */
SL_FFI_EXPORT void sl_ffi_ctx_fire_read(sl_ctx *ctx, sl_buf *b);
SL_FFI_EXPORT void sl_ffi_ctx_write(sl_ctx *ctx, sl_buf *b);

/* ctx:write(b) toward a C handler carrying promise id pid (0: none): takes
 * ownership of b. pid is reported once through the worker's promise_done
 * hook (io/worker.h), possibly before this returns (channel closed: "closed"
 * or the reason that closed it; its bytes written already: NULL); the rule
 * for stages that split a write is sl_channel_promise_attach's. */
SL_FFI_EXPORT void sl_ffi_ctx_write_p(sl_ctx *ctx, sl_buf *b, uint32_t pid);

/* Events without a buffer: ACTIVE, INACTIVE, READ_COMPLETE, WRITABILITY (n),
 * USER_EVENT (n), FLUSH; and with text (borrowed): ERROR, CLOSE. The text is
 * a close reason: its first 159 bytes go on, control characters as spaces. */
SL_FFI_EXPORT void sl_ffi_ctx_fire(sl_ctx *ctx, int ev, int n);
SL_FFI_EXPORT void sl_ffi_ctx_fire_text(sl_ctx *ctx, int ev, const char *text);

/* 1 while the channel's outbound queue is under its high water mark. */
SL_FFI_EXPORT int sl_ffi_ctx_is_writable(sl_ctx *ctx);
SL_FFI_EXPORT void sl_ffi_ctx_set_autoread(sl_ctx *ctx, int on);

/* "client 127.0.0.1:5000 on front": for log lines. */
SL_FFI_EXPORT const char *sl_ffi_ctx_describe(sl_ctx *ctx);

/* ctx:connect(target): connects ctx's connection to target, the name of an
 * upstream or "host:port" (src/proxy/bridge.h, sl_bridge_connect). 0 while
 * connecting, -1 with *err. Closing the client (every try failed at once)
 * queues its events for Lua like any close. */
SL_FFI_EXPORT int sl_ffi_ctx_connect(sl_ctx *ctx, const char *target, const char **err);

/* What sluice.pool.stats() returns, flat. Counts for the calling thread's
 * pool and its arena. */
typedef struct sl_ffi_pool_stats {
  uint64_t bytes_in_use, blocks_in_use, allocs, frees, alloc_failures;
  uint64_t cache_hits, cache_misses, cached_blocks, cached_bytes, trims, idle_trims;
  uint64_t headers_total, headers_free, recycler_size, recycler_cap, recycler_overflows;
  uint64_t region_resets, remote_queued, remote_direct, return_queue_cap;
  uint64_t reserved_bytes, chunks, chunks_created, chunks_released, chunk_bytes, chunk_used_bytes;
  uint64_t huge_allocs, huge_frees, huge_bytes;
  uint64_t nclasses;
  uint64_t class_size[80], class_allocs[80], class_frees[80];
  uint64_t arena_allocs[80], arena_frees[80];
  uint64_t leaks, leaked_bytes, leak_recorded;
  int32_t arena, unpooled, leak_level, leak_sample;
} sl_ffi_pool_stats;

/* Fills out for the calling thread's pool. 0, or -1 when the thread has none. */
SL_FFI_EXPORT int sl_ffi_pool_stats_get(sl_ffi_pool_stats *out);

/* A new buffer from the calling thread's pool (+1), or NULL. */
SL_FFI_EXPORT sl_buf *sl_ffi_pool_alloc(size_t cap, size_t max_cap);
SL_FFI_EXPORT sl_buf *sl_ffi_pool_from(const char *src, size_t len);

/* Outside a worker (busted specs, tools): a pool with the default
 * allocator, bound to the calling thread; and its destruction (0, or the
 * number of buffers still outstanding, which are then leaked). */
SL_FFI_EXPORT int sl_ffi_pool_open(void);
SL_FFI_EXPORT uint64_t sl_ffi_pool_close(void);

/* Leak tracking (buf/leak.h). touch records hint (copied) on a recorded
 * buffer at level advanced and up; set_site replaces its creation site. */
SL_FFI_EXPORT void sl_ffi_buf_touch(sl_buf *b, const char *hint);
SL_FFI_EXPORT void sl_ffi_buf_set_site(sl_buf *b, const char *site);
/* The leak detection level of the calling thread's pool (0..3), -1 without. */
SL_FFI_EXPORT int sl_ffi_leak_level(void);
/* Buffers and bytes outstanding: for ctx's channel, or the whole pool when
 * ctx is NULL. 0, or -1 without a pool. */
SL_FFI_EXPORT int sl_ffi_buf_outstanding(sl_ctx *ctx, uint64_t *count, uint64_t *bytes);

/* ---- options of C stages (pipeline/opts.h, pipeline/stages.h) ----
 * Used by lua/sluice/options.lua to build an sl_opts from a Lua table and
 * parse it for a C stage, as the config reader does. */
struct sl_opts;
SL_FFI_EXPORT struct sl_opts *sl_ffi_opts_new(void);
SL_FFI_EXPORT void sl_ffi_opts_free(struct sl_opts *o);
/* Adds key = a value of type (pipeline/opts.h's sl_opt_type): NUMBER num,
 * STRING s (len bytes), BOOLEAN num != 0, LIST (empty), TABLE; type 0
 * appends s to the list under key. 0, or -1 (out of memory, not a list). */
SL_FFI_EXPORT int sl_ffi_opts_add(struct sl_opts *o, const char *key, int type, double num,
                                  const char *s, size_t len);
/* Parses o for the C stage registered as module into *conf (+1: free it
 * with sl_ffi_stage_unconfigure; NULL for a stage without options). 0, or
 * -1 with the message in err ("max_length: expected a positive integer,
 * got 0", "no C stage named ..."). */
SL_FFI_EXPORT int sl_ffi_stage_configure(const char *module, const struct sl_opts *o, void **conf,
                                         char *err, size_t errlen);
SL_FFI_EXPORT void sl_ffi_stage_unconfigure(const char *module, void *conf);

/* One log record at level (0 debug .. 3 error). */
SL_FFI_EXPORT void sl_ffi_log(int level, const char *msg);
SL_FFI_EXPORT int sl_ffi_log_enabled(int level);

/* ---- buffer access shims (ffi_buf.c) ----
 * Used by lua/sluice/buf.lua. Each takes the Lua handle and checks its
 * generation and the buffer's indexes first; failures are NULL or SL_ERROR
 * with a static *err, never an abort. */

/* A view of [index, index + len) of h's capacity, or of all of it with h's
 * indexes (duplicate); with retain, plus one reference (returns +1), else
 * borrowed. NULL with *err on a bad range or out of memory. */
SL_FFI_EXPORT sl_buf *sl_ffi_buf_slice(const sl_lbuf *h, size_t index, size_t len, int retain,
                                       const char **err);
SL_FFI_EXPORT sl_buf *sl_ffi_buf_duplicate(const sl_lbuf *h, int retain, const char **err);
/* Room for n more writable bytes, growing a root without views within its
 * max capacity. SL_OK, or SL_ERROR with *err ("exceeds max capacity", "a
 * view cannot grow", "a buffer with views cannot grow", "out of buffer
 * memory"). */
SL_FFI_EXPORT int sl_ffi_buf_ensure_writable(const sl_lbuf *h, size_t n, const char **err);
/* Moves the readable bytes to index 0 (memmove). Bytes discarded, or SL_ERROR. */
SL_FFI_EXPORT int sl_ffi_buf_discard_read_bytes(const sl_lbuf *h, const char **err);
/* A new root (+1) holding a copy of [index, index + len), or NULL with *err. */
SL_FFI_EXPORT sl_buf *sl_ffi_buf_copy(const sl_lbuf *h, size_t index, size_t len,
                                      const char **err);
/* First match of needle (nlen bytes) in [from, to): 1 and *at, 0 for none,
 * SL_ERROR with *err. */
SL_FFI_EXPORT int sl_ffi_buf_find(const sl_lbuf *h, size_t from, size_t to, const void *needle,
                                  size_t nlen, size_t *at, const char **err);

/* ---- the Lua host's event queue (src/lua/host.c) ----
 *
 * An event for a Lua stage: Lua pops them with sl_ffi_host_next. ptr is a
 * buffer the event hands over (READ, WRITE: +1 for the receiver), str a
 * text valid until the next pop. id is the Lua id of ctx (0 for events
 * that belong to no stage: promises, timers). */
typedef struct sl_lua_event {
  sl_ctx *ctx;
  struct sl_channel *ch;
  void *ptr;
  char *str;
  double id;
  int32_t ev;
  int32_t n;
} sl_lua_event;

typedef struct sl_lua_host sl_lua_host;
struct sl_worker;

/* Pops the next event into out: 1, or 0 when the queue is empty. The
 * previous event's channel reference is dropped. */
SL_FFI_EXPORT int sl_ffi_host_next(sl_lua_host *h, sl_lua_event *out);
/* Registers a Lua stage that handles the events in mask; returns its key
 * (1-based), 0 on ENOMEM. */
SL_FFI_EXPORT int sl_ffi_host_register_stage(sl_lua_host *h, uint32_t mask);
/* Asks for a TIMER event after delay_ms (< 0: none). The timer keeps no
 * loop running (a connection of the stage that armed it does). */
SL_FFI_EXPORT void sl_ffi_host_arm_timer(sl_lua_host *h, double delay_ms);
/* The event last popped could not be handed to its stage (sluice's own Lua
 * raised first, out of Lua memory): releases the buffer it carried and
 * closes its channel with "Lua dispatch failed: " and the first line of
 * why (borrowed). Nothing when no event is current. */
SL_FFI_EXPORT void sl_ffi_host_abandon(sl_lua_host *h, const char *why);
/* lua_memory_limit between events (src/lua/host.c, sl_lua_alloc): the flag
 * the allocator raises when the heap grows past the limit (sluice.host
 * clears it); whether the heap is above the limit now; counts a stage
 * stopped at the limit; asks for a full collection at the end of the
 * drain (a stage stopped at the limit has left: what it held is garbage). */
SL_FFI_EXPORT int32_t *sl_ffi_host_heap_over(sl_lua_host *h);
SL_FFI_EXPORT int sl_ffi_host_heap_above(sl_lua_host *h);
SL_FFI_EXPORT void sl_ffi_host_heap_stopped(sl_lua_host *h);
SL_FFI_EXPORT void sl_ffi_host_collect(sl_lua_host *h);
/* A callback starts that is not an event of its own (each timer of a timer
 * event): lua_timeout_ms counts from here for it. */
SL_FFI_EXPORT void sl_ffi_host_step(sl_lua_host *h);

/* Inserts Lua stage `key` next to ctx (after it when after != 0, else
 * before it). Returns the new context's Lua id (0 on ENOMEM) and the
 * context in *out. No ADDED event: the caller creates the Lua side. */
SL_FFI_EXPORT double sl_ffi_ctx_insert_lua(sl_ctx *ctx, int after, int key, const char *name,
                                           sl_ctx **out);
/* Inserts the builtin C stage `name` next to ctx, with its configuration
 * (from sl_ffi_stage_configure, borrowed: it must outlive the pipeline;
 * NULL for a stage without options). Returns the context, or NULL with
 * *err set. */
SL_FFI_EXPORT sl_ctx *sl_ffi_ctx_insert_c(sl_ctx *ctx, int after, const char *name,
                                          const void *conf, const char **err);
/* Takes ctx out of its pipeline (its on_removed runs; for a Lua stage a
 * REMOVED event follows). */
SL_FFI_EXPORT void sl_ffi_ctx_remove(sl_ctx *ctx);
/* Names of the stages of ctx's pipeline, head to tail, in out (up to max),
 * with their contexts; returns how many there are. */
SL_FFI_EXPORT int sl_ffi_ctx_stages(sl_ctx *ctx, const char **names, sl_ctx **ctxs, int max);
/* The channel's addresses as "host:port" text ("" when unknown). */
SL_FFI_EXPORT const char *sl_ffi_ctx_address(sl_ctx *ctx, int remote);
/* The TLS version ctx's channel agreed on ("TLSv1.3"), or NULL: no TLS. */
SL_FFI_EXPORT const char *sl_ffi_ctx_tls_version(sl_ctx *ctx);
/* The host name of the TLS session's SNI (the one the client asked for;
 * on an upstream channel, the one sluice sent), or NULL: none, no TLS, or
 * the channel closed. */
SL_FFI_EXPORT const char *sl_ffi_ctx_tls_server_name(sl_ctx *ctx);
/* The subject of the certificate the channel's TLS peer showed (RFC 2253
 * text, copied at once by the caller), or NULL: none, no TLS, closed. */
SL_FFI_EXPORT const char *sl_ffi_ctx_tls_peer_subject(sl_ctx *ctx);
/* 1 while ctx's channel is open (not closed, though perhaps closing). */
SL_FFI_EXPORT int sl_ffi_ctx_is_open(sl_ctx *ctx);
/* Counts a message that no stage handled (the tail's counter). */
SL_FFI_EXPORT void sl_ffi_ctx_unhandled(sl_ctx *ctx);
/* The current time in ms of the worker's loop. */
SL_FFI_EXPORT double sl_ffi_ctx_now(sl_ctx *ctx);

/* ---- the in-memory channel of sluice.testing (embedded.c) ---- */
SL_FFI_EXPORT sl_lua_host *sl_ffi_host_open(struct sl_worker *w);
SL_FFI_EXPORT sl_lua_host *sl_ffi_embedded_host(void);
SL_FFI_EXPORT struct sl_channel *sl_ffi_embedded_open(const char *name, size_t low, size_t high);
SL_FFI_EXPORT double sl_ffi_embedded_add_lua(struct sl_channel *ch, int key, const char *name,
                                             sl_ctx **out);
/* conf: the stage's configuration from sl_ffi_stage_configure (borrowed: it
 * must outlive the channel), NULL for a stage without options. */
SL_FFI_EXPORT sl_ctx *sl_ffi_embedded_add_c(struct sl_channel *ch, const char *name,
                                            const void *conf, const char **err);
SL_FFI_EXPORT void sl_ffi_embedded_activate(struct sl_channel *ch);
SL_FFI_EXPORT void sl_ffi_embedded_fire(struct sl_channel *ch, int ev, sl_buf *b, int n,
                                        const char *text);
SL_FFI_EXPORT sl_buf *sl_ffi_embedded_take(struct sl_channel *ch);
SL_FFI_EXPORT void sl_ffi_embedded_set_writable(struct sl_channel *ch, int on);
SL_FFI_EXPORT int sl_ffi_embedded_is_open(struct sl_channel *ch);
SL_FFI_EXPORT const char *sl_ffi_embedded_reason(struct sl_channel *ch);
SL_FFI_EXPORT void sl_ffi_embedded_close(struct sl_channel *ch, const char *reason);
SL_FFI_EXPORT void sl_ffi_embedded_owned(struct sl_channel *ch, uint64_t *count, uint64_t *bytes);
SL_FFI_EXPORT size_t sl_ffi_embedded_release(struct sl_channel *ch, char *report, size_t size);
SL_FFI_EXPORT void sl_ffi_embedded_shutdown(void);

/* ---- the admin endpoint's hooks (proxy/metrics.h, buf/holder.h) ---- */

/* Counts a failure of the stage named name (sluice.host's stage_failed). */
SL_FFI_EXPORT void sl_ffi_host_stage_error(sl_lua_host *h, const char *name);
/* The holder table of h's worker's pool and the start of its header region
 * in *base (a header's slot is (address - base) / 64): Lua records the
 * holder at a hop between Lua stages with two stores, as sl_buf_hold does.
 * NULL when holders are not recorded. */
struct sl_holder;
SL_FFI_EXPORT struct sl_holder *sl_ffi_host_holders(sl_lua_host *h, uintptr_t *base);

#endif
