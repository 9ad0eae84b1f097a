#include "alloc/pool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "buf/buf_types.h"
#include "util/common.h"

_Static_assert(offsetof(sl_pool, sub_owner) == 0, "a subpage's owner is its pool's address");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ &&
                   offsetof(sl_pool, gen_next) == offsetof(sl_pool, gen_word) + 4,
               "gen_next is gen_word's upper half");

__thread sl_pool *sl_pool_tls;

/* Free headers are linked through the word at SL_HDR_LINK_OFFSET, away
 * from the fields a stale handle reads (the generation stays 0). */
static void **sl_hdr_link(void *hdr) { return sl_pool_hdr_link(hdr); }

static int sl_pool_map_region(sl_pool *p, uint32_t max_headers) {
  size_t len = SL_HDR_REGION_SPAN * 2;
  void *m = mmap(NULL, len, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return SL_ERROR;
  p->hdr_map = m;
  p->hdr_map_len = len;
  p->hdr_base = (uint8_t *)(((uintptr_t)m + SL_HDR_REGION_SPAN - 1) & ~(SL_HDR_REGION_SPAN - 1));
  *(sl_pool **)(void *)p->hdr_base = p;     /* slot 0: the owner, for sl_pool_of */
  p->hdr_next = 1;
  p->hdr_max = (uint32_t)SL_MIN((uintptr_t)max_headers, SL_HDR_REGION_SPAN / SL_HDR_SIZE);
  return SL_OK;
}

sl_pool *sl_pool_create(sl_alloc *a, int id) {
  int own = 0;
  if (a == NULL) {
    sl_alloc_config cfg;
    const char *err;
    sl_alloc_config_defaults(&cfg);
    a = sl_alloc_create(&cfg, &err);
    if (a == NULL) return NULL;
    own = 1;
  }
  sl_pool *p = aligned_alloc(_Alignof(sl_pool), sizeof(*p));   /* bins on cache lines */
  if (p == NULL) goto fail;
  memset(p, 0, sizeof(*p));
  const sl_alloc_config *cfg = &a->cfg;
  p->alloc = a;
  p->own_alloc = own;
  p->id = id;
  p->arena = &a->arenas[id % cfg->arenas];
  p->trim_interval = (uint32_t)(cfg->trim_interval > 0 ? cfg->trim_interval : 8192);
  p->gen_word = (uint64_t)1 << 32 | 1;   /* generation 1, refcount 1 */
  p->rec_cap = (uint32_t)cfg->recycler_cap;
  p->recycler = malloc(sizeof(void *) * (p->rec_cap ? p->rec_cap : 1));
  if (p->recycler == NULL || sl_retq_init(&p->retq, (size_t)cfg->return_queue_cap) != SL_OK ||
      sl_pool_map_region(p, cfg->max_headers) != SL_OK)
    goto fail;
  if (cfg->type == SL_ALLOC_POOLED && cfg->max_cached > 0) {
    size_t max = SL_MIN(cfg->max_cached, a->max_class_size);
    unsigned nbins = sl_sc_index(max) + 1;
    if (sl_sc_size(nbins - 1) > max) nbins--;   /* only classes that fit entirely */
    for (unsigned i = 0; i < nbins; i++) {
      sl_cache_bin *bin = &p->bins[i];
      bin->cap = (uint32_t)(i < a->nsmall ? cfg->small_cache : cfg->normal_cache);
      if (bin->cap == 0) continue;
      bin->items = malloc(sizeof(void *) * bin->cap);
      if (bin->items == NULL) goto fail;
    }
    p->max_cached_size = nbins ? sl_sc_size(nbins - 1) : 0;
    for (unsigned i = 0; i < nbins && i < a->nsmall; i++) p->bins[i].owns = p->bins[i].cap >= 8;
  }
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++) sl_pool_own_set_first(&p->bins[i], NULL);
  p->chunk_mask = ~((uintptr_t)cfg->chunk_size - 1);
  p->page_shift = (uint32_t)__builtin_ctzll(cfg->page_size);
  /* Flags 0, or SL_BUF_UNBINNED for a normal class no bin caches (its
   * release leaves sl_buf_free at the flag test, straight for the arena). */
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++)
    p->bins[i].tail = sl_sc_sizes[i] | (uint64_t)i << 32 |
                      (p->bins[i].cap == 0 && i >= a->nsmall ? (uint64_t)SL_BUF_UNBINNED << 48 : 0);
  for (unsigned i = a->nsmall; i < a->nclasses && cfg->type == SL_ALLOC_POOLED; i++)
    if (p->bins[i].cap == 0 && a->run_pages[i] < SL_AVAIL_LENS)
      p->bins[i].normal_pages = (uint16_t)a->run_pages[i];
  memcpy(p->lookup, sl_sc_lookup, sizeof(p->lookup));
  memcpy(p->run_pages, a->run_pages, sizeof(p->run_pages));
  p->cached_limit = p->max_cached_size;
  p->lookup_max_size = SL_MIN(p->max_cached_size, SL_SC_LOOKUP_MAX);
  p->nsmall = a->nsmall;
  p->normal_limit = cfg->type == SL_ALLOC_POOLED ? a->max_class_size : 0;
  p->normal_max_size = p->normal_limit;
  p->normal_lookup_max = SL_MIN(p->normal_limit, SL_SC_LOOKUP_MAX);
  p->leak_level = cfg->leak_level;
  p->leak_sample = cfg->leak_sample ? cfg->leak_sample : 128;
  p->leak_countdown = 1;   /* the first buffer is recorded: a leak early on shows where */
  p->trim_countdown = p->trim_interval;
  sl_pool_countdown_arm(p);
  p->release_site = "the core";
  sl_arena_lock(p->arena);   /* its fast paths' counts join the arena's */
  p->arena_next = p->arena->pools;
  p->arena->pools = p;
  sl_arena_unlock(p->arena);
  sl_pool_bind_thread(p);
  return p;
