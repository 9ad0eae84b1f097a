/*
 * sl_pool: one worker's allocator front (see pool_types.h for its parts).
 * Not thread-safe except where said: a pool belongs to the thread that
 * bound it (sl_pool_bind_thread); other threads may only give buffers back
 * through sl_pool_retq_push / sl_pool_free_foreign / sl_pool_header_put_foreign.
 */
#ifndef SL_POOL_H
#define SL_POOL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "alloc/pool_types.h"
#include "alloc/size_class.h"

#include "alloc/poison.h"
#include "util/common.h"

typedef struct sl_pool_stats {
  uint64_t bytes_in_use;      /* blocks handed out and not given back */
  uint64_t blocks_in_use;
  uint64_t allocs, frees;
  uint64_t alloc_failures;
  uint64_t cache_hits, cache_misses;
  uint64_t cached_blocks, cached_bytes;
  uint64_t trims, idle_trims;
  uint64_t headers_total;     /* header slots ever used in the region */
  uint64_t headers_free;      /* recycler + overflow list + quarantine + parked (in
                                 bins and on owned subpages) */
  uint64_t recycler_size, recycler_cap, recycler_overflows;
  uint64_t region_resets;
  uint64_t remote_queued, remote_direct, return_queue_cap;
  uint64_t remote_stacked;    /* tracked buffers handed back through a lock-free stack */
  uint64_t bufs_active;       /* == blocks_in_use: one block per live buffer */
  uint64_t bufs_active_bytes; /* == bytes_in_use */
} sl_pool_stats;

/* Creates a pool on arena id % arenas of a. With a NULL, the pool gets a
 * private allocator with the default configuration (tests, tools). The
 * calling thread is bound to it. NULL on ENOMEM. */
sl_pool *sl_pool_create(sl_alloc *a, int id);

/* Gives everything cached back and frees the pool. Live blocks are a leak
 * (the caller reports them first). */
void sl_pool_destroy(sl_pool *p);

/* Makes p the pool of the calling thread (the worker thread at start). */
void sl_pool_bind_thread(sl_pool *p);

extern __thread sl_pool *sl_pool_tls;
static inline sl_pool *sl_pool_current(void) { return sl_pool_tls; }

/* Whether the calling thread is the one p was last bound to (a compare
 * with the thread pointer: no TLS lookup on the free path). A pool whose
 * thread has ended is bound again before anything uses it (main.c does
 * at exit), so that a new thread at the same address is not taken for
 * its owner. */
static inline int sl_pool_is_owner(const sl_pool *p) {
  return p->owner_tp == __builtin_thread_pointer();
}

/* Whether the next header freed on p's thread waits in the quarantine
 * (sl_pool_header_quarantine) before it can be reused: set around
 * releases from Lua, cleared by the free that takes it. Such a free
 * leaves sl_buf_free's fast path at its first test. */
static inline void sl_pool_quarantine_next(sl_pool *p, int on) {
  p->quarantine_next = on;
  /* Foreign threads read free_tp as they release (sl_pool_free_tp). */
  __atomic_store_n(&p->free_tp, on ? NULL : p->owner_tp, __ATOMIC_RELAXED);
}

/* What sl_buf_free compares the thread pointer with: owner_tp, or NULL
 * while the quarantine waits (never another thread's). Any thread may ask:
 * the owner writes it around each release from Lua, so it is read as an
 * atomic (a plain load on the targets sluice runs on). */
static inline void *sl_pool_free_tp(const sl_pool *p) {
  return __atomic_load_n(&p->free_tp, __ATOMIC_RELAXED);
}

/* The pool a header belongs to. */
static inline sl_pool *sl_pool_of(const void *hdr) {
  return *(sl_pool *const *)((uintptr_t)hdr & ~(SL_HDR_REGION_SPAN - 1));
}

#define SL_SC_NONE 0xffffu   /* the class of huge and unpooled blocks */

