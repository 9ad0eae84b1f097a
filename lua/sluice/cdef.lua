-- sluice.cdef: the C declarations Lua sees, loaded once per state. Mirrors
-- src/buf/buf_types.h and src/lua/ffi.h exactly; nothing here depends on
-- build flags.
local ffi = require("ffi")

ffi.cdef[[
typedef struct sl_pool sl_pool;
typedef struct sl_ctx sl_ctx;
typedef struct sl_buf sl_buf;

struct sl_buf {
  uint8_t *data;
  uint32_t rd;
  uint32_t wr;
  uint32_t cap;
  uint32_t max_cap;
  uint32_t refcnt;
  uint32_t gen;
  sl_buf *root;
  sl_buf *views;
  void *owner;
  union {
    uint32_t block_size;
    uint32_t parent_off;
  };
  uint16_t sclass;
  uint16_t flags;
};

typedef struct sl_lbuf {
  sl_buf *b;
  uint32_t gen;
  int32_t refs;
  int32_t fin;
  int32_t owner;
} sl_lbuf;

int sl_ffi_abi(void);
void sl_ffi_buf_finalize(sl_lbuf *h);
int sl_ffi_buf_retain(sl_buf *b, uint32_t n, const char **err);
int sl_ffi_buf_release(sl_buf *b, uint32_t n, const char **err);
int sl_ffi_buf_release_by(sl_buf *b, uint32_t n, sl_ctx *by, const char *where, const char **err);
const char *sl_ffi_buf_released_by(sl_buf *b, uint32_t gen);
sl_buf *sl_ffi_ctx_alloc(sl_ctx *ctx, size_t cap, size_t max_cap);
sl_buf *sl_ffi_ctx_from(sl_ctx *ctx, const char *src, size_t len);
double sl_ffi_ctx_next(sl_ctx *ctx, int ev);
void sl_ffi_ctx_fire_read(sl_ctx *ctx, sl_buf *b);
void sl_ffi_ctx_write(sl_ctx *ctx, sl_buf *b);
void sl_ffi_ctx_write_p(sl_ctx *ctx, sl_buf *b, uint32_t pid);
void sl_ffi_ctx_fire(sl_ctx *ctx, int ev, int n);
void sl_ffi_ctx_fire_text(sl_ctx *ctx, int ev, const char *text);
int sl_ffi_ctx_is_writable(sl_ctx *ctx);
void sl_ffi_ctx_set_autoread(sl_ctx *ctx, int on);
const char *sl_ffi_ctx_describe(sl_ctx *ctx);
int sl_ffi_ctx_connect(sl_ctx *ctx, const char *target, const char **err);
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
void sl_ffi_buf_touch(sl_buf *b, const char *hint);
void sl_ffi_buf_set_site(sl_buf *b, const char *site);
int sl_ffi_leak_level(void);
int sl_ffi_buf_outstanding(sl_ctx *ctx, uint64_t *count, uint64_t *bytes);
int sl_ffi_pool_stats_get(sl_ffi_pool_stats *out);
sl_buf *sl_ffi_pool_alloc(size_t cap, size_t max_cap);
sl_buf *sl_ffi_pool_from(const char *src, size_t len);
int sl_ffi_pool_open(void);
uint64_t sl_ffi_pool_close(void);
typedef struct sl_opts sl_opts;
sl_opts *sl_ffi_opts_new(void);
void sl_ffi_opts_free(sl_opts *o);
int sl_ffi_opts_add(sl_opts *o, const char *key, int type, double num, const char *s, size_t len);
int sl_ffi_stage_configure(const char *module, const sl_opts *o, void **conf, char *err,
                           size_t errlen);
void sl_ffi_stage_unconfigure(const char *module, void *conf);
void sl_ffi_log(int level, const char *msg);
int sl_ffi_log_enabled(int level);
/* buffer access shims (ffi_buf.c) */
sl_buf *sl_ffi_buf_slice(const sl_lbuf *h, size_t index, size_t len, int retain, const char **err);
sl_buf *sl_ffi_buf_duplicate(const sl_lbuf *h, int retain, const char **err);
int sl_ffi_buf_ensure_writable(const sl_lbuf *h, size_t n, const char **err);
int sl_ffi_buf_discard_read_bytes(const sl_lbuf *h, const char **err);
sl_buf *sl_ffi_buf_copy(const sl_lbuf *h, size_t index, size_t len, const char **err);
int sl_ffi_buf_find(const sl_lbuf *h, size_t from, size_t to, const void *needle, size_t nlen,
                    size_t *at, const char **err);
/* the Lua host's event queue and running pipelines (host.c, ffi.c) */
typedef struct sl_lua_host sl_lua_host;
typedef struct sl_lua_event {
  sl_ctx *ctx;
  void *ch;
  void *ptr;
  char *str;
  double id;
  int32_t ev;
  int32_t n;
} sl_lua_event;
int sl_ffi_host_next(sl_lua_host *h, sl_lua_event *out);
int sl_ffi_host_register_stage(sl_lua_host *h, uint32_t mask);
void sl_ffi_host_arm_timer(sl_lua_host *h, double delay_ms);
void sl_ffi_host_abandon(sl_lua_host *h, const char *why);
int32_t *sl_ffi_host_heap_over(sl_lua_host *h);
int sl_ffi_host_heap_above(sl_lua_host *h);
void sl_ffi_host_heap_stopped(sl_lua_host *h);
void sl_ffi_host_collect(sl_lua_host *h);
void sl_ffi_host_step(sl_lua_host *h);
double sl_ffi_ctx_insert_lua(sl_ctx *ctx, int after, int key, const char *name, sl_ctx **out);
sl_ctx *sl_ffi_ctx_insert_c(sl_ctx *ctx, int after, const char *name, const void *conf,
                            const char **err);
void sl_ffi_ctx_remove(sl_ctx *ctx);
int sl_ffi_ctx_stages(sl_ctx *ctx, const char **names, sl_ctx **ctxs, int max);
const char *sl_ffi_ctx_address(sl_ctx *ctx, int remote);
const char *sl_ffi_ctx_tls_version(sl_ctx *ctx);
const char *sl_ffi_ctx_tls_server_name(sl_ctx *ctx);
const char *sl_ffi_ctx_tls_peer_subject(sl_ctx *ctx);
void sl_ffi_ctx_unhandled(sl_ctx *ctx);
int sl_ffi_ctx_is_open(sl_ctx *ctx);
double sl_ffi_ctx_now(sl_ctx *ctx);
/* the admin endpoint's hooks */
void sl_ffi_host_stage_error(sl_lua_host *h, const char *name);
typedef struct sl_holder { const void *who; uint32_t gen; uint32_t unused; } sl_holder;
sl_holder *sl_ffi_host_holders(sl_lua_host *h, uintptr_t *base);
/* the in-memory channel of sluice.testing (embedded.c) */
typedef struct sl_channel sl_channel;
sl_lua_host *sl_ffi_embedded_host(void);
sl_channel *sl_ffi_embedded_open(const char *name, size_t low, size_t high);
double sl_ffi_embedded_add_lua(sl_channel *ch, int key, const char *name, sl_ctx **out);
sl_ctx *sl_ffi_embedded_add_c(sl_channel *ch, const char *name, const void *conf,
                              const char **err);
void sl_ffi_embedded_activate(sl_channel *ch);
void sl_ffi_embedded_fire(sl_channel *ch, int ev, sl_buf *b, int n, const char *text);
sl_buf *sl_ffi_embedded_take(sl_channel *ch);
void sl_ffi_embedded_set_writable(sl_channel *ch, int on);
int sl_ffi_embedded_is_open(sl_channel *ch);
const char *sl_ffi_embedded_reason(sl_channel *ch);
void sl_ffi_embedded_close(sl_channel *ch, const char *reason);
void sl_ffi_embedded_owned(sl_channel *ch, uint64_t *count, uint64_t *bytes);
size_t sl_ffi_embedded_release(sl_channel *ch, char *report, size_t size);
void sl_ffi_embedded_shutdown(void);
]]

return true
