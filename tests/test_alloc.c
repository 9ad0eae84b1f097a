/*
 * The pooled allocator: size classes, subpages, runs (deferred coalescing,
 * the arena's index of free runs by length), usage lists, worker
 * caches and their trims, the header region and its recycler, generations,
 * the cross-thread return queue, max_memory, unpooled mode, huge blocks,
 * and a randomized stress that checks every byte it wrote.
 *
 * Each test builds its own allocator from an explicit config and ends with
 * nothing outstanding and, where it mapped chunks, none left mapped.
 *
 * Five tests guard fixed bugs (their comments say which): unmapped chunks
 * leaving ASan poison behind, a foreign release of a tracked buffer
 * blocking on a full return queue, chunks above 32 MiB overflowing the
 * class arrays, a view's header search skipping bins with parked headers,
 * and (under ThreadSanitizer: scripts/test --tsan) foreign releases racing
 * the owner's releases from Lua on the quarantine's thread test.
 *
 * ASan note (see test_unmapped_chunk_leaves_no_asan_poison): the pool
 * poisons freed blocks, and nothing clears that poison when a chunk is
 * unmapped, so anything mapped later at the same address trips false
 * reports. The other tests release chunks through release_chunks() /
 * idle_tick(), which clear the shadow of exactly the chunks that went away
 * (after they went away), so that the tests stay independent of each other.
 */
#include "test_util.h"

#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/wait.h>
#include <time.h>

#include "alloc/arena.h"
#include "alloc/chunk.h"
#include "alloc/pool.h"
#include "alloc/retq.h"
#include "alloc/size_class.h"
#include "buf/buf.h"
#include "buf/leak.h"
#include "io/worker.h"
#include "lua/ffi.h"
#include "util/common.h"

#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#else
#define TEST_ASAN 0
#endif

/* Under valgrind, RSS is valgrind's as much as ours: the RSS bound of the
 * cross-thread test is reported, not checked. */
#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define TEST_UNDER_VALGRIND() (RUNNING_ON_VALGRIND != 0)
#endif
#endif
#ifndef TEST_UNDER_VALGRIND
#define TEST_UNDER_VALGRIND() 0
#endif

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "pat_byte() assumes the byte order of pat_fill()'s word stores");

#define KiB ((size_t)1024)
#define MiB ((size_t)1024 * 1024)

/* ---- helpers ---- */

static int64_t mono_ms(void) { return sl_alloc_now_ms(); }

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#if TEST_ASAN
void __sanitizer_purge_allocator(void); /* in libasan, not in its headers */
#endif

/* Resident bytes of the process. Under ASan, its own allocator first gives
 * back what it holds for freed malloc memory (quarantine, caches), so that
 * what is measured is the pool's memory. */
static size_t rss_bytes(void) {
#if TEST_ASAN
  __sanitizer_purge_allocator();
#endif
  FILE *f = fopen("/proc/self/statm", "r");
  assert_non_null(f);
  unsigned long size = 0, resident = 0;
  assert_int_equal(fscanf(f, "%lu %lu", &size, &resident), 2);
  fclose(f);
  return (size_t)resident * (size_t)sysconf(_SC_PAGESIZE);
}

/* Whether address p is mapped, from /proc/self/maps (no syscall touches p,
 * so memory checkers have nothing to say about probing unmapped memory). */
static int is_mapped(const void *p) {
  FILE *f = fopen("/proc/self/maps", "r");
  assert_non_null(f);
  uintptr_t a = (uintptr_t)p, lo, hi;
  char line[512];
  int found = 0;
  while (!found && fgets(line, sizeof(line), f) != NULL)
    if (sscanf(line, "%" SCNxPTR "-%" SCNxPTR, &lo, &hi) == 2 && a >= lo && a < hi) found = 1;
  fclose(f);
  return found;
}

/* A config with small geometry: page 4 KiB, the given chunk size. */
static void small_config(sl_alloc_config *cfg, size_t chunk) {
  sl_alloc_config_defaults(cfg);
  cfg->page_size = 4096;
  cfg->chunk_size = chunk;
}

/* The owned-subpage tests' allocator: 4 KiB pages in 256 KiB chunks, so
 * 1 KiB elements come 4 to a subpage, and bins of 8 that fill quickly. */
static void owned_config(sl_alloc_config *cfg) {
  small_config(cfg, 256 * 1024);
  cfg->small_cache = 8;
}

static sl_alloc *new_alloc(const sl_alloc_config *cfg) {
  const char *err = NULL;
  sl_alloc *a = sl_alloc_create(cfg, &err);
  if (a == NULL) fail_msg("sl_alloc_create: %s", err ? err : "?");
  return a;
}

static sl_pool *new_pool(sl_alloc *a) {
  sl_pool *p = sl_pool_create(a, 0);
  assert_non_null(p);
  return p;
}

static size_t arena_list_count(void) {
  return sizeof(((sl_arena *)0)->lists) / sizeof(((sl_arena *)0)->lists[0]);
}

/* The chunks of ar now, into out (at most cap). Returns the count. Only
 * while no other thread uses the arena (the walk takes no lock). */
static size_t arena_chunks(const sl_arena *ar, sl_chunk **out, size_t cap) {
  size_t n = 0;
  for (size_t q = 0; q < arena_list_count(); q++)
    for (sl_chunk *c = ar->lists[q]; c != NULL; c = c->next) {
      if (n < cap) out[n] = c;
      n++;
    }
  return n;
}

static int arena_has_chunk(const sl_arena *ar, const sl_chunk *c) {
  for (size_t q = 0; q < arena_list_count(); q++)
    for (sl_chunk *x = ar->lists[q]; x != NULL; x = x->next)
      if (x == c) return 1;
  return 0;
}

/* Shadow bookkeeping around anything that may unmap chunks (see the ASan
 * note above). Without ASan these only snapshot and compare. */
typedef struct chunk_snapshot {
  sl_chunk *c[256];
  size_t n;
} chunk_snapshot;

static void snapshot_chunks(sl_arena *ar, chunk_snapshot *s) {
  s->n = arena_chunks(ar, s->c, 256);
  assert_true(s->n <= 256);
}

static void forget_unmapped(sl_arena *ar, const chunk_snapshot *s) {
  for (size_t i = 0; i < s->n; i++) {
    if (arena_has_chunk(ar, s->c[i])) continue;
    SL_UNPOISON((void *)s->c[i], ar->alloc->cfg.chunk_size);
  }
}

static unsigned release_chunks(sl_arena *ar, int64_t now_ms, int force) {
  chunk_snapshot s;
  snapshot_chunks(ar, &s);
  unsigned n = sl_arena_release_empty(ar, now_ms, force);
  forget_unmapped(ar, &s);
  return n;
}

static sl_pool_trim_report idle_tick(sl_pool *p, int64_t now_ms) {
  chunk_snapshot s;
  sl_pool_trim_report r;
  snapshot_chunks(p->arena, &s);
  int gave = sl_pool_tick(p, now_ms, &r);
  forget_unmapped(p->arena, &s);
  assert_int_equal(gave, r.blocks > 0 || r.chunks > 0 || r.headers);
  return r;
}

/* Gives everything cached back, unmaps every empty chunk, and checks that
 * nothing is outstanding and nothing is mapped; then frees p and a. */
static void finish(sl_pool *p, sl_alloc *a) {
  if (p != NULL) {
    sl_buf_drain(p);
    sl_pool_trim(p, 1);
    release_chunks(p->arena, 0, 1);
    sl_pool_stats st = sl_test_stats(p);
    assert_int_equal(st.blocks_in_use, 0);
    assert_int_equal(st.bufs_active, 0);
    assert_int_equal(st.bytes_in_use, 0);
    assert_int_equal(st.cached_blocks, 0);
  }
  for (int i = 0; i < a->cfg.arenas; i++) {
    sl_arena *ar = &a->arenas[i];
    release_chunks(ar, 0, 1);
    assert_int_equal(ar->chunks, 0);
    assert_int_equal(ar->chunks_created, ar->chunks_released);
    assert_int_equal(ar->huge_allocs, ar->huge_frees);
    assert_int_equal(ar->huge_bytes, 0);
  }
  assert_int_equal(atomic_load(&a->reserved), 0);
  sl_pool_destroy(p);
  sl_alloc_destroy(a);
}

/* The headers foreign threads freed sit on a lock-free stack that the
 * stats do not count as free; the worker's idle timer takes them back
 * (and resets the region). This does what that timer does. */
static void take_back_foreign_headers(sl_pool *p) {
  int64_t t = mono_ms() + 10000000;
  idle_tick(p, t);
  idle_tick(p, t + p->alloc->cfg.trim_idle_ms + 1);
}

/* A small deterministic PRNG (xorshift64*). */
static uint64_t rng_next(uint64_t *s) {
  uint64_t x = *s;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *s = x;
  return x * 0x2545F4914F6CDD1Dull;
}

/* The word pattern of the stress tests: word i of a buffer with key k. */
#define PAT_SEED 0x5eed5eed12345678ull
static inline uint64_t pat_word(uint64_t key, size_t i) {
  return key ^ ((uint64_t)i * 0x9E3779B97F4A7C15ull) ^ PAT_SEED;
}
static inline uint8_t pat_byte(uint64_t key, size_t k) {
  return (uint8_t)(pat_word(key, k >> 3) >> ((k & 7) * 8));
}

/* Writes the pattern of key into d[from, to); d is 8-byte aligned. */
static void pat_fill(uint8_t *d, size_t from, size_t to, uint64_t key) {
  size_t k = from;
  while (k < to && (k & 7)) {
    d[k] = pat_byte(key, k);
    k++;
  }
  uint64_t *w = (uint64_t *)(void *)(d + k);
  for (; k + 8 <= to; k += 8) *w++ = pat_word(key, k >> 3);
  while (k < to) {
    d[k] = pat_byte(key, k);
    k++;
  }
}

/* The first offset in [from, to) that does not hold the pattern, or to. */
static size_t pat_check(const uint8_t *d, size_t from, size_t to, uint64_t key) {
  size_t k = from;
  while (k < to && (k & 7)) {
    if (d[k] != pat_byte(key, k)) return k;
    k++;
  }
  const uint64_t *w = (const uint64_t *)(const void *)(d + k);
  for (; k + 8 <= to; k += 8, w++)
    if (*w != pat_word(key, k >> 3)) break;
  while (k < to) {
    if (d[k] != pat_byte(key, k)) return k;
    k++;
  }
  return to;
}

/* The generation the pool gives next, and a way to set it. */
static uint32_t next_gen(const sl_pool *p) { return (uint32_t)(p->gen_word >> 32); }
static void set_next_gen(sl_pool *p, uint32_t g) { p->gen_word = (uint64_t)g << 32 | 1; }

/* ---- 1. size classes ---- */

static void test_size_class_of_every_size_is_smallest_that_fits(void **state) {
  (void)state;
  static const size_t first[] = {16,  32,  48,  64,  80,  96,  112, 128, 160, 192,
                                 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024};
  for (unsigned i = 0; i < sizeof(first) / sizeof(first[0]); i++)
    assert_int_equal(sl_sc_size(i), first[i]);

  /* Strictly increasing, and each group after the first spans a doubling. */
  for (unsigned i = 1; i < SL_SC_MAX_CLASSES; i++)
    assert_true(sl_sc_size(i) > sl_sc_size(i - 1));
  for (unsigned i = 8; i < SL_SC_MAX_CLASSES; i++)
    assert_int_equal(sl_sc_size(i), 2 * sl_sc_size(i - 4));

  for (size_t size = 1; size <= 4 * MiB; size++) {
    unsigned idx = sl_sc_index(size);
    if (sl_sc_size(idx) < size || (idx > 0 && sl_sc_size(idx - 1) >= size))
      fail_msg("size %zu maps to class %u (%zu bytes); the class below is %zu", size, idx,
               sl_sc_size(idx), idx > 0 ? sl_sc_size(idx - 1) : (size_t)0);
  }
  /* The closed form above the lookup table, spot checks to 1 GiB. */
  for (size_t size = 4 * MiB; size <= 1024 * MiB; size = size * 5 / 4 + 1) {
    unsigned idx = sl_sc_index(size);
    assert_true(sl_sc_size(idx) >= size);
    assert_true(sl_sc_size(idx - 1) < size);
  }

  /* 28 KiB is a class and the last small one. */
  unsigned i28 = sl_sc_index(28 * KiB);
  assert_int_equal(sl_sc_size(i28), 28 * KiB);
  assert_int_equal(SL_SC_SMALL_MAX, 28 * KiB);
  sl_alloc_config cfg;
  sl_alloc_config_defaults(&cfg);
  sl_alloc *a = new_alloc(&cfg);
  assert_int_equal(a->nsmall, i28 + 1);
  assert_int_equal(sl_sc_size(a->nsmall - 1), SL_SC_SMALL_MAX);
  assert_true(sl_sc_size(a->nsmall) > SL_SC_SMALL_MAX);
  /* The default chunk (4 MiB) loses a page to its metadata, so its largest
   * class is 3.5 MiB and 4 MiB requests are huge. */
  assert_int_equal(a->max_class_size, 3584 * KiB);
  assert_int_equal(sl_sc_size(a->nclasses - 1), a->max_class_size);
  sl_alloc_destroy(a);

  /* sl_sc_count(4 MiB) counts the classes up to and including 4 MiB. */
  unsigned n4 = sl_sc_count(4 * MiB);
  assert_int_equal(sl_sc_size(n4 - 1), 4 * MiB);
  assert_true(sl_sc_size(n4) > 4 * MiB);
  unsigned below = 0;
  for (unsigned i = 0; sl_sc_size(i) <= 4 * MiB; i++) below++;
  assert_int_equal(n4, below);
}

/* ---- 2. subpages ---- */

/* Fills the first subpage of sclass through the arena, opens a second one,
 * frees everything, and checks that no chunk is left. */
static void subpage_fill_and_drain(sl_alloc *a, unsigned sclass) {
  sl_arena *ar = &a->arenas[0];
  size_t size = sl_sc_size(sclass);
  size_t page = a->cfg.page_size;
  size_t run_bytes = (size_t)a->run_pages[sclass] * page;
  size_t nelems = run_bytes / size;
  uint64_t created0 = ar->chunks_created, released0 = ar->chunks_released;
  assert_true(nelems >= 1);

  uint8_t **els = calloc(nelems + 1, sizeof(*els));
  assert_non_null(els);
  for (size_t i = 0; i < nelems; i++) {
    els[i] = sl_arena_alloc(ar, sclass, size);
    assert_non_null(els[i]);
  }
  /* All in one run: one subpage, now full and off the class's list. */
  sl_chunk *c = sl_chunk_of(els[0], a->cfg.chunk_size);
  uint32_t page0 = (uint32_t)((els[0] - c->mem) / page);
  sl_subpage *s = c->sub[page0];
  assert_non_null(s);
  assert_int_equal(s->nelems, nelems);
  assert_int_equal(s->nfree, 0);
  assert_int_equal(s->elem_size, size);
  assert_null(ar->subpages[sclass]);
  for (size_t i = 0; i < nelems; i++) {
    assert_ptr_equal(sl_chunk_of(els[i], a->cfg.chunk_size), c);
    assert_true(els[i] >= s->base && els[i] + size <= s->base + run_bytes);
    assert_int_equal((size_t)(els[i] - s->base) % size, 0); /* aligned within the run */
    assert_int_equal((uintptr_t)els[i] % 16, 0);
    for (size_t j = 0; j < i; j++) assert_ptr_not_equal(els[i], els[j]);
    pat_fill(els[i], 0, size, (uint64_t)i + 1);
  }
  for (size_t i = 0; i < nelems; i++) /* no element overlaps another */
    assert_int_equal(pat_check(els[i], 0, size, (uint64_t)i + 1), size);

  /* One more opens a second subpage, outside the first run. */
  els[nelems] = sl_arena_alloc(ar, sclass, size);
  assert_non_null(els[nelems]);
  sl_chunk *c2 = sl_chunk_of(els[nelems], a->cfg.chunk_size);
  sl_subpage *s2 = c2->sub[(els[nelems] - c2->mem) / page];
  assert_non_null(s2);
  assert_ptr_not_equal(s2, s);
  assert_true(els[nelems] < s->base || els[nelems] >= s->base + run_bytes);
  assert_int_equal(ar->cls[sclass].allocs - ar->cls[sclass].frees, nelems + 1);

  for (size_t i = 0; i <= nelems; i++) sl_arena_free(ar, els[i], sclass, size);
  free(els);
  /* At most the class's last subpage is kept; releasing gives it back and
   * then the chunk. */
  assert_true(ar->subpages[sclass] == NULL || ar->subpages[sclass]->next == NULL);
  release_chunks(ar, 0, 1);
  assert_null(ar->subpages[sclass]);
  assert_int_equal(ar->chunks, 0);
  assert_true(ar->chunks_created > created0);
  assert_int_equal(ar->chunks_released - released0, ar->chunks_created - created0);
}

static void test_subpage_fills_bitmap_then_opens_another_and_drains_to_no_chunk(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  sl_alloc *a = new_alloc(&cfg);
  /* 1024 (4 per page), 16 (256 per page: four bitmap words), 48 (85 per
   * page: bits past the end), 3072 (a 3-page run) and 28 KiB (one element
   * in a 7-page run). */
  static const size_t sizes[] = {1024, 16, 48, 3072, 28 * 1024};
  for (unsigned i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
    unsigned sclass = sl_sc_index(sizes[i]);
    assert_int_equal(sl_sc_size(sclass), sizes[i]);
    assert_true(sclass < a->nsmall);
    subpage_fill_and_drain(a, sclass);
  }
  assert_int_equal(a->run_pages[sl_sc_index(3072)], 3);
  assert_int_equal(a->run_pages[sl_sc_index(28 * KiB)], 7);
  finish(NULL, a);
}

/* ---- 3. runs ---- */

static void test_chunk_runs_split_fill_holes_and_coalesce(void **state) {
  (void)state;
  sl_chunk *c = sl_chunk_new(NULL, NULL, 64 * KiB, 4096);
  assert_non_null(c);
  assert_int_equal((uintptr_t)c % (64 * KiB), 0);
  assert_int_equal(c->npages, 16);
  uint32_t m = c->meta_pages;
  uint32_t u = sl_chunk_usable_pages(c);
  assert_true(m >= 1);
  assert_int_equal(u, 16 - m);
  assert_true(u >= 9);
  assert_int_equal(c->free_pages, u);

  /* A=1 B=2 C=3 D=1 E=rest, carved in order from the one free run. */
  assert_int_equal(sl_chunk_run_alloc(c, 1), m);
  assert_int_equal(sl_chunk_run_alloc(c, 2), m + 1);
  assert_int_equal(sl_chunk_run_alloc(c, 3), m + 3);
  assert_int_equal(sl_chunk_run_alloc(c, 1), m + 6);
  assert_int_equal(sl_chunk_run_alloc(c, u - 7), m + 7);
  assert_int_equal(c->free_pages, 0);
  assert_int_equal(sl_chunk_run_alloc(c, 1), -1);

  /* Holes of 2 (B) and 1 (D): three pages free but no run of 3. */
  sl_chunk_run_free(c, m + 1, 2);
  sl_chunk_run_free(c, m + 6, 1);
  assert_int_equal(c->free_pages, 3);
  assert_int_equal(sl_chunk_run_alloc(c, 3), -1);
  assert_int_equal(sl_chunk_run_alloc(c, 2), m + 1); /* fits B's hole, not D's */
  sl_chunk_run_free(c, m + 1, 2);

  /* Freeing A coalesces with B's hole: a run of 3 fits at the start. */
  sl_chunk_run_free(c, m, 1);
  assert_int_equal(sl_chunk_run_alloc(c, 3), m);
  /* Freeing that and C (and D's hole): a run of 7. */
  sl_chunk_run_free(c, m, 3);
  sl_chunk_run_free(c, m + 3, 3);
  assert_int_equal(c->free_pages, 7);
  assert_int_equal(sl_chunk_run_alloc(c, 8), -1);
  assert_int_equal(sl_chunk_run_alloc(c, 7), m);

  /* Everything free: one run of all usable pages, and no more. */
  sl_chunk_run_free(c, m, 7);
  sl_chunk_run_free(c, m + 7, u - 7);
  assert_int_equal(c->free_pages, u);
  assert_int_equal(sl_chunk_run_alloc(c, u + 1), -1);
  assert_int_equal(sl_chunk_run_alloc(c, u), m);
  assert_int_equal(c->free_pages, 0);
  sl_chunk_run_free(c, m, u);
  assert_int_equal(c->free_pages, u);
  sl_chunk_delete(c, 64 * KiB);
}

