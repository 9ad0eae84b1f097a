#include "alloc/arena.h"

#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "alloc/poison.h"
#include "alloc/pool.h"
#include "util/common.h"

/* Usage lists: allocation tries the fullest chunks first, so that the
 * emptiest drain and become empty (and can go back to the OS). */
enum { SL_Q_EMPTY = 0, SL_Q_LOW, SL_Q_25, SL_Q_50, SL_Q_75, SL_Q_FULL, SL_Q_COUNT };

void sl_alloc_config_defaults(sl_alloc_config *cfg) {
  memset(cfg, 0, sizeof(*cfg));
  cfg->type = SL_ALLOC_POOLED;
  cfg->arenas = 1;
  cfg->page_size = 8192;
  cfg->chunk_size = 4u << 20;
  cfg->small_cache = 256;
  cfg->normal_cache = 64;
  cfg->max_cached = 32768;
  cfg->trim_interval = 8192;
  cfg->trim_idle_ms = 10000;
  cfg->max_memory = 0;
  cfg->recycler_cap = 4096;
  cfg->return_queue_cap = 1024;
  cfg->max_headers = 1u << 21;
  cfg->leak_level = 1;
  cfg->leak_sample = 128;
}

__attribute__((noinline, cold)) void sl_spin_lock_wait(sl_spin *l) {
  do {
    for (int i = 0; atomic_load_explicit(&l->v, memory_order_relaxed); i++) {
      if (i < 64) __builtin_ia32_pause();
      else sched_yield();
    }
  } while (atomic_exchange_explicit(&l->v, 1, memory_order_acquire));
}

static int sl_is_pow2(size_t x) { return x && !(x & (x - 1)); }

/* Pages per subpage run for a small class: the run of 1..8 pages that wastes
 * the smallest share of its bytes. */
static uint32_t sl_subpage_run(size_t elem, size_t page) {
  uint32_t best = 1;
  double best_waste = 1.0;
  for (uint32_t k = 1; k <= 8; k++) {
    size_t run = k * page;
    if (run < elem) continue;
    double waste = (double)(run % elem) / (double)run;
    if (waste + 0.01 < best_waste) {
      best_waste = waste;
      best = k;
    }
  }
  return best;
}

sl_alloc *sl_alloc_create(const sl_alloc_config *cfg, const char **err) {
  if (!sl_is_pow2(cfg->page_size) || cfg->page_size < 4096 || cfg->page_size > (1u << 20)) {
    *err = "page_size must be a power of two from 4096 to 1048576";
    return NULL;
  }
  if (!sl_is_pow2(cfg->chunk_size) || cfg->chunk_size < cfg->page_size * 16 ||
      cfg->chunk_size > SL_SC_MAX_CHUNK) {
    *err = "chunk_size must be a power of two, at least 16 pages, at most 32 MiB";
    return NULL;
  }
  if (cfg->arenas < 1 || cfg->arenas > 256) {
    *err = "arenas must be from 1 to 256";
    return NULL;
  }
  sl_alloc *a = calloc(1, sizeof(*a));
  if (a == NULL) {
    *err = "out of memory";
    return NULL;
  }
  a->cfg = *cfg;
  /* A class must fit in the pages a chunk has left after its metadata. */
  size_t usable = (cfg->chunk_size / cfg->page_size -
                   sl_chunk_meta_pages(cfg->chunk_size, cfg->page_size)) * cfg->page_size;
  a->nclasses = sl_sc_index(usable) + 1;
  if (sl_sc_size(a->nclasses - 1) > usable) a->nclasses--;
  a->max_class_size = sl_sc_size(a->nclasses - 1);
  a->nsmall = SL_MIN(sl_sc_count(SL_SC_SMALL_MAX), a->nclasses);
  for (unsigned i = 0; i < a->nclasses; i++) {
    size_t sz = sl_sc_size(i);
    a->run_pages[i] = i < a->nsmall ? sl_subpage_run(sz, cfg->page_size)
                                    : (uint32_t)((sz + cfg->page_size - 1) / cfg->page_size);
  }
  a->arenas = calloc((size_t)cfg->arenas, sizeof(sl_arena));
  if (a->arenas == NULL) {
    free(a);
    *err = "out of memory";
    return NULL;
  }
  for (int i = 0; i < cfg->arenas; i++) {
    sl_spin_init(&a->arenas[i].lock);
    a->arenas[i].alloc = a;
    a->arenas[i].id = i;
  }
  return a;
}

