/*
 * A chunk: chunk_size bytes mapped from the OS, aligned to chunk_size, split
 * into pages. Its metadata lives in its own first pages, so the chunk of any
 * block is found by masking the block's address.
 *
 * Pages are handed out in runs. Free runs sit on one list per exact length
 * (a bitmap says which lists may have runs), so an allocation pops a run of
 * exactly the length it needs, or else splits the shortest longer one, and
 * a free pushes the run on its length's list: both O(1). Coalescing is
 * deferred: neighbouring free runs are merged, in one sweep over the
 * chunk, only when an allocation finds no run long enough although the
 * chunk has the pages, and at once when the chunk's last used page is
 * freed (the chunk is then one free run again). Emptiness is the used-page
 * count, never the shape of the free lists, so an empty chunk is always
 * seen as empty (and released after trim_idle_ms).
 *
 * Across the chunks of an arena, an index (sl_chunk_avail) lists for each
 * length 1..63 the chunks that have a free run of exactly that length, and
 * for 64 those with a run of 64 pages or more, with a bitmap of the
 * lengths that have any: the arena finds a chunk with an exact run, or the
 * shortest longer run, without walking chunks. A chunk joins a length's
 * list when its list of that length gets a run (at the head when it is at
 * least as full as the chunk there, else at the tail, so that fuller
 * chunks tend to serve first); it leaves lazily, when a search finds its
 * list empty again (a run of that length is often freed again before).
 *
 * A run serves either one normal block or a subpage: equal elements of one
 * small size class tracked by a bitmap. Not thread-safe: the owning
 * arena's lock covers every call.
 */
#ifndef SL_CHUNK_H
#define SL_CHUNK_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "alloc/poison.h"
#include "util/common.h"

struct sl_arena;
typedef struct sl_chunk sl_chunk;
typedef struct sl_subpage sl_subpage;

#define SL_AVAIL_LENS 64   /* lengths indexed exactly below this; this one: or more */

/* Per arena: head[k], a circular list of the chunks with a free run of k
 * pages (k = 64: 64 or more); bit k-1 of mask: head[k] is not NULL. */
typedef struct sl_chunk_avail {
  sl_chunk *head[SL_AVAIL_LENS + 1];
  uint64_t mask;
} sl_chunk_avail;

/* A worker that owns subpages (alloc/pool.c): it takes and frees their
 * elements without the arena's lock. Another thread that frees an element
 * of one of them (under the lock) pushes it here, linked through its first
 * 8 bytes; the owner takes these back before it takes another subpage and
 * before it gives its subpages back (under the lock, so that no push can
 * come in between). */
typedef struct sl_sub_owner {
  _Atomic(void *) remote;
} sl_sub_owner;

/* A subpage is on exactly one side:
 *   arena's   owner NULL; on the arena's list of its class while it has a
 *             free element (prev, next); the arena's lock covers it;
 *   owned     owner set; off the arena's lists; on its owner's list of all
 *             it owns (own_prev, own_next) and, while it has a free
 *             element, on the owner's list for its class (prev, next).
 *             Only the owner's thread touches it. Its free elements are
 *             on its free list (LIFO), not in the bitmap: the bitmap is
 *             rebuilt when the arena takes the subpage back. Debug builds
 *             keep the bitmap up to date as well, and abort on an element
 *             freed twice (release builds only check that in the arena's
 *             subpages).
 * The owner is read with sl_subpage_owner (relaxed: a plain load).
 *
 * An owned subpage's free list holds items, one per free element:
 *   bare      the element itself, tagged with SL_SUB_BARE, linked through
 *             its first 8 bytes;
 *   carried   something of the owner's that carries the element (a pool's
 *             parked header, alloc/pool.h), untagged; the owner links and
 *             reads it.
 * nbare counts the bare ones (nfree - nbare are carried), so that the
 * owner's pushes and pops of carried items count nothing but nfree.
 * sl_subpage_to_list makes bare items only, and sl_subpage_to_bits takes
 * bare items only: the owner turns its carried items into bare ones
 * before the subpage goes back to the arena. */
