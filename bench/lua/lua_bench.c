/*
 * The Lua-stage benchmark: an in-process pipeline (real core, real Lua
 * host, a channel over a socketpair that is never read) pushing buffers
 * through N stages that read a 4-byte field and pass the buffer on; the
 * tail releases it. Stages are Lua (bench/lua/field_stage.lua) or C (a
 * pass-through), chosen on the command line:
 *
 *   lua_bench lua|c N SIZE COUNT
 *
 * The leak detection level comes from SLUICE_LEAK_DETECTION. Prints one
 * line of key=value fields: buffers, ns per buffer (CPU time), buffers per
 * second.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "alloc/arena.h"
#include "alloc/pool.h"
#include "buf/buf.h"
#include "buf/holder.h"
#include "buf/leak.h"
#include "io/channel.h"
#include "io/worker.h"
#include "lua/host.h"
#include "proxy/config.h"
#include "util/log.h"

static void die(const char *what) {
  fprintf(stderr, "lua_bench: %s\n", what);
  exit(1);
}

static void c_pass(sl_ctx *ctx, sl_buf *b) {
  volatile uint32_t v = (uint32_t)b->data[b->rd] << 24 | (uint32_t)b->data[b->rd + 1] << 16 |
                        (uint32_t)b->data[b->rd + 2] << 8 | b->data[b->rd + 3];
  (void)v;
  sl_ctx_fire_read(ctx, b);
}

static const sl_stage_ops c_pass_ops = {.name = "c_pass", .on_read = c_pass};

/* Reads delivered per transition into Lua: a worker delivers everything
 * one loop iteration read (up to SL_RECV_MAX_READS per channel per
 * wake-up) in one call. 1 measures a transition per buffer. */
static long batch = SL_RECV_MAX_READS;

/* Pushes count buffers of size bytes through the pipeline. */
static inline void push(sl_worker *w, sl_channel *ch, size_t size, long count) {
  for (long i = 0; i < count; i++) {
    if (w->lua && i % batch == 0) sl_lua_host_drain(w->lua);
    sl_buf *b = sl_buf_alloc(w->pool, size, size);
    if (b == NULL) die("alloc");
    b->data[0] = 0;
    b->data[1] = 0;
    b->data[2] = (uint8_t)(i >> 8);
    b->data[3] = (uint8_t)i;
    b->wr = (uint32_t)size;
    sl_pipeline_fire_read(&ch->pipe, b);
  }
  if (w->lua) sl_lua_host_drain(w->lua);
}

/* Warm-up (JIT traces, caches) and the measured part: callgrind counts only
 * the latter (--toggle-collect=measure). */
__attribute__((noinline)) static void warm_up(sl_worker *w, sl_channel *ch, size_t size, long n) {
  push(w, ch, size, n);
}
__attribute__((noinline)) static void measure(sl_worker *w, sl_channel *ch, size_t size, long n) {
  push(w, ch, size, n);
}

static double cpu_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc != 6) die("usage: lua_bench lua|c N SIZE COUNT CONFIG");
  int lua = strcmp(argv[1], "lua") == 0;
  int n = atoi(argv[2]);
  size_t size = (size_t)atol(argv[3]);
  long count = atol(argv[4]);
  sl_log_set_level(SL_LOG_WARN);
  const char *bs = getenv("SLUICE_BENCH_BATCH");
  if (bs && atol(bs) > 0) batch = atol(bs);

  char err[1024];
  sl_config *cfg = sl_config_load(argv[5], err, sizeof(err));
  if (cfg == NULL) die(err);
  const char *lvl = getenv("SLUICE_LEAK_DETECTION");
  if (lvl && sl_leak_parse_level(lvl, &cfg->alloc.leak_level) != 0) die("bad level");
  const char *aerr;
  if (cfg->alloc.arenas == 0) cfg->alloc.arenas = 1;
  sl_alloc *alloc = sl_alloc_create(&cfg->alloc, &aerr);
  if (alloc == NULL) die(aerr);
  sl_worker *w = sl_worker_create(0, alloc);
  if (w == NULL) die("worker");
  sl_pool_bind_thread(w->pool);
  /* With an admin endpoint, the proxy records buffer holders (the memory
   * summary); without one (the default) it does not. SLUICE_HOLDERS=1
   * measures the former. */
  const char *holders = getenv("SLUICE_HOLDERS");
  if (holders && strcmp(holders, "1") == 0 && sl_holder_enable(w->pool) != 0) die("holders");
  if (lua && n > 0) {
    /* No loop runs here: events wait for the drains in push(). */
    struct ev_loop *loop = w->loop;
    w->loop = NULL;
    w->lua = sl_lua_host_create(w, cfg, err, sizeof(err));
    w->loop = loop;
    if (w->lua == NULL) die(err);
    sl_lua_host_defer(w->lua);
  }
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) die("socketpair");
  sl_addr addr;
  memset(&addr, 0, sizeof(addr));
  sl_channel_config cc = {.low_water_mark = 32768, .high_water_mark = 65536};
  sl_channel *ch = sl_channel_accepted(w, sv[0], &addr, &cc, "bench");
  const sl_listener_cfg *l = &cfg->listeners[0];
  for (int i = 0; i < n; i++) {
    sl_ctx *ctx = lua ? sl_lua_host_add_stage(w->lua, &ch->pipe, &l->stages[i])
                      : sl_pipeline_add_last(&ch->pipe, &c_pass_ops, "c_pass");
    if (ctx == NULL) die("stage");
  }
  ch->flags |= SL_CH_ACTIVE;

  warm_up(w, ch, size, 20000);
  uint64_t e0 = sl_lua_host_entries(w->lua);
  double t0 = cpu_ns();
  measure(w, ch, size, count);
  double ns = (cpu_ns() - t0) / (double)count;
  double entries = (double)(sl_lua_host_entries(w->lua) - e0) / (double)count;
  printf("stages=%s n=%d size=%zu level=%s buffers=%ld ns_per_buffer=%.1f buffers_per_s=%.0f "
         "lua_entries_per_buffer=%.4f\n",
         argv[1], n, size, sl_leak_level_name(w->pool->leak_level), count, ns, 1e9 / ns, entries);

  sl_channel_close(ch, "done", 0);
  sl_lua_host_drain(w->lua);
  sl_lua_host_destroy(w->lua);
  w->lua = NULL;
  close(sv[1]);
  sl_holder_disable(w->pool);
  uint64_t leaked = sl_worker_destroy(w);
  sl_alloc_destroy(alloc);
  sl_config_free(cfg);
  return leaked ? 3 : 0;
}
