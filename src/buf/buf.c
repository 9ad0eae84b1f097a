#include "buf/buf.h"

#include <errno.h>
#include <sched.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "alloc/pool.h"
#include "buf/leak.h"
#include "util/common.h"

_Static_assert(sizeof(sl_buf) == SL_HDR_SIZE, "sl_buf must fill one header slot");
_Static_assert(offsetof(sl_buf, views) == SL_HDR_LINK_OFFSET, "free headers link through views");
_Static_assert(offsetof(sl_buf, gen) == offsetof(sl_buf, refcnt) + 4, "refcnt, gen adjacent");
_Static_assert(offsetof(sl_buf, data) == SL_HDR_BLOCK_OFFSET, "a parked header keeps its block");
_Static_assert(offsetof(sl_buf, max_cap) == offsetof(sl_buf, cap) + 4,
               "a dead header keeps who released it in cap and max_cap");

/* A dead header (of a root or a derived buffer) keeps who released it in
 * its cap and max_cap, which it does not use: its data may stay (a parked
 * header's block). */
static inline void sl_buf_set_released_by(sl_buf *b, const char *site) {
  memcpy(&b->cap, &site, sizeof(site));
}

_Static_assert(offsetof(sl_buf, refcnt) == offsetof(sl_buf, cap) + 8,
               "cap, max_cap, refcnt, gen adjacent");

/* Makes b, whose last reference went, a dead header: it keeps the
 * generation it died with (in rd) and who released it (in cap and
 * max_cap: sl_buf_set_released_by), and its refcount and generation are 0.
 * The last three in one 16-byte store where the target has one. */
static inline void sl_buf_set_dead(sl_pool *pool, sl_buf *b) {
  b->rd = b->gen;
#ifdef __SSE2__
  /* The site in the low 8 bytes, zeros above: refcnt and gen. */
  __m128i v = _mm_loadl_epi64((const __m128i *)(const void *)&pool->release_site);
  _mm_storeu_si128((__m128i *)(void *)&b->cap, v);
#else
  memset(&b->refcnt, 0, sizeof(b->refcnt) + sizeof(b->gen));
  sl_buf_set_released_by(b, pool->release_site);
#endif
}


_Static_assert(offsetof(sl_buf, block_size) == 56 && offsetof(sl_buf, sclass) == 60 &&
                   offsetof(sl_buf, flags) == 62 && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "a header's last 8 bytes are block_size, sclass, flags");

/* The last 8 bytes of a root header over a block: block_size, sclass and
 * flags (0, or SL_BUF_UNBINNED for a block no bin takes: huge, unpooled, a
 * normal class above max_cached, whose bin's tail says so). */
static inline uint64_t sl_buf_tail(const sl_pool *pool, uint32_t usable, unsigned sclass) {
  if (sclass < SL_SC_MAX_CLASSES) return pool->bins[sclass].tail;   /* usable: its size */
  return usable | (uint64_t)sclass << 32 | (uint64_t)SL_BUF_UNBINNED << 48;
}

/* The fields every allocation sets but data: b, over a block of usable
 * bytes, is live, empty, refcount 1, with a new generation. A parked
 * header needs only these (it is a root over its block already). */
static inline void sl_buf_revive(sl_pool *pool, sl_buf *b, uint32_t usable, size_t max_cap) {
  uint32_t max = (uint32_t)max_cap;   /* at most SL_BUF_MAX_CAPACITY (checked) */
  b->rd = 0;
  b->wr = 0;
  b->cap = usable > max ? max : usable;
  b->max_cap = max;
  sl_pool_take_refcnt_gen(pool, &b->refcnt);   /* refcount 1, a new generation */
}

/* The indexes and capacities of a buffer of capacity and max_cap cap: 0,
 * 0, cap, cap, in one register where the target has a 16-byte store (so
 * that a caller can hold them there rather than cap). */
#ifdef __SSE2__
typedef __m128i sl_buf_caps;
static inline sl_buf_caps sl_buf_caps_of(uint32_t cap) {
  return _mm_shuffle_epi32(_mm_cvtsi32_si128((int)cap), 0x05);   /* 0, 0, cap, cap */
}
static inline uint32_t sl_buf_caps_cap(sl_buf_caps v) {
  return (uint32_t)_mm_cvtsi128_si32(_mm_srli_si128(v, 8));
}
#else
typedef uint32_t sl_buf_caps;
static inline sl_buf_caps sl_buf_caps_of(uint32_t cap) { return cap; }
static inline uint32_t sl_buf_caps_cap(sl_buf_caps v) { return v; }
#endif

/* sl_buf_revive for a capacity and max_cap both cap (at most the block's
 * usable size), given as sl_buf_caps_of(cap): the indexes and capacities
 * as one 16-byte store where the target has one. */
static inline void sl_buf_revive_caps(sl_pool *pool, sl_buf *b, sl_buf_caps v) {
#ifdef __SSE2__
  _Static_assert(offsetof(sl_buf, wr) == offsetof(sl_buf, rd) + 4 &&
                     offsetof(sl_buf, cap) == offsetof(sl_buf, rd) + 8 &&
                     offsetof(sl_buf, max_cap) == offsetof(sl_buf, rd) + 12,
                 "rd, wr, cap, max_cap adjacent");
  _mm_storeu_si128((__m128i *)(void *)&b->rd, v);
#else
  b->rd = 0;
  b->wr = 0;
  b->cap = v;
  b->max_cap = v;
#endif
  sl_pool_take_refcnt_gen(pool, &b->refcnt);   /* refcount 1, a new generation */
}

/* The same from cap. */
static inline void sl_buf_revive_exact(sl_pool *pool, sl_buf *b, uint32_t cap) {
  sl_buf_revive_caps(pool, b, sl_buf_caps_of(cap));
}