struct sl_subpage {
  sl_chunk *chunk;
  sl_subpage *prev, *next;     /* the list of subpages of its class with free elements */
  uint8_t *base;               /* first element */
  uint32_t first_page, npages; /* the run */
  uint32_t elem_size, nelems, nfree;
  uint32_t sclass;
  uint32_t nwords;             /* bitmap words */
  uint32_t hint;               /* a word that may have a free bit */
  uint64_t recip;              /* 2^40 / elem_size + 1: offset -> index by a multiply */
  _Atomic(sl_sub_owner *) owner;     /* NULL: the arena's. Set and cleared under the
                                        arena's lock; its owner reads it without */
  void *free;                  /* owned: its free items (see above) */
  uint32_t nbare;              /* owned: bare items among them */
  uint32_t nmove;              /* nelems - 2 (wrapping): a free with nfree - 1 at or
                                  above it changes the subpage's lists (it was full,
                                  or it is empty now) */
  sl_subpage *own_prev, *own_next;   /* owned: its owner's list of all it owns */
  uint64_t bits[];             /* 1 = element in use */
};

/* What a chunk keeps per page, at the first page of each run (zero
 * elsewhere), in one map right after its struct (sl_chunk_pages), so that
 * a run's fields share one address, found from the chunk's. */
typedef struct sl_chunk_page {
  uint32_t run_len;            /* an allocated run: its length (0 for a subpage
                                  run: see sub[]) */
  uint32_t free_head;          /* a free run: its length, else 0 */
  uint32_t free_next;          /* a free run: the next run of its list */
} sl_chunk_page;

struct sl_chunk {
  struct sl_arena *arena;
  sl_chunk_avail *avail;       /* the arena's index (NULL: a chunk on its own) */
  sl_chunk *prev, *next;       /* the arena's usage list */
  uint8_t *mem;                /* == (uint8_t *)this */
  uint32_t npages;             /* pages in the chunk, metadata included */
  uint32_t meta_pages;         /* pages holding this struct and its maps */
  uint32_t free_pages;         /* pages not in any allocated run */
  uint32_t usable;             /* npages - meta_pages */
  uint32_t list_lo, list_hi;   /* the usage list is kept while free_pages is in
                                  [list_lo, list_hi] (set by the arena) */
  uint32_t max_run;            /* no listed free run is longer (an upper bound,
                                  made exact when a search or sweep fails) */
  uint32_t unmerged;           /* frees since the last sweep (0: no two free runs
                                  are neighbours) */
  int list;                    /* index of the usage list it is on */
  int64_t empty_since_ms;      /* when it last became empty */
  uint32_t page_shift;
  uint32_t sweeps;             /* coalescing sweeps so far */
  uint32_t *bucket_hi;         /* per length SL_AVAIL_LENS..npages: first free run, or
                                  NONE (bucket_lo below for the shorter ones) */
  uint64_t *nonempty;          /* bit per length: its list may have a run (clear:
                                  it has none; a length below SL_AVAIL_LENS whose
                                  list the arena's fast path empties keeps its bit
                                  until a search finds the list empty) */
  sl_subpage **sub;            /* per page of a subpage run: the subpage */
  uint64_t av_in;              /* bit k-1: on avail->head[k]'s list */
  sl_chunk *av_next[SL_AVAIL_LENS + 1], *av_prev[SL_AVAIL_LENS + 1];
  uint32_t bucket_lo[SL_AVAIL_LENS];   /* per length below SL_AVAIL_LENS: first free
                                          run, or NONE (in the struct: the arena's fast
                                          paths find it from the chunk's address) */
};