void *sl_pool_alloc_slow(sl_pool *p, size_t size, size_t *usable, unsigned *sclass);
void sl_pool_free_slow(sl_pool *p, void *mem, size_t usable, unsigned sclass);
void *sl_pool_header_get_slow(sl_pool *p);
/* A header for a view or a derived buffer: the recycler's, the overflow
 * list's, else a parked one before a new slot (sl_pool_header_get takes a
 * new slot first); NULL with ENOMEM. */
void *sl_pool_header_get_view(sl_pool *p);
void sl_pool_trim(sl_pool *p, int everything);

/* One countdown stands for two: allocations until the next count-based trim
 * and until the next leak sample (buf/leak.c). It is set to the nearer of
 * the two; when it reaches zero, sl_pool_countdown_sync brings both up to
 * date, whichever is due runs, and sl_pool_countdown_arm sets it again.
 * Whatever changes trim_countdown or leak_countdown syncs before and arms
 * after. */
static inline void sl_pool_countdown_sync(sl_pool *p) {
  uint32_t done = p->countdown_set - p->countdown;
  p->trim_countdown -= done;
  p->leak_countdown -= done;
  p->countdown_set = p->countdown;
}

static inline void sl_pool_countdown_arm(sl_pool *p) {
  uint32_t n = SL_MIN(p->trim_countdown, p->leak_countdown);
  if (n == 0) n = 1;
  p->countdown = p->countdown_set = n;
}
/* The countdown reached zero on an allocation that made no buffer: a due
 * trim runs; a due leak sample waits for the next buffer. */
void sl_pool_event(sl_pool *p);

/* The link word of a free header (SL_HDR_LINK_OFFSET). */
static inline void **sl_pool_hdr_link(void *hdr) {
  return (void **)(void *)((char *)hdr + SL_HDR_LINK_OFFSET);
}

/* Whether a free header is at hand (recycler or overflow list). */
static inline int sl_pool_header_ready(const sl_pool *p) {
  return p->rec_n != 0 || p->hdr_overflow != NULL;
}

/* A free header, when sl_pool_header_ready(p): the recycler's top, else
 * the overflow list's first. */
static inline void *sl_pool_header_take(sl_pool *p) {
  uint32_t rn = p->rec_n;
  if (__builtin_expect(rn != 0, 1)) {
    p->rec_n = rn - 1;
    return p->recycler[rn - 1];
  }
  void *h = p->hdr_overflow;
  p->hdr_overflow = *sl_pool_hdr_link(h);
  p->hdr_overflow_n--;
  return h;
}

/* A header slot (SL_HDR_SIZE bytes, contents unspecified), or NULL. */
static inline void *sl_pool_header_get(sl_pool *p) {
  if (sl_pool_header_ready(p)) return sl_pool_header_take(p);
  return sl_pool_header_get_slow(p);
}

/* Gives a header back (its generation already set to 0): onto the
 * recycler, or beyond its cap onto the overflow list (counted). */
static inline void sl_pool_header_put(sl_pool *p, void *hdr) {
  uint32_t rn = p->rec_n;
  if (__builtin_expect(rn < p->rec_cap, 1)) {
    p->recycler[rn] = hdr;
    p->rec_n = rn + 1;
    return;
  }
  *sl_pool_hdr_link(hdr) = p->hdr_overflow;
  p->hdr_overflow = hdr;
  p->hdr_overflow_n++;
  p->recycler_overflows++;
}

/* Bin items (see pool_types.h): a parked header, or a bare block with
 * SL_BIN_BARE set. */
static inline void *sl_pool_bare_item(void *mem) { return (void *)((uintptr_t)mem | SL_BIN_BARE); }

/* The block a parked header carries. */
static inline void *sl_pool_parked_block(const void *hdr) {
  return *(void *const *)(const void *)((const char *)hdr + SL_HDR_BLOCK_OFFSET);
}

/* The block of a bin item taken out of its bin; a parked header goes to the
 * recycler. */
static inline void *sl_pool_item_block(sl_pool *p, void *item) {
  uintptr_t v = (uintptr_t)item;
  if (v & SL_BIN_BARE) return (void *)(v - SL_BIN_BARE);
  void *mem = sl_pool_parked_block(item);
  sl_pool_header_put(p, item);
  return mem;
}

