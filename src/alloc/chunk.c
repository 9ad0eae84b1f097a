#include "alloc/chunk.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "alloc/poison.h"
#include "util/common.h"



/* Entries of bucket_hi: lengths SL_AVAIL_LENS to npages. */
static uint32_t sl_chunk_bucket_hi_len(uint32_t npages) {
  return npages + 1 > SL_AVAIL_LENS ? npages + 1 - SL_AVAIL_LENS : 0;
}

static size_t sl_chunk_meta_bytes(uint32_t npages) {
  size_t words = (npages + 1 + 63) / 64;
  return sizeof(sl_chunk) + (size_t)npages * sizeof(sl_chunk_page) +
         sl_chunk_bucket_hi_len(npages) * sizeof(uint32_t) + 8 + words * 8 +
         (size_t)npages * sizeof(sl_subpage *);
}

uint32_t sl_chunk_meta_pages(size_t chunk_size, size_t page_size) {
  return (uint32_t)((sl_chunk_meta_bytes((uint32_t)(chunk_size / page_size)) + page_size - 1) /
                    page_size);
}

static inline uint32_t sl_avail_key(uint32_t len) { return len < SL_AVAIL_LENS ? len : SL_AVAIL_LENS; }

void sl_chunk_avail_join(sl_chunk *c, uint32_t k) {
  if (c->avail == NULL || (c->av_in & (1ull << (k - 1)))) return;
  sl_chunk_avail_link(c, c->avail, k);
}

void sl_chunk_avail_leave(sl_chunk *c, uint32_t k) {
  uint64_t bit = 1ull << (k - 1);
  if (!(c->av_in & bit)) return;
  sl_chunk_avail *av = c->avail;
  c->av_in &= ~bit;
  if (c->av_next[k] == c) {
    av->head[k] = NULL;
    av->mask &= ~bit;
    return;
  }
  c->av_prev[k]->av_next[k] = c->av_next[k];
  c->av_next[k]->av_prev[k] = c->av_prev[k];
  if (av->head[k] == c) av->head[k] = c->av_next[k];
}

/* Whether c lists any free run of SL_AVAIL_LENS pages or more. */
static int sl_free_has_long(const sl_chunk *c) {
  uint32_t words = (c->npages + 1 + 63) / 64;
  for (uint32_t w = SL_AVAIL_LENS / 64; w < words; w++)
    if (c->nonempty[w]) return 1;
  return 0;
}

/* Whether c (on the index under key k) still lists a run for that key. */
static int sl_avail_valid(const sl_chunk *c, uint32_t k) {
  return k < SL_AVAIL_LENS ? c->bucket_lo[k] != SL_CHUNK_NONE : sl_free_has_long(c);
}

sl_chunk *sl_chunk_avail_find(sl_chunk_avail *av, uint32_t n) {
  if (n < SL_AVAIL_LENS) {
    /* An exact run, else the shortest longer one; stale entries (their
     * runs were taken since) leave the index as they are met. */
    for (;;) {
      uint64_t keys = av->mask & ~((1ull << (n - 1)) - 1);   /* keys n .. 64 */
      if (keys == 0) return NULL;
      uint32_t k = (uint32_t)__builtin_ctzll(keys) + 1;
      sl_chunk *c = av->head[k];
      if (sl_avail_valid(c, k)) return c;
      sl_chunk_avail_leave(c, k);
    }
  }
  sl_chunk *h = av->head[SL_AVAIL_LENS];
  if (h == NULL) return NULL;
  sl_chunk *c = h;
  do {
    if (c->max_run >= n) return c;
    c = c->av_next[SL_AVAIL_LENS];
  } while (c != h);
  return NULL;
}

/* The smallest length >= n whose list has a run, or 0. A bit found set
 * over an empty list (the arena's fast path leaves them: chunk.h) is
 * cleared on the way. */
static inline uint32_t sl_free_fit(sl_chunk *c, uint32_t n) {
  uint32_t words = (c->npages + 1 + 63) / 64;
  uint32_t w = n >> 6;
  uint64_t bits = c->nonempty[w] & (~0ull << (n & 63));
  for (;;) {
    while (bits) {
      uint32_t len = (w << 6) + (uint32_t)__builtin_ctzll(bits);
      if (*sl_chunk_bucket(c, len) != SL_CHUNK_NONE) return len;
      c->nonempty[w] &= ~(1ull << (len & 63));
      bits &= bits - 1;
    }
    if (++w >= words) return 0;
    bits = c->nonempty[w];
  }
}

/* Empties every list; with unmark, the runs lose their free_head marks too
 * (otherwise the marks stay, for a sweep to read). */
