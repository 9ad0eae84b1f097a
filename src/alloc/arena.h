/*
 * The shared side of the allocator: sl_alloc holds the configuration and the
 * arenas; an arena holds chunks (in usage lists, fullest first) and the
 * subpages of each small class, behind a lock, because several workers may
 * share one arena and a buffer released on a foreign thread may be freed
 * straight into it. Workers reach an arena only on a cache miss.
 *
 * Memory comes back: a chunk that has been empty for trim_idle_ms is
 * unmapped; huge blocks (above the chunk size) are unmapped when freed;
 * max_memory caps what all arenas together have mapped.
 */
#ifndef SL_ARENA_H
#define SL_ARENA_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "alloc/chunk.h"
#include "alloc/size_class.h"
#include "alloc/spin.h"

typedef enum { SL_ALLOC_POOLED = 0, SL_ALLOC_UNPOOLED = 1 } sl_alloc_type;

typedef struct sl_alloc_config {
  sl_alloc_type type;
  int arenas;               /* default: one per worker */
  size_t page_size;         /* 8 KiB */
  size_t chunk_size;        /* 4 MiB */
  int small_cache;          /* worker cache entries per small class: 256 */
  int normal_cache;         /* per normal class: 64 */
  size_t max_cached;        /* largest size a worker caches: 32 KiB */
  int trim_interval;        /* allocations between cache trims: 8192 */
  int trim_idle_ms;         /* idle time before caches and empty chunks go: 10000 */
  size_t max_memory;        /* ceiling on mapped bytes; 0: none */
  int recycler_cap;         /* free headers a worker keeps: 4096 */
  int return_queue_cap;     /* cross-thread returns queued per worker: 1024 */
  uint32_t max_headers;     /* live headers per worker (address space): 1 << 21 */
  int leak_level;           /* buf/leak.h: 0 disabled .. 3 paranoid; default 1 */
  uint32_t leak_sample;     /* simple and advanced record 1 in this many: 128 */
} sl_alloc_config;

/* Fills cfg with the defaults above (arenas = 1). */
void sl_alloc_config_defaults(sl_alloc_config *cfg);

struct sl_pool;

/* Per class counters of one arena (blocks served to and taken back from
 * worker caches and callers). */
typedef struct sl_class_stats {
  uint64_t allocs;
  uint64_t frees;
} sl_class_stats;

typedef struct sl_arena {
  sl_spin lock;
  struct sl_alloc *alloc;
  int id;
  sl_chunk *lists[6];                       /* see SL_Q_* in arena.c */
  unsigned list_mask;                       /* bit q: lists[q] is not empty */
  sl_chunk_avail avail;                     /* chunks by the free runs they list */
  sl_subpage *subpages[SL_SC_MAX_CLASSES];  /* small classes: subpages with room */
  sl_class_stats cls[SL_SC_MAX_CLASSES];     /* but for the pools' shares below */
  struct sl_pool *pools;                    /* the pools using it (linked through
                                               their arena_next): each counts the
                                               normal blocks its fast paths take
                                               and free here under the lock, in
                                               counts of its own that
                                               sl_arena_get_stats adds to cls */
  uint64_t chunks_created, chunks_released;
  uint64_t chunks;                          /* mapped now */
  uint64_t huge_allocs, huge_frees;
  uint64_t huge_bytes;                      /* mapped now for huge blocks */
} sl_arena;

typedef struct sl_alloc {
  sl_alloc_config cfg;
  sl_arena *arenas;
  unsigned nclasses;                        /* classes a chunk can hold; above: huge */
  size_t max_class_size;                    /* size of the largest of them */
  unsigned nsmall;                          /* classes up to SL_SC_SMALL_MAX */
  uint32_t run_pages[SL_SC_MAX_CLASSES];    /* pages per subpage run, or per normal block */
  atomic_size_t reserved;                   /* bytes mapped by every arena */
  atomic_uint_fast64_t refused;             /* allocations refused by max_memory */
} sl_alloc;

/* Checks cfg and creates the arenas. NULL with *err on a bad config. */
sl_alloc *sl_alloc_create(const sl_alloc_config *cfg, const char **err);

/* Unmaps everything; every pool using it must be gone. */
void sl_alloc_destroy(sl_alloc *a);

/* Allocates a block of class sclass (or a huge block of size bytes when
 * sclass >= nclasses). NULL when max_memory or the OS refuses. */
void *sl_arena_alloc(sl_arena *ar, unsigned sclass, size_t size);

/* Frees a block of class sclass (huge: size is its mapped size). */
void sl_arena_free(sl_arena *ar, void *p, unsigned sclass, size_t size);

/* Frees n blocks of one class under one lock. */
void sl_arena_free_many(sl_arena *ar, void **blocks, unsigned n, unsigned sclass);