fail:
  if (p) {
    for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++) free(p->bins[i].items);
    free(p->recycler);
    sl_retq_destroy(&p->retq);
    if (p->hdr_map) munmap(p->hdr_map, p->hdr_map_len);
    free(p);
  }
  if (own) sl_alloc_destroy(a);
  return NULL;
}

void sl_pool_bind_thread(sl_pool *p) {
  sl_pool_tls = p;
  if (p != NULL) {
    p->owner_tp = __builtin_thread_pointer();
    sl_pool_quarantine_next(p, p->quarantine_next);
  }
}

static void sl_pool_take_remote_headers(sl_pool *p) {
  void *h = atomic_exchange(&p->hdr_remote, NULL);
  while (h != NULL) {
    void *next = *sl_hdr_link(h);
    *sl_hdr_link(h) = p->hdr_overflow;
    p->hdr_overflow = h;
    p->hdr_overflow_n++;
    h = next;
  }
}

/* Frees the leak records kept for reuse (buf/leak.c). */
static void sl_pool_free_spare_records(sl_pool *p) {
  for (void *r = p->leak_spare, *next; r != NULL; r = next) {
    next = *(void **)r;
    free(r);
  }
  p->leak_spare = NULL;
  p->leak_spare_n = 0;
}

void sl_pool_destroy(sl_pool *p) {
  if (p == NULL) return;
  sl_pool_trim(p, 1);   /* reports every count to the arena */
  sl_arena_lock(p->arena);
  sl_pool **link = &p->arena->pools;
  while (*link != p) link = &(*link)->arena_next;
  *link = p->arena_next;
  sl_arena_unlock(p->arena);
  sl_arena_release_empty(p->arena, 0, 1);
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++) free(p->bins[i].items);
  free(p->recycler);
  sl_retq_destroy(&p->retq);
  munmap(p->hdr_map, p->hdr_map_len);
  if (p->leak_rec) munmap(p->leak_rec, p->leak_map_len);
  sl_pool_free_spare_records(p);
  if (sl_pool_tls == p) sl_pool_tls = NULL;
  sl_alloc *a = p->own_alloc ? p->alloc : NULL;
  free(p);
  sl_alloc_destroy(a);
}

static unsigned sl_pool_class(const sl_pool *p, size_t size) {
  return size > p->alloc->max_class_size ? p->alloc->nclasses : sl_sc_index(size);
}

unsigned sl_pool_class_of(const sl_pool *p, size_t usable) {
  if (p->alloc->cfg.type == SL_ALLOC_UNPOOLED || usable > p->alloc->max_class_size)
    return SL_SC_NONE;
  return sl_sc_index(usable);
}

/* ---- owned subpages (see pool_types.h) ---- */

const sl_subpage sl_pool_own_none = {.free = (void *)SL_SUB_BARE};

static void sl_pool_own_link(sl_cache_bin *bin, sl_subpage *s) {
  s->prev = NULL;
  s->next = sl_pool_own_first(bin);
  if (s->next != NULL) s->next->prev = s;
  bin->own = s;
}