/* Flushes the older half of a full bin to the arena and parks hdr (a dead
 * root header whose block is of class sclass) on it. */
void sl_pool_park_slow(sl_pool *p, void *hdr, unsigned sclass);

/* Owned subpages (see pool_types.h). Their free lists hold bare blocks
 * (tagged SL_BIN_BARE, which is chunk.h's SL_SUB_BARE) and parked headers
 * (linked through SL_HDR_LINK_OFFSET; nfree - nbare of them). */
_Static_assert(SL_BIN_BARE == SL_SUB_BARE, "bins and owned subpages tag bare blocks alike");

/* What a bin's own points at when none of its owned subpages has room:
 * no subpage, but its free list reads as a bare item (SL_SUB_BARE alone),
 * so that the fast path tests one bit for "a parked header to take"
 * (sl_buf_alloc). Never written (read-only memory). */
extern const sl_subpage sl_pool_own_none;

/* The first owned subpage with room of bin's class, or NULL. */
static inline sl_subpage *sl_pool_own_first(const sl_cache_bin *bin) {
  return bin->own == &sl_pool_own_none ? NULL : bin->own;
}

/* Makes s (NULL: none) the first owned subpage with room of bin's class. */
static inline void sl_pool_own_set_first(sl_cache_bin *bin, sl_subpage *s) {
  bin->own = s != NULL ? s : (sl_subpage *)(uintptr_t)&sl_pool_own_none;
}

/* An element was taken off the free list of s, the first owned subpage
 * of bin's class: one free element less; a subpage left full leaves the
 * list. Counts the allocation (own_allocs). */
static inline void sl_pool_own_took(sl_cache_bin *bin, sl_subpage *s) {
  if (__builtin_expect(--s->nfree == 0, 0)) {
    sl_pool_own_set_first(bin, s->next);
    if (s->next != NULL) s->next->prev = NULL;
    s->next = NULL;
  }
  bin->own_allocs++;
}

/* A parked header of a small class keeps its block's subpage in its link
 * word (sl_buf's views, which a root without views uses so: the release
 * reads it instead of looking the subpage up), except while it is linked
 * on that subpage's free list. */
static inline sl_subpage *sl_pool_parked_subpage(const void *hdr) {
  return *(sl_subpage *const *)(const void *)((const char *)hdr + SL_HDR_LINK_OFFSET);
}

/* Takes parked header hdr, the first item of owned subpage s, off its
 * list; its link (sl_buf's views) is s again (sl_pool_parked_subpage).
 * The caller then calls sl_pool_own_took. */
static inline void sl_pool_own_pop_parked(sl_subpage *s, void *hdr) {
  void **link = sl_pool_hdr_link(hdr);
  s->free = *link;
  *link = s;
  sl_subpage_debug_take(s, sl_pool_parked_block(hdr));
}

/* Puts hdr, a parked header whose block is an element of s (owned by the
 * pool), on s's free list. Returns s's nfree as it was before (see
 * sl_pool_own_moves). The caller counts the free (bin->own_frees). */
static inline uint32_t sl_pool_own_push_parked(sl_subpage *s, void *hdr) {
  sl_subpage_debug_give(s, sl_pool_parked_block(hdr));
  *sl_pool_hdr_link(hdr) = s->free;
  s->free = hdr;
  return s->nfree++;
}

/* Subpage s of p had nfree free elements before one more was freed: it
 * was full (back on its class's list), or it is empty now (back to the
 * arena unless it is its class's only one with room). */
void sl_pool_own_moved(sl_pool *p, sl_subpage *s, uint32_t nfree);

/* The subpage of mem, a block of small class sclass. */
static inline sl_subpage *sl_pool_subpage_of(const sl_pool *p, const void *mem, unsigned sclass) {
  uintptr_t c = (uintptr_t)mem & p->chunk_mask;
  sl_subpage *s = ((sl_chunk *)c)->sub[((uintptr_t)mem - c) >> p->page_shift];
  SL_ASSERT_DEBUG(s != NULL && s->sclass == sclass, "small block freed with the wrong class");
  (void)sclass;
  return s;
}