/* The same over data. */
static inline void sl_buf_init_live(sl_pool *pool, sl_buf *b, uint8_t *data, uint32_t usable,
                                    size_t max_cap) {
  b->data = data;
  sl_buf_revive(pool, b, usable, max_cap);
}

/* What a root over a block of a class without subpages (normal, huge,
 * unpooled) keeps in views while it has none: a subpage no pool owns. */
#define SL_BUF_NO_SUBPAGE ((sl_buf *)(uintptr_t)&sl_pool_own_none)

/* What a root keeps in views while it has none (SL_BUF_HAS_VIEWS clear):
 * the subpage of its block, data, for a small class, else
 * SL_BUF_NO_SUBPAGE; so that a release into a full bin finds the subpage
 * to park on, or that it has none the pool owns, in one load. */
static inline sl_buf *sl_buf_home(const sl_pool *pool, const uint8_t *data, unsigned sclass) {
  if (sclass >= pool->nsmall) return SL_BUF_NO_SUBPAGE;   /* huge, unpooled: SL_SC_NONE */
  return (sl_buf *)(void *)sl_pool_subpage_of(pool, data, sclass);
}

/* The subpage a root without views keeps (sl_buf_home), checked against
 * its block in debug builds. */
static inline sl_subpage *sl_buf_subpage(const sl_pool *pool, const sl_buf *r) {
  SL_ASSERT_DEBUG(!(r->flags & SL_BUF_HAS_VIEWS) &&
                      r->views == sl_buf_home(pool, r->data, r->sclass),
                  "a root without views keeps its block's subpage");
  (void)pool;
  return (sl_subpage *)(void *)r->views;
}

/* Makes b a live root over data: refcount 1, a new generation; tail is
 * its block_size, sclass and flags (sl_buf_tail, or a bin's copy), home
 * what it keeps in views (sl_buf_home). */
static inline void sl_buf_init_root(sl_pool *pool, sl_buf *b, uint8_t *data, uint64_t tail,
                                    size_t max_cap, void *home) {
  sl_buf_init_live(pool, b, data, (uint32_t)tail, max_cap);
  b->root = b;
  b->views = home;
  b->owner = NULL;
  memcpy(&b->block_size, &tail, sizeof(tail));
}

/* The count-based trim or the leak sample is due (rare). */
__attribute__((noinline)) static sl_buf *sl_buf_alloc_event(sl_pool *pool, sl_buf *b) {
  sl_pool_countdown_sync(pool);
  if (pool->trim_countdown == 0) sl_pool_trim(pool, 0);
  if (pool->leak_countdown == 0) sl_leak_sampled(pool, b);
  sl_pool_countdown_arm(pool);
  return b;
}

/* Counts an allocation down towards the next trim or leak sample (one
 * countdown for both); returns b. */
static inline sl_buf *sl_buf_alloc_done(sl_pool *pool, sl_buf *b) {
  if (__builtin_expect(--pool->countdown == 0, 0)) return sl_buf_alloc_event(pool, b);
  return b;
}

/* Any allocation the fast path below does not take: an empty recycler
 * (foreign threads' returns are taken back first), a miss in the worker
 * cache, sizes above max_cached, bad arguments, failures. */
__attribute__((noinline)) static sl_buf *sl_buf_alloc_slow(sl_pool *pool, size_t cap,
                                                           size_t max_cap) {
  if (max_cap < cap) max_cap = cap;
  if (max_cap > SL_BUF_MAX_CAPACITY) {
    errno = EINVAL;
    return NULL;
  }
  if (pool->rec_n == 0 && sl_pool_has_returns(pool)) sl_buf_drain(pool);
  sl_buf *b = sl_pool_header_get(pool);
  if (b == NULL) return NULL;
  size_t usable;
  unsigned sclass;
  uint8_t *data = sl_pool_alloc_block(pool, cap, &usable, &sclass);
  if (data == NULL) {
    sl_pool_header_put(pool, b);
    return NULL;
  }
  /* block_size is what the pool reported (it gets exactly that back);
   * only the capacity is limited by max_cap. */
  sl_buf_init_root(pool, b, data, sl_buf_tail(pool, (uint32_t)usable, sclass), max_cap,
                   sl_buf_home(pool, data, sclass));
  return sl_buf_alloc_done(pool, b);
}

/* sl_buf_alloc_normal's general case: headers found however they can be,
 * the arena's general path, small or cached sizes (the slow path). */
__attribute__((noinline)) static sl_buf *sl_buf_alloc_normal_slow(sl_pool *pool, size_t cap,
                                                                  size_t max_cap) {
  unsigned idx = sl_sc_index(cap);
  if (idx < pool->nsmall || cap <= pool->max_cached_size)
    return sl_buf_alloc_slow(pool, cap, max_cap);
  if (pool->rec_n == 0 && sl_pool_has_returns(pool)) sl_buf_drain(pool);
  sl_buf *b = sl_pool_header_get(pool);
  if (b == NULL) return NULL;
  uint8_t *data = sl_arena_alloc_normal(pool->arena, idx);
  if (data == NULL) {   /* the slow path trims, retries or fails */
    sl_pool_header_put(pool, b);
    return sl_buf_alloc_slow(pool, cap, max_cap);
  }
  sl_cache_bin *bin = &pool->bins[idx];
  bin->allocs_rest++;
  SL_UNPOISON(data, (uint32_t)bin->tail);
  sl_buf_init_root(pool, b, data, bin->tail, max_cap, SL_BUF_NO_SUBPAGE);
  return sl_buf_alloc_done(pool, b);
}

/* What a new root over a block without a subpage has in views and owner
 * (SL_BUF_NO_SUBPAGE, NULL), as they lie in the header: one copy. */