static void sl_free_clear_lists(sl_chunk *c, int unmark) {
  uint32_t words = (c->npages + 1 + 63) / 64;
  for (uint32_t w = 0; w < words; w++) {
    uint64_t bits = c->nonempty[w];
    while (bits) {
      uint32_t len = (w << 6) + (uint32_t)__builtin_ctzll(bits);
      bits &= bits - 1;
      if (c->avail != NULL) sl_chunk_avail_leave(c, sl_avail_key(len));
      uint32_t *bucket = sl_chunk_bucket(c, len);
      sl_chunk_page *pg = sl_chunk_pages(c);
      if (unmark)
        for (uint32_t r = *bucket; r != SL_CHUNK_NONE; r = pg[r].free_next) pg[r].free_head = 0;
      *bucket = SL_CHUNK_NONE;
    }
    c->nonempty[w] = 0;
  }
}

sl_chunk *sl_chunk_new(struct sl_arena *arena, sl_chunk_avail *avail, size_t chunk_size,
                       size_t page_size) {
  /* Map twice the size and keep the aligned middle. */
  size_t span = chunk_size * 2;
  uint8_t *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return NULL;
  uintptr_t start = ((uintptr_t)raw + chunk_size - 1) & ~((uintptr_t)chunk_size - 1);
  size_t head = start - (uintptr_t)raw;
  if (head) munmap(raw, head);
  munmap((uint8_t *)start + chunk_size, span - head - chunk_size);

  sl_chunk *c = (sl_chunk *)start;
  uint32_t npages = (uint32_t)(chunk_size / page_size);
  memset(c, 0, sizeof(*c));
  c->arena = arena;
  c->avail = avail;
  c->mem = (uint8_t *)start;
  c->npages = npages;
  c->meta_pages = sl_chunk_meta_pages(chunk_size, page_size);
  c->usable = npages - c->meta_pages;
  c->page_shift = (uint32_t)__builtin_ctzll(page_size);
  /* After the struct (a fresh mmap: all zero): the pages' map, the
   * subpages', then the longer runs' lists. */
  c->sub = (sl_subpage **)(void *)(sl_chunk_pages(c) + npages);
  c->bucket_hi = (uint32_t *)(void *)(c->sub + npages);   /* lengths SL_AVAIL_LENS..npages */
  uint32_t nhi = sl_chunk_bucket_hi_len(npages);
  c->nonempty = (uint64_t *)(void *)(((uintptr_t)(c->bucket_hi + nhi) + 7) & ~(uintptr_t)7);
  memset(c->bucket_lo, 0xff, sizeof(c->bucket_lo));
  memset(c->bucket_hi, 0xff, nhi * sizeof(uint32_t));
  c->free_pages = c->usable;
  sl_chunk_free_push(c, c->meta_pages, c->usable);
  return c;
}

void sl_chunk_delete(sl_chunk *c, size_t chunk_size) {
  while (c->av_in) sl_chunk_avail_leave(c, (uint32_t)__builtin_ctzll(c->av_in) + 1);
  SL_UNPOISON(c->mem, chunk_size);
  munmap(c->mem, chunk_size);
}

void sl_chunk_coalesce(sl_chunk *c) {
  sl_free_clear_lists(c, 0);
  c->max_run = 0;
  sl_chunk_page *pg = sl_chunk_pages(c);
  uint32_t p = c->meta_pages;
  while (p < c->npages) {
    if (pg[p].free_head) {
      uint32_t start = p;
      while (p < c->npages && pg[p].free_head) {
        uint32_t len = pg[p].free_head;
        pg[p].free_head = 0;
        p += len;
      }
      sl_chunk_free_push(c, start, p - start);
      continue;
    }
    uint32_t step = pg[p].run_len ? pg[p].run_len : c->sub[p] ? c->sub[p]->npages : 0;
    SL_ASSERT(step > 0, "chunk page map has a hole");
    p += step;
  }
  c->unmerged = 0;
  c->sweeps++;
}

int sl_chunk_run_take(sl_chunk *c, uint32_t n) {
  if (n == 0 || n > c->max_run) return -1;
  uint32_t len = sl_free_fit(c, n);
  if (len == 0) {
    c->max_run = n - 1;   /* no listed run is n pages or longer */
    return -1;
  }
  uint32_t start = sl_chunk_free_pop(c, len);
  if (len > n) sl_chunk_free_push(c, start + n, len - n);
  sl_chunk_pages(c)[start].run_len = n;
  c->free_pages -= n;
  return (int)start;
}

int sl_chunk_run_alloc(sl_chunk *c, uint32_t n) {
  int page = sl_chunk_run_take(c, n);
  if (page >= 0 || n > c->free_pages || c->unmerged == 0) return page;
  sl_chunk_coalesce(c);
  return sl_chunk_run_take(c, n);
}