/* Frees go onto per-length lists and are merged only when an allocation
 * finds no run long enough: a chunk cut into one-page runs and freed page
 * by page still serves a run of every free page, after one sweep. */
static void test_chunk_defers_coalescing_until_a_run_does_not_fit(void **state) {
  (void)state;
  sl_chunk *c = sl_chunk_new(NULL, NULL, 64 * KiB, 4096);
  assert_non_null(c);
  uint32_t m = c->meta_pages, u = sl_chunk_usable_pages(c);
  for (uint32_t i = 0; i < u; i++) assert_int_equal(sl_chunk_run_alloc(c, 1), m + i);
  /* Free all but the last page, from the end: nothing merges. */
  for (uint32_t i = u - 1; i-- > 0;) sl_chunk_run_free(c, m + i, 1);
  assert_int_equal(c->free_pages, u - 1);
  assert_int_equal(c->unmerged, u - 1);
  assert_int_equal(c->sweeps, 0);
  assert_int_not_equal(*sl_chunk_bucket(c, 1), SL_CHUNK_NONE);
  assert_int_equal(*sl_chunk_bucket(c, u - 1), SL_CHUNK_NONE);

  /* A one-page run comes straight off its list: the last freed. */
  assert_int_equal(sl_chunk_run_take(c, 1), m);
  sl_chunk_run_free(c, m, 1);
  assert_int_equal(c->sweeps, 0);

  /* Two pages: no listed run fits; a take refuses, an alloc sweeps once
   * and gets every free page as one run. */
  assert_int_equal(sl_chunk_run_take(c, 2), -1);
  assert_int_equal(sl_chunk_run_alloc(c, u - 1), m);
  assert_int_equal(c->sweeps, 1);
  assert_int_equal(c->unmerged, 0);
  assert_int_equal(c->free_pages, 0);
  assert_int_equal(sl_chunk_run_alloc(c, 1), -1);
  assert_int_equal(c->sweeps, 1); /* nothing unmerged: no second sweep */

  /* The last used run freed: one free run of every usable page at once. */
  sl_chunk_run_free(c, m, u - 1);
  assert_int_equal(c->unmerged, 1);
  sl_chunk_run_free(c, m + u - 1, 1);
  assert_int_equal(c->free_pages, u);
  assert_int_equal(c->unmerged, 0);
  assert_int_equal(*sl_chunk_bucket(c, u), m);
  assert_int_equal(*sl_chunk_bucket(c, 1), SL_CHUNK_NONE);
  assert_int_equal(sl_chunk_run_alloc(c, u), m);
  assert_int_equal(c->sweeps, 1);
  sl_chunk_run_free(c, m, u);
  sl_chunk_delete(c, 64 * KiB);
}

/* The element index of a subpage is a multiply and a shift, not a
 * division: exact for every small class, page size and element (checked
 * at each element's first and last byte). */
static void test_subpage_index_by_multiply_is_exact(void **state) {
  (void)state;
  static const size_t pages[] = {4096, 8192, 65536, 1024 * KiB};
  for (size_t g = 0; g < sizeof(pages) / sizeof(pages[0]); g++) {
    sl_alloc_config cfg;
    sl_alloc_config_defaults(&cfg);
    cfg.page_size = pages[g];
    cfg.chunk_size = SL_MAX(pages[g] * 16, (size_t)4 * MiB);
    sl_alloc *a = new_alloc(&cfg);
    sl_chunk *c = sl_chunk_new(NULL, NULL, cfg.chunk_size, cfg.page_size);
    assert_non_null(c);
    for (unsigned k = 0; k < a->nsmall; k++) {
      uint32_t elem = (uint32_t)sl_sc_size(k);
      sl_subpage *s = sl_subpage_new(c, c->meta_pages, a->run_pages[k], elem, k);
      assert_non_null(s);
      /* The largest runs have half a million elements: every element of
       * the last 4096, a stride through the rest. */
      uint32_t stride = s->nelems > 8192 ? 61 : 1;
      for (uint32_t i = 0; i < s->nelems; i += (i + 4096 >= s->nelems ? 1 : stride)) {
        uint8_t *e = s->base + (size_t)i * elem;
        if (sl_subpage_index(s, e) != i || sl_subpage_index(s, e + elem - 1) != i)
          fail_msg("page %zu, class %u (%u B): element %u maps to %u", pages[g], k, elem, i,
                   sl_subpage_index(s, e));
      }
      for (uint32_t p = c->meta_pages; p < c->meta_pages + a->run_pages[k]; p++) c->sub[p] = NULL;
      free(s);
    }
    sl_chunk_delete(c, cfg.chunk_size);
    sl_alloc_destroy(a);
  }
}

/* ---- 4. usage lists ---- */

static void test_arena_allocates_from_fuller_chunk_and_unmaps_idle_empty_one(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB); /* 63 usable pages */
  cfg.trim_idle_ms = 1000;
  sl_alloc *a = new_alloc(&cfg);
  sl_arena *ar = &a->arenas[0];
  unsigned k32 = sl_sc_index(32 * KiB); /* a normal class: 8-page runs */
  assert_true(k32 >= a->nsmall);
  assert_int_equal(a->run_pages[k32], 8);

  /* 7 blocks fill a chunk (56 of 63 pages); 14 need two chunks. */
  void *blk[14];
  for (int i = 0; i < 14; i++) {
    blk[i] = sl_arena_alloc(ar, k32, 32 * KiB);
    assert_non_null(blk[i]);
  }
  sl_chunk *A = sl_chunk_of(blk[0], cfg.chunk_size);
  sl_chunk *B = sl_chunk_of(blk[7], cfg.chunk_size);
  assert_ptr_not_equal(A, B);
  for (int i = 0; i < 7; i++) {
    assert_ptr_equal(sl_chunk_of(blk[i], cfg.chunk_size), A);
    assert_ptr_equal(sl_chunk_of(blk[7 + i], cfg.chunk_size), B);
  }
  assert_int_equal(ar->chunks, 2);

  /* A keeps 2 blocks (25%), B keeps 5 (63%): B is fuller, so the next
   * block comes from B even though A, the older chunk, has more room. */
  for (int i = 2; i < 7; i++) sl_arena_free(ar, blk[i], k32, 32 * KiB);
  sl_arena_free(ar, blk[12], k32, 32 * KiB);
  sl_arena_free(ar, blk[13], k32, 32 * KiB);
  assert_true(A->free_pages > B->free_pages);
  void *n1 = sl_arena_alloc(ar, k32, 32 * KiB);
  assert_ptr_equal(sl_chunk_of(n1, cfg.chunk_size), B);

  /* A empties: an empty chunk is the last choice, so B serves again. */
  sl_arena_free(ar, blk[0], k32, 32 * KiB);
  sl_arena_free(ar, blk[1], k32, 32 * KiB);
  assert_int_equal(A->free_pages, sl_chunk_usable_pages(A));
  int64_t emptied = mono_ms();
  void *n2 = sl_arena_alloc(ar, k32, 32 * KiB);
  assert_ptr_equal(sl_chunk_of(n2, cfg.chunk_size), B);

  /* A has not been empty for trim_idle_ms: kept. Later on: unmapped. */
  assert_int_equal(release_chunks(ar, emptied, 0), 0);
  assert_int_equal(ar->chunks, 2);
  assert_true(arena_has_chunk(ar, A));
  assert_int_equal(release_chunks(ar, mono_ms() + 1000000, 0), 1);
  assert_int_equal(ar->chunks, 1);
  assert_int_equal(ar->chunks_released, 1);
  assert_false(arena_has_chunk(ar, A));
  assert_false(is_mapped(A));
  assert_false(is_mapped((uint8_t *)A + cfg.chunk_size - 1));
  assert_true(is_mapped(B));
  assert_true(arena_has_chunk(ar, B));
  assert_int_equal(atomic_load(&a->reserved), cfg.chunk_size);

  /* B is still in use: not released even when forced. */
  assert_int_equal(release_chunks(ar, 0, 1), 0);
  for (int i = 7; i < 12; i++) sl_arena_free(ar, blk[i], k32, 32 * KiB);
  sl_arena_free(ar, n1, k32, 32 * KiB);
  sl_arena_free(ar, n2, k32, 32 * KiB);
  finish(NULL, a);
}

/* The usage list q that holds c, or -1. */
static int arena_list_of(const sl_arena *ar, const sl_chunk *c) {
  for (size_t q = 0; q < arena_list_count(); q++)
    for (sl_chunk *x = ar->lists[q]; x != NULL; x = x->next)
      if (x == c) return (int)q;
  return -1;
}

/* A chunk whose usage goes up and down around a list boundary stays on
 * its list (an eighth of the chunk of slack each way), and still moves to
 * the empty list the moment its last page is freed. */
static void test_chunk_keeps_its_usage_list_near_a_boundary(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB); /* 63 usable pages: boundary 25% at 15, slack 7 */
  sl_alloc *a = new_alloc(&cfg);
  sl_arena *ar = &a->arenas[0];
  unsigned k32 = sl_sc_index(32 * KiB); /* 8 pages */
  void *b[3];
  for (int i = 0; i < 2; i++) assert_non_null(b[i] = sl_arena_alloc(ar, k32, 32 * KiB));
  sl_chunk *c = sl_chunk_of(b[0], cfg.chunk_size);
  int low = arena_list_of(ar, c); /* 16 of 63 used: still the first list above empty */
  assert_true(low > 0);
  assert_non_null(b[2] = sl_arena_alloc(ar, k32, 32 * KiB)); /* 24: past the slack */
  int q25 = arena_list_of(ar, c);
  assert_true(q25 > low);
  for (int round = 0; round < 10; round++) { /* 16, 24, 16, ...: no move */
    sl_arena_free(ar, b[2], k32, 32 * KiB);
    assert_int_equal(arena_list_of(ar, c), q25);
    assert_non_null(b[2] = sl_arena_alloc(ar, k32, 32 * KiB));
    assert_int_equal(arena_list_of(ar, c), q25);
  }
  sl_arena_free(ar, b[2], k32, 32 * KiB);
  sl_arena_free(ar, b[1], k32, 32 * KiB); /* 8: still within the slack */
  assert_int_equal(arena_list_of(ar, c), q25);
  sl_arena_free(ar, b[0], k32, 32 * KiB); /* empty, exactly */
  assert_int_equal(arena_list_of(ar, c), 0);
  assert_int_equal(c->free_pages, sl_chunk_usable_pages(c));
  finish(NULL, a);
}

/* Across chunks, a freed run is found by its length (the arena's index),
 * without walking chunks or merging: the next block of that length takes
 * that very run, and a longer request splits the shortest longer run. */
static void test_arena_serves_freed_runs_by_length_across_chunks(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB); /* 63 usable pages */
  sl_alloc *a = new_alloc(&cfg);
  sl_arena *ar = &a->arenas[0];
  unsigned k32 = sl_sc_index(32 * KiB), k40 = sl_sc_index(40 * KiB), k48 = sl_sc_index(48 * KiB);
  assert_true(k32 >= a->nsmall); /* normal classes: runs of pages */
  assert_int_equal(a->run_pages[k40], 10);
  assert_int_equal(a->run_pages[k48], 12);
  void *blk[5];
  for (int i = 0; i < 5; i++) assert_non_null(blk[i] = sl_arena_alloc(ar, k32, 32 * KiB));
  void *ten = sl_arena_alloc(ar, k40, 40 * KiB);
  void *twelve = sl_arena_alloc(ar, k48, 48 * KiB); /* 62 of A's 63 pages used */
  sl_chunk *A = sl_chunk_of(blk[0], cfg.chunk_size);
  assert_ptr_equal(sl_chunk_of(ten, cfg.chunk_size), A);
  assert_ptr_equal(sl_chunk_of(twelve, cfg.chunk_size), A);
  void *other = sl_arena_alloc(ar, k32, 32 * KiB); /* no room in A: chunk B */
  sl_chunk *B = sl_chunk_of(other, cfg.chunk_size);
  assert_ptr_not_equal(A, B);

  /* An 8-page run freed in A is the next 8-page block, though B has a
   * 55-page run. */
  sl_arena_free(ar, blk[3], k32, 32 * KiB);
  void *again = sl_arena_alloc(ar, k32, 32 * KiB);
  assert_ptr_equal(again, blk[3]);
  blk[3] = again;

  /* A 10-page hole in A cannot hold 12 pages: B's long run is split, and
   * neither chunk is swept. */
  sl_arena_free(ar, ten, k40, 40 * KiB);
  void *twelve2 = sl_arena_alloc(ar, k48, 48 * KiB);
  assert_ptr_equal(sl_chunk_of(twelve2, cfg.chunk_size), B);
  assert_int_equal(A->sweeps + B->sweeps, 0);
  /* ... and the 10-page hole is the next 10-page block. */
  void *ten2 = sl_arena_alloc(ar, k40, 40 * KiB);
  assert_ptr_equal(ten2, ten);

  sl_arena_free(ar, ten2, k40, 40 * KiB);
  sl_arena_free(ar, twelve, k48, 48 * KiB);
  sl_arena_free(ar, twelve2, k48, 48 * KiB);
  sl_arena_free(ar, other, k32, 32 * KiB);
  for (int i = 0; i < 5; i++) sl_arena_free(ar, blk[i], k32, 32 * KiB);
  finish(NULL, a);
}

/* Emptiness is the used-page count: a chunk whose runs were freed in an
 * order that left every free run unmerged is still one free run, on the
 * empty list, as soon as its last block goes, and is unmapped once it has
 * been empty for trim_idle_ms (not before). */
static void test_empty_chunk_with_unmerged_frees_is_released_after_idle(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.trim_idle_ms = 1000;
  sl_alloc *a = new_alloc(&cfg);
  sl_arena *ar = &a->arenas[0];
  /* Normal blocks of 8, 10 and 12 pages, twice: 60 of 63 pages. */
  static const size_t sizes[] = {32 * KiB, 40 * KiB, 48 * KiB};
  void *blk[6];
  for (int i = 0; i < 6; i++) {
    size_t sz = sizes[i % 3];
    assert_true(sl_sc_index(sz) >= a->nsmall);
    assert_non_null(blk[i] = sl_arena_alloc(ar, sl_sc_index(sz), sz));
  }
  sl_chunk *c = sl_chunk_of(blk[0], cfg.chunk_size);
  for (int i = 0; i < 6; i++) assert_ptr_equal(sl_chunk_of(blk[i], cfg.chunk_size), c);
  static const int order[] = {4, 0, 2, 5, 1};   /* never two neighbours in a row */
  for (int j = 0; j < 5; j++) {
    size_t sz = sizes[order[j] % 3];
    sl_arena_free(ar, blk[order[j]], sl_sc_index(sz), sz);
  }
  assert_int_equal(c->unmerged, 5);
  assert_int_equal(c->sweeps, 0);
  assert_int_not_equal(arena_list_of(ar, c), 0);

  sl_arena_free(ar, blk[3], sl_sc_index(sizes[0]), sizes[0]);
  int64_t emptied = mono_ms();
  assert_int_equal(arena_list_of(ar, c), 0);
  assert_int_equal(c->free_pages, sl_chunk_usable_pages(c));
  assert_int_equal(*sl_chunk_bucket(c, sl_chunk_usable_pages(c)), c->meta_pages);
  assert_int_equal(c->unmerged, 0);
  assert_int_equal(release_chunks(ar, emptied, 0), 0);
  assert_true(is_mapped(c));
  assert_int_equal(release_chunks(ar, mono_ms() + 1000000, 0), 1);
  assert_false(is_mapped(c));
  assert_int_equal(ar->chunks, 0);
  finish(NULL, a);
}

/* ---- 5. worker cache bounds ---- */

static void test_worker_cache_keeps_at_most_small_cache_blocks_per_class(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.small_cache = 4;
  cfg.max_cached = 4096;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_arena *ar = p->arena;
  unsigned k = sl_sc_index(1024);
  assert_int_equal(p->max_cached_size, 4096);

  void *blk[10];
  size_t usable;
  for (int i = 0; i < 10; i++) {
    blk[i] = sl_pool_alloc(p, 1000, &usable);
    assert_non_null(blk[i]);
    assert_int_equal(usable, 1024);
  }
  assert_int_equal(sl_test_stats(p).cache_misses, 10);
  for (int i = 0; i < 10; i++) sl_pool_free(p, blk[i], 1024);
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.cached_blocks, 4);
  assert_int_equal(st.cached_bytes, 4 * 1024);
  assert_int_equal(st.blocks_in_use, 0);
  assert_int_equal(ar->cls[k].frees, 6); /* the rest went to the arena */

  /* Four hits, LIFO, then a miss. */
  void *again[5];
  for (int i = 0; i < 5; i++) {
    again[i] = sl_pool_alloc(p, 1024, &usable);
    assert_non_null(again[i]);
  }
  for (int i = 0; i < 4; i++) assert_ptr_equal(again[i], blk[3 - i]);
  st = sl_test_stats(p);
  assert_int_equal(st.cache_hits, 4);
  assert_int_equal(st.cache_misses, 11);
  assert_int_equal(st.cached_blocks, 0);
  assert_int_equal(ar->cls[k].allocs, 11);
  for (int i = 0; i < 5; i++) sl_pool_free(p, again[i], 1024);
  assert_int_equal(sl_test_stats(p).cached_blocks, 4);

  /* max_cached (4096) is cached; a 5120 block, a normal block and a huge
   * one are not. */
  void *m = sl_pool_alloc(p, 4096, &usable);
  assert_non_null(m);
  sl_pool_free(p, m, usable);
  assert_int_equal(sl_test_stats(p).cached_blocks, 5);
  static const size_t big[] = {4097, 5000, 40000, 300000};
  for (unsigned i = 0; i < sizeof(big) / sizeof(big[0]); i++) {
    uint64_t hits = sl_test_stats(p).cache_hits;
    for (int round = 0; round < 2; round++) {
      m = sl_pool_alloc(p, big[i], &usable);
      assert_non_null(m);
      assert_true(usable >= big[i]);
      sl_pool_free(p, m, usable);
      assert_int_equal(sl_test_stats(p).cached_blocks, 5);
    }
    assert_int_equal(sl_test_stats(p).cache_hits, hits); /* the second round missed too */
  }
  assert_int_equal(ar->cls[sl_sc_index(5120)].frees, 4);
  finish(p, a);
}