_Static_assert(offsetof(sl_buf, owner) == offsetof(sl_buf, views) + sizeof(void *),
               "views, owner adjacent");
static const struct {
  void *views;
  void *owner;
} sl_buf_normal_views_owner = {SL_BUF_NO_SUBPAGE, NULL};

/* A normal size above max_cached, once the arena's lock is held and c
 * has run start of the class's n pages (sl_arena_normal_head): the run,
 * the header from the recycler. exact (a constant): cap is at most
 * SL_SC_LOOKUP_MAX (the class from the table) and max_cap is cap, so both
 * capacities are cap (the class holds at least that), as in
 * sl_buf_alloc_binned. */
static inline __attribute__((always_inline)) sl_buf *sl_buf_alloc_normal_take(
    sl_pool *pool, size_t cap, size_t max_cap, int exact, sl_cache_bin *bin, sl_chunk *c,
    uint32_t start, size_t n) {
  /* exact: cap is held in its vector from here (one register less) */
  sl_buf_caps v = sl_buf_caps_of((uint32_t)cap);
  uint8_t *data = sl_arena_normal_take(pool->arena, c, start, &bin->own_allocs, n);
  if (data == NULL) {
    if (exact) cap = max_cap = sl_buf_caps_cap(v);
    return sl_buf_alloc_normal_slow(pool, cap, max_cap);
  }
  uint32_t rn = pool->rec_n - 1;
  pool->rec_n = rn;
  sl_buf *b = pool->recycler[rn];
  uint64_t tail = bin->tail;
  SL_UNPOISON(data, (uint32_t)tail);
  b->data = data;
  if (exact) sl_buf_revive_caps(pool, b, v);
  else sl_buf_revive(pool, b, (uint32_t)tail, max_cap);
  b->root = b;
  memcpy(&b->views, &sl_buf_normal_views_owner, sizeof(sl_buf_normal_views_owner));
  memcpy(&b->block_size, &tail, sizeof(tail));
  return sl_buf_alloc_done(pool, b);
}

/* The same when the index's head for the class was stale (about one
 * allocation in seven in a steady mix): the walk past it, out of line so
 * that the common case keeps no registers for it. max_cap at most
 * SL_BUF_MAX_CAPACITY, cap to the class's size. */
__attribute__((noinline)) static sl_buf *sl_buf_alloc_normal_stale(sl_pool *pool, size_t cap,
                                                                   size_t max_cap,
                                                                   sl_cache_bin *bin,
                                                                   sl_chunk *c) {
  size_t n = bin->normal_pages;
  SL_OPAQUE(n);   /* a full register: GCC would zero-extend copies of it again */
  c = sl_arena_normal_walk(pool->arena, c, n);
  if (c == NULL) return sl_buf_alloc_normal_slow(pool, cap, max_cap);
  return sl_buf_alloc_normal_take(pool, cap, max_cap, 0, bin, c, c->bucket_lo[n], n);
}

/* A normal size above max_cached: a run straight from the arena (O(1)
 * there in the common case), the header from the recycler. Only that
 * common case is here, with no call but tail calls, so that it keeps no
 * registers; a stale head is sl_buf_alloc_normal_stale's, the rest
 * sl_buf_alloc_normal_slow's. exact: as in sl_buf_alloc_normal_take. */
static inline __attribute__((always_inline)) sl_buf *sl_buf_alloc_normal_common(sl_pool *pool,
                                                                               size_t cap,
                                                                               size_t max_cap,
                                                                               int exact) {
  size_t off = exact || cap <= SL_SC_LOOKUP_MAX
                   ? pool->lookup[(cap + 15) >> 4]
                   : (size_t)sl_sc_index(cap) << SL_SC_LOOKUP_SHIFT;
  sl_cache_bin *bin = (sl_cache_bin *)(void *)((char *)pool->bins + off);
  /* A class no bin caches with runs the index lists exactly (small
   * classes, cached ones and longer runs take the slow path). */
  size_t n = bin->normal_pages;
  SL_OPAQUE(n);   /* a full register: GCC would zero-extend copies of it again */
  if (n == 0 || pool->rec_n == 0) return sl_buf_alloc_normal_slow(pool, cap, max_cap);
  sl_chunk *c = sl_arena_normal_head(pool->arena, n);
  if (c == NULL) return sl_buf_alloc_normal_slow(pool, cap, max_cap);
  uint32_t start = c->bucket_lo[n];
  if (__builtin_expect(start == SL_CHUNK_NONE, 0))
    return sl_buf_alloc_normal_stale(pool, cap, max_cap, bin, c);
  return sl_buf_alloc_normal_take(pool, cap, max_cap, exact, bin, c, start, n);
}

/* sl_buf_alloc_normal_common for a size up to normal_lookup_max and a
 * max_cap at most cap (the common case). */
__attribute__((noinline)) static sl_buf *sl_buf_alloc_normal(sl_pool *pool, size_t cap) {
  return sl_buf_alloc_normal_common(pool, cap, cap, 1);
}

/* Any other size above lookup_max_size: a normal size above the table's
 * or with a max_cap above cap (at most SL_BUF_MAX_CAPACITY) the same way,
 * the rest (huge, unpooled, failing on purpose, bad arguments) through
 * the slow path. */
__attribute__((noinline)) static sl_buf *sl_buf_alloc_large(sl_pool *pool, size_t cap,
                                                            size_t max_cap) {
  if (cap > pool->normal_max_size || max_cap > SL_BUF_MAX_CAPACITY)
    return sl_buf_alloc_slow(pool, cap, max_cap);
  return sl_buf_alloc_normal_common(pool, cap, max_cap < cap ? cap : max_cap, 0);
}

