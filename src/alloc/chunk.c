#include "alloc/chunk.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "util/common.h"

static int sl_bit(const uint64_t *bits, uint32_t i) { return (int)((bits[i >> 6] >> (i & 63)) & 1); }

static void sl_bits_set(uint64_t *bits, uint32_t from, uint32_t n, int on) {
  for (uint32_t i = from; i < from + n; i++) {
    if (on) bits[i >> 6] |= 1ull << (i & 63);
    else bits[i >> 6] &= ~(1ull << (i & 63));
  }
}

/* First page >= i whose bit equals want, or limit. */
static uint32_t sl_bits_find(const uint64_t *bits, uint32_t i, uint32_t limit, int want) {
  while (i < limit) {
    uint64_t w = bits[i >> 6];
    if (!want) w = ~w;
    w &= ~0ull << (i & 63);
    if (w) {
      uint32_t r = (i & ~63u) + (uint32_t)__builtin_ctzll(w);
      return r < limit ? r : limit;
    }
    i = (i & ~63u) + 64;
  }
  return limit;
}

static size_t sl_chunk_meta_bytes(uint32_t npages) {
  return sizeof(sl_chunk) + ((npages + 63) / 64) * 8 + npages * sizeof(uint32_t) + 8 +
         npages * sizeof(sl_subpage *);
}

uint32_t sl_chunk_meta_pages(size_t chunk_size, size_t page_size) {
  return (uint32_t)((sl_chunk_meta_bytes((uint32_t)(chunk_size / page_size)) + page_size - 1) /
                    page_size);
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
  c->used = (uint64_t *)(void *)(c + 1);
  c->run_len = (uint32_t *)(void *)(c->used + (npages + 63) / 64);
  c->sub = (sl_subpage **)(void *)(((uintptr_t)(c->run_len + npages) + 7) & ~(uintptr_t)7);
  sl_bits_set(c->used, 0, c->meta_pages, 1);
  c->free_pages = npages - c->meta_pages;
  return c;
}

void sl_chunk_delete(sl_chunk *c, size_t chunk_size) { munmap(c->mem, chunk_size); }

int sl_chunk_run_alloc(sl_chunk *c, uint32_t n) {
  if (n > c->free_pages) return -1;
  uint32_t i = c->meta_pages;
  while (i < c->npages) {
    uint32_t start = sl_bits_find(c->used, i, c->npages, 0);
    if (start + n > c->npages) return -1;
    uint32_t end = sl_bits_find(c->used, start, start + n, 1);
    if (end == start + n) {
      sl_bits_set(c->used, start, n, 1);
      c->run_len[start] = n;
      c->free_pages -= n;
      return (int)start;
    }
    i = sl_bits_find(c->used, end, c->npages, 0);
  }
  return -1;
}

void sl_chunk_run_free(sl_chunk *c, uint32_t page, uint32_t n) {
  SL_ASSERT(page >= c->meta_pages && page + n <= c->npages && sl_bit(c->used, page),
            "run freed that is not allocated");
  sl_bits_set(c->used, page, n, 0);
  c->run_len[page] = 0;
  c->free_pages += n;
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