static void sl_pool_own_unlink(sl_cache_bin *bin, sl_subpage *s) {
  if (s->prev != NULL) s->prev->next = s->next;
  else if (bin->own == s) sl_pool_own_set_first(bin, s->next);
  if (s->next != NULL) s->next->prev = s->prev;
  s->prev = s->next = NULL;
}

/* Class k's owned-subpage counts were added to the arena's: the pool's
 * own counts take them too (sl_cache_bin). */
static void sl_pool_own_fold(sl_cache_bin *bin) {
  bin->allocs_rest += bin->own_allocs;
  bin->frees_rest += bin->own_frees;
  bin->own_allocs = bin->own_frees = 0;
}

/* Adds the pool's share of class k's counts to the arena's. Lock held. */
static void sl_pool_own_report(sl_pool *p, unsigned k) {
  sl_cache_bin *bin = &p->bins[k];
  p->arena->cls[k].allocs += bin->own_allocs;
  p->arena->cls[k].frees += bin->own_frees;
  sl_pool_own_fold(bin);
}

/* The same for every class, under the lock (a trim): the normal classes'
 * shares too (sl_cache_bin), before their 32-bit counts could wrap. */
static void sl_pool_own_report_all(sl_pool *p) {
  unsigned n = p->alloc->nclasses;
  int any = 0;
  for (unsigned k = 0; k < n && !any; k++)
    any = p->bins[k].own_allocs != 0 || p->bins[k].own_frees != 0;
  if (!any) return;
  sl_arena_lock(p->arena);
  for (unsigned k = 0; k < n; k++) sl_pool_own_report(p, k);
  sl_arena_unlock(p->arena);
}

sl_pool *sl_pool_arena_share(const sl_pool *p, sl_class_stats *cls) {
  for (unsigned k = p->nsmall; k < p->alloc->nclasses; k++) {
    cls[k].allocs += p->bins[k].own_allocs;
    cls[k].frees += p->bins[k].own_frees;
  }
  return p->arena_next;
}

/* Turns the parked headers on owned subpage s's free list into bare
 * blocks; the headers go to the recycler (or the overflow list). */
static void sl_pool_own_unpark(sl_pool *p, sl_subpage *s) {
  if (s->nbare == s->nfree) return;
  void **prev = &s->free;
  uintptr_t item = (uintptr_t)s->free;
  while (item != 0) {
    if (item & SL_BIN_BARE) {
      prev = (void **)(item - SL_BIN_BARE);   /* a bare block links through its first bytes */
      item = (uintptr_t)*prev;
      continue;
    }
    void *h = (void *)item;
    void *next = *sl_pool_hdr_link(h);
    uint8_t *mem = sl_pool_parked_block(h);
    SL_UNPOISON(mem, sizeof(void *));
    *(void **)mem = next;
    *prev = sl_pool_bare_item(mem);
    prev = (void **)mem;
    *sl_pool_hdr_link(h) = NULL;
    sl_pool_header_put(p, h);
    item = (uintptr_t)next;
  }
  s->nbare = s->nfree;
}

/* The parked headers of owned subpage s, empty and going back to the
 * arena, to the recycler: its list is not rebuilt, as its bitmap is only
 * cleared (sl_subpage_to_bits). */
static void sl_pool_own_unpark_empty(sl_pool *p, sl_subpage *s) {
  if (s->nbare == s->nfree) return;
  for (uintptr_t item = (uintptr_t)s->free, next; item != 0; item = next) {
    if (item & SL_BIN_BARE) {
      next = (uintptr_t)*(void **)(item - SL_BIN_BARE);
      continue;
    }
    next = (uintptr_t)*sl_pool_hdr_link((void *)item);
    sl_pool_header_put(p, (void *)item);
  }
}

/* Gives owned subpage s back to the arena, its parked headers to the
 * recycler first. Lock held. */
static void sl_pool_own_disown(sl_pool *p, sl_subpage *s) {
  if (s->nfree == s->nelems) sl_pool_own_unpark_empty(p, s);
  else sl_pool_own_unpark(p, s);
  sl_pool_own_unlink(&p->bins[s->sclass], s);
  if (s->own_prev != NULL) s->own_prev->own_next = s->own_next;
  else p->owned = s->own_next;
  if (s->own_next != NULL) s->own_next->own_prev = s->own_prev;
  sl_pool_own_report(p, s->sclass);
  sl_arena_subpage_disown(p->arena, s);
}

/* s was full, or has become empty; locked: the caller holds the arena's
 * lock (then an empty subpage stays owned: everything is being given
 * back anyway). */