/* A bare block popped from bin: it gets a header, from the recycler or
 * the overflow list when they have one (NULL: the block goes back, and
 * the slow path reports the failure). */
__attribute__((noinline)) static sl_buf *sl_buf_alloc_bare(sl_pool *pool, sl_cache_bin *bin,
                                                           uint8_t *data, size_t cap,
                                                           size_t max_cap) {
  if (!sl_pool_header_ready(pool) && sl_pool_has_returns(pool)) {
    /* The block goes back first: the drain may fill its bin. The drained
     * buffers bring headers, and the allocation starts again. */
    bin->items[bin->n++] = sl_pool_bare_item(data);
    bin->used--;   /* no hit after all */
    sl_buf_drain(pool);
    return sl_buf_alloc(pool, cap, max_cap);
  }
  sl_buf *b = sl_pool_header_get(pool);
  if (b == NULL) {
    bin->items[bin->n++] = sl_pool_bare_item(data);   /* nothing changed the bin since the pop */
    bin->used--;
    return sl_buf_alloc_slow(pool, cap, max_cap);
  }
  SL_UNPOISON(data, (uint32_t)bin->tail);
  sl_buf_init_root(pool, b, data, bin->tail, max_cap,
                   sl_buf_home(pool, data, (unsigned)(bin->tail >> 32) & 0xffffu));
  return sl_buf_alloc_done(pool, b);
}

/* A miss that sl_buf_alloc does not serve itself (it takes headers
 * parked on owned subpages): a bare block first on the first owned
 * subpage with room, with a header from the recycler, with no call but
 * tail calls; anything else (no owned subpage with room, no header in the
 * recycler) goes to the slow path. */
__attribute__((noinline)) static sl_buf *sl_buf_alloc_miss(sl_pool *pool, size_t cap,
                                                           size_t max_cap, sl_cache_bin *bin) {
  sl_subpage *s = bin->own;
  uint32_t rn = pool->rec_n;
  if (s == &sl_pool_own_none || rn == 0) return sl_buf_alloc_slow(pool, cap, max_cap);
  uintptr_t item = (uintptr_t)s->free;
  SL_ASSERT_DEBUG(item & SL_BIN_BARE, "sl_buf_alloc takes parked headers itself");
  uint8_t *data = sl_subpage_pop_bare(s, item);
  sl_pool_own_took(bin, s);
  pool->rec_n = rn - 1;   /* a header from the recycler (the slow path takes the rest) */
  sl_buf *b = pool->recycler[rn - 1];
  SL_UNPOISON(data, (uint32_t)bin->tail);
  sl_buf_init_root(pool, b, data, bin->tail, max_cap, s);
  return sl_buf_alloc_done(pool, b);
}

/* sl_buf_alloc's cache path, for cap up to lookup_max_size and max_cap
 * from cap to SL_BUF_MAX_CAPACITY: a parked header from the worker cache,
 * which brings its block (a bare block gets a header from the recycler),
 * or from the first owned subpage with room; the indexes, capacities,
 * refcount, generation and the countdown (trim, leak sampling) as in the
 * slow path. The class comes from one load. exact (a constant): max_cap
 * is cap, so both capacities are cap (the class holds at least that). */
static inline __attribute__((always_inline)) sl_buf *sl_buf_alloc_binned(sl_pool *pool,
                                                                        size_t cap,
                                                                        size_t max_cap,
                                                                        int exact) {
  _Static_assert(sizeof(sl_cache_bin) == 1u << SL_SC_LOOKUP_SHIFT, "the table holds bin offsets");
  sl_cache_bin *bin = (sl_cache_bin *)(void *)((char *)pool->bins + pool->lookup[(cap + 15) >> 4]);
  uint32_t n = bin->n;
  uintptr_t item;
  if (__builtin_expect(n == 0, 0)) {
    /* A miss: a header parked on the first owned subpage with room comes
     * back as from the bin; anything else (a bare block, or no subpage:
     * sl_pool_own_none) is sl_buf_alloc_miss's. */
    sl_subpage *s = bin->own;
    if ((item = (uintptr_t)s->free) & SL_BIN_BARE) return sl_buf_alloc_miss(pool, cap, max_cap, bin);
    sl_pool_own_pop_parked(s, (void *)item);
    sl_pool_own_took(bin, s);
    goto parked;
  }
  n--;
  bin->n = n;
  bin->used++;   /* the hit and the allocation (sl_cache_bin) */
  item = (uintptr_t)bin->items[n];
  if (__builtin_expect(item & SL_BIN_BARE, 0))
    return sl_buf_alloc_bare(pool, bin, (uint8_t *)(item - SL_BIN_BARE), cap, max_cap);
parked:;
  /* A parked header: root, views, owner, block_size, sclass and flags are
   * already those of a root over its block. */
  sl_buf *b = (sl_buf *)item;
  uint32_t usable = b->block_size;
  SL_UNPOISON(b->data, usable);
  if (exact) sl_buf_revive_exact(pool, b, (uint32_t)cap);
  else sl_buf_revive(pool, b, usable, max_cap);
  return sl_buf_alloc_done(pool, b);
}

/* sl_buf_alloc_binned for a max_cap above cap (a buffer that may grow). */
__attribute__((noinline)) static sl_buf *sl_buf_alloc_growable(sl_pool *pool, size_t cap,
                                                               size_t max_cap) {
  if (max_cap > SL_BUF_MAX_CAPACITY) return sl_buf_alloc_slow(pool, cap, max_cap);
  return sl_buf_alloc_binned(pool, cap, max_cap, 0);
}

/* The fast path: a size up to lookup_max_size (the cache's, at most the
 * lookup table's) with max_cap at most cap (0: cap), which is what the
 * read loop and most callers ask; a growable buffer takes the same path
 * with a few more instructions. Sizes above max_cached go to the arena
 * directly (sl_buf_alloc_normal; above the table's, or growable:
 * sl_buf_alloc_large). */