/* The first free run of length len's list (sl_chunk's bucket_lo, bucket_hi). */
static inline uint32_t *sl_chunk_bucket(sl_chunk *c, uint32_t len) {
  return len < SL_AVAIL_LENS ? &c->bucket_lo[len] : &c->bucket_hi[len - SL_AVAIL_LENS];
}

/* c's map of its pages (sl_chunk_page), from c's address alone: it
 * follows the struct (no load on the arena's normal-size paths). */
static inline sl_chunk_page *sl_chunk_pages(sl_chunk *c) {
  return (sl_chunk_page *)(void *)(c + 1);
}

/* Pages a chunk of this geometry spends on its own metadata. */
uint32_t sl_chunk_meta_pages(size_t chunk_size, size_t page_size);

/* Maps a new chunk, indexed in avail (may be NULL). NULL when the OS
 * refuses. */
sl_chunk *sl_chunk_new(struct sl_arena *arena, sl_chunk_avail *avail, size_t chunk_size,
                       size_t page_size);
/* Takes c out of its index and unmaps it. */
void sl_chunk_delete(sl_chunk *c, size_t chunk_size);

/* A chunk of avail with a free run of at least n pages, preferring an
 * exact one, then the shortest longer one; NULL when the index has none
 * (coalescing might still make one). */
sl_chunk *sl_chunk_avail_find(sl_chunk_avail *avail, uint32_t n);

#define SL_CHUNK_NONE 0xffffffffu

/* Puts c on its index's list for key k (a length below SL_AVAIL_LENS, or
 * SL_AVAIL_LENS for longer runs); nothing when it is on it already or has
 * no index. */
void sl_chunk_avail_join(sl_chunk *c, uint32_t k);

/* Puts c on its index av's list for key k, c not being on it: at the
 * head when it is at least as full as the chunk there, else at the tail
 * (sl_chunk_avail_join checks first; the arena's fast path knows). */
static inline void sl_chunk_avail_link(sl_chunk *c, sl_chunk_avail *av, uint32_t k) {
  sl_chunk *h = av->head[k];
  c->av_in |= 1ull << (k - 1);
  if (h == NULL) {
    c->av_next[k] = c->av_prev[k] = c;
    av->head[k] = c;
    av->mask |= 1ull << (k - 1);
    return;
  }
  sl_chunk *t = h->av_prev[k];   /* insert between the tail and the head */
  c->av_next[k] = h;
  c->av_prev[k] = t;
  t->av_next[k] = c;
  h->av_prev[k] = c;
  if (c->free_pages <= h->free_pages) av->head[k] = c;   /* fuller: first */
}

/* Puts the free run [start, start + len) on its length's list, c being on
 * the index for that length already (or the list having runs). */
static inline void sl_chunk_free_push_listed(sl_chunk *c, uint32_t start, uint32_t len) {
  uint32_t *bucket = sl_chunk_bucket(c, len);
  uint32_t first = *bucket;
  sl_chunk_pages(c)[start].free_head = len;
  sl_chunk_pages(c)[start].free_next = first;
  *bucket = start;
  if (first == SL_CHUNK_NONE) c->nonempty[len >> 6] |= 1ull << (len & 63);   /* else set */
  if (len > c->max_run) c->max_run = len;
}

/* Puts the free run [start, start + len) on its length's list (and c on
 * the index for it). */
static inline void sl_chunk_free_push(sl_chunk *c, uint32_t start, uint32_t len) {
  uint32_t *bucket = sl_chunk_bucket(c, len);
  uint32_t first = *bucket;
  sl_chunk_pages(c)[start].free_head = len;
  sl_chunk_pages(c)[start].free_next = first;
  *bucket = start;
  c->nonempty[len >> 6] |= 1ull << (len & 63);
  if (len > c->max_run) c->max_run = len;
  if (first == SL_CHUNK_NONE) {
    uint32_t k = len < SL_AVAIL_LENS ? len : SL_AVAIL_LENS;
    if (!(c->av_in & (1ull << (k - 1)))) sl_chunk_avail_join(c, k);   /* not on it already */
  }
}