static void sl_pool_own_moved_in(sl_pool *p, sl_subpage *s, uint32_t nfree, int locked) {
  sl_cache_bin *bin = &p->bins[s->sclass];
  if (nfree == 0) sl_pool_own_link(bin, s);
  if (!locked && s->nfree == s->nelems && (s->prev != NULL || s->next != NULL)) {
    sl_arena_lock(p->arena);
    sl_pool_own_disown(p, s);
    sl_arena_unlock(p->arena);
  }
}

__attribute__((noinline)) void sl_pool_own_moved(sl_pool *p, sl_subpage *s, uint32_t nfree) {
  sl_pool_own_moved_in(p, s, nfree, 0);
}

/* Takes back the elements of owned subpages that other threads freed
 * (the arena counted them then). */
static void sl_pool_own_reclaim(sl_pool *p, int locked) {
  void *b = atomic_exchange_explicit(&p->sub_owner.remote, NULL, memory_order_acquire);
  while (b != NULL) {
    void *next = *(void **)b;
    uintptr_t c = (uintptr_t)b & p->chunk_mask;
    sl_subpage *s = ((sl_chunk *)c)->sub[((uintptr_t)b - c) >> p->page_shift];
    SL_ASSERT(s != NULL && sl_subpage_owner(s) == &p->sub_owner,
              "remote element of a subpage not owned");
    uint32_t nfree = sl_subpage_push(s, b);
    if (sl_pool_own_moves(s, nfree)) sl_pool_own_moved_in(p, s, nfree, locked);
    b = next;
  }
}

/* Gives every owned subpage back to the arena (after the elements other
 * threads freed, under the same lock: no more can come). */
static void sl_pool_own_return_all(sl_pool *p) {
  if (p->owned == NULL && atomic_load_explicit(&p->sub_owner.remote, memory_order_relaxed) == NULL)
    return;
  sl_arena_lock(p->arena);
  sl_pool_own_reclaim(p, 1);
  while (p->owned != NULL) sl_pool_own_disown(p, p->owned);
  sl_arena_unlock(p->arena);
}

/* A block of small class idx from an owned subpage: the first with room,
 * else (after taking back what other threads freed) one more from the
 * arena. NULL when memory is refused. */
static void *sl_pool_own_alloc(sl_pool *p, unsigned idx) {
  sl_cache_bin *bin = &p->bins[idx];
  if (sl_pool_own_first(bin) == NULL &&
      atomic_load_explicit(&p->sub_owner.remote, memory_order_relaxed))
    sl_pool_own_reclaim(p, 0);
  if (sl_pool_own_first(bin) == NULL) {
    sl_subpage *s = sl_arena_subpage_own(p->arena, idx, &p->sub_owner, bin->own_allocs,
                                         bin->own_frees);
    sl_pool_own_fold(bin);   /* the arena took them, refused or not */
    if (s == NULL) return NULL;
    sl_subpage_to_list(s);
    s->own_prev = NULL;
    s->own_next = p->owned;
    if (p->owned != NULL) p->owned->own_prev = s;
    p->owned = s;
    sl_pool_own_link(bin, s);
  }
  sl_subpage *s = bin->own;
  uintptr_t item = (uintptr_t)s->free;
  void *mem;
  if (item & SL_BIN_BARE) {
    mem = sl_subpage_pop_bare(s, item);
  } else {
    /* A parked header: its block is what is asked for, it goes back. */
    sl_pool_own_pop_parked(s, (void *)item);
    mem = sl_pool_parked_block((void *)item);
    sl_pool_header_put(p, (void *)item);
  }
  sl_pool_own_took(bin, s);
  return mem;
}

/* A block of class idx from the arena (an owned subpage for the classes
 * that own them, which counts it: *counted = 1). */
static void *sl_pool_arena_get(sl_pool *p, unsigned idx, size_t size, int *counted) {
  *counted = idx < p->alloc->nsmall && p->bins[idx].owns && size <= p->max_cached_size;
  if (*counted) return sl_pool_own_alloc(p, idx);
  return sl_arena_alloc(p->arena, idx, size);
}