/* ---- 6. trim by count ---- */

static void alloc_free_other_class(sl_pool *p, int n) {
  for (int i = 0; i < n; i++) {
    size_t usable;
    void *m = sl_pool_alloc(p, 64, &usable);
    assert_non_null(m);
    sl_pool_free(p, m, usable);
  }
}

static void test_cache_trim_every_interval_gives_back_unused_entries(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.trim_interval = 100;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  unsigned k = sl_sc_index(1024);
  sl_cache_bin *bin = &p->bins[k];
  void *blk[10];
  size_t usable;
  uint64_t trims0 = sl_test_stats(p).trims;

  /* Ten 1 KiB blocks cached (ten allocations counted; a miss may refill
   * the bin with more). */
  for (int i = 0; i < 10; i++) assert_non_null(blk[i] = sl_pool_alloc(p, 1024, &usable));
  for (int i = 0; i < 10; i++) sl_pool_free(p, blk[i], 1024);
  assert_true(bin->n >= 10);
  uint32_t cached = bin->n;
  uint64_t to_arena = p->arena->cls[k].frees;

  /* 89 more allocations of another class: no trim yet. */
  alloc_free_other_class(p, 89);
  assert_int_equal(sl_test_stats(p).trims, trims0);
  assert_int_equal(bin->n, cached);
  /* The 100th: the trim gives back every entry the 1 KiB bin holds beyond
   * what it served since the last trim. */
  uint32_t used = bin->used;
  alloc_free_other_class(p, 1);
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.trims, trims0 + 1);
  assert_int_equal(bin->n, SL_MIN(cached, used));
  assert_int_equal(p->arena->cls[k].frees - to_arena, cached - bin->n);
  assert_int_equal(bin->used, 0);

  /* Cached again; three are used in the interval (and held): the trim keeps
   * at most what was used. */
  for (int i = 0; i < 10; i++) assert_non_null(blk[i] = sl_pool_alloc(p, 1024, &usable));
  for (int i = 0; i < 10; i++) sl_pool_free(p, blk[i], 1024);
  for (int i = 0; i < 3; i++) assert_non_null(blk[i] = sl_pool_alloc(p, 1024, &usable));
  uint64_t since = 13; /* allocations counted since the trim */
  alloc_free_other_class(p, (int)(100 - since - 1));
  assert_int_equal(sl_test_stats(p).trims, trims0 + 1);
  cached = bin->n;
  used = bin->used;
  assert_true(used >= 3);
  alloc_free_other_class(p, 1);
  assert_int_equal(sl_test_stats(p).trims, trims0 + 2);
  assert_int_equal(bin->n, SL_MIN(cached, used));
  assert_true(bin->n < cached); /* something went back */
  for (int i = 0; i < 3; i++) sl_pool_free(p, blk[i], 1024);

  /* A whole interval without a 1 KiB allocation: all go. */
  assert_true(bin->n > 0);
  alloc_free_other_class(p, 100);
  assert_int_equal(sl_test_stats(p).trims, trims0 + 3);
  assert_int_equal(bin->n, 0);
  finish(p, a);
}

/* ---- 7. idle trim ---- */

static void test_idle_tick_gives_back_cache_chunks_and_header_region(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.trim_idle_ms = 50;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_arena *ar = p->arena;

  /* 100 buffers (more than 64 headers): small ones are cached when
   * released, normal ones (40000 > max_cached) go back to their chunk. */
  sl_buf *b[100];
  for (int i = 0; i < 100; i++) {
    b[i] = sl_buf_alloc(p, i % 4 == 0 ? 40000 : 100, 0);
    assert_non_null(b[i]);
  }
  sl_buf *first = b[0], *far = b[99];
  assert_ptr_equal((uint8_t *)first, p->hdr_base + SL_HDR_SIZE); /* slot 1 */
  assert_ptr_equal((uint8_t *)far, p->hdr_base + 100 * SL_HDR_SIZE); /* past the first page */
  for (int i = 0; i < 100; i++) sl_buf_release(b[i]);
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.headers_total, 100);
  assert_true(st.cached_blocks > 0);
  assert_true(ar->chunks >= 1);
  assert_int_equal(st.idle_trims, 0);

  /* Far ahead of the monotonic clock, so that chunks emptied now count as
   * idle by then. */
  int64_t t = mono_ms() + 1000000;
  idle_tick(p, t); /* notes the activity */
  idle_tick(p, t + cfg.trim_idle_ms - 1);
  st = sl_test_stats(p);
  assert_int_equal(st.idle_trims, 0);
  assert_true(st.cached_blocks > 0);

  /* An allocation in between restarts the idle time. */
  sl_buf *x = sl_buf_alloc(p, 100, 0);
  assert_non_null(x);
  sl_buf_release(x);
  idle_tick(p, t + cfg.trim_idle_ms + 1);
  assert_int_equal(sl_test_stats(p).idle_trims, 0);
  assert_int_equal(sl_test_stats(p).region_resets, 0);

  idle_tick(p, t + 2 * cfg.trim_idle_ms + 2);
  st = sl_test_stats(p);
  assert_int_equal(st.idle_trims, 1);
  assert_int_equal(st.cached_blocks, 0);
  assert_int_equal(ar->chunks, 0);
  assert_int_equal(atomic_load(&a->reserved), 0);
  assert_int_equal(st.region_resets, 1);
  assert_int_equal(st.headers_total, 0);
  assert_int_equal(st.headers_free, 0);
  /* The region stays mapped: a stale header reads as dead. Past the first
   * page (kept: it holds slot 0) the memory went back and reads as zeros. */
  assert_int_equal(first->gen, 0);
  assert_int_equal(first->refcnt, 0);
  assert_int_equal(far->gen, 0);
  assert_null(far->data);
  assert_null(far->root);

  /* Idle again: nothing cached, nothing to reset, counters stay. */
  idle_tick(p, t + 4 * cfg.trim_idle_ms);
  st = sl_test_stats(p);
  assert_int_equal(st.idle_trims, 1);
  assert_int_equal(st.region_resets, 1);

  /* The region starts over at slot 1. */
  x = sl_buf_alloc(p, 100, 0);
  assert_non_null(x);
  assert_ptr_equal(x, first);
  assert_true(x->gen != 0);
  assert_int_equal(sl_test_stats(p).headers_total, 1);
  sl_buf_release(x);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* With one time base (CLOCK_MONOTONIC ms, as the arena uses), an idle tick
 * keeps a chunk that became empty less than trim_idle_ms ago: the pool has
 * been idle (no allocation) long enough, the chunk has not. */
static void test_idle_tick_keeps_chunk_emptied_less_than_idle_ago(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.trim_idle_ms = 300;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_buf *b = sl_buf_alloc(p, 40000, 0); /* normal: never cached */
  assert_non_null(b);
  sl_buf_release(b);
  int64_t emptied = mono_ms();           /* the chunk is empty since then */
  assert_int_equal(p->arena->chunks, 1);
  /* The last allocation was seen trim_idle_ms before the chunk emptied. */
  idle_tick(p, emptied - cfg.trim_idle_ms);
  idle_tick(p, emptied + 150);           /* pool idle 450 ms, chunk 150 ms */
  assert_int_equal(sl_test_stats(p).idle_trims, 0);
  assert_int_equal(p->arena->chunks, 1);
  idle_tick(p, emptied + cfg.trim_idle_ms + 1);
  assert_int_equal(p->arena->chunks, 0); /* empty for 301 ms */
  assert_int_equal(p->arena->chunks_released, 1);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* ---- 8. recycler ---- */

static void test_recycler_keeps_cap_headers_and_overflows_the_rest(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.recycler_cap = 8;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  /* A size no bin caches: a root over a cached size parks its header with
   * its block when released (see test_released_root_parks_with_its_block),
   * these go to the recycler. */
  const size_t size = 40000;
  assert_true(size > p->max_cached_size);
  sl_buf *b[20];
  for (int i = 0; i < 20; i++) assert_non_null(b[i] = sl_buf_alloc(p, size, 0));
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.headers_total, 20);
  assert_int_equal(st.headers_free, 0);
  assert_int_equal(st.recycler_cap, 8);
  for (int i = 0; i < 20; i++) sl_buf_release(b[i]);
  st = sl_test_stats(p);
  assert_int_equal(st.recycler_size, 8);
  assert_int_equal(st.recycler_overflows, 12);
  assert_int_equal(st.headers_free, 20);
  SL_TEST_ASSERT_POOL_CLEAN(p);

  /* Allocating again reuses exactly those headers. */
  sl_buf *c[20];
  for (int i = 0; i < 20; i++) {
    assert_non_null(c[i] = sl_buf_alloc(p, size, 0));
    int found = 0;
    for (int j = 0; j < 20; j++) found |= c[i] == b[j];
    assert_true(found);
    for (int j = 0; j < i; j++) assert_ptr_not_equal(c[i], c[j]);
  }
  st = sl_test_stats(p);
  assert_int_equal(st.headers_total, 20);
  assert_int_equal(st.headers_free, 0);
  assert_int_equal(st.recycler_size, 0);
  for (int i = 0; i < 20; i++) sl_buf_release(c[i]);
  st = sl_test_stats(p);
  assert_int_equal(st.recycler_size, 8);
  assert_int_equal(st.recycler_overflows, 24);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* A root released on its worker parks its header with its block in the
 * cache: the next allocation of that class is the same header over the same
 * block, with a new generation; the dead header meanwhile answers as any
 * released one (generation 0, who released it). Taking the block without a
 * buffer, or trimming, gives the header to the recycler. */
static void test_released_root_parks_with_its_block(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_buf *b = sl_buf_alloc(p, 100, 0);
  assert_non_null(b);
  uint8_t *data = b->data;
  uint32_t gen = b->gen;
  uint64_t total = sl_test_stats(p).headers_total;
  sl_buf_release_site(p, "the parking test");
  sl_buf_release(b);
  sl_buf_release_site(p, NULL);
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(b->gen, 0);
  assert_string_equal(sl_buf_released_by(b, gen), "the parking test");
  assert_int_equal(st.recycler_size, 0);              /* parked, not recycled */
  assert_int_equal(st.headers_free, st.headers_total);
  assert_true(st.cached_blocks >= 1);
  SL_TEST_ASSERT_POOL_CLEAN(p);

  sl_buf *c = sl_buf_alloc(p, 100, 0);
  assert_ptr_equal(c, b);
  assert_ptr_equal(c->data, data);
  assert_true(c->gen != 0 && c->gen != gen);
  assert_null(sl_buf_released_by(c, gen));           /* reused since */
  assert_int_equal(c->refcnt, 1);
  assert_ptr_equal(c->root, c);
  SL_TEST_ASSERT_NO_VIEWS(c);
  assert_null(c->owner);
  assert_int_equal(c->flags, 0);
  assert_int_equal(c->rd, 0);
  assert_int_equal(c->wr, 0);
  assert_int_equal(c->cap, 100);   /* max_cap (0: the size asked) */
  assert_int_equal(c->block_size, 112);
  assert_int_equal(sl_test_stats(p).headers_total, total);
  sl_buf_release(c);

  /* A block taken without a buffer: the parked header goes to the recycler. */
  size_t usable;
  void *m = sl_pool_alloc(p, 100, &usable);
  assert_ptr_equal(m, data);
  assert_int_equal(sl_test_stats(p).recycler_size, 1);
  sl_pool_free(p, m, usable);
  assert_int_equal(sl_test_stats(p).recycler_size, 1);   /* the block comes back bare */

  /* A bare block gets the recycler's header; released, it parks again; a
   * trim gives every parked header to the recycler. */
  c = sl_buf_alloc(p, 100, 0);
  assert_ptr_equal(c->data, data);
  assert_int_equal(sl_test_stats(p).recycler_size, 0);
  sl_buf_release(c);
  uint64_t cached = sl_test_stats(p).cached_blocks;
  sl_pool_trim(p, 1);
  st = sl_test_stats(p);
  assert_int_equal(st.cached_blocks, 0);
  assert_int_equal(st.recycler_size, 1);
  assert_true(cached >= 1);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* A view needs a header when the recycler is empty: it takes a parked one
 * (whose block stays cached, bare) rather than a new slot; a root over the
 * bare block then gets one. A buffer with views or derived buffers does not
 * park until they are gone, and then parks clean. */
static void test_views_take_parked_headers_and_roots_park_clean(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  const char *err = NULL;
  sl_buf *b1 = sl_buf_alloc(p, 100, 0);
  uint8_t *data1 = b1->data;
  sl_buf_release(b1);                                 /* parked */
  sl_buf *b2 = sl_buf_alloc(p, 5000, 0);
  assert_non_null(b2);
  uint64_t total = sl_test_stats(p).headers_total;
  assert_int_equal(sl_test_stats(p).recycler_size, 0);
  sl_buf *v = sl_buf_slice(b2, 0, 10, &err);
  assert_ptr_equal(v, b1);                            /* the parked header */
  assert_int_equal(sl_test_stats(p).headers_total, total);
  sl_buf *d = sl_buf_retained_slice(b2, 10, 10, &err);
  assert_non_null(d);
  assert_true(b2->flags & SL_BUF_HAS_VIEWS);
  assert_true(b2->flags & SL_BUF_SHARED);
  sl_buf *c = sl_buf_alloc(p, 100, 0);               /* the bare block, a new header */
  assert_ptr_equal(c->data, data1);
  assert_ptr_not_equal(c, b1);
  assert_ptr_equal(c->root, c);
  assert_int_equal(c->flags, 0);
  sl_buf_release(c);
  sl_buf_release(d);
  assert_int_equal(sl_buf_release(b2), 1);            /* views die, then it parks */
  assert_int_equal(b2->flags, 0);
  SL_TEST_ASSERT_NO_VIEWS(b2);   /* its views died; it keeps its subpage there */
  sl_buf *e = sl_buf_alloc(p, 5000, 0);
  assert_ptr_equal(e, b2);
  assert_int_equal(e->flags, 0);
  assert_int_equal(sl_buf_derived_count(e), 0);
  sl_buf_release(e);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* When the header region is used up (max_headers), allocation and views
 * fail with ENOMEM, and a refused allocation takes no block. */
static void test_header_exhaustion_refuses_without_taking_a_block(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.max_headers = 10;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  const char *err = NULL;
  sl_buf *b[16];
  int n = 0;
  errno = 0;
  while (n < 16 && (b[n] = sl_buf_alloc(p, 100, 0)) != NULL) n++;
  assert_int_equal(errno, ENOMEM);
  assert_true(n >= 9 && n <= 10); /* slot 0 holds the pool */
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.blocks_in_use, n);
  assert_int_equal(st.bufs_active, n);
  assert_null(sl_buf_slice(b[0], 0, 10, &err));
  assert_string_equal(err, "out of memory");
  assert_null(sl_buf_duplicate(b[0]));
  /* One back, one more. */
  sl_buf_release(b[n - 1]);
  assert_non_null(b[n - 1] = sl_buf_alloc(p, 100, 0));
  for (int i = 0; i < n; i++) sl_buf_release(b[i]);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* ---- 9. generations ---- */

static void test_released_header_has_gen_zero_and_live_gen_is_never_zero(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  const char *err = NULL;

  sl_buf *b = sl_buf_alloc(p, 100, 0);
  assert_non_null(b);
  assert_true(b->gen != 0);
  sl_buf *v = sl_buf_slice(b, 0, 10, &err);
  assert_non_null(v);
  assert_true(v->gen != 0);
  assert_true(v->gen != b->gen);
  sl_buf_release(b);
  assert_int_equal(b->gen, 0); /* the header stays readable: dead */
  assert_int_equal(v->gen, 0); /* its views die with it */
  assert_int_equal(b->refcnt, 0);

  /* Wrap-around skips 0, for roots and for views: generations are odd
   * (the next one stays odd, from 1 on). */
  assert_true(next_gen(p) & 1);
  set_next_gen(p, 0xffffffffu);
  sl_buf *b1 = sl_buf_alloc(p, 100, 0);
  sl_buf *b2 = sl_buf_alloc(p, 100, 0);
  assert_non_null(b1);
  assert_non_null(b2);
  assert_int_equal(b1->gen, 0xffffffffu);
  assert_true(b2->gen != 0);
  assert_int_equal(b2->gen, 1);
  sl_buf *v2 = sl_buf_duplicate(b2);
  assert_non_null(v2);
  assert_int_equal(v2->gen, 3);
  set_next_gen(p, 0xfffffffdu);
  sl_buf *b3 = sl_buf_alloc(p, 100, 0);
  sl_buf *v3 = sl_buf_duplicate(b3);
  assert_non_null(b3);
  assert_non_null(v3);
  assert_int_equal(b3->gen, 0xfffffffdu);
  assert_int_equal(v3->gen, 0xffffffffu);
  assert_int_equal(next_gen(p), 1);
  sl_buf_release(b1);
  sl_buf_release(b2);
  sl_buf_release(b3);
  assert_int_equal(b1->gen, 0);
  assert_int_equal(v2->gen, 0);

  /* Without tampering, every buffer gets a generation of its own, also
   * when headers are reused. */
  set_next_gen(p, 1);
  sl_buf *many[64];
  uint32_t seen[512];
  for (int round = 0; round < 8; round++) {
    for (int i = 0; i < 64; i++) {
      assert_non_null(many[i] = sl_buf_alloc(p, 16, 0));
      seen[round * 64 + i] = many[i]->gen;
    }
    for (int i = 0; i < 64; i++) sl_buf_release(many[i]);
  }
  for (int i = 0; i < 512; i++) {
    assert_true(seen[i] != 0);
    for (int j = 0; j < i; j++) assert_true(seen[i] != seen[j]);
  }
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* ---- 10. return queue bound ---- */

typedef struct release_job {
  sl_buf **bufs;
  size_t n;
  sl_pool *tls_seen;
} release_job;

static void *release_all_thread(void *arg) {
  release_job *j = arg;
  j->tls_seen = sl_pool_current();
  for (size_t i = 0; i < j->n; i++) sl_buf_release(j->bufs[i]);
  return NULL;
}

/* A bare block hit while the recycler is empty and other threads have
 * returned buffers: the block goes back to its bin before the drain (which
 * may fill that bin), and the allocation starts again. The buffer is sound,
 * the hit is counted once, the returned buffer's header serves (no new
 * slot), and the pool ends clean. */
static void test_bare_hit_with_empty_recycler_drains_returns_first(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  /* The buffer another thread will release: the same class as the bare
   * block, so that the drain puts it on top of that bin. */
  sl_buf *f = sl_buf_alloc(p, 100, 0);
  sl_buf *b = sl_buf_alloc(p, 100, 0);
  assert_non_null(f);
  assert_non_null(b);
  uint8_t *bare = b->data;
  sl_buf_release(b);                                  /* parked in the bin */
  size_t usable;
  void *m = sl_pool_alloc(p, 100, &usable);           /* its header to the recycler */
  assert_ptr_equal(m, bare);
  sl_pool_free(p, m, usable);                         /* back, bare, on top of the bin */
  sl_buf *other = sl_buf_alloc(p, 5000, 0);           /* takes the recycler's header */
  assert_non_null(other);
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.recycler_size, 0);
  uint64_t total = st.headers_total;

  release_job job = {.bufs = &f, .n = 1, .tls_seen = p};
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, release_all_thread, &job), 0);
  assert_int_equal(pthread_join(th, NULL), 0);
  assert_int_equal(sl_test_stats(p).remote_queued, 1);
  assert_true(sl_pool_has_returns(p));

  uint64_t hits = sl_test_stats(p).cache_hits;
  sl_buf *c = sl_buf_alloc(p, 100, 0);
  assert_non_null(c);
  assert_false(sl_pool_has_returns(p));               /* drained */
  st = sl_test_stats(p);
  assert_int_equal(st.cache_hits, hits + 1);          /* one allocation, one hit */
  assert_int_equal(st.headers_total, total);          /* the returned header served */
  assert_int_equal(c->refcnt, 1);
  assert_ptr_equal(c->root, c);
  assert_int_equal(c->cap, 100);
  assert_int_equal(c->flags, 0);
  /* Whatever the bin gave, the other block is still cached, and both
   * blocks are distinct and usable. */
  sl_buf *d = sl_buf_alloc(p, 100, 0);
  assert_non_null(d);
  assert_ptr_not_equal(c->data, d->data);
  assert_true(c->data == bare || d->data == bare);
  memset(c->data, 0xab, c->cap);
  memset(d->data, 0xcd, d->cap);
  sl_buf_release(c);
  sl_buf_release(d);
  sl_buf_release(other);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

static void test_foreign_release_queues_up_to_cap_and_frees_the_rest_directly(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.return_queue_cap = 16;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_arena *ar = p->arena;
  sl_buf *b[100];
  for (int i = 0; i < 100; i++) {
    assert_non_null(b[i] = sl_buf_alloc(p, i % 2 ? 2000 : 40000, 0));
    sl_test_fill_pattern(b[i]->data, b[i]->cap, (size_t)i);
  }
  uint64_t arena_frees0 = 0;
  for (unsigned k = 0; k < a->nclasses; k++) arena_frees0 += ar->cls[k].frees;

  release_job job = {.bufs = b, .n = 100, .tls_seen = p};
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, release_all_thread, &job), 0);
  assert_int_equal(pthread_join(th, NULL), 0);
  assert_null(job.tls_seen); /* the other thread has no pool */

  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.return_queue_cap, 16);
  assert_int_equal(st.remote_queued, 16);
  assert_int_equal(st.remote_direct, 84);
  assert_int_equal(st.blocks_in_use, 16); /* the queued ones, until drained */
  uint64_t arena_frees = 0;
  for (unsigned k = 0; k < a->nclasses; k++) arena_frees += ar->cls[k].frees;
  assert_int_equal(arena_frees - arena_frees0, 84);
  /* The queued buffers are dead already. */
  for (int i = 0; i < 16; i++) assert_int_equal(b[i]->gen, 0);

  assert_int_equal(sl_buf_drain(p), 16);
  assert_int_equal(sl_buf_drain(p), 0);
  st = sl_test_stats(p);
  assert_int_equal(st.blocks_in_use, 0);
  assert_int_equal(st.bufs_active, 0);
  assert_int_equal(st.bytes_in_use, 0);
  assert_int_equal(p->drained, 16);

  /* The headers the other thread freed come back into use: 100 more
   * buffers of the same sizes need no new header slot (the drained 2000 B
   * roots are parked with their blocks, and serve the first of them). */
  for (int i = 0; i < 100; i++) assert_non_null(b[i] = sl_buf_alloc(p, i % 2 ? 2000 : 40000, 0));
  assert_int_equal(sl_test_stats(p).headers_total, 100);
  for (int i = 0; i < 100; i++) sl_buf_release(b[i]);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* The queue itself: capacity rounded up to a power of two, FIFO, full
 * means full, and it keeps working across many wrap-arounds. */