/* Whether p owns s (else it is the arena's or another pool's). */
static inline int sl_pool_owns(const sl_pool *p, const sl_subpage *s) {
  return (const void *)sl_subpage_owner(s) == (const void *)p;   /* sub_owner is first */
}

/* Whether a subpage that had nfree free elements before one more was
 * freed changes lists (see sl_pool_own_moved). */
static inline int sl_pool_own_moves(const sl_subpage *s, uint32_t nfree) {
  return nfree - 1 >= s->nmove;   /* nfree == 0 || nfree + 1 == nelems, in one compare */
}

/* Gives mem, a block of small class sclass whose bin owns subpages, back
 * to its subpage when p owns it: 1, the free counted (own_frees). Else 0,
 * and nothing is done (the caller gives it to the arena). Aborts on an
 * element freed twice (debug builds). */
static inline int sl_pool_own_give(sl_pool *p, sl_cache_bin *bin, void *mem, unsigned sclass) {
  sl_subpage *s = sl_pool_subpage_of(p, mem, sclass);
  if (__builtin_expect(!sl_pool_owns(p, s), 0)) return 0;
  uint32_t nfree = sl_subpage_push(s, mem);
  bin->own_frees++;
  if (__builtin_expect(sl_pool_own_moves(s, nfree), 0)) sl_pool_own_moved(p, s, nfree);
  return 1;
}

/* sl_pool_alloc_cls without counting towards the trim (the buffer code
 * counts its allocations itself, with the buffer). */
static inline void *sl_pool_alloc_block(sl_pool *p, size_t size, size_t *usable,
                                        unsigned *sclass) {
  if (size <= p->max_cached_size) {
    unsigned idx = sl_sc_index(size);
    sl_cache_bin *bin = &p->bins[idx];
    uint32_t n = bin->n;
    if (n > 0) {
      void *mem = sl_pool_item_block(p, bin->items[n - 1]);
      bin->n = n - 1;
      bin->used++;   /* the hit and the allocation (sl_cache_bin) */
      *usable = sl_sc_size(idx);
      *sclass = idx;
      SL_UNPOISON(mem, *usable);
      return mem;
    }
  }
  return sl_pool_alloc_slow(p, size, usable, sclass);
}

/* Returns a block of at least size bytes, its usable size and its class
 * (SL_SC_NONE for huge and unpooled blocks), or NULL. The cache hit is a
 * stack pop (and, for a parked header, a push on the recycler). */
static inline void *sl_pool_alloc_cls(sl_pool *p, size_t size, size_t *usable,
                                      unsigned *sclass) {
  void *mem = sl_pool_alloc_block(p, size, usable, sclass);
  if (mem != NULL && --p->countdown == 0) sl_pool_event(p);
  return mem;
}

/* Gives back a block with the usable size and class sl_pool_alloc_cls
 * reported. The cache hit is a stack push. */
static inline void sl_pool_free_cls(sl_pool *p, void *mem, size_t usable, unsigned sclass) {
  if (sclass < SL_SC_MAX_CLASSES) {
    sl_cache_bin *bin = &p->bins[sclass];
    if (bin->n < bin->cap) {
      SL_POISON(mem, usable);
      bin->items[bin->n++] = sl_pool_bare_item(mem);
      bin->frees_rest++;
      return;
    }
  }
  sl_pool_free_slow(p, mem, usable, sclass);
}

/* The same without the class (derived from usable). */
static inline void *sl_pool_alloc(sl_pool *p, size_t size, size_t *usable) {
  unsigned sclass;
  return sl_pool_alloc_cls(p, size, usable, &sclass);
}
unsigned sl_pool_class_of(const sl_pool *p, size_t usable);
static inline void sl_pool_free(sl_pool *p, void *mem, size_t usable) {
  sl_pool_free_cls(p, mem, usable, sl_pool_class_of(p, usable));
}

/* Whether foreign threads have queued buffers for the owner. */
static inline int sl_pool_has_returns(sl_pool *p) {
  sl_retq_cell *c = &p->retq.cells[p->retq.head & p->retq.mask];
  return atomic_load_explicit(&c->seq, memory_order_acquire) == p->retq.head + 1 ||
         atomic_load_explicit(&p->bufs_remote, memory_order_relaxed) != NULL;
}