static void sl_list_remove(sl_arena *ar, int q, sl_chunk *c) {
  if (c->prev) c->prev->next = c->next;
  else ar->lists[q] = c->next;
  if (c->next) c->next->prev = c->prev;
  c->prev = c->next = NULL;
  if (ar->lists[q] == NULL) ar->list_mask &= ~(1u << q);
}

static void sl_list_push(sl_arena *ar, int q, sl_chunk *c) {
  c->prev = NULL;
  c->next = ar->lists[q];
  if (c->next) c->next->prev = c;
  ar->lists[q] = c;
  ar->list_mask |= 1u << q;
}

void sl_alloc_destroy(sl_alloc *a) {
  if (a == NULL) return;
  for (int i = 0; i < a->cfg.arenas; i++) {
    sl_arena *ar = &a->arenas[i];
    for (int q = 0; q < SL_Q_COUNT; q++) {
      while (ar->lists[q]) {
        sl_chunk *c = ar->lists[q];
        sl_list_remove(ar, q, c);
        for (uint32_t p = c->meta_pages; p < c->npages; p++) {
          sl_subpage *s = c->sub[p];
          if (s && s->first_page == p) free(s);
        }
        sl_chunk_delete(c, a->cfg.chunk_size);
      }
    }
  }
  free(a->arenas);
  free(a);
}

/* The usage list for a chunk with used of usable pages in use: empty,
 * below 25%, 25-50%, 50-75%, 75% and more, full. */
static int sl_chunk_list_for(uint32_t used, uint32_t usable) {
  if (used == 0) return SL_Q_EMPTY;
  if (used == usable) return SL_Q_FULL;
  return used < usable / 4 ? SL_Q_LOW : used < usable / 2 ? SL_Q_25
       : used < usable / 4 * 3 ? SL_Q_50 : SL_Q_75;
}

/* Sets the free-page range in which c stays on list q: the list's own
 * range widened by an eighth of the chunk on both sides (exact at empty
 * and full), so that a chunk whose usage goes up and down around a
 * boundary does not move on every allocation. */
static void sl_chunk_set_list(sl_chunk *c, int q) {
  uint32_t u = c->usable, m = u / 8 ? u / 8 : 1;
  uint32_t lo_used, hi_used;   /* the chunk stays while lo_used <= used <= hi_used */
  switch (q) {
  case SL_Q_EMPTY: lo_used = 0; hi_used = 0; break;
  case SL_Q_LOW: lo_used = 1; hi_used = u / 4 + m; break;
  case SL_Q_25: lo_used = u / 4 - m; hi_used = u / 2 + m; break;
  case SL_Q_50: lo_used = u / 2 - m; hi_used = u / 4 * 3 + m; break;
  case SL_Q_75: lo_used = u / 4 * 3 - m; hi_used = u - 1; break;
  default: lo_used = u; hi_used = u; break;
  }
  if (lo_used < 1 && q != SL_Q_EMPTY) lo_used = 1;
  if (hi_used > u - 1 && q != SL_Q_FULL) hi_used = u - 1;
  c->list = q;
  c->list_lo = u - hi_used;
  c->list_hi = u - lo_used;
}

int64_t sl_alloc_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void sl_arena_relist_move(sl_arena *ar, sl_chunk *c) {
  int q = sl_chunk_list_for(c->usable - c->free_pages, c->usable);
  sl_list_remove(ar, c->list, c);
  sl_chunk_set_list(c, q);
  if (q == SL_Q_EMPTY) c->empty_since_ms = sl_alloc_now_ms();
  sl_list_push(ar, q, c);
}