sl_buf *sl_buf_alloc(sl_pool *pool, size_t cap, size_t max_cap) {
  if (__builtin_expect(cap > pool->lookup_max_size, 0)) {
    if (cap <= pool->normal_lookup_max && max_cap <= cap) return sl_buf_alloc_normal(pool, cap);
    return sl_buf_alloc_large(pool, cap, max_cap);
  }
  if (__builtin_expect(max_cap > cap, 0)) return sl_buf_alloc_growable(pool, cap, max_cap);
  return sl_buf_alloc_binned(pool, cap, cap, 1);
}

sl_buf *sl_buf_from(sl_pool *pool, const void *src, size_t len) {
  sl_buf *b = sl_buf_alloc(pool, len, len);
  if (b == NULL) return NULL;
  if (len > 0) memcpy(b->data, src, len);
  b->wr = (uint32_t)len;
  return b;
}

void sl_buf_retain(sl_buf *b) {
  sl_buf *r = b->root;
  SL_ASSERT(r->refcnt > 0, "retain of a released buffer");
  r->refcnt++;
}

static void sl_buf_free_derived(sl_pool *pool, sl_buf *d);

/* Kills the views of refcount holder h (SL_BUF_HAS_VIEWS: they die with
 * it); h keeps what a root without views keeps (sl_buf_home). */
static inline void sl_buf_kill_views(sl_pool *pool, sl_buf *h) {
  sl_buf *v = h->views;
  while (v != NULL) {
    sl_buf *next = v->views;
    v->rd = v->gen; /* a dead header keeps the generation it died with */
    v->gen = 0;
    sl_pool_header_put(pool, v);
    v = next;
  }
  h->views = (h->flags & SL_BUF_VIEW) ? NULL : sl_buf_home(pool, h->data, h->sclass);
  h->flags &= (uint16_t)~SL_BUF_HAS_VIEWS;
}

/* Makes root r (released: no owner, record, views or shared flag left, so
 * flags 0) a parked header, to go on the bin of its class or on its
 * block's owned subpage: its data stays the block (SL_HDR_BLOCK_OFFSET),
 * and the header keeps, dead, the generation it died with (in rd) and who
 * released it (in cap and max_cap). */
static inline void sl_buf_to_parked(sl_pool *pool, sl_buf *r) {
  SL_POISON(r->data, r->block_size);
  sl_buf_set_dead(pool, r);
}

/* Parks root r (released, flags 0) on s, the owned subpage of its block
 * (of bin's class), instead of the full bin: the header stays with its
 * block, so that a miss takes both back as a hit does. */
static inline void sl_buf_park_own(sl_pool *pool, sl_buf *r, sl_cache_bin *bin, sl_subpage *s) {
  sl_buf_to_parked(pool, r);
  uint32_t nfree = sl_pool_own_push_parked(s, r);
  bin->own_frees++;   /* the release (sl_cache_bin) */
  if (__builtin_expect(sl_pool_own_moves(s, nfree), 0)) sl_pool_own_moved(pool, s, nfree);
}

/* A dead root header keeps the generation it died with and who released
 * it (in rd, and in cap and max_cap: sl_buf_set_released_by); it goes back to the
 * recycler. */
static inline void sl_buf_bury(sl_pool *pool, sl_buf *r) {
  sl_buf_set_dead(pool, r);
  sl_pool_header_put(pool, r);
}

/* Frees a root whose refcount reached zero, on its pool's thread. */
static void sl_buf_free_local(sl_buf *r, sl_pool *pool) {
  if (__builtin_expect(r->flags & SL_BUF_VIEW, 0)) {
    sl_buf_free_derived(pool, r);
    return;
  }
  if (r->owner != NULL || (r->flags & SL_BUF_RECORDED)) sl_leak_on_free(pool, r);
  if (r->flags & SL_BUF_HAS_VIEWS) sl_buf_kill_views(pool, r);
  r->flags &= (uint16_t)~SL_BUF_SHARED;   /* its derived buffers are gone */
  unsigned sc = r->sclass;
  if (!pool->quarantine_next && !(r->flags & SL_BUF_UNBINNED) && pool->bins[sc].cap > 0) {
    sl_cache_bin *bin = &pool->bins[sc];
    if (__builtin_expect(bin->n < bin->cap, 1)) {
      sl_buf_to_parked(pool, r);
      bin->items[bin->n++] = r;
      bin->frees_rest++;
      return;
    }
    if (bin->owns) {
      /* A full bin whose class owns subpages: the header parks with its
       * block on the block's subpage (when the pool still owns it). */
      sl_subpage *s = sl_buf_subpage(pool, r);
      if (sl_pool_owns(pool, s)) {
        sl_buf_park_own(pool, r, bin, s);
        return;
      }
    }
    sl_buf_to_parked(pool, r);
    sl_pool_park_slow(pool, r, sc);   /* the older half goes to the arena first */
    return;
  }
  sl_pool_free_cls(pool, r->data, r->block_size, r->sclass);
  sl_buf_set_dead(pool, r);
  if (__builtin_expect(pool->quarantine_next, 0)) {
    sl_pool_quarantine_next(pool, 0);
    sl_pool_header_quarantine(pool, r);
    return;
  }
  sl_pool_header_put(pool, r);
}