/* Gives a header back through the quarantine: it becomes reusable only
 * after 64 more have gone through, so errors about a handle to it can still
 * say who released it. */
void sl_pool_header_quarantine(sl_pool *p, void *hdr);

/* Generations are odd, so never 0, without a test: odd from the start,
 * and + 2 keeps them odd. */
static inline uint32_t sl_pool_next_gen(sl_pool *p) {
  uint32_t g = p->gen_next;
  SL_ASSERT_DEBUG(g & 1, "generations are odd");
  p->gen_next = g + 2;
  return g;
}

/* Writes a new buffer's refcount (1) and its generation as the 8 bytes
 * at dst (sl_buf's refcnt and gen, adjacent: buf.c checks), one store. */
static inline void sl_pool_take_refcnt_gen(sl_pool *p, void *dst) {
  uint64_t w = p->gen_word;
  SL_ASSERT_DEBUG(((w >> 32) & 1) && (uint32_t)w == 1, "generations are odd");
  memcpy(dst, &w, sizeof(w));
  p->gen_next += 2;   /* the generation half only: one add to memory */
}

/* Foreign threads: queue an item for the owner (SL_OK or SL_AGAIN when
 * full), or free a block straight into the arena, or return a header. */
int sl_pool_retq_push(sl_pool *p, void *item);
void sl_pool_free_foreign(sl_pool *p, void *mem, size_t usable);
void sl_pool_header_put_foreign(sl_pool *p, void *hdr);

/* The owner: the next queued item, or NULL. */
void *sl_pool_retq_pop(sl_pool *p);

/* Foreign threads: hands a whole item to the owner through a lock-free
 * stack linked through the 8 bytes at link_offset inside the item (no
 * memory of its own, so nothing piles up beyond the items themselves). The
 * owner takes them all with sl_pool_remote_take. */
void sl_pool_remote_push(sl_pool *p, void *item, size_t link_offset);
void *sl_pool_remote_take(sl_pool *p);

typedef struct sl_pool_trim_report {
  uint64_t blocks;        /* cached blocks given back to the arena */
  unsigned chunks;        /* chunks unmapped */
  int headers;            /* 1 when the header region went back to the OS */
} sl_pool_trim_report;

/* The owner, from its timer (now_ms from sl_alloc_now_ms): after
 * trim_idle_ms without allocations, gives back the caches, empty chunks and
 * the header region when no header is live. Returns 1 and fills r when it
 * gave anything back, else 0. */
int sl_pool_tick(sl_pool *p, int64_t now_ms, sl_pool_trim_report *r);

/* Test aid: make the next n allocations fail (0 turns it off). */
void sl_pool_fail_next(sl_pool *p, unsigned n);

void sl_pool_get_stats(const sl_pool *p, sl_pool_stats *out);

/* Adds p's share of its arena's normal class counts (the fast paths' runs
 * not reported yet: sl_cache_bin) to cls; returns the next pool using the
 * arena. The arena's lock held (sl_arena_get_stats). */
sl_pool *sl_pool_arena_share(const sl_pool *p, sl_class_stats *cls);

/* Blocks of class k this pool handed out so far, and got back (each is
 * counted in one of several places: see sl_cache_bin). */
static inline uint64_t sl_pool_class_allocs(const sl_pool *p, unsigned k) {
  const sl_cache_bin *bin = &p->bins[k];
  return bin->allocs_rest + bin->used + bin->own_allocs;
}

static inline uint64_t sl_pool_class_frees(const sl_pool *p, unsigned k) {
  return p->bins[k].frees_rest + p->bins[k].own_frees;
}

/* Blocks of class k that other threads released straight into the arena
 * (the return queue full): out of the pool's hands, not in its frees.
 * Blocks of class k live now are allocs - frees - these. Any thread. */
static inline uint64_t sl_pool_class_frees_direct(const sl_pool *p, unsigned k) {
  return atomic_load_explicit(&((sl_pool *)(uintptr_t)p)->remote_direct_cls[k],
                              memory_order_relaxed);
}

#endif