static int sl_reserve(sl_alloc *a, size_t n) {
  size_t cur = atomic_load(&a->reserved);
  for (;;) {
    if (a->cfg.max_memory && cur + n > a->cfg.max_memory) {
      atomic_fetch_add(&a->refused, 1);
      errno = ENOMEM;
      return SL_ERROR;
    }
    if (atomic_compare_exchange_weak(&a->reserved, &cur, cur + n)) return SL_OK;
  }
}

static void sl_unreserve(sl_alloc *a, size_t n) { atomic_fetch_sub(&a->reserved, n); }

/* A run of n pages: from a chunk that lists one (the index prefers exact
 * runs, then fuller chunks), else from a chunk whose free runs make one
 * once merged, else from a new chunk. */
static sl_chunk *sl_arena_run(sl_arena *ar, uint32_t n, int *page) {
  /* A chunk with a free run as it is, from the index. */
  for (;;) {
    sl_chunk *c = sl_chunk_avail_find(&ar->avail, n);
    if (c == NULL) break;
    int p = sl_chunk_run_take(c, n);   /* fails only for n >= 64, tightening max_run */
    if (p >= 0) {
      *page = p;
      return c;
    }
  }
  /* None: merge the neighbouring free runs of a chunk that has the pages,
   * emptiest first (the likeliest to yield a long run). */
  unsigned mask = ar->list_mask & ((1u << SL_Q_FULL) - 1);
  while (mask) {
    int q = __builtin_ctz(mask);
    mask &= mask - 1;
    for (sl_chunk *c = ar->lists[q]; c != NULL; c = c->next) {
      int p = sl_chunk_run_alloc(c, n);
      if (p >= 0) {
        *page = p;
        return c;
      }
    }
  }
  sl_alloc *a = ar->alloc;
  if (sl_reserve(a, a->cfg.chunk_size) != SL_OK) return NULL;
  sl_chunk *c = sl_chunk_new(ar, &ar->avail, a->cfg.chunk_size, a->cfg.page_size);
  if (c == NULL) {
    sl_unreserve(a, a->cfg.chunk_size);
    return NULL;
  }
  ar->chunks_created++;
  ar->chunks++;
  sl_chunk_set_list(c, SL_Q_EMPTY);
  c->empty_since_ms = sl_alloc_now_ms();
  sl_list_push(ar, SL_Q_EMPTY, c);
  *page = sl_chunk_run_alloc(c, n);
  SL_ASSERT(*page >= 0, "a new chunk has no room for a run");
  return c;
}

size_t sl_alloc_huge_size(const sl_alloc *a, size_t size) {
  return (size + a->cfg.page_size - 1) & ~(a->cfg.page_size - 1);
}

static void *sl_arena_huge(sl_arena *ar, size_t size) {
  sl_alloc *a = ar->alloc;
  size_t n = sl_alloc_huge_size(a, size);
  if (sl_reserve(a, n) != SL_OK) return NULL;
  void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    sl_unreserve(a, n);
    return NULL;
  }
  sl_spin_lock(&ar->lock);
  ar->huge_allocs++;
  ar->huge_bytes += n;
  sl_spin_unlock(&ar->lock);
  return p;
}

/* The first subpage of sclass with a free element (a new one when there is
 * none), or NULL. Lock held. */
static sl_subpage *sl_arena_subpage(sl_arena *ar, unsigned sclass) {
  sl_subpage *s = ar->subpages[sclass];
  if (s == NULL) {
    int page;
    uint32_t n = ar->alloc->run_pages[sclass];
    sl_chunk *c = sl_arena_run(ar, n, &page);
    if (c == NULL) return NULL;
    s = sl_subpage_new(c, (uint32_t)page, n, (uint32_t)sl_sc_size(sclass), sclass);
    if (s == NULL) {
      sl_chunk_run_free(c, (uint32_t)page, n);
      sl_arena_relist(ar, c);
      return NULL;
    }
    sl_chunk_pages(c)[page].run_len = 0; /* a subpage run, found through sub[] */
    sl_arena_relist(ar, c);
    ar->subpages[sclass] = s;
  }
  return s;
}