const char *sl_buf_released_by(const sl_buf *b, uint32_t gen) {
  if (b->gen != 0 || b->rd != gen) return NULL; /* reused since */
  const sl_buf *r = b;
  if ((b->flags & (SL_BUF_VIEW | SL_BUF_DERIVED)) == SL_BUF_VIEW) {
    /* A view died with its refcount holder, which must not have been
     * reused since (a dead root or derived header keeps who released it). */
    r = b->root;
    if (r->gen != 0 || (r->flags & (SL_BUF_VIEW | SL_BUF_DERIVED)) == SL_BUF_VIEW) return NULL;
  }
  const char *site;
  memcpy(&site, &r->cap, sizeof(site));
  return site;
}

/* Frees a root released on a thread that does not own its pool: through
 * the owner's bounded return queue, or straight into the arena when the
 * queue is full (nothing piles up). */
__attribute__((noinline)) static void sl_buf_free_foreign(sl_buf *r, sl_pool *pool) {
  if (r->flags & SL_BUF_VIEW) {
    /* A derived buffer releases its parent: the owner does it all. */
    sl_pool_remote_push(pool, r, offsetof(sl_buf, rd));
    return;
  }
  r->gen = 0;
  sl_buf *views = (r->flags & SL_BUF_HAS_VIEWS) ? r->views : NULL;
  for (sl_buf *v = views; v != NULL; v = v->views) v->gen = 0;
  if (sl_pool_retq_push(pool, r) == SL_OK) return;
  if (r->owner != NULL || (r->flags & SL_BUF_RECORDED)) {
    /* Owner lists and records belong to the owner's thread: hand the whole
     * buffer over through the lock-free stack (linked through its reader and
     * writer indexes, unused now). */
    sl_pool_remote_push(pool, r, offsetof(sl_buf, rd));
    return;
  }
  sl_buf *v = views;
  while (v != NULL) {
    sl_buf *next = v->views;
    sl_pool_header_put_foreign(pool, v);
    v = next;
  }
  sl_pool_free_foreign(pool, r->data, r->block_size);
  sl_pool_header_put_foreign(pool, r);
}

/* A normal block that no bin caches: straight back to its chunk (poisoned
 * first, as on the fast path). */
__attribute__((noinline)) static void sl_buf_free_normal_slow(sl_buf *r, sl_pool *pool) {
  unsigned sc = r->sclass;
  SL_POISON(r->data, r->block_size);
  pool->bins[sc].frees_rest++;
  sl_arena_free_normal(pool->arena, r->data, sc);
  sl_buf_bury(pool, r);
}

/* The same for the header already dead in the recycler's next slot
 * (sl_buf_free_normal: no register keeps it through the lock). */
__attribute__((noinline)) static void sl_buf_free_normal_dead(sl_pool *pool) {
  sl_buf *r = pool->recycler[pool->rec_n];
  unsigned sc = r->sclass;
  pool->bins[sc].frees_rest++;
  sl_arena_free_normal(pool->arena, r->data, sc);
  sl_pool_header_put(pool, r);
}

/* The common case of that with no call but tail calls (see
 * sl_buf_alloc_normal), for r of normal class sc: r dies first, into the
 * recycler's next slot, which it takes once its run is back in its chunk;
 * the rest is sl_buf_free_normal_slow (sl_buf_free_normal_dead once r is
 * dead). */
__attribute__((noinline)) static void sl_buf_free_normal(sl_buf *r, sl_pool *pool, size_t sc) {
  sl_cache_bin *bin = (sl_cache_bin *)(void *)((char *)pool->bins + (sc << SL_SC_LOOKUP_SHIFT));
  SL_OPAQUE(bin);   /* one register for the bin's fields (GCC would keep sc apart) */
  size_t n = bin->normal_pages;
  SL_OPAQUE(n);   /* a full register: GCC would zero-extend copies of it again */
  uint32_t rn = pool->rec_n;
  if (n == 0 || rn >= pool->rec_cap) {
    sl_buf_free_normal_slow(r, pool);
    return;
  }
  uint8_t *data = r->data;
  SL_POISON(data, r->block_size);
  uintptr_t c = (uintptr_t)data & pool->chunk_mask;
  size_t page = ((uintptr_t)data - c) >> pool->page_shift;
  SL_OPAQUE(page);   /* here, before the lock: the shift frees its count register */
  sl_buf_set_dead(pool, r);
  pool->recycler[rn] = r;
  if (!sl_arena_free_normal_try(pool->arena, (sl_chunk *)c, page, n, &bin->own_frees)) {
    sl_buf_free_normal_dead(pool);
    return;
  }
  pool->rec_n++;   /* after the lock: read again, one add to memory */
}

/* sl_buf_free's common case, r being a root on its worker with no owner,
 * record, views or derived buffers, and no quarantine: the header parks
 * with its block in its bin (one stack push) or, the bin full, on the
 * block's owned subpage; a normal class no bin caches goes straight to
 * the arena. */
static inline void sl_buf_free_plain(sl_pool *pool, sl_buf *r, size_t sc) {
  sl_cache_bin *bin = &pool->bins[sc];
  uint32_t n = bin->n;
  if (__builtin_expect(n < bin->cap, 1)) {
    sl_buf_to_parked(pool, r);   /* the refcount goes to 0 there */
    bin->items[n] = r;
    bin->n++;   /* an add to memory: n's register stays the index */
    bin->frees_rest++;
    return;
  }
  /* The bin is full: the header parks with its block on the block's
   * subpage, which it keeps, when the pool owns that (only classes that
   * own subpages have such blocks). */
  sl_subpage *s = sl_buf_subpage(pool, r);
  if (__builtin_expect(sl_pool_owns(pool, s), 1)) {
    sl_buf_park_own(pool, r, bin, s);   /* the refcount goes to 0 there */
    return;
  }
  r->refcnt = 0;
  sl_buf_free_local(r, pool);
}

/* A root whose only difference from the common case is its leak record
 * (a sampled buffer): as in the common case, then the record goes back
 * (keyed by the header's slot, which nothing reuses in between). */