__attribute__((noinline)) void *sl_pool_alloc_slow(sl_pool *p, size_t size, size_t *usable, unsigned *sclass) {
  if (p->fail_next > 0) {
    if (--p->fail_next == 0) {
      p->max_cached_size = p->cached_limit;
      p->lookup_max_size = SL_MIN(p->cached_limit, SL_SC_LOOKUP_MAX);
      p->normal_max_size = p->normal_limit;
      p->normal_lookup_max = SL_MIN(p->normal_limit, SL_SC_LOOKUP_MAX);
    }
    p->alloc_failures++;
    errno = ENOMEM;
    return NULL;
  }
  sl_alloc *a = p->alloc;
  *sclass = SL_SC_NONE;
  if (a->cfg.type == SL_ALLOC_UNPOOLED) {
    size_t n = size ? size : 1;
    void *mem = malloc(n);
    if (mem == NULL) {
      p->alloc_failures++;
      return NULL;
    }
    *usable = n;
    p->unpooled_bytes += n;
    p->other_allocs++;
    return mem;
  }
  unsigned idx = sl_pool_class(p, size);
  int counted;
  void *mem = sl_pool_arena_get(p, idx, size, &counted);
  if (mem == NULL) {
    /* Refused (max_memory) or the OS said no: the caches are memory too.
     * Give them back, unmap what that empties, and try once more. */
    sl_pool_trim(p, 1);
    sl_arena_release_empty(p->arena, 0, 1);
    mem = sl_pool_arena_get(p, idx, size, &counted);
  }
  if (mem == NULL) {
    p->alloc_failures++;
    errno = ENOMEM;
    return NULL;
  }
  if (idx < a->nclasses) {
    *usable = sl_sc_size(idx);
    *sclass = idx;
    if (!counted) p->bins[idx].allocs_rest++;
    SL_UNPOISON(mem, *usable);
  } else {
    *usable = sl_alloc_huge_size(a, size);
    p->unpooled_bytes += *usable;
    p->other_allocs++;
  }
  return mem;
}

/* Gives bin item item of small class sclass, whose bin owns subpages, to
 * its block's subpage when p owns it, a parked header with its block: 1.
 * Else 0, nothing done. The caller counts it. */
static int sl_pool_own_give_item(sl_pool *p, void *item, unsigned sclass) {
  uintptr_t v = (uintptr_t)item;
  sl_subpage *s;
  uint32_t nfree;
  if (v & SL_BIN_BARE) {
    void *mem = (void *)(v - SL_BIN_BARE);
    s = sl_pool_subpage_of(p, mem, sclass);
    if (!sl_pool_owns(p, s)) return 0;
    nfree = sl_subpage_push(s, mem);
  } else {
    s = sl_pool_parked_subpage(item);
    SL_ASSERT_DEBUG(s == sl_pool_subpage_of(p, sl_pool_parked_block(item), sclass),
                    "a parked header keeps its block's subpage");
    if (!sl_pool_owns(p, s)) return 0;
    nfree = sl_pool_own_push_parked(s, item);
  }
  if (sl_pool_own_moves(s, nfree)) sl_pool_own_moved(p, s, nfree);
  return 1;
}

/* Gives the give oldest entries of bin sclass back: to the owned subpages
 * of their blocks (parked headers stay parked there), else to the arena
 * (parked headers to the recycler). An entry given to its owned subpage
 * counts in own_frees for the arena and leaves frees_rest (its release
 * was counted when it was cached: sl_cache_bin), once for all of them. */
static void sl_pool_bin_give(sl_pool *p, unsigned sclass, uint32_t give) {
  sl_cache_bin *bin = &p->bins[sclass];
  if (give == 0) return;
  uint32_t rest = 0, owned = 0;
  void **items = bin->items;
  int owns = bin->owns != 0;
  for (uint32_t i = 0; i < give; i++) {
    void *item = items[i];
    if (owns && sl_pool_own_give_item(p, item, sclass)) {
      owned++;
      continue;
    }
    items[rest++] = sl_pool_item_block(p, item);
  }
  bin->own_frees += owned;
  bin->frees_rest -= owned;
  sl_arena_free_many(p->arena, bin->items, rest, sclass);
  memmove(bin->items, bin->items + give, (bin->n - give) * sizeof(void *));
  bin->n -= give;
}

__attribute__((noinline)) void sl_pool_park_slow(sl_pool *p, void *hdr, unsigned sclass) {
  sl_cache_bin *bin = &p->bins[sclass];
  sl_pool_bin_give(p, sclass, (bin->cap + 1) / 2);   /* cap >= 1 */
  bin->items[bin->n++] = hdr;
  bin->frees_rest++;
}

