/*
 * alloc_bench: one workload against one allocator, for bench/alloc/run.
 *
 * Built once per backend from this one file, because jemalloc and mimalloc
 * replace malloc for the whole process:
 *   -DBENCH_SLUICE    sl_buf_alloc + sl_buf_release on a pool with the
 *                     default allocator configuration
 *   -DBENCH_GLIBC     malloc + free (glibc)
 *   -DBENCH_JEMALLOC  malloc + free, linked with -ljemalloc
 *   -DBENCH_MIMALLOC  malloc + free, linked with -lmimalloc
 *   -DBENCH_NULL      "loop": the same harness with an allocator that does
 *                     nothing; its instruction count is subtracted from the
 *                     others, so that their figures are the allocator's own
 *
 * Usage: alloc_bench W1|W2|W3|W4 PAIRS [SPIN]
 *   PAIRS  alloc+free pairs to measure (W3 rounds up to whole rounds)
 *   SPIN   W4 only: polls of the ring before sched_yield (0 under callgrind)
 *
 * Prints one line of key=value fields (see main). The measured work runs in
 * functions whose names start with measure_ (the producer and, for W4, the
 * consumer thread), so that `valgrind --tool=callgrind --collect-atstart=no
 * --toggle-collect='measure_*'` counts exactly that work; a warm-up pass of
 * the same loop runs first and is counted by neither the clock nor callgrind.
 *
 * Every workload touches the first and last byte of each block it gets, the
 * same for every backend; sizes and free orders come from tables filled with
 * a fixed-seed PRNG before anything is measured, so every backend sees the
 * same sequence.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(BENCH_SLUICE)
#include "alloc/arena.h"
#include "alloc/pool.h"
#include "buf/buf.h"
#ifdef BENCH_MAX_CACHED
#define BENCH_BACKEND "sluice-64k"
#else
#define BENCH_BACKEND "sluice"
#endif
#elif defined(BENCH_GLIBC)
#include <malloc.h>
#define BENCH_BACKEND "glibc"
#elif defined(BENCH_JEMALLOC)
#include <jemalloc/jemalloc.h>
#define BENCH_BACKEND "jemalloc"
#elif defined(BENCH_MIMALLOC)
#include <mimalloc.h>
#define BENCH_BACKEND "mimalloc"
#elif defined(BENCH_NULL)
#define BENCH_BACKEND "loop"
#else
#error "define one of BENCH_SLUICE, BENCH_GLIBC, BENCH_JEMALLOC, BENCH_MIMALLOC, BENCH_NULL"
#endif

#define BENCH_NOINLINE __attribute__((noinline))
/* Makes p escape, so that the compiler cannot drop a malloc/free pair or
 * the touches. */
#define BENCH_ESCAPE(p) __asm__ volatile("" : : "r"(p) : "memory")

#define BENCH_SIZES (1u << 16)        /* size table entries, cycled */
#define BENCH_SIZE_MASK (BENCH_SIZES - 1)
#define BENCH_FIFO 1024               /* W2: live buffers */
#define BENCH_LIVE 10000              /* W3: live objects per round */
#define BENCH_PERMS 4                 /* W3: free orders, cycled */
#define BENCH_RING 256                /* W4: slots between the threads */
#define BENCH_DRAIN_EVERY 64          /* W4: owner drains every so many allocations */

static void bench_die(const char *what) {
  fprintf(stderr, "alloc_bench (%s): %s\n", BENCH_BACKEND, what);
  exit(1);
}

/* ---- backends ---------------------------------------------------------- */

#if defined(BENCH_SLUICE)
static sl_alloc *bench_alloc_state;
static sl_pool *bench_pool;

static void bench_init(void) {
  sl_alloc_config cfg;
  const char *err = "?";
  sl_alloc_config_defaults(&cfg);
#ifdef BENCH_MAX_CACHED
  cfg.max_cached = BENCH_MAX_CACHED;   /* the tuned row: a larger worker cache */
#endif
  bench_alloc_state = sl_alloc_create(&cfg, &err);
  if (bench_alloc_state == NULL) bench_die(err);
  bench_pool = sl_pool_create(bench_alloc_state, 0);   /* binds this thread */
  if (bench_pool == NULL) bench_die("sl_pool_create failed");
}

static inline void *bench_get(size_t n, uint8_t **data) {
  sl_buf *b = sl_buf_alloc(bench_pool, n, 0);
  if (b == NULL) bench_die("sl_buf_alloc failed");
  *data = b->data;
  return b;
}