/* Takes c off its index's list for key k (nothing when it is not on it). */
void sl_chunk_avail_leave(sl_chunk *c, uint32_t k);

/* Takes the first run off the (non-empty) list of length len. */
static inline uint32_t sl_chunk_free_pop(sl_chunk *c, uint32_t len) {
  uint32_t *bucket = sl_chunk_bucket(c, len);
  uint32_t start = *bucket;
  uint32_t next = sl_chunk_pages(c)[start].free_next;
  *bucket = next;
  sl_chunk_pages(c)[start].free_head = 0;
  if (next == SL_CHUNK_NONE) c->nonempty[len >> 6] &= ~(1ull << (len & 63));
  return start;
}

/* Allocates the first run of the (non-empty) list of length n, whole. */
static inline uint32_t sl_chunk_run_take_exact(sl_chunk *c, uint32_t n) {
  uint32_t start = sl_chunk_free_pop(c, n);
  sl_chunk_pages(c)[start].run_len = n;
  c->free_pages -= n;
  return start;
}

/* Makes c one free run of all its usable pages (it has none in use). */
void sl_chunk_reset(sl_chunk *c);

/* sl_chunk_run_free, inline for the arena's normal-size path. Aborts when
 * page does not start an allocated run of n pages (page lies in the chunk,
 * as it comes from a block's address; a meta page's run_len is 0). */
static inline void sl_chunk_run_free_inline(sl_chunk *c, uint32_t page, uint32_t n) {
  SL_ASSERT(sl_chunk_pages(c)[page].run_len == n && n != 0, "run freed that is not allocated");
  sl_chunk_pages(c)[page].run_len = 0;
  c->free_pages += n;
  if (__builtin_expect(c->free_pages == c->usable, 0)) {
    sl_chunk_reset(c);   /* the last used run: one free run again */
    return;
  }
  sl_chunk_free_push(c, page, n);
  c->unmerged++;
}

/* Takes a run of n pages off the lists without merging anything: a free
 * run of length n, else the shortest longer one, split. -1 when no listed
 * run is long enough. O(1) for the lengths of normal blocks. */
int sl_chunk_run_take(sl_chunk *c, uint32_t n);
/* Allocates a run of n pages: a free run of length n, else the shortest
 * longer one, split; when none is long enough but the chunk has n free
 * pages and unmerged frees, merges neighbouring free runs and tries once
 * more. Returns the run's first page index or -1. */
int sl_chunk_run_alloc(sl_chunk *c, uint32_t n);
/* Frees the run of n pages that starts at page: onto its length's list
 * (merging is deferred), or, when it was the chunk's last used run, the
 * whole chunk becomes one free run. */
void sl_chunk_run_free(sl_chunk *c, uint32_t page, uint32_t n);
/* Merges every pair of neighbouring free runs (run_alloc does this when it
 * must). */
void sl_chunk_coalesce(sl_chunk *c);

/* Turns a run into a subpage of elem_size elements. NULL on ENOMEM (the run
 * is left allocated; the caller frees it). */
sl_subpage *sl_subpage_new(sl_chunk *c, uint32_t first_page, uint32_t npages,
                           uint32_t elem_size, uint32_t sclass);
void *sl_subpage_alloc(sl_subpage *s);
static inline sl_sub_owner *sl_subpage_owner(const sl_subpage *s) {
  return atomic_load_explicit(&((sl_subpage *)s)->owner, memory_order_relaxed);
}

static inline void sl_subpage_set_owner(sl_subpage *s, sl_sub_owner *o) {
  atomic_store_explicit(&s->owner, o, memory_order_relaxed);
}

/* An arena's subpage becomes owned: its free elements go on its free
 * list. */