__attribute__((noinline)) void sl_pool_free_slow(sl_pool *p, void *mem, size_t usable, unsigned sclass) {
  if (p->alloc->cfg.type == SL_ALLOC_UNPOOLED) {
    p->other_frees++;
    p->unpooled_bytes -= usable;
    free(mem);
    return;
  }
  if (sclass != SL_SC_NONE) {
    SL_POISON(mem, usable);
    sl_cache_bin *bin = &p->bins[sclass];
    if (bin->cap >= 8 && bin->owns && sl_pool_own_give(p, bin, mem, sclass)) return;
    bin->frees_rest++;
    if (bin->cap >= 8) {
      /* A full bin gives its older half back in one trip, then keeps mem. */
      sl_pool_bin_give(p, sclass, bin->cap / 2);
      bin->items[bin->n++] = sl_pool_bare_item(mem);
      return;
    }
    sl_arena_free(p->arena, mem, sclass, usable);
    return;
  }
  p->other_frees++;
  p->unpooled_bytes -= usable;
  sl_arena_free(p->arena, mem, p->alloc->nclasses, usable);
}

/* A parked header among the top few entries of a bin, or first on the
 * free list of a class's first owned subpage with room (its block stays
 * there, bare), or NULL. Only the tops are looked at, so that a search
 * costs at most a few entries per class: headers park on top. A header
 * parks in a bin only with a release that the class counts
 * (sl_pool_class_frees, which only grows: frees_rest alone goes down when
 * a bin gives entries to owned subpages): the bins are not searched again
 * while that count has not moved since a search found none there. */
static void *sl_pool_unpark(sl_pool *p) {
  uint64_t frees = 0;
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++) frees += sl_pool_class_frees(p, i);
  if (frees != p->unpark_frees) {
    for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++) {
      sl_cache_bin *bin = &p->bins[i];
      uint32_t low = bin->n > 8 ? bin->n - 8 : 0;
      for (uint32_t k = bin->n; k > low; k--) {
        void *item = bin->items[k - 1];
        if ((uintptr_t)item & SL_BIN_BARE) continue;
        bin->items[k - 1] = sl_pool_bare_item(sl_pool_parked_block(item));
        return item;
      }
    }
    p->unpark_frees = frees;
  }
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++) {
    sl_subpage *s = sl_pool_own_first(&p->bins[i]);
    void *h = s != NULL ? s->free : NULL;
    if (h != NULL && !((uintptr_t)h & SL_BIN_BARE)) {
      uint8_t *mem = sl_pool_parked_block(h);
      SL_UNPOISON(mem, sizeof(void *));
      *(void **)mem = *sl_pool_hdr_link(h);
      *sl_pool_hdr_link(h) = NULL;
      s->free = sl_pool_bare_item(mem);
      s->nbare++;
      return h;
    }
  }
  return NULL;
}

/* Every parked header to the recycler (their blocks stay, bare). */
static void sl_pool_unpark_all(sl_pool *p) {
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++) {
    sl_cache_bin *bin = &p->bins[i];
    for (uint32_t k = 0; k < bin->n; k++)
      bin->items[k] = sl_pool_bare_item(sl_pool_item_block(p, bin->items[k]));
  }
  for (sl_subpage *s = p->owned; s != NULL; s = s->own_next) sl_pool_own_unpark(p, s);
}

/* Parked headers, in bins and on owned subpages (free, as far as the
 * header count goes). */
static uint64_t sl_pool_parked(const sl_pool *p) {
  uint64_t n = 0;
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++)
    for (uint32_t k = 0; k < p->bins[i].n; k++) n += !((uintptr_t)p->bins[i].items[k] & SL_BIN_BARE);
  for (const sl_subpage *s = p->owned; s != NULL; s = s->own_next) n += s->nfree - s->nbare;
  return n;
}

/* A header when the recycler and the overflow list are empty: one freed by
 * a foreign thread, else a parked one (near the top of a bin) or a new
 * slot, in the order parked_first says. NULL with ENOMEM. */
static void *sl_pool_header_find(sl_pool *p, int parked_first) {
  if (atomic_load_explicit(&p->hdr_remote, memory_order_relaxed)) {
    sl_pool_take_remote_headers(p);
    if (p->hdr_overflow != NULL) return sl_pool_header_take(p);
  }
  void *h = parked_first ? sl_pool_unpark(p) : NULL;
  if (h != NULL) return h;
  if (p->hdr_next < p->hdr_max) return p->hdr_base + (size_t)p->hdr_next++ * SL_HDR_SIZE;
  h = sl_pool_unpark(p);
  if (h != NULL) return h;
  errno = ENOMEM;
  return NULL;
}

/* A root buffer's header: a new slot before a parked one. A root parks
 * with its block when released, so taking a parked header would only leave
 * a bare block to take the next free header each time round; the count
 * stays bounded, as the bins are. */