__attribute__((noinline)) static void sl_buf_free_recorded(sl_buf *r, sl_pool *pool) {
  r->flags &= (uint16_t)~SL_BUF_RECORDED;
  sl_buf_free_plain(pool, r, r->sclass);
  sl_leak_forget(pool, r);
}

/* The same for a sampled root of a normal class no bin caches. */
__attribute__((noinline)) static void sl_buf_free_normal_recorded(sl_buf *r, sl_pool *pool) {
  r->flags &= (uint16_t)~SL_BUF_RECORDED;
  sl_buf_free_normal(r, pool, r->sclass);
  sl_leak_forget(pool, r);
}

_Static_assert(offsetof(sl_buf, flags) == offsetof(sl_buf, sclass) + 2,
               "sclass and flags: one 32-bit word");

void sl_buf_free(sl_buf *r) {
  sl_pool *pool = sl_pool_of(r);
  if (__builtin_expect(sl_pool_free_tp(pool) != __builtin_thread_pointer(), 0)) {
    /* Another thread than the pool's, or the header that is to wait in
     * the quarantine. */
    r->refcnt = 0;
    if (!sl_pool_is_owner(pool)) {
      sl_buf_free_foreign(r, pool);
      return;
    }
    sl_buf_free_local(r, pool);   /* takes quarantine_next */
    return;
  }
  /* sclass, and flags above it: a root with no flag (no owner, record,
   * views, derived buffers, and a block a bin takes) reads as its class. */
  uint32_t word;
  memcpy(&word, &r->sclass, sizeof(word));
  if (__builtin_expect(word <= 0xffffu, 1)) {
    sl_buf_free_plain(pool, r, word);
    return;
  }
  if (word - ((uint32_t)SL_BUF_UNBINNED << 16) < SL_SC_MAX_CLASSES) {
    /* Only SL_BUF_UNBINNED, and a class: a normal class no bin caches, its
     * chunk (the header dies there, its refcount with it). */
    sl_buf_free_normal(r, pool, word - ((uint32_t)SL_BUF_UNBINNED << 16));
    return;
  }
  if (word >> 16 == SL_BUF_RECORDED) {
    sl_buf_free_recorded(r, pool);
    return;
  }
  if (word - ((uint32_t)(SL_BUF_UNBINNED | SL_BUF_RECORDED) << 16) < SL_SC_MAX_CLASSES) {
    sl_buf_free_normal_recorded(r, pool);
    return;
  }
  r->refcnt = 0;
  sl_buf_free_local(r, pool);
}

void sl_buf_release_dead(const sl_buf *b) {
  SL_UNUSED(b);
  SL_ASSERT(0, "release of a released buffer");
  abort();
}

size_t sl_buf_drain(sl_pool *pool) {
  size_t n = 0;
  sl_buf *r;
  while ((r = sl_pool_retq_pop(pool)) != NULL) {
    sl_buf_free_local(r, pool);
    n++;
  }
  r = sl_pool_remote_take(pool);
  while (r != NULL) {
    sl_buf *next = *(sl_buf **)(void *)&r->rd;
    sl_buf_free_local(r, pool);
    r = next;
    n++;
  }
  return n;
}


int sl_buf_retain_n(sl_buf *b, uint32_t n, const char **err) {
  sl_buf *r = b->root;
  if (r->refcnt == 0) {
    *err = "refcnt 0, increment";
    return SL_ERROR;
  }
  if (n == 0 || r->refcnt + n < r->refcnt || r->refcnt + n > 0x7fffffffu) {
    *err = "refcount overflow or zero increment";
    return SL_ERROR;
  }
  r->refcnt += n;
  return 0;
}

int sl_buf_release_n(sl_buf *b, uint32_t n, const char **err) {
  static const char *const msgs[] = {
      "refcnt 0, decrement 1", "refcnt 1, decrement 2", "refcnt 2, decrement 3"};
  sl_buf *r = b->root;
  if (n == 0) {
    *err = "decrement must be positive";
    return SL_ERROR;
  }
  if (r->refcnt < n) {
    /* Static text: the common cases verbatim, the rest generic. */
    *err = (n - r->refcnt == 1 && r->refcnt < 3) ? msgs[r->refcnt]
                                                 : "refcnt lower than decrement";
    return SL_ERROR;
  }
  r->refcnt -= n;
  if (r->refcnt > 0) return 0;
  sl_buf_free(r);
  return 1;
}

/* A view (derived == 0: shares the refcount of b's holder, on whose list it
 * dies) or a derived buffer (derived == 1: refcount 1, one reference on b's
 * holder) over [data, data + cap) of b's memory. NULL on ENOMEM. */
static sl_buf *sl_buf_view(sl_buf *b, uint8_t *data, uint32_t cap, int derived) {
  sl_buf *h = b->root;
  sl_pool *pool = sl_pool_of(h);
  sl_buf *v = sl_pool_header_get_view(pool);
  if (v == NULL) return NULL;
  v->data = data;
  v->rd = 0;
  v->wr = 0;
  v->cap = cap;
  v->max_cap = cap;
  v->gen = sl_pool_next_gen(pool);
  v->owner = NULL;
  v->sclass = SL_SC_NONE;
  if (!derived) {
    v->refcnt = 0;
    v->root = h;
    v->block_size = 0;
    v->flags = SL_BUF_VIEW;
    v->views = (h->flags & SL_BUF_HAS_VIEWS) ? h->views : NULL;
    h->views = v;
    h->flags |= SL_BUF_HAS_VIEWS;
    return v;
  }
  v->refcnt = 1;
  v->root = v;
  v->views = NULL;
  v->parent_off = (uint32_t)((uintptr_t)h & (SL_HDR_REGION_SPAN - 1));
  v->flags = SL_BUF_VIEW | SL_BUF_DERIVED;
  if (sl_leak_on_derive(pool, h, v) != SL_OK) {
    v->gen = 0;
    sl_pool_header_put(pool, v);
    return NULL;
  }
  h->refcnt++;
  h->flags |= SL_BUF_SHARED;
  return v;
}