static void test_return_queue_is_bounded_fifo(void **state) {
  (void)state;
  sl_retq q;
  assert_int_equal(sl_retq_init(&q, 5), SL_OK);
  assert_int_equal(sl_retq_capacity(&q), 8);
  uintptr_t next_in = 1, next_out = 1;
  for (int round = 0; round < 1000; round++) {
    int fill = 1 + round % 8;
    for (int i = 0; i < fill; i++) assert_int_equal(sl_retq_push(&q, (void *)next_in++), SL_OK);
    if (fill == 8) assert_int_equal(sl_retq_push(&q, (void *)next_in), SL_AGAIN);
    for (int i = 0; i < fill; i++) assert_ptr_equal(sl_retq_pop(&q), (void *)next_out++);
    assert_null(sl_retq_pop(&q));
  }
  sl_retq_destroy(&q);
}

/* ---- 11. producer/consumer across threads ---- */

#define HANDOFF_SLOTS 256
#define PC_TOTAL 1000000
#define PC_BATCH 32

typedef struct handoff {
  pthread_mutex_t mu;
  pthread_cond_t not_empty, not_full;
  sl_buf *ring[HANDOFF_SLOTS];
  size_t head, tail; /* tail - head: buffers in the ring */
  int closed;
  int started;       /* the consumer runs (and has touched its stack) */
  uint64_t released; /* by the consumer */
  uint64_t bad;      /* buffers whose marks were wrong */
} handoff;

static void *consumer_thread(void *arg) {
  handoff *h = arg;
  sl_buf *local[HANDOFF_SLOTS];
  memset(local, 0, sizeof(local));
  pthread_mutex_lock(&h->mu);
  h->started = 1;
  pthread_cond_signal(&h->not_full);
  pthread_mutex_unlock(&h->mu);
  for (;;) {
    pthread_mutex_lock(&h->mu);
    while (h->tail == h->head && !h->closed) pthread_cond_wait(&h->not_empty, &h->mu);
    size_t n = h->tail - h->head;
    for (size_t i = 0; i < n; i++) local[i] = h->ring[(h->head + i) % HANDOFF_SLOTS];
    h->head += n;
    int closed = h->closed;
    pthread_cond_signal(&h->not_full);
    pthread_mutex_unlock(&h->mu);
    if (n == 0 && closed) break;
    for (size_t i = 0; i < n; i++) {
      sl_buf *b = local[i];
      uint64_t head, tail;
      memcpy(&head, b->data, 8);
      memcpy(&tail, b->data + b->cap - 8, 8);
      if (head != tail || head != (uint64_t)(uintptr_t)b->data || !sl_buf_is_live(b)) h->bad++;
      sl_buf_release(b);
      h->released++;
    }
  }
  return NULL;
}

/* A consumer thread started on a new handoff, running when this returns. */
static handoff *handoff_start(pthread_t *th) {
  handoff *h = calloc(1, sizeof(*h));
  assert_non_null(h);
  pthread_mutex_init(&h->mu, NULL);
  pthread_cond_init(&h->not_empty, NULL);
  pthread_cond_init(&h->not_full, NULL);
  assert_int_equal(pthread_create(th, NULL, consumer_thread, h), 0);
  pthread_mutex_lock(&h->mu);
  while (!h->started) pthread_cond_wait(&h->not_full, &h->mu);
  pthread_mutex_unlock(&h->mu);
  return h;
}

/* Closes the handoff and waits for the consumer to release what it has. */
static void handoff_close(handoff *h, pthread_t th) {
  pthread_mutex_lock(&h->mu);
  h->closed = 1;
  pthread_cond_signal(&h->not_empty);
  pthread_mutex_unlock(&h->mu);
  assert_int_equal(pthread_join(th, NULL), 0);
}

static void handoff_free(handoff *h) {
  pthread_cond_destroy(&h->not_empty);
  pthread_cond_destroy(&h->not_full);
  pthread_mutex_destroy(&h->mu);
  free(h);
}

static void test_cross_thread_release_keeps_memory_bounded(void **state) {
  (void)state;
  sl_alloc_config cfg;
  sl_alloc_config_defaults(&cfg); /* 8 KiB pages, 4 MiB chunks */
  cfg.return_queue_cap = 64;
  /* Leak recording stays at its default: sampled buffers released while
   * the queue is full go to the owner through its lock-free stack (this used
   * to deadlock; see test_foreign_release_of_tracked_buffer_never_blocks). */
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_arena *ar = p->arena;

  pthread_t th;
  handoff *h = handoff_start(&th);
  size_t rss_before = rss_bytes();
  double t0 = now_s();

  uint64_t seed = 42;
  size_t queue_peak = 0, cap = sl_retq_capacity(&p->retq);
  uint64_t alloc_failed = 0;
  sl_buf *batch[PC_BATCH];
  for (size_t done = 0; done < PC_TOTAL; done += PC_BATCH) {
    for (int i = 0; i < PC_BATCH; i++) {
      size_t size = 1024 + (size_t)(rng_next(&seed) % (3 * 1024 + 1));
      sl_buf *b = sl_buf_alloc(p, size, 0);
      if (b == NULL) {
        alloc_failed++;
        break;
      }
      uint64_t mark = (uint64_t)(uintptr_t)b->data;
      memcpy(b->data, &mark, 8);
      memcpy(b->data + b->cap - 8, &mark, 8);
      b->wr = b->cap;
      batch[i] = b;
    }
    if (alloc_failed) break;
    pthread_mutex_lock(&h->mu);
    while (HANDOFF_SLOTS - (h->tail - h->head) < PC_BATCH) pthread_cond_wait(&h->not_full, &h->mu);
    for (int i = 0; i < PC_BATCH; i++) h->ring[(h->tail + i) % HANDOFF_SLOTS] = batch[i];
    h->tail += PC_BATCH;
    pthread_cond_signal(&h->not_empty);
    pthread_mutex_unlock(&h->mu);
    if ((done / PC_BATCH) % 32 == 0) {
      size_t queued = atomic_load(&p->retq.tail) - p->retq.head;
      if (queued > queue_peak) queue_peak = queued;
      sl_buf_drain(p);
    }
  }
  handoff_close(h, th);
  size_t queued = atomic_load(&p->retq.tail) - p->retq.head;
  if (queued > queue_peak) queue_peak = queued;
  sl_buf_drain(p);
  double elapsed = now_s() - t0;
  size_t rss_peak = rss_bytes();

  assert_int_equal(alloc_failed, 0);
  assert_int_equal(h->bad, 0);
  assert_int_equal(h->released, PC_TOTAL);
  sl_pool_stats st = sl_test_stats(p);
  assert_true(queue_peak <= cap);
  assert_int_equal(st.remote_queued + st.remote_direct + st.remote_stacked, PC_TOTAL);
  assert_true(st.remote_stacked > 0); /* sampled (recorded) buffers went this way */
  assert_int_equal(p->drained, st.remote_queued);
  assert_int_equal(st.allocs, PC_TOTAL);
  assert_int_equal(st.blocks_in_use, 0);
  assert_int_equal(st.bufs_active, 0);
  assert_int_equal(st.bytes_in_use, 0);
  assert_true(st.recycler_size <= st.recycler_cap);
  /* Headers are reused across threads: the region did not grow with the
   * number of buffers, only with what was in flight. */
  assert_true(st.headers_total < 4096);
  /* So are blocks: a couple of chunks at most. */
  assert_true(ar->chunks_created <= 3);

  sl_pool_trim(p, 1);
  release_chunks(ar, 0, 1);
  assert_int_equal(ar->chunks, 0);
  size_t rss_after = rss_bytes();
  print_message("    cross-thread: %d buffers in %.2f s; queued %" PRIu64 ", direct %" PRIu64
                ", queue peak %zu/%zu, headers %" PRIu64 ", chunks %" PRIu64
                "; rss before %.2f MiB, after the run %+.2f, after trimming %+.2f\n",
                PC_TOTAL, elapsed, st.remote_queued, st.remote_direct, queue_peak, cap,
                st.headers_total, ar->chunks_created, (double)rss_before / (double)MiB,
                ((double)rss_peak - (double)rss_before) / (double)MiB,
                ((double)rss_after - (double)rss_before) / (double)MiB);
  if (TEST_UNDER_VALGRIND())
    print_message("    (RSS bound not checked under valgrind)\n");
  else
    assert_true(rss_after <= rss_before + 4 * MiB + 1 * MiB);

  take_back_foreign_headers(p);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  handoff_free(h);
  finish(p, a);
}

/* ---- 11b. subpages owned by a worker ---- */

/* The subpage of a pooled small block. */
static sl_subpage *subpage_of(const sl_pool *p, const void *mem) {
  sl_chunk *c = sl_chunk_of(mem, p->alloc->cfg.chunk_size);
  return c->sub[((const uint8_t *)mem - c->mem) >> c->page_shift];
}

static size_t owned_count(const sl_pool *p) {
  size_t n = 0;
  for (const sl_subpage *s = p->owned; s != NULL; s = s->own_next) {
    assert_ptr_equal(sl_subpage_owner(s), &p->sub_owner);
    n++;
  }
  return n;
}

/* Misses of a small class take elements of subpages the pool owns; a
 * release into a full bin gives the block back to its subpage; a subpage
 * that empties while another of its class has room goes back to the
 * arena (which keeps one empty subpage per class, as before), and trimming
 * everything gives every owned subpage back. The arena's counts include
 * the pool's share after a trim. */
static void test_owned_subpages_serve_misses_and_go_back_to_the_arena(void **state) {
  (void)state;
  sl_alloc_config cfg;
  owned_config(&cfg);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_arena *ar = p->arena;
  unsigned k = sl_sc_index(1024);
  sl_cache_bin *bin = &p->bins[k];
  assert_int_equal(a->run_pages[k], 1);
  assert_true(bin->owns);
  assert_false(p->bins[sl_sc_index(40000)].owns); /* not cached: the arena serves it */

  sl_buf *b[20];
  for (int i = 0; i < 20; i++) {
    assert_non_null(b[i] = sl_buf_alloc(p, 1000, 0));
    sl_subpage *s = subpage_of(p, b[i]->data);
    assert_ptr_equal(sl_subpage_owner(s), &p->sub_owner);
    if (i % 4 > 0) assert_ptr_equal(s, subpage_of(p, b[i - 1]->data)); /* filled in turn */
    sl_test_fill_pattern(b[i]->data, b[i]->cap, (size_t)i);
  }
  assert_int_equal(owned_count(p), 5);
  assert_null(ar->subpages[k]);   /* owned subpages are off the arena's lists */
  assert_null(sl_pool_own_first(bin));   /* all five are full */
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.cache_misses, 20);
  assert_int_equal(st.blocks_in_use, 20);
  for (int i = 0; i < 20; i++)
    assert_int_equal(sl_test_pattern_mismatch(b[i]->data, b[i]->cap, (size_t)i), b[i]->cap);

  /* The first eight park in the bin (cap 8); the other twelve go back to
   * subpages 2, 3 and 4. Subpage 2 empties first, alone on the list: it
   * stays. 3 and 4 empty with 2 beside them: they go back to the arena,
   * which keeps 3 (its class's only one) and gives 4's page back. */
  uint8_t *data[20];
  for (int i = 0; i < 20; i++) data[i] = b[i]->data;
  sl_subpage *s2 = subpage_of(p, data[8]), *s3 = subpage_of(p, data[12]);
  for (int i = 0; i < 20; i++) sl_buf_release(b[i]);
  st = sl_test_stats(p);
  assert_int_equal(st.blocks_in_use, 0);
  assert_int_equal(st.cached_blocks, 8);
  assert_int_equal(bin->n, 8);
  assert_int_equal(owned_count(p), 3);
  assert_ptr_equal(sl_pool_own_first(bin), s2);
  assert_int_equal(s2->nfree, s2->nelems);
  assert_ptr_equal(ar->subpages[k], s3);
  assert_null(sl_subpage_owner(s3));
  assert_int_equal(s3->nfree, s3->nelems);
  assert_null(s3->next);
  assert_null(subpage_of(p, data[16]));   /* 4's page went back to its chunk */

  /* Twelve again: eight hits (LIFO), then four misses from subpage 2. */
  for (int i = 0; i < 12; i++) {
    assert_non_null(b[i] = sl_buf_alloc(p, 1000, 0));
    if (i < 8) assert_ptr_equal(b[i]->data, data[7 - i]);
    else assert_ptr_equal(subpage_of(p, b[i]->data), s2);
  }
  assert_null(sl_pool_own_first(bin));
  assert_int_equal(sl_test_stats(p).cache_hits, 8);
  for (int i = 0; i < 12; i++) sl_buf_release(b[i]);

  /* Everything back: no owned subpage, the arena's counts complete. */
  sl_pool_trim(p, 1);
  assert_null(p->owned);
  assert_null(sl_pool_own_first(bin));
  assert_int_equal(sl_test_stats(p).cached_blocks, 0);
  assert_int_equal(ar->cls[k].allocs, 24);
  assert_int_equal(ar->cls[k].frees, 24);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* Each allocation and release is counted once, in one of several
 * counters (hits, owned-subpage misses and parks, the rest: sl_cache_bin),
 * which trims and reports to the arena fold together. Whatever path a
 * block takes (a hit, an owned subpage, a count-based trim or a flush to
 * the subpages, the arena for a normal class no bin caches, a bare block
 * without a header), the per-class counts, the totals and the bytes in use
 * stay exactly what was done, and the arena's counts add up once
 * everything is back. */