/* Takes a full subpage (the list's first) off its class's list. */
static void sl_arena_subpage_full(sl_arena *ar, sl_subpage *s) {
  ar->subpages[s->sclass] = s->next;
  if (s->next) s->next->prev = NULL;
  s->next = s->prev = NULL;
}

static void *sl_arena_small(sl_arena *ar, unsigned sclass) {
  sl_subpage *s = sl_arena_subpage(ar, sclass);
  if (s == NULL) return NULL;
  void *p = sl_subpage_alloc(s);
  if (s->nfree == 0) sl_arena_subpage_full(ar, s);
  return p;
}

void *sl_arena_alloc_normal_slow(sl_arena *ar, unsigned sclass) {
  uint32_t n = ar->alloc->run_pages[sclass];
  if (n < SL_AVAIL_LENS) {
    /* The index's first chunk for n had no run of n left (chunks leave
     * lazily): the next one on that list may have one. */
    sl_chunk *c;
    while ((c = ar->avail.head[n]) != NULL && c->bucket_lo[n] == SL_CHUNK_NONE)
      sl_chunk_avail_leave(c, n);
    if (c != NULL) {
      uint32_t page = sl_chunk_run_take_exact(c, n);
      sl_arena_relist(ar, c);
      ar->cls[sclass].allocs++;
      sl_spin_unlock(&ar->lock);
      return c->mem + ((size_t)page << c->page_shift);
    }
  }
  int page;
  sl_chunk *c = sl_arena_run(ar, ar->alloc->run_pages[sclass], &page);
  void *p = NULL;
  if (c != NULL) {
    sl_arena_relist(ar, c);
    p = c->mem + ((size_t)page << c->page_shift);
    ar->cls[sclass].allocs++;
  }
  sl_spin_unlock(&ar->lock);
  return p;
}

void *sl_arena_alloc(sl_arena *ar, unsigned sclass, size_t size) {
  sl_alloc *a = ar->alloc;
  if (sclass >= a->nclasses) return sl_arena_huge(ar, size);
  if (sclass >= a->nsmall) return sl_arena_alloc_normal(ar, sclass);
  sl_spin_lock(&ar->lock);
  void *p = sl_arena_small(ar, sclass);
  if (p) ar->cls[sclass].allocs++;
  sl_spin_unlock(&ar->lock);
  return p;
}

static void sl_subpage_release(sl_arena *ar, sl_subpage *s);

/* An element of a subpage that a worker owns, freed by someone else
 * (lock held): onto the owner's remote stack, linked through its first
 * 8 bytes (see chunk.h). */
static void sl_sub_owner_push(sl_sub_owner *o, void *p) {
  SL_UNPOISON(p, sizeof(void *));
  void *old = atomic_load_explicit(&o->remote, memory_order_relaxed);
  do {
    *(void **)p = old;
  } while (!atomic_compare_exchange_weak_explicit(&o->remote, &old, p, memory_order_release,
                                                  memory_order_relaxed));
}

sl_subpage *sl_arena_subpage_own(sl_arena *ar, unsigned sclass, sl_sub_owner *o,
                                 uint32_t allocs, uint32_t frees) {
  sl_spin_lock(&ar->lock);
  ar->cls[sclass].allocs += allocs;
  ar->cls[sclass].frees += frees;
  sl_subpage *s = sl_arena_subpage(ar, sclass);   /* the list's first */
  if (s != NULL) {
    sl_arena_subpage_full(ar, s);
    sl_subpage_set_owner(s, o);
  }
  sl_spin_unlock(&ar->lock);
  return s;
}