static sl_buf *sl_buf_range(sl_buf *b, size_t index, size_t len, int derived, const char **err) {
  SL_ASSERT(sl_buf_is_live(b), "slice of a released buffer");
  if (index > b->cap || len > b->cap - index) {
    *err = "slice out of range";
    return NULL;
  }
  sl_buf *v = sl_buf_view(b, b->data + index, (uint32_t)len, derived);
  if (v == NULL) {
    *err = "out of memory";
    return NULL;
  }
  v->wr = (uint32_t)len;
  return v;
}

static sl_buf *sl_buf_whole(sl_buf *b, int derived) {
  SL_ASSERT(sl_buf_is_live(b), "duplicate of a released buffer");
  sl_buf *v = sl_buf_view(b, b->data, b->cap, derived);
  if (v == NULL) return NULL;
  v->rd = b->rd;
  v->wr = b->wr;
  return v;
}

sl_buf *sl_buf_slice(sl_buf *b, size_t index, size_t len, const char **err) {
  return sl_buf_range(b, index, len, 0, err);
}

sl_buf *sl_buf_duplicate(sl_buf *b) { return sl_buf_whole(b, 0); }

sl_buf *sl_buf_retained_slice(sl_buf *b, size_t index, size_t len, const char **err) {
  return sl_buf_range(b, index, len, 1, err);
}

sl_buf *sl_buf_retained_duplicate(sl_buf *b) { return sl_buf_whole(b, 1); }

sl_buf *sl_buf_read_retained_slice(sl_buf *b, size_t len, const char **err) {
  if (len > sl_buf_readable(b)) {
    *err = "slice out of range";
    return NULL;
  }
  sl_buf *d = sl_buf_retained_slice(b, b->rd, len, err);
  if (d != NULL) b->rd += (uint32_t)len;
  return d;
}

/* A derived buffer's refcount reached zero: its views die, its header goes
 * back (keeping, dead, who released it) and its parent's reference is
 * released, which may free the parent in turn. */
static void sl_buf_free_derived(sl_pool *pool, sl_buf *d) {
  sl_buf *parent = sl_buf_parent(d);
  sl_leak_on_free_derived(pool, d, parent);
  if (d->flags & SL_BUF_HAS_VIEWS) sl_buf_kill_views(pool, d);
  sl_buf_set_dead(pool, d);
  if (__builtin_expect(pool->quarantine_next, 0)) {
    sl_pool_quarantine_next(pool, 0);
    sl_pool_header_quarantine(pool, d);
  } else {
    sl_pool_header_put(pool, d);
  }
  sl_buf_release(parent);
}

sl_buf *sl_buf_memory_root(sl_buf *b) {
  for (;;) {
    if (!(b->flags & SL_BUF_VIEW)) return b;
    b = (b->flags & SL_BUF_DERIVED) ? sl_buf_parent(b) : b->root;
  }
}

int sl_buf_may_grow(const sl_buf *b, const char **err) {
  if (b->flags & SL_BUF_VIEW) {
    *err = "a view cannot grow";
    return 0;
  }
  if ((b->flags & SL_BUF_HAS_VIEWS) || sl_buf_derived_count(b) > 0) {
    *err = "a buffer with views cannot grow";
    return 0;
  }
  return 1;
}

int sl_buf_ensure_writable(sl_buf *b, size_t n, const char **err) {
  if (n <= sl_buf_writable(b)) return SL_OK;
  if (!sl_buf_may_grow(b, err)) {
    *err = "cannot grow a buffer that has views";
    return SL_ERROR;
  }
  if (n > SL_BUF_MAX_CAPACITY) {
    *err = "exceeds max capacity";
    return SL_ERROR;
  }
  size_t need = (size_t)b->wr + n;
  if (need > b->max_cap) {
    *err = "exceeds max capacity";
    return SL_ERROR;
  }
  if (need <= b->block_size) {
    b->cap = (uint32_t)need;
    return SL_OK;
  }
  size_t want = b->cap < 64 ? 64 : b->cap;
  while (want < need) want *= 2;
  if (want > b->max_cap) want = b->max_cap;
  size_t usable = 0;
  unsigned sclass;
  sl_pool *pool = sl_pool_of(b);
  uint8_t *mem = sl_pool_alloc_cls(pool, want, &usable, &sclass);
  if (mem == NULL) {
    *err = "out of memory";
    return SL_ERROR;
  }
  memcpy(mem, b->data, b->wr);
  sl_pool_free_cls(pool, b->data, b->block_size, b->sclass);
  b->sclass = (uint16_t)sclass;
  b->flags = (uint16_t)((b->flags & ~SL_BUF_UNBINNED) |
                        (sl_buf_tail(pool, (uint32_t)usable, sclass) >> 48 & SL_BUF_UNBINNED));
  if (b->owner) b->owner->bytes += usable - b->block_size;
  b->views = sl_buf_home(pool, mem, sclass);   /* it has none (sl_buf_may_grow) */
  b->data = mem;
  b->block_size = (uint32_t)usable;
  b->cap = (uint32_t)(usable > b->max_cap ? b->max_cap : usable);
  return SL_OK;
}

int sl_buf_write(sl_buf *b, const void *src, size_t len, const char **err) {
  if (sl_buf_ensure_writable(b, len, err) != SL_OK) return SL_ERROR;
  memcpy(b->data + b->wr, src, len);
  b->wr += (uint32_t)len;
  return SL_OK;
}