void sl_subpage_to_list(sl_subpage *s);
/* An owned subpage goes back to the arena: its bitmap is rebuilt from the
 * free list, which empties; an empty one's bitmap is simply cleared (its
 * list may then still hold carried items, their carriers already taken). */
void sl_subpage_to_bits(sl_subpage *s);

/* The element index of p in s (exact for runs below 16 MiB and elements
 * below 32 KiB, which subpages are; checked in sl_subpage_free). */
static inline uint32_t sl_subpage_index(const sl_subpage *s, const void *p) {
  uint64_t off = (uint64_t)((const uint8_t *)p - s->base);
  return (uint32_t)((off * s->recip) >> 40);
}

/* Frees element p. Returns 1 when the subpage became empty. Aborts on a
 * pointer that is not an element, or one that is free already. */
static inline int sl_subpage_free(sl_subpage *s, void *p) {
  uint32_t i = sl_subpage_index(s, p);
  uint64_t bit = 1ull << (i & 63);
  SL_ASSERT(i < s->nelems && s->base + (size_t)i * s->elem_size == (uint8_t *)p,
            "pointer is not an element of its subpage");
  SL_ASSERT(s->bits[i >> 6] & bit, "subpage element freed twice");
  s->bits[i >> 6] &= ~bit;
  s->hint = i >> 6;
  return ++s->nfree == s->nelems;
}

#define SL_SUB_BARE ((uintptr_t)1)   /* a free-list item with this bit is a bare element */

/* Debug builds: element p of owned subpage s leaves its free list (the
 * bitmap marks it used; aborts when it was not free). */
static inline void sl_subpage_debug_take(sl_subpage *s, const void *p) {
#ifndef NDEBUG
  uint32_t i = sl_subpage_index(s, p);
  SL_ASSERT(!(s->bits[i >> 6] & (1ull << (i & 63))),
            "owned subpage's free list has an element in use");
  s->bits[i >> 6] |= 1ull << (i & 63);
#else
  (void)s;
  (void)p;
#endif
}

/* Debug builds: element p joins the free list of owned subpage s (aborts
 * when p is not an element of s, or is free already). */
static inline void sl_subpage_debug_give(sl_subpage *s, const void *p) {
#ifndef NDEBUG
  uint32_t i = sl_subpage_index(s, p);
  SL_ASSERT(i < s->nelems && s->base + (size_t)i * s->elem_size == (const uint8_t *)p,
            "pointer is not an element of its subpage");
  SL_ASSERT(s->bits[i >> 6] & (1ull << (i & 63)), "subpage element freed twice");
  s->bits[i >> 6] &= ~(1ull << (i & 63));
#else
  (void)s;
  (void)p;
#endif
}

/* The element of a bare item (the first of an owned subpage's free list),
 * taken off the list. The caller then counts it out of nfree. */
static inline void *sl_subpage_pop_bare(sl_subpage *s, uintptr_t item) {
  void *p = (void *)(item - SL_SUB_BARE);
  s->free = *(void **)p;
  s->nbare--;
  sl_subpage_debug_take(s, p);
  return p;
}

/* Gives element p back to its owned subpage s as a bare item. Whether p
 * is an element of s, and not free already, is checked in debug builds
 * only (the owner's blocks come from its own headers). Returns nfree as
 * it was before. */
static inline uint32_t sl_subpage_push(sl_subpage *s, void *p) {
  sl_subpage_debug_give(s, p);
  SL_UNPOISON(p, sizeof(void *));
  *(void **)p = s->free;
  s->free = (void *)((uintptr_t)p | SL_SUB_BARE);
  s->nbare++;
  return s->nfree++;
}

static inline sl_chunk *sl_chunk_of(const void *p, size_t chunk_size) {
  return (sl_chunk *)(void *)((uintptr_t)p & ~((uintptr_t)chunk_size - 1));
}

static inline uint32_t sl_chunk_usable_pages(const sl_chunk *c) { return c->usable; }

#endif