__attribute__((noinline)) void *sl_pool_header_get_slow(sl_pool *p) {
  return sl_pool_header_find(p, 0);
}

/* Views and derived buffers never park: their headers come from parked ones
 * first, so that the header count does not grow for them. */
__attribute__((noinline)) void *sl_pool_header_get_view(sl_pool *p) {
  if (sl_pool_header_ready(p)) return sl_pool_header_take(p);
  return sl_pool_header_find(p, 1);
}

void sl_pool_header_quarantine(sl_pool *p, void *hdr) {
  void *old = p->quarantine[p->quarantine_head];
  p->quarantine[p->quarantine_head] = hdr;
  p->quarantine_head = (p->quarantine_head + 1) % 64;
  if (old != NULL) sl_pool_header_put(p, old);
  else p->quarantine_n++;
}

static void sl_pool_quarantine_flush(sl_pool *p) {
  for (unsigned i = 0; i < 64; i++) {
    if (p->quarantine[i] != NULL) sl_pool_header_put(p, p->quarantine[i]);
    p->quarantine[i] = NULL;
  }
  p->quarantine_n = 0;
}

int sl_pool_retq_push(sl_pool *p, void *item) {
  int rc = sl_retq_push(&p->retq, item);
  if (rc == SL_OK) atomic_fetch_add_explicit(&p->remote_queued, 1, memory_order_relaxed);
  return rc;
}

void *sl_pool_retq_pop(sl_pool *p) {
  void *item = sl_retq_pop(&p->retq);
  if (item) p->drained++;
  return item;
}

void sl_pool_free_foreign(sl_pool *p, void *mem, size_t usable) {
  atomic_fetch_add_explicit(&p->remote_direct, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&p->remote_direct_bytes, usable, memory_order_relaxed);
  if (p->alloc->cfg.type == SL_ALLOC_UNPOOLED) {
    free(mem);
    return;
  }
  unsigned idx = sl_pool_class(p, usable);
  if (idx < p->alloc->nclasses) {
    SL_POISON(mem, usable);
    atomic_fetch_add_explicit(&p->remote_direct_cls[idx], 1, memory_order_relaxed);
  }
  sl_arena_free(p->arena, mem, idx, usable);
}

void sl_pool_remote_push(sl_pool *p, void *item, size_t link_offset) {
  atomic_fetch_add_explicit(&p->remote_stacked, 1, memory_order_relaxed);
  void **link = (void **)(void *)((char *)item + link_offset);
  void *old = atomic_load_explicit(&p->bufs_remote, memory_order_relaxed);
  do {
    *link = old;
  } while (!atomic_compare_exchange_weak_explicit(&p->bufs_remote, &old, item,
                                                  memory_order_release, memory_order_relaxed));
}

void *sl_pool_remote_take(sl_pool *p) {
  return atomic_exchange_explicit(&p->bufs_remote, NULL, memory_order_acquire);
}

void sl_pool_header_put_foreign(sl_pool *p, void *hdr) {
  void *old = atomic_load_explicit(&p->hdr_remote, memory_order_relaxed);
  do {
    *sl_hdr_link(hdr) = old;
  } while (!atomic_compare_exchange_weak_explicit(&p->hdr_remote, &old, hdr, memory_order_release,
                                                  memory_order_relaxed));
}

__attribute__((noinline)) void sl_pool_event(sl_pool *p) {
  sl_pool_countdown_sync(p);
  if (p->trim_countdown == 0) sl_pool_trim(p, 0);
  if (p->leak_countdown == 0) p->leak_countdown = 1;   /* the next buffer is sampled */
  sl_pool_countdown_arm(p);
}

__attribute__((noinline)) void sl_pool_trim(sl_pool *p, int everything) {
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++) {
    sl_cache_bin *bin = &p->bins[i];
    if ((bin->n | bin->used) == 0) continue;
    /* What went unused since the last trim goes back: the oldest entries. */
    uint32_t give = everything ? bin->n : (bin->n > bin->used ? bin->n - bin->used : 0);
    if (give != 0) sl_pool_bin_give(p, i, give);
    p->cache_hits += bin->used;
    bin->allocs_rest += bin->used;   /* sl_cache_bin */
    bin->used = 0;
  }
  if (everything) sl_pool_own_return_all(p);
  else if (atomic_load_explicit(&p->sub_owner.remote, memory_order_relaxed) != NULL)
    sl_pool_own_reclaim(p, 0);
  sl_pool_own_report_all(p);
  sl_pool_countdown_sync(p);
  p->trim_countdown = p->trim_interval;
  sl_pool_countdown_arm(p);
  p->trims++;
}