#define CNT_LIVE 64
#define CNT_OPS 6000
static void test_class_counts_stay_exact_on_every_path(void **state) {
  (void)state;
  sl_alloc_config cfg;
  owned_config(&cfg);
  cfg.trim_interval = 37;   /* count-based trims among the operations */
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  static const size_t sizes[] = {100, 1000, 1000, 3000, 40000};
  uint64_t allocs[SL_SC_MAX_CLASSES] = {0}, frees[SL_SC_MAX_CLASSES] = {0};
  sl_buf *bufs[CNT_LIVE] = {0};
  void *blocks[CNT_LIVE] = {0};
  size_t block_size[CNT_LIVE] = {0};
  uint64_t seed = 0x6a09e667f3bcc909ull, bytes = 0, hits = 0, total = 0;
  for (int op = 0; op < CNT_OPS; op++) {
    unsigned i = (unsigned)(rng_next(&seed) % CNT_LIVE);
    uint64_t r = rng_next(&seed);
    if (r % 5 == 0) {   /* a bare block, without a header */
      if (blocks[i] != NULL) {
        unsigned k = sl_sc_index(block_size[i]);
        sl_pool_free(p, blocks[i], block_size[i]);
        blocks[i] = NULL;
        frees[k]++;
        bytes -= block_size[i];
      } else {
        size_t usable;
        assert_non_null(blocks[i] = sl_pool_alloc(p, sizes[r / 5 % 4], &usable));
        block_size[i] = usable;
        allocs[sl_sc_index(usable)]++;
        bytes += usable;
      }
    } else if (bufs[i] != NULL) {
      unsigned k = bufs[i]->sclass;
      bytes -= bufs[i]->block_size;
      sl_buf_release(bufs[i]);
      bufs[i] = NULL;
      frees[k]++;
    } else {
      assert_non_null(bufs[i] = sl_buf_alloc(p, sizes[r / 5 % 5], 0));
      allocs[bufs[i]->sclass]++;
      bytes += bufs[i]->block_size;
    }
    if (op % 1000 == 999) sl_pool_trim(p, op % 2000 == 1999);
    total = 0;
    for (unsigned k = 0; k < SL_SC_MAX_CLASSES; k++) {
      assert_int_equal(sl_pool_class_allocs(p, k), allocs[k]);
      assert_int_equal(sl_pool_class_frees(p, k), frees[k]);
      total += allocs[k];
    }
    sl_pool_stats st = sl_test_stats(p);
    assert_int_equal(st.allocs, total);
    assert_int_equal(st.bytes_in_use, bytes);
    assert_int_equal(st.cache_hits + st.cache_misses, st.allocs);
    assert_true(st.cache_hits >= hits);   /* never taken back */
    hits = st.cache_hits;
  }
  sl_pool_stats st = sl_test_stats(p);
  assert_true(st.cache_hits > 0 && st.cache_misses > 0 && st.trims > 3);
  unsigned k1 = sl_sc_index(1000);
  assert_true(sl_pool_class_allocs(p, k1) > 1000);   /* bins of 8: owned subpages served most */
  for (unsigned i = 0; i < CNT_LIVE; i++) {
    if (bufs[i] != NULL) sl_buf_release(bufs[i]);
    if (blocks[i] != NULL) sl_pool_free(p, blocks[i], block_size[i]);
  }
  sl_pool_trim(p, 1);
  for (unsigned k = 0; k < SL_SC_MAX_CLASSES; k++)
    assert_int_equal(sl_pool_class_allocs(p, k), sl_pool_class_frees(p, k));
  /* With everything back, the arena has counted each of the pool's blocks
   * out and in (the owned subpages' share reported at the trims). */
  for (unsigned k = 0; k < a->nclasses; k++)
    assert_int_equal(p->arena->cls[k].allocs, p->arena->cls[k].frees);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* Another thread reads the arena's counts while the pool's fast paths
 * take and give back normal runs: every copy is consistent (frees never
 * above allocs, both never going back), and the last one exact. */
typedef struct stats_reader {
  sl_arena *ar;
  unsigned k;
  atomic_int stop;
  unsigned reads, bad;
} stats_reader;

/* In a loop that waits for other threads: under valgrind, which runs one
 * thread at a time, the waiting thread gives the others its turn (else it
 * spins through whole time slices while they wait to run). */
static void spin_pause(void) {
  if (TEST_UNDER_VALGRIND()) sched_yield();
}

static void *stats_reader_thread(void *arg) {
  stats_reader *sr = arg;
  uint64_t allocs = 0, frees = 0;
  while (!atomic_load(&sr->stop) || sr->reads < 100) {
    spin_pause();
    sl_arena_stats as;
    sl_arena_get_stats(sr->ar, &as);
    uint64_t a = as.cls[sr->k].allocs, f = as.cls[sr->k].frees;
    if (f > a || a < allocs || f < frees) sr->bad++;
    allocs = a;
    frees = f;
    sr->reads++;
  }
  return NULL;
}

static void test_arena_counts_read_from_another_thread(void **state) {
  (void)state;
  sl_alloc_config cfg;
  sl_alloc_config_defaults(&cfg);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  unsigned k = sl_sc_index(40000);
  stats_reader sr = {.ar = p->arena, .k = k};
  atomic_init(&sr.stop, 0);
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, stats_reader_thread, &sr), 0);
  sl_buf *keep = sl_buf_alloc(p, 40000, 0);   /* the chunk stays in use */
  sl_buf *b[16];
  for (int round = 0; round < 200; round++) {
    for (int i = 0; i < 16; i++) assert_non_null(b[i] = sl_buf_alloc(p, 40000, 0));
    for (int i = 0; i < 16; i++) sl_buf_release(b[i]);
  }
  assert_true(p->bins[k].own_allocs > 0 && p->bins[k].own_frees > 0);   /* fast paths */
  sl_buf_release(keep);
  atomic_store(&sr.stop, 1);
  assert_int_equal(pthread_join(th, NULL), 0);
  assert_int_equal(sr.bad, 0);
  sl_arena_stats as;
  sl_arena_get_stats(p->arena, &as);
  assert_int_equal(as.cls[k].allocs, 3201);
  assert_int_equal(as.cls[k].frees, 3201);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* The runs that the fast paths of pools take from their arena and give
 * back (a normal class no bin caches) count in each pool's share of the
 * arena's counts, under the arena's lock: sl_arena_get_stats sums them
 * with the arena's own at once, for every pool on the arena, and keeps
 * them when a trim reports a pool's share and when a pool goes. */
