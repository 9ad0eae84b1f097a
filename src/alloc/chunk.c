#include "alloc/chunk.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "alloc/poison.h"
#include "util/common.h"

#define SL_NONE 0xffffffffu

static int sl_bit(const uint64_t *bits, uint32_t i) { return (int)((bits[i >> 6] >> (i & 63)) & 1); }

static size_t sl_chunk_meta_bytes(uint32_t npages) {
  size_t words = (npages + 1 + 63) / 64;
  return sizeof(sl_chunk) + 8 * (size_t)npages * sizeof(uint32_t) + words * 8 + 16 +
         (size_t)npages * sizeof(sl_subpage *);
}

uint32_t sl_chunk_meta_pages(size_t chunk_size, size_t page_size) {
  return (uint32_t)((sl_chunk_meta_bytes((uint32_t)(chunk_size / page_size)) + page_size - 1) /
                    page_size);
}

static void sl_free_insert(sl_chunk *c, uint32_t start, uint32_t len) {
  c->free_head[start] = len;
  c->free_tail[start + len - 1] = len;
  uint32_t first = c->bucket[len];
  c->free_next[start] = first;
  c->free_prev[start] = SL_NONE;
  if (first != SL_NONE) c->free_prev[first] = start;
  c->bucket[len] = start;
  c->nonempty[len >> 6] |= 1ull << (len & 63);
  if (len > c->max_free) c->max_free = len;
}

/* After runs were taken out and put back: if the longest free run's bucket
 * emptied, the longest is now shorter; find it scanning down from there. */
static void sl_free_fix_max(sl_chunk *c) {
  uint32_t m = c->max_free;
  if (m == 0 || c->bucket[m] != SL_NONE) return;
  int w = (int)(m >> 6);
  uint64_t bits = c->nonempty[w] & (~0ull >> (63 - (m & 63)));
  for (;;) {
    if (bits) {
      c->max_free = (uint32_t)w * 64 + 63 - (uint32_t)__builtin_clzll(bits);
      return;
    }
    if (--w < 0) break;
    bits = c->nonempty[w];
  }
  c->max_free = 0;
}

static void sl_free_remove(sl_chunk *c, uint32_t start) {
  uint32_t len = c->free_head[start];
  uint32_t next = c->free_next[start], prev = c->free_prev[start];
  if (prev != SL_NONE) c->free_next[prev] = next;
  else c->bucket[len] = next;
  if (next != SL_NONE) c->free_prev[next] = prev;
  if (c->bucket[len] == SL_NONE) c->nonempty[len >> 6] &= ~(1ull << (len & 63));
  c->free_head[start] = 0;
  c->free_tail[start + len - 1] = 0;
}

/* The smallest length >= n whose bucket has a free run, or 0. */
static uint32_t sl_free_fit(const sl_chunk *c, uint32_t n) {
  uint32_t words = (c->npages + 1 + 63) / 64;
  uint32_t w = n >> 6;
  uint64_t bits = c->nonempty[w] & (~0ull << (n & 63));
  for (;;) {
    if (bits) return (w << 6) + (uint32_t)__builtin_ctzll(bits);
    if (++w >= words) return 0;
    bits = c->nonempty[w];
  }
}

sl_chunk *sl_chunk_new(struct sl_arena *arena, size_t chunk_size, size_t page_size) {
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
  c->mem = (uint8_t *)start;
  c->npages = npages;
  c->meta_pages = sl_chunk_meta_pages(chunk_size, page_size);
  c->page_shift = (uint32_t)__builtin_ctzll(page_size);
  uint32_t *u = (uint32_t *)(void *)(c + 1);   /* fresh mmap: all zero */
  c->run_len = u;
  c->free_head = u + npages;
  c->free_tail = u + 2 * npages;
  c->free_next = u + 3 * npages;
  c->free_prev = u + 4 * npages;
  c->bucket = u + 5 * npages;                  /* npages + 1 entries */
  c->nonempty = (uint64_t *)(void *)(((uintptr_t)(u + 7 * npages) + 7) & ~(uintptr_t)7);
  uint32_t words = (npages + 1 + 63) / 64;
  c->sub = (sl_subpage **)(void *)(c->nonempty + words);
  memset(c->bucket, 0xff, (npages + 1) * sizeof(uint32_t));
  c->free_pages = npages - c->meta_pages;
  sl_free_insert(c, c->meta_pages, c->free_pages);
  return c;
}

void sl_chunk_delete(sl_chunk *c, size_t chunk_size) {
  SL_UNPOISON(c->mem, chunk_size);
  munmap(c->mem, chunk_size);
}

int sl_chunk_run_alloc(sl_chunk *c, uint32_t n) {
  if (n == 0 || n > c->max_free) return -1;
  uint32_t len = sl_free_fit(c, n);
  if (len == 0) return -1;
  uint32_t start = c->bucket[len];
  sl_free_remove(c, start);
  if (len > n) sl_free_insert(c, start + n, len - n);
  sl_free_fix_max(c);
  c->run_len[start] = n;
  c->free_pages -= n;
  return (int)start;
}

void sl_chunk_run_free(sl_chunk *c, uint32_t page, uint32_t n) {
  SL_ASSERT(page >= c->meta_pages && page + n <= c->npages && c->run_len[page] == n,
            "run freed that is not allocated");
  c->run_len[page] = 0;
  c->free_pages += n;
  uint32_t start = page, len = n;
  if (page > c->meta_pages && c->free_tail[page - 1]) {   /* merge left */
    uint32_t l = c->free_tail[page - 1];
    start = page - l;
    sl_free_remove(c, start);
    len += l;
  }
  if (page + n < c->npages && c->free_head[page + n]) {    /* merge right */
    uint32_t r = c->free_head[page + n];
    sl_free_remove(c, page + n);
    len += r;
  }
  sl_free_insert(c, start, len);
  sl_free_fix_max(c);
}

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
  s->sclass = sclass;
  s->nwords = nwords;
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

int sl_subpage_free(sl_subpage *s, void *p) {
  size_t off = (size_t)((uint8_t *)p - s->base);
  uint32_t i = (uint32_t)(off / s->elem_size);
  SL_ASSERT(off % s->elem_size == 0 && i < s->nelems, "pointer is not an element of its subpage");
  SL_ASSERT(sl_bit(s->bits, i), "subpage element freed twice");
  s->bits[i >> 6] &= ~(1ull << (i & 63));
  s->nfree++;
  s->hint = i >> 6;
  return s->nfree == s->nelems;
}