/* Gives the header region's memory back when no header is live. */
static int sl_pool_reset_region(sl_pool *p) {
  sl_pool_take_remote_headers(p);
  sl_pool_quarantine_flush(p);
  sl_pool_unpark_all(p);
  uint64_t live = (uint64_t)(p->hdr_next - 1) - p->rec_n - p->hdr_overflow_n;
  if (live != 0 || p->hdr_next <= 64) return 0;
  size_t page = 4096;
  uint8_t *from = p->hdr_base + page;   /* the first page keeps slot 0 */
  size_t len = ((size_t)p->hdr_next * SL_HDR_SIZE + page - 1) / page * page - page;
  madvise(from, len, MADV_DONTNEED);    /* reads as zeros: generation 0, dead */
  p->rec_n = 0;
  p->hdr_overflow = NULL;
  p->hdr_overflow_n = 0;
  p->hdr_next = 1;
  p->region_resets++;
  return 1;
}

int sl_pool_tick(sl_pool *p, int64_t now_ms, sl_pool_trim_report *r) {
  memset(r, 0, sizeof(*r));
  uint64_t allocs = p->other_allocs;
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++) allocs += sl_pool_class_allocs(p, i);
  if (allocs != p->allocs_at_tick || p->last_activity_ms == 0) {
    p->allocs_at_tick = allocs;
    p->last_activity_ms = now_ms;
    return 0;
  }
  if (now_ms - p->last_activity_ms < p->alloc->cfg.trim_idle_ms) return 0;
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++) r->blocks += p->bins[i].n;
  if (r->blocks) {
    sl_pool_trim(p, 1);
    p->idle_trims++;
  } else {
    sl_pool_own_return_all(p);
  }
  r->headers = sl_pool_reset_region(p);
  sl_pool_free_spare_records(p);
  r->chunks = sl_arena_release_empty(p->arena, now_ms, 0);
  return r->blocks || r->headers || r->chunks;
}

void sl_pool_fail_next(sl_pool *p, unsigned n) {
  p->fail_next = n;
  /* While failing on purpose every allocation takes the slow path. */
  p->max_cached_size = n ? 0 : p->cached_limit;
  p->lookup_max_size = SL_MIN(p->max_cached_size, SL_SC_LOOKUP_MAX);
  p->normal_max_size = n ? 0 : p->normal_limit;
  p->normal_lookup_max = SL_MIN(p->normal_max_size, SL_SC_LOOKUP_MAX);
}

void sl_pool_get_stats(const sl_pool *p, sl_pool_stats *st) {
  memset(st, 0, sizeof(*st));
  uint64_t direct = atomic_load(&((sl_pool *)p)->remote_direct);
  uint64_t bytes = p->unpooled_bytes - atomic_load(&((sl_pool *)p)->remote_direct_bytes);
  uint64_t allocs = p->other_allocs, frees = p->other_frees, hits = p->cache_hits;
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++) {
    uint64_t a = sl_pool_class_allocs(p, i), f = sl_pool_class_frees(p, i);
    bytes += (a - f) * sl_sc_size(i);
    allocs += a;
    frees += f;
    hits += p->bins[i].used;
    st->cached_blocks += p->bins[i].n;
    st->cached_bytes += p->bins[i].n * sl_sc_size(i);
  }
  st->allocs = allocs;
  st->frees = frees + direct;
  st->blocks_in_use = allocs - frees - direct;
  st->bytes_in_use = bytes;
  st->alloc_failures = p->alloc_failures;
  st->cache_hits = hits;
  st->cache_misses = allocs - hits;
  st->trims = p->trims;
  st->idle_trims = p->idle_trims;
  st->headers_total = p->hdr_next - 1;
  st->headers_free = p->rec_n + p->hdr_overflow_n + p->quarantine_n + sl_pool_parked(p);
  st->recycler_size = p->rec_n;
  st->recycler_cap = p->rec_cap;
  st->recycler_overflows = p->recycler_overflows;
  st->region_resets = p->region_resets;
  st->remote_queued = atomic_load(&((sl_pool *)p)->remote_queued);
  st->remote_direct = direct;
  st->remote_stacked = atomic_load(&((sl_pool *)p)->remote_stacked);
  st->return_queue_cap = sl_retq_capacity(&p->retq);
  st->bufs_active = st->blocks_in_use;
  st->bufs_active_bytes = st->bytes_in_use;
}