void sl_chunk_reset(sl_chunk *c) {
  sl_free_clear_lists(c, 1);
  c->max_run = 0;
  c->unmerged = 0;
  sl_chunk_free_push(c, c->meta_pages, c->usable);
}

void sl_chunk_run_free(sl_chunk *c, uint32_t page, uint32_t n) { sl_chunk_run_free_inline(c, page, n); }

sl_subpage *sl_subpage_new(sl_chunk *c, uint32_t first_page, uint32_t npages,
                           uint32_t elem_size, uint32_t sclass) {
  uint32_t nelems = (uint32_t)(((size_t)npages << c->page_shift) / elem_size);
  uint32_t nwords = (nelems + 63) / 64;
  sl_subpage *s = calloc(1, sizeof(*s) + nwords * sizeof(uint64_t));
  if (s == NULL) return NULL;
  s->chunk = c;
  s->base = c->mem + ((size_t)first_page << c->page_shift);
  s->first_page = first_page;
  s->npages = npages;
  s->elem_size = elem_size;
  s->nelems = s->nfree = nelems;
  s->nmove = nelems - 2;
  s->sclass = sclass;
  s->nwords = nwords;
  s->recip = ((uint64_t)1 << 40) / elem_size + 1;
  /* Bits past nelems are marked used so they are never handed out. */
  if (nelems & 63) s->bits[nwords - 1] = ~0ull << (nelems & 63);
  for (uint32_t p = first_page; p < first_page + npages; p++) c->sub[p] = s;
  return s;
}

void *sl_subpage_alloc(sl_subpage *s) {
  if (s->nfree == 0) return NULL;
  for (uint32_t k = 0; k < s->nwords; k++) {
    uint32_t w = (s->hint + k) % s->nwords;
    uint64_t free_bits = ~s->bits[w];
    if (free_bits) {
      uint32_t bit = (uint32_t)__builtin_ctzll(free_bits);
      s->bits[w] |= 1ull << bit;
      s->nfree--;
      s->hint = w;
      return s->base + (size_t)(w * 64 + bit) * s->elem_size;
    }
  }
  SL_ASSERT(0, "subpage bitmap disagrees with its free count");
  return NULL;
}

void sl_subpage_to_list(sl_subpage *s) {
  void *head = NULL;
  size_t es = s->elem_size;
  if (s->nfree == s->nelems) {
    /* Every element free (a new subpage, mostly): no bits to scan. */
    for (uint32_t i = s->nelems; i-- > 0;) {
      void *e = s->base + (size_t)i * es;
      SL_UNPOISON(e, sizeof(void *));
      *(void **)e = head;
      head = (void *)((uintptr_t)e | SL_SUB_BARE);
    }
    s->free = head;
    s->nbare = s->nfree;
    return;
  }
  for (uint32_t w = s->nwords; w-- > 0;) {
    uint64_t free_bits = ~s->bits[w];
    while (free_bits != 0) {   /* highest first, so that the list starts low */
      uint32_t bit = 63 - (uint32_t)__builtin_clzll(free_bits);
      free_bits &= ~(1ull << bit);
      void *e = s->base + ((size_t)w * 64 + bit) * es;
      SL_UNPOISON(e, sizeof(void *));
      *(void **)e = head;
      head = (void *)((uintptr_t)e | SL_SUB_BARE);
    }
  }
  s->free = head;
  s->nbare = s->nfree;
}

void sl_subpage_to_bits(sl_subpage *s) {
  if (s->nfree == s->nelems) {
    /* Empty: every element free, whatever its list holds (its owner has
     * taken what the carried items carry). */
    memset(s->bits, 0, s->nwords * sizeof(uint64_t));
    if (s->nelems & 63) s->bits[s->nwords - 1] = ~0ull << (s->nelems & 63);
    SL_POISON(s->base, (size_t)s->nelems * s->elem_size);
    s->free = NULL;
    s->nbare = s->nfree;
    s->hint = 0;
    return;
  }
  SL_ASSERT(s->nbare == s->nfree, "owned subpage goes back with carried items");
  for (uint32_t w = 0; w < s->nwords; w++) s->bits[w] = ~0ull;   /* past nelems: used */
  uint32_t n = 0;
  for (void *item = s->free, *next; item != NULL; item = next) {
    SL_ASSERT((uintptr_t)item & SL_SUB_BARE, "owned subpage goes back with a carried item");
    void *e = (void *)((uintptr_t)item - SL_SUB_BARE);
    next = *(void **)e;
    SL_POISON(e, sizeof(void *));
    uint32_t i = sl_subpage_index(s, e);
    s->bits[i >> 6] &= ~(1ull << (i & 63));
    n++;
  }
  SL_ASSERT(n == s->nfree, "owned subpage's free list disagrees with its free count");
  s->free = NULL;
  s->hint = 0;
}