/* A subpage that was full has a free element again: back on its list. */
static void sl_arena_subpage_relink(sl_arena *ar, sl_subpage *s) {
  s->next = ar->subpages[s->sclass];
  s->prev = NULL;
  if (s->next) s->next->prev = s;
  ar->subpages[s->sclass] = s;
}

/* Frees one block with the lock held. */
static void sl_arena_free_locked(sl_arena *ar, void *p, unsigned sclass) {
  sl_alloc *a = ar->alloc;
  sl_chunk *c = sl_chunk_of(p, a->cfg.chunk_size);
  uint32_t page = (uint32_t)(((uint8_t *)p - c->mem) >> c->page_shift);
  ar->cls[sclass].frees++;
  if (sclass >= a->nsmall) {
    sl_chunk_run_free_inline(c, page, a->run_pages[sclass]);   /* checks the run's length */
    sl_arena_relist(ar, c);
    return;
  }
  sl_subpage *s = c->sub[page];
  SL_ASSERT(s != NULL && s->sclass == sclass, "small block freed with the wrong class");
  if (sl_subpage_owner(s) != NULL) {
    sl_sub_owner_push(sl_subpage_owner(s), p);
    return;
  }
  int was_full = s->nfree == 0;
  int empty = sl_subpage_free(s, p);
  if (was_full) sl_arena_subpage_relink(ar, s);
  /* An empty subpage goes back to its chunk unless it is its class's only
   * one (kept to avoid churn; trimming returns it). */
  if (empty && (s->prev != NULL || s->next != NULL)) sl_subpage_release(ar, s);
}

void sl_arena_free(sl_arena *ar, void *p, unsigned sclass, size_t size) {
  sl_alloc *a = ar->alloc;
  if (sclass >= a->nclasses) {
    size_t n = sl_alloc_huge_size(a, size);
    munmap(p, n);
    sl_unreserve(a, n);
    sl_spin_lock(&ar->lock);
    ar->huge_frees++;
    ar->huge_bytes -= n;
    sl_spin_unlock(&ar->lock);
    return;
  }
  sl_spin_lock(&ar->lock);
  sl_arena_free_locked(ar, p, sclass);
  sl_spin_unlock(&ar->lock);
}

/* Subpage s had nfree free elements before one more was freed: it was
 * full (back on its class's list), or it is now empty (back to its chunk,
 * unless it is its class's only one). */
__attribute__((noinline)) static void sl_arena_subpage_moved(sl_arena *ar, sl_subpage *s,
                                                             uint32_t nfree) {
  if (nfree == 0) sl_arena_subpage_relink(ar, s);
  if (s->nfree == s->nelems && (s->prev != NULL || s->next != NULL)) sl_subpage_release(ar, s);
}

void sl_arena_free_many(sl_arena *ar, void **blocks, unsigned n, unsigned sclass) {
  if (n == 0) return;
  sl_alloc *a = ar->alloc;
  sl_spin_lock(&ar->lock);
  if (sclass >= a->nsmall) {
    for (unsigned i = 0; i < n; i++) sl_arena_free_locked(ar, blocks[i], sclass);
    sl_spin_unlock(&ar->lock);
    return;
  }
  /* Small blocks (a worker cache flushing): sl_arena_free_locked's small
   * half, with what is the same for every block hoisted, and the rare
   * list moves out of the loop. */
  uintptr_t chunk_mask = ~((uintptr_t)a->cfg.chunk_size - 1);
  uint32_t page_shift = (uint32_t)__builtin_ctzll(a->cfg.page_size);
  ar->cls[sclass].frees += n;
  for (unsigned i = 0; i < n; i++) {
    uint8_t *p = blocks[i];
    sl_chunk *c = (sl_chunk *)(void *)((uintptr_t)p & chunk_mask);
    sl_subpage *s = c->sub[((uintptr_t)p & ~chunk_mask) >> page_shift];
    SL_ASSERT(s != NULL && s->sclass == sclass, "small block freed with the wrong class");
    if (__builtin_expect(sl_subpage_owner(s) != NULL, 0)) {
      sl_sub_owner_push(sl_subpage_owner(s), p);
      continue;
    }
    uint32_t nfree = s->nfree;
    sl_subpage_free(s, p);
    if (__builtin_expect(nfree == 0 || nfree + 1 == s->nelems, 0))
      sl_arena_subpage_moved(ar, s, nfree);
  }
  sl_spin_unlock(&ar->lock);
}