static inline void bench_put(void *h) { sl_buf_release(h); }

/* W4: the pool's owner takes back what the other thread released. */
static inline void bench_owner_poll(void) { sl_buf_drain(bench_pool); }

static void bench_trim(void) {
  sl_buf_drain(bench_pool);
  sl_pool_trim(bench_pool, 1);
  sl_arena_release_empty(&bench_alloc_state->arenas[0], 0, 1);
}

static void bench_describe(FILE *f) {
  sl_pool_stats st;
  sl_pool_get_stats(bench_pool, &st);
  fprintf(f, " sl_allocs=%llu sl_cache_hits=%llu sl_remote_queued=%llu sl_remote_direct=%llu"
             " sl_recycler_overflows=%llu sl_headers_total=%llu sl_chunks_created=%llu",
          (unsigned long long)st.allocs, (unsigned long long)st.cache_hits,
          (unsigned long long)st.remote_queued, (unsigned long long)st.remote_direct,
          (unsigned long long)st.recycler_overflows, (unsigned long long)st.headers_total,
          (unsigned long long)bench_alloc_state->arenas[0].chunks_created);
}

#elif defined(BENCH_NULL)
static _Alignas(64) uint8_t bench_null_mem[65536];

static void bench_init(void) {}

/* noipa: the harness pays a real call, as it does for malloc. */
__attribute__((noipa)) static void *bench_get(size_t n, uint8_t **data) {
  (void)n;
  *data = bench_null_mem;
  return bench_null_mem;
}

__attribute__((noipa)) static void bench_put(void *h) { BENCH_ESCAPE(h); }

static inline void bench_owner_poll(void) {}
static void bench_trim(void) {}
static void bench_describe(FILE *f) { (void)f; }

#else /* malloc + free: glibc, jemalloc or mimalloc */

static void bench_init(void) {
#if defined(BENCH_JEMALLOC)
  /* malloc must be jemalloc's: its per-thread counter moves. */
  uint64_t before = 0, after = 0;
  size_t sz = sizeof(before);
  if (mallctl("thread.allocated", &before, &sz, NULL, 0) != 0) bench_die("mallctl failed");
  void *p = malloc(1000);
  BENCH_ESCAPE(p);
  sz = sizeof(after);
  mallctl("thread.allocated", &after, &sz, NULL, 0);
  free(p);
  if (after <= before) bench_die("malloc is not jemalloc's");
#elif defined(BENCH_MIMALLOC)
  void *p = malloc(64);
  BENCH_ESCAPE(p);
  if (!mi_is_in_heap_region(p)) bench_die("malloc is not mimalloc's");
  free(p);
#endif
}

static inline void *bench_get(size_t n, uint8_t **data) {
  void *p = malloc(n);
  if (p == NULL) bench_die("malloc failed");
  *data = p;
  return p;
}

static inline void bench_put(void *h) { free(h); }
static inline void bench_owner_poll(void) {}

static void bench_trim(void) {
#if defined(BENCH_GLIBC)
  malloc_trim(0);
#elif defined(BENCH_JEMALLOC)
  mallctl("thread.tcache.flush", NULL, NULL, NULL, 0);
  mallctl("arena.4096.purge", NULL, NULL, NULL, 0);   /* MALLCTL_ARENAS_ALL */
#elif defined(BENCH_MIMALLOC)
  mi_collect(true);
#endif
}

static void bench_describe(FILE *f) { (void)f; }
#endif

/* ---- tables -------------------------------------------------------------- */

static uint32_t bench_sizes[BENCH_SIZES];
static uint32_t bench_perm[BENCH_PERMS][BENCH_LIVE];
static uint64_t bench_rng_state;