static void test_arena_counts_take_the_pools_fast_normal_runs(void **state) {
  (void)state;
  sl_alloc_config cfg;
  sl_alloc_config_defaults(&cfg);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *q = sl_pool_create(a, 1), *p = new_pool(a);   /* one arena for both */
  assert_non_null(q);
  assert_ptr_equal(p->arena, q->arena);
  unsigned k = sl_sc_index(40000);
  assert_true(p->bins[k].normal_pages != 0 && q->bins[k].normal_pages != 0);
  /* Runs of that length get listed (the first ones split a chunk's free
   * run: the arena's general path), then both pools take and give them
   * back on their fast paths. */
  sl_buf *b[12];
  for (int i = 0; i < 12; i++) assert_non_null(b[i] = sl_buf_alloc(i % 2 ? q : p, 40000, 0));
  sl_buf *keep = sl_buf_alloc(p, 40000, 0);   /* the chunk stays in use */
  for (int i = 0; i < 12; i++) sl_buf_release(b[i]);
  for (int i = 0; i < 8; i++) assert_non_null(b[i] = sl_buf_alloc(i % 2 ? q : p, 40000, 0));
  for (int i = 0; i < 3; i++) sl_buf_release(b[i]);
  assert_true(p->bins[k].own_allocs > 0 && p->bins[k].own_frees > 0);
  assert_true(q->bins[k].own_allocs > 0 && q->bins[k].own_frees > 0);
  sl_arena_stats as;
  sl_arena_get_stats(p->arena, &as);
  assert_int_equal(as.cls[k].allocs, 21);
  assert_int_equal(as.cls[k].frees, 15);
  assert_int_equal(sl_pool_class_allocs(p, k) + sl_pool_class_allocs(q, k), 21);
  assert_int_equal(sl_pool_class_frees(p, k) + sl_pool_class_frees(q, k), 15);
  /* A trim moves p's share into the arena's counts: the sums stay. */
  sl_pool_trim(p, 0);
  assert_int_equal(p->bins[k].own_allocs, 0);
  assert_int_equal(p->bins[k].own_frees, 0);
  assert_int_equal(sl_pool_class_allocs(p, k) + sl_pool_class_allocs(q, k), 21);
  sl_arena_get_stats(p->arena, &as);
  assert_int_equal(as.cls[k].allocs, 21);
  assert_int_equal(as.cls[k].frees, 15);
  for (int i = 3; i < 8; i++) sl_buf_release(b[i]);
  sl_buf_release(keep);
  /* q goes: its share stays in the arena's counts. */
  sl_pool_destroy(q);
  sl_arena_get_stats(p->arena, &as);
  assert_int_equal(as.cls[k].allocs, 21);
  assert_int_equal(as.cls[k].frees, 21);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* A normal class no bin caches (above max_cached) carries SL_BUF_UNBINNED
 * from its bin's tail, so that its release leaves sl_buf_free at the flag
 * test for its chunk (nothing cached); a release from Lua sets the
 * quarantine, which sends the next release off the fast path (the header
 * waits its turn) and clears itself there. */
static void test_uncached_normal_goes_to_its_chunk_and_quarantine_takes_one_header(void **state) {
  (void)state;
  sl_alloc_config cfg;
  sl_alloc_config_defaults(&cfg);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_buf_release(sl_buf_alloc(p, 100, 0));   /* the first buffer is a leak sample */
  sl_buf *b = sl_buf_alloc(p, 40000, 0);
  assert_non_null(b);
  unsigned k = b->sclass;
  assert_true(k >= a->nsmall && k < a->nclasses);
  assert_int_equal(b->flags, SL_BUF_UNBINNED);
  SL_TEST_ASSERT_NO_VIEWS(b);
  sl_arena_stats as;
  sl_arena_get_stats(p->arena, &as);
  uint64_t frees = as.cls[k].frees;
  assert_int_equal(sl_buf_release(b), 1);
  assert_int_equal(b->gen, 0);
  sl_arena_get_stats(p->arena, &as);
  assert_int_equal(as.cls[k].frees, frees + 1);   /* back in its chunk */
  assert_int_equal(p->bins[k].n, 0);
  assert_int_equal(sl_pool_class_frees(p, k), 1);

  sl_buf *q = sl_buf_alloc(p, 100, 0), *r = sl_buf_alloc(p, 100, 0);
  unsigned kq = q->sclass;
  uint32_t cached = p->bins[kq].n;
  sl_pool_quarantine_next(p, 1);
  assert_null(p->free_tp);
  sl_buf_release(q);   /* the header waits in the quarantine; its block is cached bare */
  assert_ptr_equal(p->free_tp, p->owner_tp);
  assert_int_equal(p->quarantine_n, 1);
  assert_int_equal(p->bins[kq].n, cached + 1);
  assert_true((uintptr_t)p->bins[kq].items[cached] & SL_BIN_BARE);
  sl_buf_release(r);   /* the fast path again: parks, header and block, in its bin */
  assert_int_equal(p->bins[kq].n, cached + 2);
  assert_ptr_equal(p->bins[kq].items[cached + 1], r);
  assert_int_equal(p->quarantine_n, 1);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* Headers parked on owned subpages now, and the blocks they carry. */
static uint32_t parked_on_subpages(const sl_pool *p) {
  uint32_t n = 0;
  for (const sl_subpage *s = p->owned; s != NULL; s = s->own_next) n += s->nfree - s->nbare;
  return n;
}

/* A release into a full bin of a class that owns subpages parks the
 * header with its block on the block's subpage: no header goes to the
 * recycler, and the header counts as free. A miss then takes it back with
 * its block, set up as a hit's. A subpage that empties, and a trim of
 * everything, give the headers parked on it to the recycler. */
static void test_full_bin_parks_headers_on_owned_subpages_for_misses(void **state) {
  (void)state;
  sl_alloc_config cfg;
  owned_config(&cfg);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  unsigned k = sl_sc_index(1024);
  sl_cache_bin *bin = &p->bins[k];
  sl_buf *b[24], *live[4], *parked[12];
  uint8_t *parked_data[12];
  uint32_t parked_gen[12];
  for (int i = 0; i < 24; i++) assert_non_null(b[i] = sl_buf_alloc(p, 1000, 0));
  assert_int_equal(owned_count(p), 6);

  /* The first eight fill the bin. Of each of the other four subpages,
   * three elements are released and one stays live (none empties). */
  int np = 0, nl = 0;
  for (int i = 0; i < 24; i++) {
    if (i >= 8 && i % 4 == 3) {
      live[nl++] = b[i];
      continue;
    }
    if (i >= 8) {
      parked[np] = b[i];
      parked_gen[np] = b[i]->gen;
      parked_data[np++] = b[i]->data;
    }
    sl_buf_release_site(p, i >= 8 ? "the subpage test" : "the bin test");
    sl_buf_release(b[i]);
    sl_buf_release_site(p, NULL);
  }
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(bin->n, 8);
  assert_int_equal(st.cached_blocks, 8);
  assert_int_equal(st.blocks_in_use, 4);
  assert_int_equal(st.recycler_size, 0);   /* every header stayed with its block */
  assert_int_equal(parked_on_subpages(p), 12);
  assert_int_equal(st.headers_total, 24);
  assert_int_equal(st.headers_free, 20);   /* 8 in the bin, 12 on subpages */
  for (int j = 0; j < 12; j++) {
    assert_int_equal(parked[j]->gen, 0);
    assert_int_equal(parked[j]->refcnt, 0);
    /* A stale handle still learns who released it. */
    assert_string_equal(sl_buf_released_by(parked[j], parked_gen[j]), "the subpage test");
  }

  /* Twenty again: eight hits, then twelve misses, each one of the
   * headers parked on a subpage, over the block it parked with. */
  uint64_t misses = st.cache_misses;
  for (int i = 0; i < 20; i++) {
    assert_non_null(b[i] = sl_buf_alloc(p, 1000, 0));
    sl_test_fill_pattern(b[i]->data, b[i]->cap, (size_t)i * 1000);
    if (i < 8) continue;
    int found = -1;
    for (int j = 0; j < 12; j++)
      if (b[i] == parked[j]) found = j;
    assert_true(found >= 0);
    assert_ptr_equal(b[i]->data, parked_data[found]);
    assert_true(b[i]->gen != 0);
    assert_int_equal(b[i]->refcnt, 1);
    assert_ptr_equal(b[i]->root, b[i]);
    SL_TEST_ASSERT_NO_VIEWS(b[i]);
    assert_null(b[i]->owner);
    assert_int_equal(b[i]->flags, 0);
    assert_int_equal(b[i]->block_size, 1024);
    assert_int_equal(b[i]->cap, 1000);
    assert_int_equal(b[i]->rd, 0);
    assert_int_equal(b[i]->wr, 0);
  }
  st = sl_test_stats(p);
  assert_int_equal(st.cache_misses - misses, 12);
  assert_int_equal(st.headers_total, 24);  /* no new header */
  assert_int_equal(st.recycler_size, 0);
  assert_int_equal(parked_on_subpages(p), 0);
  for (int i = 0; i < 20; i++)
    assert_int_equal(sl_test_pattern_mismatch(b[i]->data, b[i]->cap, (size_t)i * 1000),
                     b[i]->cap);

  /* All back: the eight hits fill the bin, the twelve park on their
   * subpages, then the live four empty their subpages: those that go
   * back to the arena give their four headers to the recycler. */
  for (int i = 0; i < 20; i++) sl_buf_release(b[i]);
  assert_int_equal(parked_on_subpages(p), 12);
  size_t owned = owned_count(p);
  for (int i = 0; i < 4; i++) sl_buf_release(live[i]);
  st = sl_test_stats(p);
  size_t gone = owned - owned_count(p);
  assert_true(gone >= 3);   /* all but one with room (the arena keeps one) */
  assert_int_equal(st.recycler_size, 4 * gone);
  assert_int_equal(parked_on_subpages(p) + st.recycler_size, 16);
  assert_int_equal(st.headers_free, st.headers_total);

  /* A trim of everything gives every owned subpage back, and its parked
   * headers to the recycler: every header is there. */
  sl_pool_trim(p, 1);
  assert_null(p->owned);
  st = sl_test_stats(p);
  assert_int_equal(st.headers_total, 24);
  assert_int_equal(st.recycler_size, 24);
  assert_int_equal(st.headers_free, 24);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* A view's header, with the recycler empty, comes from a parked header
 * before a new slot: one first on an owned subpage's free list too (its
 * block stays there, bare). */
static void test_views_take_headers_parked_on_owned_subpages(void **state) {
  (void)state;
  sl_alloc_config cfg;
  owned_config(&cfg);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_buf *b[12];
  void *raw[8];
  size_t usable;
  for (int i = 0; i < 12; i++) assert_non_null(b[i] = sl_buf_alloc(p, 1000, 0));
  for (int i = 0; i < 8; i++) assert_non_null(raw[i] = sl_pool_alloc(p, 1000, &usable));
  for (int i = 0; i < 8; i++) sl_pool_free(p, raw[i], usable);   /* the bin: bare blocks */
  for (int i = 0; i < 12; i++)
    if (i % 4 != 3) sl_buf_release(b[i]);   /* nine park on subpages */
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.recycler_size, 0);
  assert_int_equal(parked_on_subpages(p), 9);
  assert_int_equal(st.headers_total, 12);

  sl_buf *v = sl_buf_duplicate(b[3]);
  assert_non_null(v);
  int found = 0;
  for (int i = 0; i < 12; i++) found |= i % 4 != 3 && v == b[i];
  assert_true(found);
  assert_int_equal(parked_on_subpages(p), 8);
  st = sl_test_stats(p);
  assert_int_equal(st.headers_total, 12);   /* no new slot */
  assert_int_equal(st.headers_free, 8);    /* the bin's blocks are bare */
  sl_buf_release(b[3]);   /* the view dies with it */
  sl_buf_release(b[7]);
  sl_buf_release(b[11]);
  st = sl_test_stats(p);
  assert_int_equal(st.headers_free, st.headers_total);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* A view's header search skips the bins while their release count has
 * not moved since a search found no parked header there. That count must
 * only grow: a full bin that gives entries to their owned subpages moves
 * them from frees_rest to own_frees, and a count of frees_rest alone could
 * come back to where the last search left it while headers have parked in
 * the bins since (a view then took a new slot, or failed with ENOMEM once
 * the region was used up). */
static void test_view_header_search_sees_headers_parked_after_a_flush(void **state) {
  (void)state;
  sl_alloc_config cfg;
  owned_config(&cfg);
  cfg.max_headers = 10;   /* slot 0 and the nine used below: no new slot for the last view */
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  const char *err = NULL;
  sl_buf *sample = sl_buf_alloc(p, 100, 0);   /* the first buffer is a leak sample: held */
  sl_buf *r = sl_buf_alloc(p, 1000, 0), *fill[3];
  for (int i = 0; i < 3; i++) assert_non_null(fill[i] = sl_buf_alloc(p, 1000, 0));
  assert_ptr_equal(sl_pool_subpage_of(p, fill[2]->data, r->sclass),
                   sl_pool_subpage_of(p, r->data, r->sclass));   /* r's subpage is full */
  sl_buf *q[3];
  for (int i = 0; i < 3; i++) assert_non_null(q[i] = sl_buf_alloc(p, 100, 0));
  sl_pool_trim(p, 1);   /* r's subpage is no longer owned, and has no room */
  unsigned k = r->sclass;
  void *raw[8];
  size_t usable;
  for (int i = 0; i < 8; i++) assert_non_null(raw[i] = sl_pool_alloc(p, 1000, &usable));
  for (int i = 0; i < 8; i++) sl_pool_free(p, raw[i], usable);   /* bin k: full, bare */
  assert_int_equal(p->bins[k].n, p->bins[k].cap);
  assert_int_equal(sl_test_stats(p).recycler_size, 0);
  sl_buf *v = sl_buf_slice(r, 0, 10, &err);   /* searches the bins: nothing parked */
  assert_non_null(v);
  /* r parks in its full bin, which gives its older half to their owned
   * subpages; then three more park. */
  assert_int_equal(sl_buf_release(r), 1);
  for (int i = 0; i < 3; i++) assert_int_equal(sl_buf_release(q[i]), 1);
  sl_buf *z = sl_buf_alloc(p, 300, 0);   /* takes the view's header from the recycler */
  assert_non_null(z);
  assert_int_equal(sl_test_stats(p).recycler_size, 0);
  assert_int_equal(sl_test_stats(p).headers_total, cfg.max_headers - 1);
  sl_buf *w = sl_buf_duplicate(z);
  assert_non_null(w);   /* a parked header */
  assert_true(w == r || w == q[0] || w == q[1] || w == q[2]);
  sl_buf_release(z);
  sl_buf_release(sample);
  for (int i = 0; i < 3; i++) sl_buf_release(fill[i]);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* An idle pool gives back every chunk and the header region although
 * headers were parked on its owned subpages. */
static void test_idle_tick_takes_headers_off_owned_subpages(void **state) {
  (void)state;
  sl_alloc_config cfg;
  owned_config(&cfg);
  cfg.trim_idle_ms = 50;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_buf *b[100];
  for (int i = 0; i < 100; i++) assert_non_null(b[i] = sl_buf_alloc(p, 1000, 0));
  for (int i = 0; i < 100; i++)
    if (i % 4 != 3) sl_buf_release(b[i]);
  assert_int_equal(parked_on_subpages(p), 75 - 8);
  for (int i = 3; i < 100; i += 4) sl_buf_release(b[i]);
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.blocks_in_use, 0);
  assert_int_equal(st.headers_total, 100);
  assert_int_equal(st.headers_free, 100);
  assert_true(parked_on_subpages(p) > 0);   /* the subpage its class keeps */

  int64_t t = mono_ms() + 1000000;
  idle_tick(p, t);
  sl_pool_trim_report r = idle_tick(p, t + cfg.trim_idle_ms + 1);
  assert_int_equal(r.blocks, 8);
  assert_int_equal(r.chunks, 1);
  assert_int_equal(r.headers, 1);
  assert_null(p->owned);
  st = sl_test_stats(p);
  assert_int_equal(st.region_resets, 1);
  assert_int_equal(st.headers_total, 0);
  assert_int_equal(st.headers_free, 0);
  assert_int_equal(p->arena->chunks, 0);
  assert_int_equal(atomic_load(&a->reserved), 0);

  sl_buf *x = sl_buf_alloc(p, 1000, 0);
  assert_non_null(x);
  sl_buf_release(x);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* Elements of owned subpages freed on another thread (the return queue
 * full) go onto the owner's remote stack; the owner takes them back before
 * it takes another subpage, so that no new memory is used for them. */
static void test_foreign_frees_into_owned_subpages_come_back_to_the_owner(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.return_queue_cap = 2;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_arena *ar = p->arena;
  unsigned k = sl_sc_index(1024);
  sl_buf *b[40];
  uint8_t *data[40];
  for (int i = 0; i < 40; i++) {
    assert_non_null(b[i] = sl_buf_alloc(p, 1000, 0));
    data[i] = b[i]->data;
  }
  assert_int_equal(owned_count(p), 10);
  uint64_t frees0 = ar->cls[k].frees;

  release_job job = {.bufs = b, .n = 40, .tls_seen = p};
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, release_all_thread, &job), 0);
  assert_int_equal(pthread_join(th, NULL), 0);
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.remote_queued, 2);
  assert_int_equal(st.remote_direct, 38);
  assert_int_equal(ar->cls[k].frees - frees0, 38); /* counted by the arena at once */
  assert_non_null(atomic_load(&p->sub_owner.remote));
  for (sl_subpage *s = p->owned; s != NULL; s = s->own_next) assert_int_equal(s->nfree, 0);

  assert_int_equal(sl_buf_drain(p), 2);   /* those two park in the bin */
  /* Forty again: two hits, then the 38 from the remote stack, in the same
   * ten subpages. */
  for (int i = 0; i < 40; i++) {
    assert_non_null(b[i] = sl_buf_alloc(p, 1000, 0));
    int found = 0;
    for (int j = 0; j < 40 && !found; j++) found = b[i]->data == data[j];
    assert_true(found);
  }
  assert_null(atomic_load(&p->sub_owner.remote));
  assert_int_equal(owned_count(p), 10);
  assert_int_equal(ar->chunks, 1);
  for (int i = 0; i < 40; i++) sl_buf_release(b[i]);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* An idle pool whose bins are empty still gives its owned subpages back,
 * so that their chunk goes to the OS. */
static void test_idle_tick_gives_back_owned_subpages(void **state) {
  (void)state;
  sl_alloc_config cfg;
  owned_config(&cfg);
  cfg.trim_idle_ms = 50;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_buf *b[20];
  for (int i = 0; i < 20; i++) assert_non_null(b[i] = sl_buf_alloc(p, 1000, 0));
  for (int i = 0; i < 20; i++) sl_buf_release(b[i]);
  sl_pool_trim(p, 0);   /* nothing was used since: the bin empties into its subpages */
  assert_int_equal(sl_test_stats(p).cached_blocks, 0);
  assert_true(owned_count(p) >= 1);
  assert_int_equal(p->arena->chunks, 1);

  int64_t t = mono_ms() + 1000000;
  idle_tick(p, t);
  sl_pool_trim_report r = idle_tick(p, t + cfg.trim_idle_ms + 1);
  assert_int_equal(r.blocks, 0);
  assert_int_equal(r.chunks, 1);
  assert_null(p->owned);
  assert_int_equal(p->arena->chunks, 0);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* Under max_memory, the memory a pool holds in its cache and its owned
 * subpages is given back before an allocation is refused: a chunk filled
 * with one class, released, then serves another class. */
static void test_max_memory_takes_back_owned_subpages_before_refusing(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.max_memory = 256 * KiB; /* one chunk */
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  static sl_buf *b[512];
  size_t n = 0;
  while (n < 512 && (b[n] = sl_buf_alloc(p, 1000, 0)) != NULL) n++;
  assert_true(n > 200 && n < 512); /* the chunk's pages, four 1 KiB elements each */
  assert_int_equal(errno, ENOMEM);
  assert_true(atomic_load(&a->refused) >= 1);
  assert_int_equal(sl_test_stats(p).blocks_in_use, n);
  assert_int_equal(p->arena->chunks, 1);
  /* The refused allocation gave the owned subpages back first (then
   * retried): the live blocks' subpages are the arena's now. */
  assert_int_equal(owned_count(p), 0);
  for (size_t i = 0; i < n; i++) sl_buf_release(b[i]);
  assert_int_equal(sl_test_stats(p).cached_blocks, n);

  /* Every page holds 1 KiB elements, all in the pool's cache: 2 KiB
   * buffers get them back. */
  size_t m = 0;
  while (m < 512 && (b[m] = sl_buf_alloc(p, 2000, 0)) != NULL) m++;
  assert_true(m >= n / 2 - 8);
  assert_int_equal(p->arena->chunks, 1);
  for (size_t i = 0; i < m; i++) sl_buf_release(b[i]);
  sl_pool_trim(p, 1);
  release_chunks(p->arena, 0, 1);

  /* Owned subpages half used: a refusal gives them back to the arena,
   * and the next misses take them again (no new chunk). The chunk holds
   * n 1 KiB blocks exactly, so filling it refuses nothing. */
  for (size_t i = 0; i < n; i++) assert_non_null(b[i] = sl_buf_alloc(p, 1000, 0));
  for (size_t i = 0; i < n; i += 2) sl_buf_release(b[i]);   /* the odd ones stay */
  sl_pool_trim(p, 0);
  sl_pool_trim(p, 0);   /* the cache empties into the owned subpages */
  assert_int_equal(sl_test_stats(p).cached_blocks, 0);
  assert_true(owned_count(p) > 0);
  errno = 0;
  assert_null(sl_buf_alloc(p, 2000, 0));   /* every page holds a live 1 KiB block */
  assert_int_equal(errno, ENOMEM);
  assert_int_equal(owned_count(p), 0);
  assert_non_null(p->arena->subpages[sl_sc_index(1024)]);
  for (size_t i = 0; i < n; i += 2) assert_non_null(b[i] = sl_buf_alloc(p, 1000, 0));
  assert_int_equal(p->arena->chunks, 1);
  for (size_t i = 0; i < n; i++) sl_buf_release(b[i]);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  /* Everything back and reported: the arena's per-class counts agree, the
   * refusals above included (the counts a pool hands over with a refused
   * request are not handed over again). */
  sl_pool_trim(p, 1);
  sl_arena_stats as;
  sl_arena_get_stats(p->arena, &as);
  for (unsigned c = 0; c < SL_SC_MAX_CLASSES; c++) assert_int_equal(as.cls[c].allocs, as.cls[c].frees);
  finish(p, a);
}

/* Buffers released on another thread while their owner releases others
 * as a Lua stage does (the quarantine set around each release), makes
 * views and derived buffers, drains, trims and goes idle: through the
 * return queue and, with it full, the direct path; every byte checked,
 * every count back at the end. Under ThreadSanitizer (scripts/test --tsan)
 * it guards the thread test of sl_buf_free, which the owner rewrites
 * around each release from Lua (free_tp) while foreign threads read it. */
#define XT_TOTAL 200000   /* a tenth under valgrind, which runs one thread at a time */
static void test_foreign_releases_race_lua_releases_views_and_trims(void **state) {
  (void)state;
  sl_alloc_config cfg;
  owned_config(&cfg);
  cfg.return_queue_cap = 4;
  cfg.trim_interval = 97;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  pthread_t th;
  handoff *h = handoff_start(&th);
  static const size_t sizes[] = {16, 100, 1000, 3000, 5000, 20000, 40000, 70000};
  uint64_t seed = 7, given = 0;
  int64_t now = mono_ms() + 1000000;
  const char *err = NULL;
  int total = TEST_UNDER_VALGRIND() ? XT_TOTAL / 10 : XT_TOTAL;
  for (int i = 0; i < total; i++) {
    uint64_t r = rng_next(&seed);
    size_t size = sizes[r % 8];
    sl_buf *b = sl_buf_alloc(p, size, (r >> 8) % 3 == 0 ? size * 2 : 0);
    assert_non_null(b);
    uint64_t mark = (uint64_t)(uintptr_t)b->data;
    memcpy(b->data, &mark, 8);
    memcpy(b->data + b->cap - 8, &mark, 8);
    b->wr = b->cap;
    sl_buf *give = b;
    switch ((r >> 16) % 5) {
    case 0: /* a view dies with its buffer on the other thread */
      assert_non_null(sl_buf_slice(b, 0, 8, &err));
      break;
    case 1: { /* a derived buffer goes; its parent is released here, from Lua */
      sl_buf *d = sl_buf_retained_duplicate(b);
      assert_non_null(d);
      assert_int_equal(sl_ffi_buf_release_by(b, 1, NULL, NULL, &err), 0);
      give = d;
      break;
    }
    case 2: /* released here, from Lua */
      assert_int_equal(sl_ffi_buf_release_by(b, 1, NULL, NULL, &err), 1);
      give = NULL;
      break;
    default:
      break;
    }
    if (give != NULL) {
      pthread_mutex_lock(&h->mu);
      while (h->tail - h->head == HANDOFF_SLOTS) pthread_cond_wait(&h->not_full, &h->mu);
      h->ring[h->tail++ % HANDOFF_SLOTS] = give;
      given++;
      pthread_cond_signal(&h->not_empty);
      pthread_mutex_unlock(&h->mu);
    }
    if (i % 61 == 0) sl_buf_drain(p);
    if (i % 4999 == 0) {
      sl_pool_trim_report tr;
      sl_pool_tick(p, now, &tr);
      now += cfg.trim_idle_ms + 1;
      sl_pool_tick(p, now, &tr);   /* idle: caches, owned subpages back */
    }
  }
  handoff_close(h, th);
  sl_buf_drain(p);
  assert_int_equal(h->bad, 0);
  assert_int_equal(h->released, given);
  sl_pool_stats st = sl_test_stats(p);
  assert_true(st.remote_direct > 0 && st.remote_queued > 0 && st.remote_stacked > 0);
  assert_int_equal(st.blocks_in_use, 0);
  assert_int_equal(st.bytes_in_use, 0);
  take_back_foreign_headers(p);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  handoff_free(h);
  finish(p, a);
}

/* ---- 12. max_memory ---- */

static void test_max_memory_refuses_new_chunks_and_huge_blocks(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB); /* 63 usable pages: 7 blocks of 32 KiB */
  cfg.max_memory = 512 * KiB;    /* two chunks */
  sl_alloc *a = new_alloc(&cfg);
  sl_arena *ar = &a->arenas[0];
  unsigned k32 = sl_sc_index(32 * KiB);
  void *blk[14];
  for (int i = 0; i < 14; i++) assert_non_null(blk[i] = sl_arena_alloc(ar, k32, 32 * KiB));
  assert_int_equal(ar->chunks, 2);
  assert_int_equal(atomic_load(&a->reserved), 512 * KiB);
  assert_int_equal(atomic_load(&a->refused), 0);

  errno = 0;
  assert_null(sl_arena_alloc(ar, k32, 32 * KiB));
  assert_int_equal(errno, ENOMEM);
  assert_int_equal(atomic_load(&a->refused), 1);
  assert_int_equal(ar->chunks, 2);
  /* Room inside the mapped chunks is still served: a small block. */
  void *small = sl_arena_alloc(ar, sl_sc_index(100), 100);
  assert_non_null(small);
  /* Freeing one block makes the next allocation succeed, in its place. */
  sl_arena_free(ar, blk[3], k32, 32 * KiB);
  void *again = sl_arena_alloc(ar, k32, 32 * KiB);
  assert_ptr_equal(again, blk[3]);
  blk[3] = again;
  assert_null(sl_arena_alloc(ar, k32, 32 * KiB));
  assert_int_equal(atomic_load(&a->refused), 2);
  /* A huge block does not fit beside the chunks. */
  assert_null(sl_arena_alloc(ar, a->nclasses, 300 * KiB));
  assert_int_equal(atomic_load(&a->refused), 3);
  assert_int_equal(ar->huge_allocs, 0);

  for (int i = 0; i < 14; i++) sl_arena_free(ar, blk[i], k32, 32 * KiB);
  sl_arena_free(ar, small, sl_sc_index(100), 100);
  release_chunks(ar, 0, 1);
  assert_int_equal(atomic_load(&a->reserved), 0);
  /* Nothing mapped: a huge block above max_memory is refused, one below is
   * served and counted, and given back. */
  assert_null(sl_arena_alloc(ar, a->nclasses, 600 * KiB));
  assert_int_equal(atomic_load(&a->refused), 4);
  void *hg = sl_arena_alloc(ar, a->nclasses, 300 * KiB);
  assert_non_null(hg);
  assert_int_equal(atomic_load(&a->reserved), sl_alloc_huge_size(a, 300 * KiB));
  sl_arena_free(ar, hg, a->nclasses, sl_alloc_huge_size(a, 300 * KiB));
  assert_int_equal(atomic_load(&a->reserved), 0);

  /* Through a pool: sl_buf_alloc says NULL and counts the failure. */
  sl_pool *p = new_pool(a);
  errno = 0;
  assert_null(sl_buf_alloc(p, 600 * KiB, 0));
  assert_int_equal(errno, ENOMEM);
  assert_int_equal(sl_test_stats(p).alloc_failures, 1);
  sl_buf *ok = sl_buf_alloc(p, 300 * KiB, 0);
  assert_non_null(ok);
  sl_buf_release(ok);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* ---- 13. unpooled mode ---- */

/* What a user of sl_buf observes in one scripted session. */
typedef struct buf_session {
  int slice_same_memory, slice_bytes_ok, dup_indexes_ok;
  const char *grow_with_views_err;
  int grow_ok, grown_bytes_ok;
  const char *grow_past_max_err;
  const char *slice_range_err;
  size_t empty_readable;
  int huge_ok;
  uint64_t active_at_peak, active_bytes_ok, active_after;
  uint64_t cached_after;
} buf_session;

static void run_buf_session(sl_pool *p, buf_session *out) {
  const char *err = NULL;
  memset(out, 0, sizeof(*out));
  uint8_t src[200];
  sl_test_fill_pattern(src, sizeof(src), 7);

  sl_buf *b = sl_buf_alloc(p, 100, 1000);
  assert_non_null(b);
  assert_true(b->cap >= 100);
  assert_true(b->cap <= 1000);
  assert_int_equal(sl_buf_write(b, src, 100, &err), SL_OK);
  sl_buf *v = sl_buf_slice(b, 10, 50, &err);
  assert_non_null(v);
  out->slice_same_memory = v->data == b->data + 10;
  out->slice_bytes_ok = sl_buf_readable(v) == 50 && memcmp(sl_buf_rptr(v), src + 10, 50) == 0;
  b->rd = 5;
  sl_buf *d = sl_buf_duplicate(b);
  assert_non_null(d);
  out->dup_indexes_ok = d->rd == 5 && d->wr == 100 && d->data == b->data;
  err = NULL;
  assert_int_equal(sl_buf_ensure_writable(b, 5000, &err), SL_ERROR);
  out->grow_with_views_err = err;
  err = NULL;
  assert_null(sl_buf_slice(b, 90, b->cap, &err));
  out->slice_range_err = err;

  sl_buf *c = sl_buf_alloc(p, 10, 100000);
  assert_non_null(c);
  assert_true(c->cap >= 10);
  assert_int_equal(sl_buf_write(c, src, 10, &err), SL_OK);
  out->grow_ok = sl_buf_ensure_writable(c, 50000, &err) == SL_OK && c->cap >= 50010;
  uint8_t *big = malloc(50000);
  assert_non_null(big);
  sl_test_fill_pattern(big, 50000, 10);
  assert_int_equal(sl_buf_write(c, big, 50000, &err), SL_OK);
  free(big);
  out->grown_bytes_ok = c->wr == 50010 && memcmp(c->data, src, 10) == 0 &&
                        sl_test_pattern_mismatch(c->data + 10, 50000, 10) == 50000;
  err = NULL;
  assert_int_equal(sl_buf_ensure_writable(c, 100000, &err), SL_ERROR);
  out->grow_past_max_err = err;

  sl_buf *e = sl_buf_from(p, src, 0);
  assert_non_null(e);
  out->empty_readable = sl_buf_readable(e);

  sl_buf *h = sl_buf_alloc(p, 5 * MiB, 0);
  assert_non_null(h);
  memset(h->data, 0xab, h->cap);
  out->huge_ok = h->cap == 5 * MiB && h->data[5 * MiB - 1] == 0xab;

  sl_pool_stats st = sl_test_stats(p);
  out->active_at_peak = st.bufs_active;
  out->active_bytes_ok = st.bufs_active_bytes ==
                         (uint64_t)b->block_size + c->block_size + e->block_size + h->block_size;
  assert_int_equal(sl_buf_release(b), 1);
  assert_int_equal(v->gen, 0);
  assert_int_equal(d->gen, 0);
  sl_buf_release(c);
  sl_buf_release(e);
  sl_buf_release(h);
  st = sl_test_stats(p);
  out->active_after = st.bufs_active;
  out->cached_after = st.cached_blocks;
}

static void test_unpooled_mode_behaves_like_pooled(void **state) {
  (void)state;
  buf_session s[2];
  for (int mode = 0; mode < 2; mode++) {
    sl_alloc_config cfg;
    small_config(&cfg, 256 * KiB);
    cfg.type = mode ? SL_ALLOC_UNPOOLED : SL_ALLOC_POOLED;
    sl_alloc *a = new_alloc(&cfg);
    sl_pool *p = new_pool(a);
    run_buf_session(p, &s[mode]);
    if (mode == 1) {
      assert_int_equal(s[1].cached_after, 0);
      assert_int_equal(p->max_cached_size, 0);
      assert_int_equal(p->arena->chunks_created, 0); /* nothing mapped, ever */
      assert_int_equal(p->arena->huge_allocs, 0);
    }
    SL_TEST_ASSERT_POOL_CLEAN(p);
    finish(p, a);
  }
  assert_true(s[0].slice_same_memory && s[1].slice_same_memory);
  assert_true(s[0].slice_bytes_ok && s[1].slice_bytes_ok);
  assert_true(s[0].dup_indexes_ok && s[1].dup_indexes_ok);
  assert_true(s[0].grow_ok && s[1].grow_ok);
  assert_true(s[0].grown_bytes_ok && s[1].grown_bytes_ok);
  assert_true(s[0].huge_ok && s[1].huge_ok);
  assert_string_equal(s[0].grow_with_views_err, "cannot grow a buffer that has views");
  assert_string_equal(s[1].grow_with_views_err, s[0].grow_with_views_err);
  assert_string_equal(s[0].grow_past_max_err, "exceeds max capacity");
  assert_string_equal(s[1].grow_past_max_err, s[0].grow_past_max_err);
  assert_string_equal(s[0].slice_range_err, "slice out of range");
  assert_string_equal(s[1].slice_range_err, s[0].slice_range_err);
  assert_int_equal(s[0].empty_readable, 0);
  assert_int_equal(s[1].empty_readable, 0);
  assert_int_equal(s[0].active_at_peak, 4);
  assert_int_equal(s[1].active_at_peak, 4);
  assert_true(s[0].active_bytes_ok && s[1].active_bytes_ok);
  assert_int_equal(s[0].active_after, 0);
  assert_int_equal(s[1].active_after, 0);
}

/* ---- 14. huge blocks ---- */

static void test_huge_blocks_are_mapped_directly_and_unmapped_on_free(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_arena *ar = p->arena;
  const size_t sizes[] = {a->max_class_size + 1, 256 * KiB, 256 * KiB + 1, 3 * 256 * KiB + 123,
                          2 * MiB};
  enum { N = sizeof(sizes) / sizeof(sizes[0]) };
  void *m[N];
  size_t usable[N], total = 0;
  for (int i = 0; i < N; i++) {
    m[i] = sl_pool_alloc(p, sizes[i], &usable[i]);
    assert_non_null(m[i]);
    assert_true(usable[i] >= sizes[i]);
    assert_int_equal(usable[i] % 4096, 0);
    assert_true(usable[i] - sizes[i] < 4096);
    assert_int_equal((uintptr_t)m[i] % 4096, 0);
    pat_fill(m[i], 0, usable[i], (uint64_t)i + 100);
    total += usable[i];
  }
  for (int i = 0; i < N; i++)
    assert_int_equal(pat_check(m[i], 0, usable[i], (uint64_t)i + 100), usable[i]);
  assert_int_equal(ar->chunks, 0); /* none came from a chunk */
  assert_int_equal(ar->huge_allocs, N);
  assert_int_equal(ar->huge_bytes, total);
  assert_int_equal(atomic_load(&a->reserved), total);
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.blocks_in_use, N);
  assert_int_equal(st.bytes_in_use, total);
  for (int i = 0; i < N; i++) {
    assert_true(is_mapped(m[i]) && is_mapped((uint8_t *)m[i] + usable[i] - 1));
    sl_pool_free(p, m[i], usable[i]);
    assert_false(is_mapped(m[i]));            /* unmapped, first page to last */
    assert_false(is_mapped((uint8_t *)m[i] + usable[i] - 1));
  }
  assert_int_equal(ar->huge_frees, N);
  assert_int_equal(ar->huge_bytes, 0);
  assert_int_equal(atomic_load(&a->reserved), 0);
  assert_int_equal(sl_test_stats(p).cached_blocks, 0);

  /* A buffer that grows from a class block into a huge one. */
  const char *err = NULL;
  sl_buf *b = sl_buf_alloc(p, 100, 1 * MiB);
  assert_non_null(b);
  sl_test_fill_pattern(b->data, 100, 0);
  b->wr = 100;
  assert_int_equal(sl_buf_ensure_writable(b, 600 * KiB, &err), SL_OK);
  assert_true(b->cap >= 100 + 600 * KiB);
  assert_int_equal(sl_test_pattern_mismatch(b->data, 100, 0), 100);
  assert_int_equal(ar->huge_allocs, N + 1);
  sl_buf_release(b);
  assert_int_equal(ar->huge_frees, N + 1);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* The largest class fits a chunk beside its metadata, for several
 * geometries; the sizes above it, up to the chunk size, are huge (this
 * used to abort: a class of the chunk's size did not fit a new chunk). */
static void test_largest_class_fits_a_chunk_and_larger_sizes_are_huge(void **state) {
  (void)state;
  static const size_t geo[][2] = {
      {4096, 64 * KiB}, {4096, 256 * KiB}, {8192, 4 * MiB}, {4096, 1 * MiB}};
  for (unsigned g = 0; g < sizeof(geo) / sizeof(geo[0]); g++) {
    sl_alloc_config cfg;
    sl_alloc_config_defaults(&cfg);
    cfg.page_size = geo[g][0];
    cfg.chunk_size = geo[g][1];
    sl_alloc *a = new_alloc(&cfg);
    sl_pool *p = new_pool(a);
    size_t usable_bytes = (cfg.chunk_size / cfg.page_size -
                           sl_chunk_meta_pages(cfg.chunk_size, cfg.page_size)) * cfg.page_size;
    assert_true(a->max_class_size <= usable_bytes);
    assert_true(sl_sc_size(a->nclasses) > usable_bytes);
    assert_true(a->nclasses <= SL_SC_MAX_CLASSES);

    size_t u = 0;
    void *m = sl_pool_alloc(p, a->max_class_size, &u);
    assert_non_null(m);
    assert_int_equal(u, a->max_class_size);
    assert_int_equal(p->arena->chunks, 1);
    assert_int_equal(p->arena->huge_allocs, 0);
    memset(m, 0x5a, u);
    sl_pool_free(p, m, u);
    static const size_t over[] = {1, 4096, 0};
    for (unsigned i = 0; i < 3; i++) {
      size_t size = over[i] ? a->max_class_size + over[i] : cfg.chunk_size;
      m = sl_pool_alloc(p, size, &u);
      assert_non_null(m);
      assert_true(u >= size);
      memset(m, 0x5a, size);
      sl_pool_free(p, m, u);
    }
    assert_int_equal(p->arena->huge_allocs, 3);
    assert_int_equal(p->arena->huge_frees, 3);
    finish(p, a);
  }
}

/* ---- 15. randomized stress ---- */

#define STRESS_ALLOCS 1000000
#define STRESS_LIVE 2000

typedef struct live_buf {
  sl_buf *b;
  uint64_t key;
  uint32_t nviews;
} live_buf;

static size_t stress_size(uint64_t *seed, const sl_alloc *a) {
  uint64_t r = rng_next(seed);
  if (r % 5000 == 0) /* rarely: huge */
    return a->max_class_size + 1 + (size_t)(rng_next(seed) % (2 * a->cfg.chunk_size));
  if (r % 10 == 0) /* some uniformly up to 70000 */
    return 1 + (size_t)(rng_next(seed) % 70000);
  /* mostly log-uniform over 1..70000 */
  unsigned bits = 1 + (unsigned)(rng_next(seed) % 16); /* 2^16 = 65536 */
  size_t lo = (size_t)1 << (bits - 1);
  return lo + (size_t)(rng_next(seed) % lo);
}

static void stress_verify(const live_buf *lb, const char *when) {
  sl_buf *b = lb->b;
  size_t bad = pat_check(b->data, 0, b->cap, lb->key);
  if (bad != b->cap)
    fail_msg("%s: buffer %p (cap %u, block %u) corrupted at offset %zu", when, (void *)b, b->cap,
             b->block_size, bad);
}

static void test_random_stress_never_overlaps_or_corrupts(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.trim_interval = 1000;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  live_buf *live = calloc(STRESS_LIVE, sizeof(*live));
  assert_non_null(live);
  size_t nlive = 0;
  uint64_t seed = 0x1234567887654321ull, serial = 0;
  uint64_t allocs = 0, releases = 0, slices = 0, dups = 0, grows = 0, huge = 0, grow_refused = 0;
  double t0 = now_s();
  const char *err = NULL;

  while (allocs < STRESS_ALLOCS || nlive > 0) {
    uint64_t r = rng_next(&seed);
    int do_alloc = allocs < STRESS_ALLOCS && (nlive == 0 || (nlive < STRESS_LIVE && r % 100 < 55));
    if (do_alloc) {
      size_t size = stress_size(&seed, a);
      sl_buf *b = sl_buf_alloc(p, size, 2 * size);
      if (b == NULL) fail_msg("sl_buf_alloc(%zu) failed", size);
      assert_true(b->cap >= size);
      if (size > a->max_class_size) huge++;
      live_buf *lb = &live[nlive++];
      lb->b = b;
      lb->key = (uint64_t)(uintptr_t)b->data ^ (++serial << 40);
      lb->nviews = 0;
      pat_fill(b->data, 0, b->cap, lb->key);
      b->wr = b->cap;
      allocs++;
    } else {
      size_t i = (size_t)(rng_next(&seed) % nlive);
      live_buf *lb = &live[i];
      uint64_t op = rng_next(&seed) % 100;
      if (op < 4 && lb->b->cap > 0) { /* slice, and check what it sees */
        size_t off = (size_t)(rng_next(&seed) % lb->b->cap);
        size_t len = (size_t)(rng_next(&seed) % (lb->b->cap - off + 1));
        sl_buf *v = sl_buf_slice(lb->b, off, len, &err);
        assert_non_null(v);
        assert_ptr_equal(v->data, lb->b->data + off);
        assert_int_equal(sl_buf_readable(v), len);
        size_t n = len < 512 ? len : 512;
        assert_int_equal(pat_check(lb->b->data, off, off + n, lb->key), off + n);
        lb->nviews++;
        slices++;
        continue;
      }
      if (op < 6) { /* duplicate */
        sl_buf *v = sl_buf_duplicate(lb->b);
        assert_non_null(v);
        assert_ptr_equal(v->data, lb->b->data);
        assert_int_equal(v->wr, lb->b->wr);
        lb->nviews++;
        dups++;
        continue;
      }
      if (op < 10) { /* grow */
        sl_buf *b = lb->b;
        size_t old = b->cap;
        if (lb->nviews > 0 || b->max_cap == old) {
          assert_int_equal(sl_buf_ensure_writable(b, 1, &err), SL_ERROR);
          grow_refused++;
          continue;
        }
        size_t extra = 1 + (size_t)(rng_next(&seed) % (b->max_cap - old));
        assert_int_equal(sl_buf_ensure_writable(b, extra, &err), SL_OK);
        assert_true(b->cap >= old + extra);
        assert_int_equal(pat_check(b->data, 0, old, lb->key), old);
        pat_fill(b->data, old, b->cap, lb->key);
        b->wr = b->cap;
        grows++;
        continue;
      }
      stress_verify(lb, "release");
      sl_buf *v = (lb->b->flags & SL_BUF_HAS_VIEWS) ? lb->b->views : NULL;
      assert_int_equal(sl_buf_release(lb->b), 1);
      if (v != NULL) assert_int_equal(v->gen, 0);
      live[i] = live[--nlive];
      releases++;
    }
    if (((allocs + releases) & 4095) == 0) {
      sl_pool_stats st = sl_test_stats(p);
      uint64_t bytes = 0;
      for (size_t k = 0; k < nlive; k++) bytes += live[k].b->block_size;
      assert_int_equal(st.blocks_in_use, nlive);
      assert_int_equal(st.bytes_in_use, bytes);
      assert_int_equal(st.bufs_active, nlive);
    }
  }
  double elapsed = now_s() - t0;
  print_message("    stress: %" PRIu64 " allocations, %" PRIu64 " huge, %" PRIu64
                " slices, %" PRIu64 " duplicates, %" PRIu64 " grows (%" PRIu64
                " refused) in %.2f s; chunks created %" PRIu64 "\n",
                allocs, huge, slices, dups, grows, grow_refused, elapsed, p->arena->chunks_created);
  assert_true(huge > 0 && slices > 0 && dups > 0 && grows > 0 && grow_refused > 0);
  free(live);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

/* ---- known bugs in src/ (reported, skipped by default) ---- */

/* Fixed bug: with ASan, the pool poisons freed class blocks (SL_POISON) but
 * nothing unpoisons a chunk when sl_arena_release_empty / sl_alloc_destroy
 * unmap it (and this ASan has no munmap interceptor that would). Whatever
 * the process maps next at that address (a huge block, a chunk of another
 * geometry, a pool's header region, LuaJIT's memory) reads as poisoned and
 * trips false "use-after-poison" reports. */
static void test_unmapped_chunk_leaves_no_asan_poison(void **state) {
  (void)state;
  if (!TEST_ASAN) skip();
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  size_t usable;
  void *m = sl_pool_alloc(p, 40000, &usable); /* normal: freed straight to the arena */
  assert_non_null(m);
  sl_chunk *c = sl_chunk_of(m, cfg.chunk_size);
  sl_pool_free(p, m, usable);                 /* poisons the block */
  assert_int_equal(sl_arena_release_empty(p->arena, 0, 1), 1); /* unmaps the chunk */
#if TEST_ASAN
  void *still = __asan_region_is_poisoned((void *)c, cfg.chunk_size);
  ASAN_UNPOISON_MEMORY_REGION((void *)c, cfg.chunk_size); /* for the tests after this one */
  if (still != NULL)
    fail_msg("unmapped chunk %p still poisoned at %p: a later mapping there reads as poisoned",
             (void *)c, still);
#else
  (void)c;
#endif
  finish(p, a);
}

/* The worker's own timer (every trim_idle_ms / 2000 s) keeps a chunk that
 * emptied less than trim_idle_ms ago, even though the pool has been idle
 * longer. (It used to tick with ev_now(), a realtime-based clock, against
 * the arena's CLOCK_MONOTONIC stamps, and unmapped every empty chunk.) */
static void run_loop_after_ms(sl_worker *w, unsigned ms) {
  usleep(ms * 1000);
  chunk_snapshot s;
  snapshot_chunks(w->pool->arena, &s);
  ev_run(w->loop, EVRUN_NOWAIT);
  forget_unmapped(w->pool->arena, &s);
}

static void test_worker_timer_keeps_chunk_emptied_less_than_idle_ago(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  /* Wall-clock sleeps against the worker's timer: the margins (about a
   * second either way) leave room for a machine that stalls the test. */
  cfg.trim_idle_ms = 2000;               /* the timer runs every second */
  sl_alloc *a = new_alloc(&cfg);
  sl_worker *w = sl_worker_create(0, a);
  assert_non_null(w);
  sl_pool *p = w->pool;
  sl_buf *b = sl_buf_alloc(p, 40000, 0); /* normal: never cached */
  assert_non_null(b);
  ev_run(w->loop, EVRUN_NOWAIT);
  run_loop_after_ms(w, 1050);            /* tick: notes the allocation */
  run_loop_after_ms(w, 1050);            /* tick: idle 1.05 s, nothing */
  sl_buf_release(b);                     /* the chunk empties now */
  assert_int_equal(p->arena->chunks, 1);
  run_loop_after_ms(w, 1050);            /* tick: pool idle 2.1 s, chunk 1.05 s */
  uint64_t chunks = p->arena->chunks;
  run_loop_after_ms(w, 1100);            /* tick: chunk empty 2.15 s */
  uint64_t chunks_later = p->arena->chunks;
  release_chunks(p->arena, 0, 1);
  assert_int_equal(sl_worker_destroy(w), 0);
  finish(NULL, a);
  if (chunks != 1)
    fail_msg("the worker's idle tick unmapped a chunk that had been empty for about 1 s "
             "(trim_idle_ms 2000)");
  assert_int_equal(chunks_later, 0);
}

/* BUG (since 9cb9404, leak detection): sl_buf_free_foreign no longer
 * frees directly when the owner's return queue is full if the buffer has an
 * owner or a leak record (SL_BUF_RECORDED: the pool's first buffer and 1 in
 * leak_sample after it, by default); it yields in a loop until the owner
 * drains (buf.c, "wait for room rather than touch them here"). A foreign
 * thread then depends on the owner's progress: if the owner waits for it
 * (a bounded handoff, a join, a lock), both wait for ever. The design
 * (pool_types.h) says a full queue means a direct free: nothing waits.
 * test_cross_thread_release_keeps_memory_bounded with the default
 * leak_level hangs this way (consumer in sl_buf_free_foreign's yield loop,
 * producer in pthread_cond_wait for ring room). */
static void *release_three_thread(void *arg) {
  sl_buf **b = arg;
  sl_buf_release(b[1]);
  sl_buf_release(b[2]); /* the queue (2 slots) is full now */
  sl_buf_release(b[0]); /* recorded: should be freed directly */
  return NULL;
}

static void test_foreign_release_of_tracked_buffer_never_blocks(void **state) {
  (void)state;
  sl_alloc_config cfg;
  small_config(&cfg, 256 * KiB);
  cfg.return_queue_cap = 2;
  cfg.leak_level = 1; /* the default: simple, the first buffer recorded */
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_buf *b[3];
  for (int i = 0; i < 3; i++) assert_non_null(b[i] = sl_buf_alloc(p, 100, 0));
  assert_true(b[0]->flags & SL_BUF_RECORDED);
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, release_three_thread, b), 0);
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += 1;
  int rc = pthread_timedjoin_np(th, NULL, &until);
  int blocked = rc == ETIMEDOUT;
  if (blocked) {
    sl_buf_drain(p); /* room: the releasing thread goes on */
    assert_int_equal(pthread_join(th, NULL), 0);
  } else {
    assert_int_equal(rc, 0);
  }
  sl_buf_drain(p);
  take_back_foreign_headers(p);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
  if (blocked)
    fail_msg("a foreign thread releasing a recorded buffer into a full return queue waited "
             "(1 s and counting) for the owner to drain, instead of freeing it directly");
}

/* Fixed bug: SL_SC_MAX_CLASSES (80) covers chunks up to 32 MiB, but
 * sl_alloc_create accepts chunk_size up to 1 GiB ("enough for chunks up to
 * 1 GiB", size_class.h). With a 64 MiB chunk there are 83 classes:
 * sl_alloc_create writes run_pages[80..82] past the array, over
 * a->reserved (so max_memory refuses everything), and allocations of the
 * top classes index arena->cls[] and pool->cls[] out of bounds. With 128
 * MiB and up the writes leave the struct (heap overflow). */
static void test_chunk_above_32mib_is_refused_not_overflowed(void **state) {
  (void)state;
  /* In a child: UBSan builds abort on the out-of-bounds index. */
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    sl_alloc_config cfg;
    sl_alloc_config_defaults(&cfg);
    cfg.chunk_size = 64 * MiB;
    cfg.max_memory = 1024 * MiB;
    const char *err = NULL;
    sl_alloc *a = sl_alloc_create(&cfg, &err);
    if (a == NULL) _exit(0); /* refusing the config would be a fix too */
    int bad = 0;
    if (a->nclasses > SL_SC_MAX_CLASSES) bad |= 1;
    if (atomic_load(&a->reserved) != 0) bad |= 2;
    void *m = sl_arena_alloc(&a->arenas[0], sl_sc_index(100), 100);
    if (m == NULL) bad |= 4;
    _exit(bad ? 100 + bad : 0); /* sanitizers exit with 1 */
  }
  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  if (WIFSIGNALED(status))
    fail_msg("sl_alloc_create with a 64 MiB chunk died with signal %d (index past run_pages[%d])",
             WTERMSIG(status), SL_SC_MAX_CLASSES);
  assert_true(WIFEXITED(status));
  int code = WEXITSTATUS(status);
  if (code > 0 && code < 100)
    fail_msg("sl_alloc_create with a 64 MiB chunk: a sanitizer stopped it (exit %d): an index "
             "past run_pages[%d]", code, SL_SC_MAX_CLASSES);
  code -= 100;
  if (code > 0)
    fail_msg("64 MiB chunk:%s%s%s", code & 1 ? " nclasses > SL_SC_MAX_CLASSES;" : "",
             code & 2 ? " a->reserved overwritten by run_pages[] past its end;" : "",
             code & 4 ? " a 100-byte allocation refused under a 1 GiB max_memory" : "");
}

/* Normal sizes above max_cached in a random mix, with trims and forced
 * releases of empty chunks between, over several geometries (page 4096
 * and chunk 64 KiB or 1 MiB: runs of 64 pages and more), max_cached 0 and
 * 65536: every buffer keeps its bytes (no run handed out twice), and the
 * arena's counts are exact at the end. */
static void normal_mix_run(size_t page, size_t chunk, size_t max_cached, uint64_t seed) {
  sl_alloc_config cfg;
  sl_alloc_config_defaults(&cfg);
  cfg.page_size = page;
  cfg.chunk_size = chunk;
  cfg.max_cached = max_cached;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  size_t lo = 32768 + 1, hi = a->max_class_size;
  enum { LIVE = 96 };
  sl_buf *live[LIVE] = {0};
  uint64_t key[LIVE] = {0};
  uint64_t s = seed, allocs = 0;
  int ops = TEST_UNDER_VALGRIND() ? 4000 : 20000;
  for (int op = 0; op < ops; op++) {
    unsigned i = (unsigned)(rng_next(&s) % LIVE);
    if (live[i] == NULL) {
      size_t sz = lo + rng_next(&s) % (hi - lo + 1);
      live[i] = sl_buf_alloc(p, sz, (rng_next(&s) & 7) == 0 ? sz + 100 : 0);
      assert_non_null(live[i]);
      allocs++;
      key[i] = rng_next(&s);
      uint8_t *d = live[i]->data;
      size_t cap = live[i]->cap;
      memcpy(d, &key[i], 8);
      memcpy(d + cap - 8, &key[i], 8);
    } else {
      uint64_t k1, k2;
      memcpy(&k1, live[i]->data, 8);
      memcpy(&k2, live[i]->data + live[i]->cap - 8, 8);
      assert_true(k1 == key[i] && k2 == key[i]);
      sl_buf_release(live[i]);
      live[i] = NULL;
    }
    if (op % 997 == 0) sl_pool_trim(p, 0);
    if (op % 2503 == 0) release_chunks(p->arena, 0, 1);
  }
  for (unsigned i = 0; i < LIVE; i++)
    if (live[i] != NULL) sl_buf_release(live[i]);
  sl_pool_trim(p, 1);
  sl_arena_stats as;
  sl_arena_get_stats(p->arena, &as);
  uint64_t ta = 0, tf = 0;
  for (unsigned k = a->nsmall; k < a->nclasses; k++) {
    ta += as.cls[k].allocs;
    tf += as.cls[k].frees;
  }
  assert_int_equal(ta, tf);
  if (max_cached < lo) assert_int_equal(ta, allocs);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

static void test_normal_mix_over_geometries(void **state) {
  (void)state;
  normal_mix_run(8192, 4u << 20, 0, 1);
  normal_mix_run(8192, 4u << 20, 65536, 2);
  normal_mix_run(4096, 65536, 0, 3);
  normal_mix_run(4096, 1u << 20, 0, 4);
  normal_mix_run(4096, 1u << 20, 32768, 5);
}

/* Two pools on two threads share one arena (arenas below workers): each
 * takes and frees normal runs above max_cached on its fast paths, hands
 * some buffers to the other to release (foreign frees on the same
 * chunks), while a third thread reads the arena's counts; the pools end
 * while it reads. Every buffer keeps its bytes, the counts stay
 * consistent and are exact at the end. */
typedef struct mix_worker {
  sl_alloc *a;
  _Atomic(sl_buf *) *give, *take;   /* one slot each way */
  atomic_int *done, *quit;
  uint64_t seed, allocs;
} mix_worker;

static int buf_keyed(const sl_buf *b) {
  uint64_t k1, k2;
  memcpy(&k1, b->data, 8);
  memcpy(&k2, b->data + b->cap - 8, 8);
  return k1 == k2;
}

static void buf_key(sl_buf *b, uint64_t k) {
  memcpy(b->data, &k, 8);
  memcpy(b->data + b->cap - 8, &k, 8);
}

static void *mix_worker_thread(void *arg) {
  mix_worker *w = arg;
  sl_pool *p = sl_pool_create(w->a, 0);
  if (p == NULL) return (void *)1;
  enum { LIVE = 48 };
  sl_buf *live[LIVE] = {0};
  uint64_t s = w->seed;
  size_t lo = 32768 + 1, hi = 32768 * 4;
  int bad = 0;
  /* Under valgrind the threads take turns: a tenth of the operations. */
  int ops = TEST_UNDER_VALGRIND() ? 4000 : 40000;
  for (int op = 0; op < ops; op++) {
    unsigned i = (unsigned)(rng_next(&s) % LIVE);
    sl_buf *f = atomic_exchange(w->take, NULL);
    if (f != NULL) {
      bad |= !buf_keyed(f);
      sl_buf_release(f);   /* a foreign free */
    }
    if (live[i] == NULL) {
      size_t sz = lo + rng_next(&s) % (hi - lo + 1);
      live[i] = sl_buf_alloc(p, sz, 0);
      if (live[i] == NULL) return (void *)2;
      w->allocs++;
      buf_key(live[i], rng_next(&s));
    } else {
      bad |= !buf_keyed(live[i]);
      sl_buf *expect = NULL;
      if ((rng_next(&s) & 3) == 0 && atomic_compare_exchange_strong(w->give, &expect, live[i])) {
      } else {
        sl_buf_release(live[i]);
      }
      live[i] = NULL;
    }
    if (op % 512 == 0) sl_buf_drain(p);
  }
  for (unsigned i = 0; i < LIVE; i++)
    if (live[i] != NULL) sl_buf_release(live[i]);
  atomic_fetch_add(w->done, 1);
  while (atomic_load(w->done) < 2 || atomic_load(w->take) != NULL) {
    spin_pause();
    sl_buf *f = atomic_exchange(w->take, NULL);
    if (f != NULL) {
      bad |= !buf_keyed(f);
      sl_buf_release(f);
    }
    sl_buf_drain(p);
  }
  atomic_fetch_add(w->quit, 1);
  while (atomic_load(w->quit) < 2 || atomic_load(w->give) != NULL) {
    spin_pause();
    sl_buf_drain(p);
  }
  sl_buf_drain(p);
  sl_pool_trim(p, 1);
  sl_pool_stats st = sl_test_stats(p);
  if (st.blocks_in_use != 0 || st.bufs_active != 0) bad |= 4;
  sl_pool_destroy(p);
  return (void *)(intptr_t)bad;
}

static void pools_race_run(size_t page, size_t chunk, int retq_cap) {
  sl_alloc_config cfg;
  sl_alloc_config_defaults(&cfg);
  cfg.max_cached = 0;
  cfg.arenas = 1;
  cfg.page_size = page;
  cfg.chunk_size = chunk;
  cfg.return_queue_cap = retq_cap;
  sl_alloc *a = new_alloc(&cfg);
  _Atomic(sl_buf *) slot[2];
  atomic_init(&slot[0], NULL);
  atomic_init(&slot[1], NULL);
  atomic_int done, quit;
  atomic_init(&done, 0);
  atomic_init(&quit, 0);
  mix_worker w[2] = {
      {.a = a, .give = &slot[0], .take = &slot[1], .done = &done, .quit = &quit, .seed = 11},
      {.a = a, .give = &slot[1], .take = &slot[0], .done = &done, .quit = &quit, .seed = 12}};
  stats_reader sr = {.ar = &a->arenas[0], .k = sl_sc_index(40000)};
  atomic_init(&sr.stop, 0);
  pthread_t th[3];
  assert_int_equal(pthread_create(&th[2], NULL, stats_reader_thread, &sr), 0);
  for (int i = 0; i < 2; i++)
    assert_int_equal(pthread_create(&th[i], NULL, mix_worker_thread, &w[i]), 0);
  for (int i = 0; i < 2; i++) {
    void *r;
    assert_int_equal(pthread_join(th[i], &r), 0);
    assert_int_equal((intptr_t)r, 0);
  }
  atomic_store(&sr.stop, 1);
  assert_int_equal(pthread_join(th[2], NULL), 0);
  assert_int_equal(sr.bad, 0);
  sl_arena_stats as;
  sl_arena_get_stats(&a->arenas[0], &as);
  uint64_t ta = 0, tf = 0;
  for (unsigned k = a->nsmall; k < a->nclasses; k++) {
    ta += as.cls[k].allocs;
    tf += as.cls[k].frees;
  }
  assert_int_equal(ta, w[0].allocs + w[1].allocs);
  assert_int_equal(tf, ta);
  finish(NULL, a);
}

static void test_pools_sharing_an_arena_race_on_normal_fast_paths(void **state) {
  (void)state;
  pools_race_run(8192, 4u << 20, 1024);
  pools_race_run(4096, 256 * KiB, 2);   /* foreign frees straight to the arena */
}

/* Normal sizes above max_cached, every buffer recorded (leak_sample 1),
 * pooled and unpooled, with max_memory refusing and injected failures in
 * between: a refused or failed allocation leaves no header out and no
 * count bumped, and the pool is back where it started. */
static void normal_edges_run(int type, int level) {
  sl_alloc_config cfg;
  sl_alloc_config_defaults(&cfg);
  cfg.type = type;
  cfg.max_cached = 0;
  cfg.leak_level = level;
  cfg.leak_sample = 1;
  cfg.page_size = 4096;
  cfg.chunk_size = 256 * KiB;
  cfg.max_memory = 512 * KiB;   /* two chunks */
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  sl_buf *b[64] = {0};
  unsigned n = 0, refused = 0;
  size_t sz = 40000;
  unsigned k = sl_sc_index(sz);
  for (int round = 0; round < 6; round++) {
    while (n < 64) {
      if (n % 5 == 2) {
        sl_pool_stats before = sl_test_stats(p);
        sl_pool_fail_next(p, 1);
        assert_null(sl_buf_alloc(p, sz, 0));
        sl_pool_stats after = sl_test_stats(p);
        assert_int_equal(after.headers_total - after.headers_free,
                         before.headers_total - before.headers_free);
        assert_int_equal(after.allocs, before.allocs);
        assert_int_equal(after.bufs_active, before.bufs_active);
      }
      sl_buf *x = sl_buf_alloc(p, sz, 0);
      if (x == NULL) {
        refused++;
        break;
      }
      memset(x->data, (int)n, x->cap);
      b[n++] = x;
    }
    /* free every other one (fast frees into a used chunk), then refill */
    for (unsigned i = 0; i < n; i += 2) {
      if (b[i] == NULL) continue;
      for (size_t j = 0; j < b[i]->cap; j += 4096) assert_int_equal(b[i]->data[j], (uint8_t)i);
      sl_buf_release(b[i]);
      b[i] = NULL;
    }
    unsigned m = 0;
    for (unsigned i = 0; i < n; i++)
      if (b[i] != NULL) b[m++] = b[i];
    n = m;
    for (unsigned i = 0; i < n; i++) memset(b[i]->data, (int)i, b[i]->cap);
  }
  for (unsigned i = 0; i < n; i++) sl_buf_release(b[i]);
  if (type == SL_ALLOC_POOLED) assert_true(refused > 0);
  sl_pool_trim(p, 1);
  sl_pool_stats st = sl_test_stats(p);
  assert_int_equal(st.allocs, st.frees);
  if (type == SL_ALLOC_POOLED) {
    sl_arena_stats as;
    sl_arena_get_stats(p->arena, &as);
    assert_int_equal(as.cls[k].allocs, as.cls[k].frees);
    assert_int_equal(as.cls[k].allocs, sl_pool_class_allocs(p, k));
  }
  assert_int_equal(p->leak_recorded, 0);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

static void test_normal_fast_paths_recorded_refused_and_failing(void **state) {
  (void)state;
  normal_edges_run(SL_ALLOC_POOLED, 1);
  normal_edges_run(SL_ALLOC_POOLED, 3);
  normal_edges_run(SL_ALLOC_UNPOOLED, 1);
  normal_edges_run(SL_ALLOC_UNPOOLED, 3);
}

/* Whether a freed block's first and last bytes are poisoned (ASan) or
 * filled with 0xde (SLUICE_POOL_DEBUG); -1 when the build does neither. */
static int freed_block_poisoned(const uint8_t *d, size_t n) {
#if TEST_ASAN
  return __asan_address_is_poisoned(d) && __asan_address_is_poisoned(d + n - 1);
#elif defined(SLUICE_POOL_DEBUG)
  return d[0] == 0xde && d[n - 1] == 0xde;
#else
  (void)d;
  (void)n;
  return -1;
#endif
}

/* A normal block that no bin caches is poisoned when it is freed, on
 * every way back to its chunk: the fast path, a class whose runs are too
 * long for it (64 pages or more), and a full recycler. */
static void test_uncached_normal_free_poisons_on_every_path(void **state) {
  (void)state;
  sl_alloc_config cfg;
  sl_alloc_config_defaults(&cfg);
  cfg.max_cached = 0;
  cfg.recycler_cap = 1;
  sl_alloc *a = new_alloc(&cfg);
  sl_pool *p = new_pool(a);
  assert_true(a->run_pages[sl_sc_index(600 * KiB)] >= 64);
  assert_int_equal(p->bins[sl_sc_index(600 * KiB)].normal_pages, 0);
  sl_buf *keep = sl_buf_alloc(p, 40000, 0);   /* the chunk stays in use */
  assert_non_null(keep);
  const size_t sizes[] = {40000, 600 * KiB};
  for (unsigned i = 0; i < 2; i++) {
    sl_buf *x = sl_buf_alloc(p, sizes[i], 0);
    sl_buf *y = sl_buf_alloc(p, sizes[i], 0);
    assert_non_null(x);
    assert_non_null(y);
    memset(x->data, 1, x->cap);
    memset(y->data, 1, y->cap);
    uint8_t *dx = x->data, *dy = y->data;
    size_t nx = x->block_size, ny = y->block_size;
    assert_true(p->rec_n < p->rec_cap);
    sl_buf_release(x);   /* into the recycler's one slot */
    assert_int_equal(p->rec_n, p->rec_cap);
    sl_buf_release(y);   /* the recycler full */
    int px = freed_block_poisoned(dx, nx), py = freed_block_poisoned(dy, ny);
    if (px < 0) break;
    if (!px) fail_msg("freed %zu-byte block %p not poisoned (recycler with room)", sizes[i], dx);
    if (!py) fail_msg("freed %zu-byte block %p not poisoned (recycler full)", sizes[i], dy);
  }
  sl_buf_release(keep);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  finish(p, a);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_size_class_of_every_size_is_smallest_that_fits),
      cmocka_unit_test(test_subpage_fills_bitmap_then_opens_another_and_drains_to_no_chunk),
      cmocka_unit_test(test_chunk_runs_split_fill_holes_and_coalesce),
      cmocka_unit_test(test_chunk_defers_coalescing_until_a_run_does_not_fit),
      cmocka_unit_test(test_subpage_index_by_multiply_is_exact),
      cmocka_unit_test(test_arena_allocates_from_fuller_chunk_and_unmaps_idle_empty_one),
      cmocka_unit_test(test_chunk_keeps_its_usage_list_near_a_boundary),
      cmocka_unit_test(test_arena_serves_freed_runs_by_length_across_chunks),
      cmocka_unit_test(test_empty_chunk_with_unmerged_frees_is_released_after_idle),
      cmocka_unit_test(test_worker_cache_keeps_at_most_small_cache_blocks_per_class),
      cmocka_unit_test(test_cache_trim_every_interval_gives_back_unused_entries),
      cmocka_unit_test(test_idle_tick_gives_back_cache_chunks_and_header_region),
      cmocka_unit_test(test_idle_tick_keeps_chunk_emptied_less_than_idle_ago),
      cmocka_unit_test(test_worker_timer_keeps_chunk_emptied_less_than_idle_ago),
      cmocka_unit_test(test_recycler_keeps_cap_headers_and_overflows_the_rest),
      cmocka_unit_test(test_released_root_parks_with_its_block),
      cmocka_unit_test(test_views_take_parked_headers_and_roots_park_clean),
      cmocka_unit_test(test_header_exhaustion_refuses_without_taking_a_block),
      cmocka_unit_test(test_released_header_has_gen_zero_and_live_gen_is_never_zero),
      cmocka_unit_test(test_bare_hit_with_empty_recycler_drains_returns_first),
    cmocka_unit_test(test_foreign_release_queues_up_to_cap_and_frees_the_rest_directly),
      cmocka_unit_test(test_return_queue_is_bounded_fifo),
      cmocka_unit_test(test_cross_thread_release_keeps_memory_bounded),
      cmocka_unit_test(test_foreign_releases_race_lua_releases_views_and_trims),
      cmocka_unit_test(test_owned_subpages_serve_misses_and_go_back_to_the_arena),
      cmocka_unit_test(test_class_counts_stay_exact_on_every_path),
      cmocka_unit_test(test_uncached_normal_goes_to_its_chunk_and_quarantine_takes_one_header),
      cmocka_unit_test(test_arena_counts_take_the_pools_fast_normal_runs),
      cmocka_unit_test(test_arena_counts_read_from_another_thread),
      cmocka_unit_test(test_normal_mix_over_geometries),
      cmocka_unit_test(test_uncached_normal_free_poisons_on_every_path),
      cmocka_unit_test(test_normal_fast_paths_recorded_refused_and_failing),
      cmocka_unit_test(test_pools_sharing_an_arena_race_on_normal_fast_paths),
      cmocka_unit_test(test_full_bin_parks_headers_on_owned_subpages_for_misses),
      cmocka_unit_test(test_views_take_headers_parked_on_owned_subpages),
      cmocka_unit_test(test_view_header_search_sees_headers_parked_after_a_flush),
      cmocka_unit_test(test_idle_tick_takes_headers_off_owned_subpages),
      cmocka_unit_test(test_foreign_frees_into_owned_subpages_come_back_to_the_owner),
      cmocka_unit_test(test_idle_tick_gives_back_owned_subpages),
      cmocka_unit_test(test_max_memory_takes_back_owned_subpages_before_refusing),
      cmocka_unit_test(test_max_memory_refuses_new_chunks_and_huge_blocks),
      cmocka_unit_test(test_unpooled_mode_behaves_like_pooled),
      cmocka_unit_test(test_huge_blocks_are_mapped_directly_and_unmapped_on_free),
      cmocka_unit_test(test_largest_class_fits_a_chunk_and_larger_sizes_are_huge),
      cmocka_unit_test(test_random_stress_never_overlaps_or_corrupts),
      cmocka_unit_test(test_unmapped_chunk_leaves_no_asan_poison),
            cmocka_unit_test(test_foreign_release_of_tracked_buffer_never_blocks),
      cmocka_unit_test(test_chunk_above_32mib_is_refused_not_overflowed),
  };
  return cmocka_run_group_tests_name("alloc", tests, NULL, NULL);
}