/* Returns an empty subpage's run to its chunk. Lock held. */
static void sl_subpage_release(sl_arena *ar, sl_subpage *s) {
  sl_chunk *c = s->chunk;
  if (s->prev) s->prev->next = s->next;
  else ar->subpages[s->sclass] = s->next;
  if (s->next) s->next->prev = s->prev;
  for (uint32_t q = s->first_page; q < s->first_page + s->npages; q++) c->sub[q] = NULL;
  sl_chunk_pages(c)[s->first_page].run_len = s->npages;
  sl_chunk_run_free(c, s->first_page, s->npages);
  free(s);
  sl_arena_relist(ar, c);
}

void sl_arena_subpage_disown(sl_arena *ar, sl_subpage *s) {
  sl_subpage_to_bits(s);
  sl_subpage_set_owner(s, NULL);
  s->prev = s->next = s->own_prev = s->own_next = NULL;
  if (s->nfree == 0) return;   /* full: off the lists, as the arena keeps full ones */
  sl_arena_subpage_relink(ar, s);
  if (s->nfree == s->nelems && s->next != NULL) sl_subpage_release(ar, s);
}

unsigned sl_arena_release_empty(sl_arena *ar, int64_t now_ms, int force) {
  sl_alloc *a = ar->alloc;
  unsigned released = 0;
  sl_spin_lock(&ar->lock);
  /* Subpages kept as their class's last one go back too, so that their
   * chunks can empty. */
  for (unsigned k = 0; k < a->nsmall; k++) {
    sl_subpage *s = ar->subpages[k];
    while (s != NULL) {
      sl_subpage *next = s->next;
      if (s->nfree == s->nelems) sl_subpage_release(ar, s);
      s = next;
    }
  }
  sl_chunk *c = ar->lists[SL_Q_EMPTY];
  while (c != NULL) {
    sl_chunk *next = c->next;
    if (force || now_ms - c->empty_since_ms >= a->cfg.trim_idle_ms) {
      sl_list_remove(ar, SL_Q_EMPTY, c);
      sl_chunk_delete(c, a->cfg.chunk_size);
      sl_unreserve(a, a->cfg.chunk_size);
      ar->chunks_released++;
      ar->chunks--;
      released++;
    }
    c = next;
  }
  sl_spin_unlock(&ar->lock);
  return released;
}

void sl_arena_get_stats(sl_arena *ar, sl_arena_stats *st) {
  sl_alloc *a = ar->alloc;
  memset(st, 0, sizeof(*st));
  sl_spin_lock(&ar->lock);
  st->chunks = ar->chunks;
  st->chunks_created = ar->chunks_created;
  st->chunks_released = ar->chunks_released;
  st->chunk_bytes = ar->chunks * a->cfg.chunk_size;
  for (int q = 0; q < SL_Q_COUNT; q++)
    for (sl_chunk *c = ar->lists[q]; c != NULL; c = c->next)
      st->used_bytes += (uint64_t)(sl_chunk_usable_pages(c) - c->free_pages) * a->cfg.page_size;
  st->huge_allocs = ar->huge_allocs;
  st->huge_frees = ar->huge_frees;
  st->huge_bytes = ar->huge_bytes;
  st->nclasses = a->nclasses;
  memcpy(st->cls, ar->cls, sizeof(st->cls));
  for (struct sl_pool *p = ar->pools; p != NULL; p = sl_pool_arena_share(p, st->cls)) {
  }
  sl_spin_unlock(&ar->lock);
}