static uint64_t bench_rng(void) {   /* splitmix64 */
  uint64_t z = (bench_rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static void bench_tables(const char *w) {
  bench_rng_state = 0x5eed0000u + (uint64_t)w[1];
  for (uint32_t i = 0; i < BENCH_SIZES; i++) {
    if (!strcmp(w, "W1") || !strcmp(w, "W4")) {
      bench_sizes[i] = 512u << (bench_rng() % 8);            /* 512 .. 64 KiB */
    } else if (!strcmp(w, "W2")) {
      bench_sizes[i] = 64u + (uint32_t)(bench_rng() % (65536 - 64 + 1));
    } else {
      bench_sizes[i] = 16u + (uint32_t)(bench_rng() % (512 - 16 + 1));
    }
  }
  for (int k = 0; k < BENCH_PERMS; k++) {   /* Fisher-Yates */
    for (uint32_t i = 0; i < BENCH_LIVE; i++) bench_perm[k][i] = i;
    for (uint32_t i = BENCH_LIVE - 1; i > 0; i--) {
      uint32_t j = (uint32_t)(bench_rng() % (i + 1));
      uint32_t t = bench_perm[k][i];
      bench_perm[k][i] = bench_perm[k][j];
      bench_perm[k][j] = t;
    }
  }
}

/* One block: allocate, touch its first and last byte. */
static inline void *bench_take(uint64_t i) {
  size_t n = bench_sizes[i & BENCH_SIZE_MASK];
  uint8_t *d;
  void *h = bench_get(n, &d);
  d[0] = (uint8_t)i;
  d[n - 1] = (uint8_t)i;
  BENCH_ESCAPE(d);
  return h;
}

/* ---- W1 io-cycle: allocate, touch, free ------------------------------- */

BENCH_NOINLINE static void w1_loop(uint64_t pairs) {
  for (uint64_t i = 0; i < pairs; i++) bench_put(bench_take(i));
}

BENCH_NOINLINE void measure_w1(uint64_t pairs) { w1_loop(pairs); }

/* ---- W2 queue: a FIFO of up to 1024 live buffers ------------------------ */

static void *bench_fifo[BENCH_FIFO];

BENCH_NOINLINE static void w2_loop(uint64_t pairs) {
  uint32_t head = 0, count = 0;
  for (uint64_t i = 0; i < pairs; i++) {
    if (count == BENCH_FIFO) {
      bench_put(bench_fifo[head]);
      head = (head + 1) & (BENCH_FIFO - 1);
      count--;
    }
    bench_fifo[(head + count) & (BENCH_FIFO - 1)] = bench_take(i);
    count++;
  }
  while (count > 0) {
    bench_put(bench_fifo[head]);
    head = (head + 1) & (BENCH_FIFO - 1);
    count--;
  }
}

BENCH_NOINLINE void measure_w2(uint64_t pairs) { w2_loop(pairs); }

/* ---- W3 small: 10,000 live objects, freed in a shuffled order ----------- */

static void *bench_live[BENCH_LIVE];

BENCH_NOINLINE static void w3_loop(uint64_t rounds) {
  for (uint64_t r = 0; r < rounds; r++) {
    uint64_t base = r * BENCH_LIVE;
    for (uint32_t j = 0; j < BENCH_LIVE; j++) bench_live[j] = bench_take(base + j);
    const uint32_t *perm = bench_perm[r % BENCH_PERMS];
    for (uint32_t j = 0; j < BENCH_LIVE; j++) bench_put(bench_live[perm[j]]);
  }
}

BENCH_NOINLINE void measure_w3(uint64_t rounds) { w3_loop(rounds); }

/* ---- W4 cross-thread: this thread allocates, another frees --------------- */

typedef struct bench_ring {
  _Alignas(64) atomic_size_t head;   /* consumer */
  _Alignas(64) atomic_size_t tail;   /* producer */
  _Alignas(64) void *slots[BENCH_RING];
  uint64_t pairs;
} bench_ring;

static bench_ring bench_q;
static unsigned bench_spin = 100;

static inline void bench_wait(unsigned *spins) {
  if (*spins < bench_spin) {
    (*spins)++;
    __builtin_ia32_pause();
  } else {
    *spins = 0;
    sched_yield();
  }
}

static void w4_consume(bench_ring *q) {
  size_t head = 0, tail = 0;
  unsigned spins = 0;
  for (uint64_t i = 0; i < q->pairs; i++) {
    while (head == tail) {
      tail = atomic_load_explicit(&q->tail, memory_order_acquire);
      if (head == tail) bench_wait(&spins);
    }
    void *h = q->slots[head & (BENCH_RING - 1)];
    head++;
    atomic_store_explicit(&q->head, head, memory_order_release);
    bench_put(h);
  }
}

static void w4_produce(bench_ring *q) {
  size_t tail = 0, head = 0;
  unsigned spins = 0;
  for (uint64_t i = 0; i < q->pairs; i++) {
    void *h = bench_take(i);
    while (tail - head == BENCH_RING) {
      head = atomic_load_explicit(&q->head, memory_order_acquire);
      if (tail - head == BENCH_RING) bench_wait(&spins);
    }
    q->slots[tail & (BENCH_RING - 1)] = h;
    tail++;
    atomic_store_explicit(&q->tail, tail, memory_order_release);
    if ((i & (BENCH_DRAIN_EVERY - 1)) == BENCH_DRAIN_EVERY - 1) bench_owner_poll();
  }
}

BENCH_NOINLINE static void *w4_warm_consumer(void *arg) {
  w4_consume(arg);
  return NULL;
}

BENCH_NOINLINE void *measure_w4_consumer(void *arg) {
  w4_consume(arg);
  return NULL;
}

static void w4_run(uint64_t pairs, void *(*consumer)(void *)) {
  pthread_t t;
  memset(&bench_q, 0, sizeof(bench_q));
  bench_q.pairs = pairs;
  if (pthread_create(&t, NULL, consumer, &bench_q) != 0) bench_die("pthread_create failed");
  w4_produce(&bench_q);
  pthread_join(t, NULL);
  bench_owner_poll();
}

BENCH_NOINLINE static void w4_warm(uint64_t pairs) { w4_run(pairs, w4_warm_consumer); }

BENCH_NOINLINE void measure_w4(uint64_t pairs) { w4_run(pairs, measure_w4_consumer); }

/* ---- memory figures, read without allocating ----------------------------- */

static long bench_read_proc(const char *path, char *buf, size_t len) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = read(fd, buf, len - 1);
  close(fd);
  if (n < 0) return -1;
  buf[n] = 0;
  return n;
}

/* Resident set now, KiB (/proc/self/statm). */
static long bench_rss_kb(void) {
  char buf[256];
  if (bench_read_proc("/proc/self/statm", buf, sizeof(buf)) < 0) return -1;
  long size = 0, res = 0;
  if (sscanf(buf, "%ld %ld", &size, &res) != 2) return -1;
  return res * (sysconf(_SC_PAGESIZE) / 1024);
}

/* Peak resident set, KiB (VmHWM). */
static long bench_hwm_kb(void) {
  char buf[4096];
  if (bench_read_proc("/proc/self/status", buf, sizeof(buf)) < 0) return -1;
  const char *p = strstr(buf, "VmHWM:");
  return p ? strtol(p + 6, NULL, 10) : -1;
}

static double bench_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s W1|W2|W3|W4 PAIRS [SPIN]\n", argv[0]);
    return 2;
  }
  const char *w = argv[1];
  uint64_t pairs = strtoull(argv[2], NULL, 10);
  if (argc > 3) bench_spin = (unsigned)strtoul(argv[3], NULL, 10);
  if (strcmp(w, "W1") && strcmp(w, "W2") && strcmp(w, "W3") && strcmp(w, "W4"))
    bench_die("workload must be W1, W2, W3 or W4");

  bench_init();
  bench_tables(w);
  uint64_t warm = pairs / 4;
  long rss_start = bench_rss_kb();
  double t0 = 0, t1 = 0;

  if (!strcmp(w, "W1")) {
    w1_loop(warm);
    t0 = bench_now_ns();
    measure_w1(pairs);
    t1 = bench_now_ns();
  } else if (!strcmp(w, "W2")) {
    w2_loop(warm);
    t0 = bench_now_ns();
    measure_w2(pairs);
    t1 = bench_now_ns();
  } else if (!strcmp(w, "W3")) {
    uint64_t rounds = (pairs + BENCH_LIVE - 1) / BENCH_LIVE;
    pairs = rounds * BENCH_LIVE;
    w3_loop(1);
    t0 = bench_now_ns();
    measure_w3(rounds);
    t1 = bench_now_ns();
  } else {
    w4_warm(warm);
    t0 = bench_now_ns();
    measure_w4(pairs);
    t1 = bench_now_ns();
  }

  long rss_free = bench_rss_kb();
  bench_trim();
  long rss_trim = bench_rss_kb();
  long hwm = bench_hwm_kb();

  printf("workload=%s allocator=%s pairs=%llu ns_per_op=%.3f peak_rss_kb=%ld rss_start_kb=%ld"
         " rss_after_free_kb=%ld rss_after_trim_kb=%ld",
         w, BENCH_BACKEND, (unsigned long long)pairs, pairs ? (t1 - t0) / (double)pairs : 0.0,
         hwm, rss_start, rss_free, rss_trim);
  bench_describe(stdout);
  printf("\n");
  return 0;
}