/* A subpage of small class sclass for o to own (see chunk.h): the
 * arena's first with a free element, else a new one; it leaves the
 * arena's lists. The counts o has not reported yet (blocks it took from
 * and gave back to subpages of that class) are added to the arena's
 * under the same lock. NULL when memory is refused. */
sl_subpage *sl_arena_subpage_own(sl_arena *ar, unsigned sclass, sl_sub_owner *o,
                                 uint32_t allocs, uint32_t frees);

/* Gives an owned subpage back to the arena (its owner has taken it off
 * its own lists): on its class's list when it has a free element, and
 * back to its chunk when it is empty, unless it is its class's only one.
 * Lock held. */
void sl_arena_subpage_disown(sl_arena *ar, sl_subpage *s);

static inline void sl_arena_lock(sl_arena *ar) { sl_spin_lock(&ar->lock); }
static inline void sl_arena_unlock(sl_arena *ar) { sl_spin_unlock(&ar->lock); }

/* Moves c to the usage list its use says (its free pages left the range
 * of the one it is on). Lock held. */
void sl_arena_relist_move(sl_arena *ar, sl_chunk *c);

/* Keeps c on the right usage list after a run was taken or freed. */
static inline void sl_arena_relist(sl_arena *ar, sl_chunk *c) {
  if (__builtin_expect(c->free_pages < c->list_lo || c->free_pages > c->list_hi, 0))
    sl_arena_relist_move(ar, c);
}

/* sl_arena_alloc_normal's general case, called with the lock held (it
 * unlocks). */
void *sl_arena_alloc_normal_slow(sl_arena *ar, unsigned sclass);

/* A block of normal class sclass (nsmall <= sclass < nclasses): a run of
 * pages, or NULL when memory is refused. The common case is inline: the
 * index's first chunk for that length lists a run of exactly that length
 * (a pop); anything else goes through sl_arena_alloc_normal_slow. */
static inline void *sl_arena_alloc_normal(sl_arena *ar, unsigned sclass) {
  uint32_t n = ar->alloc->run_pages[sclass];
  sl_spin_lock(&ar->lock);
  sl_chunk *c = n < SL_AVAIL_LENS ? ar->avail.head[n] : NULL;
  if (__builtin_expect(c == NULL || c->bucket_lo[n] == SL_CHUNK_NONE, 0))
    return sl_arena_alloc_normal_slow(ar, sclass);
  uint32_t page = sl_chunk_run_take_exact(c, n);
  sl_arena_relist(ar, c);
  ar->cls[sclass].allocs++;
  sl_spin_unlock(&ar->lock);
  return c->mem + ((size_t)page << c->page_shift);
}

/* Frees a normal block: its run goes on its chunk's list of that length
 * (merging is deferred). */
static inline void sl_arena_free_normal(sl_arena *ar, void *p, unsigned sclass) {
  sl_alloc *a = ar->alloc;
  sl_chunk *c = sl_chunk_of(p, a->cfg.chunk_size);
  uint32_t page = (uint32_t)(((uint8_t *)p - c->mem) >> c->page_shift);
  uint32_t n = a->run_pages[sclass];
  sl_spin_lock(&ar->lock);
  ar->cls[sclass].frees++;
  sl_chunk_run_free_inline(c, page, n);
  sl_arena_relist(ar, c);
  sl_spin_unlock(&ar->lock);
}

/* sl_arena_alloc_normal's common case alone, without waiting and without
 * calling anything (so that callers keep no registers for it), in steps
 * so that a caller can keep the rarer walk out of line: the lock free,
 * one of the first chunks on the index's list for the run's length with
 * a run of exactly that length (it becomes the list's head: stale chunks
 * stay on the list, for the runs freed next), the chunk staying on its
 * usage list. When a step fails nothing is allocated and the lock is not
 * held: the caller then calls sl_arena_alloc_normal. n is the class's run
 * length, 1 to SL_AVAIL_LENS - 1 (a pool's bins[sclass].normal_pages). A
 * list that the pop empties keeps its bit in the chunk's nonempty
 * (chunk.h). The allocation is counted in *count, under the lock: the
 * calling pool's share of the class's count (see sl_arena's pools), not
 * in cls.
 *
 * First step: the lock and the head of the index's list for n (NULL: the
 * lock busy or the list empty). Its first run of n pages is
 * c->bucket_lo[n]: SL_CHUNK_NONE if the head is stale (chunks leave
 * lazily), then sl_arena_normal_walk, else sl_arena_normal_take. */
static inline sl_chunk *sl_arena_normal_head(sl_arena *ar, size_t n) {
  if (sl_spin_trylock_busy(&ar->lock)) return NULL;
  sl_chunk *c = ar->avail.head[n];
  if (__builtin_expect(c == NULL, 0)) sl_spin_unlock(&ar->lock);
  return c;
}

/* The head h was stale: the next few chunks on the list may have a run;
 * the first that has becomes the head and is returned (then
 * sl_arena_normal_take), else NULL (the lock released). */
static inline sl_chunk *sl_arena_normal_walk(sl_arena *ar, sl_chunk *h, size_t n) {
  sl_chunk *c = h;
  for (int k = 0; k < 4 && (c = c->av_next[n]) != h && c->bucket_lo[n] == SL_CHUNK_NONE; k++) {
  }
  if (c == h || c->bucket_lo[n] == SL_CHUNK_NONE) {
    sl_spin_unlock(&ar->lock);
    return NULL;
  }
  ar->avail.head[n] = c;
  return c;
}

/* The last step: takes run start (c->bucket_lo[n]) of c unless the chunk
 * would leave its usage list, and releases the lock. Returns the block,
 * or NULL. */
static inline void *sl_arena_normal_take(sl_arena *ar, sl_chunk *c, uint32_t start,
                                         uint32_t *count, size_t n) {
  if (__builtin_expect(c->free_pages - (uint32_t)n < c->list_lo, 0)) {   /* relist */
    sl_spin_unlock(&ar->lock);
    return NULL;
  }
  sl_chunk_page *e = &sl_chunk_pages(c)[start];
  c->bucket_lo[n] = e->free_next;   /* emptied, its bit in nonempty stays (chunk.h) */
  e->free_head = 0;
  e->run_len = (uint32_t)n;
  c->free_pages -= (uint32_t)n;
  ++*count;
  sl_spin_unlock(&ar->lock);
  return (uint8_t *)c + ((size_t)start << c->page_shift);   /* c->mem is c */
}

/* sl_arena_free_normal's common case alone, likewise: the lock free, the
 * run allocated as a block of sclass, the chunk staying on its usage list
 * (a chunk that left the index for the run's length joins it again). 0
 * otherwise, nothing changed: the caller then calls
 * sl_arena_free_normal. The caller gives the block's chunk c, its first
 * page and n, the class's run length (1 to SL_AVAIL_LENS - 1: a pool's
 * bins[sclass].normal_pages), from its own copies of the geometry. The
 * chunk's last used run is not freed here: a chunk with a run in use is
 * on a usage list other than the empty one (every allocation relists),
 * whose list_hi is below usable, so that the last run fails the usage
 * test. The free is counted in *count, likewise. */
static inline int sl_arena_free_normal_try(sl_arena *ar, sl_chunk *c, size_t page, size_t n,
                                           uint32_t *count) {
  if (sl_spin_trylock_busy(&ar->lock)) return 0;
  uint32_t first = c->bucket_lo[n];
  sl_chunk_page *e = &sl_chunk_pages(c)[page];
  if (__builtin_expect(e->run_len != (uint32_t)n || c->free_pages + (uint32_t)n > c->list_hi, 0)) {
    sl_spin_unlock(&ar->lock);
    return 0;
  }
  e->run_len = 0;
  e->free_head = (uint32_t)n;
  e->free_next = first;
  c->free_pages += (uint32_t)n;
  c->bucket_lo[n] = (uint32_t)page;
  if (__builtin_expect(first == SL_CHUNK_NONE, 0)) {
    /* The list was empty: it has a run now, and max_run may be below n
     * (a listed run of n already keeps it at n or more). */
    c->nonempty[0] |= 1ull << n;
    if ((uint32_t)n > c->max_run) c->max_run = (uint32_t)n;
    if (!(c->av_in & (1ull << (n - 1)))) sl_chunk_avail_link(c, &ar->avail, (uint32_t)n);
  }
  c->unmerged++;
  ++*count;
  sl_spin_unlock(&ar->lock);
  return 1;
}

/* Unmaps chunks empty since before now_ms - trim_idle_ms (or all empty chunks
 * when force). Returns the number released. */
unsigned sl_arena_release_empty(sl_arena *ar, int64_t now_ms, int force);

typedef struct sl_arena_stats {
  uint64_t chunks, chunks_created, chunks_released;
  uint64_t chunk_bytes;                     /* mapped for chunks now */
  uint64_t used_bytes;                      /* pages in use in those chunks */
  uint64_t huge_allocs, huge_frees, huge_bytes;
  unsigned nclasses;
  sl_class_stats cls[SL_SC_MAX_CLASSES];
} sl_arena_stats;

/* A consistent copy of ar's counters (takes the lock): cls with the
 * shares of the pools using it (sl_pool_arena_share). */
void sl_arena_get_stats(sl_arena *ar, sl_arena_stats *out);

/* The allocator's clock: CLOCK_MONOTONIC in milliseconds. sl_pool_tick and
 * sl_arena_release_empty take times from it. */
int64_t sl_alloc_now_ms(void);

/* Mapped size of a huge block of size bytes. */
size_t sl_alloc_huge_size(const sl_alloc *a, size_t size);

#endif
