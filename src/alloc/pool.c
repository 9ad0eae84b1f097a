#include "alloc/pool.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "util/common.h"

#define SL_POOL_SLAB_HEADERS 64

/* A slab of headers; slabs are chained and freed only with the pool. */
typedef struct sl_pool_slab {
  struct sl_pool_slab *next;
  /* headers follow, each header_size bytes, aligned to 16 */
} sl_pool_slab;

/* The free-list link lives at the end of a free header, so that the fields
 * a stale handle reads (data pointer, indexes, generation) stay intact. */
struct sl_pool {
  size_t header_size;       /* rounded up to 16 */
  sl_pool_slab *slabs;      /* every slab ever made */
  void *free_headers;       /* free list, linked through the last word */
  unsigned fail_next;       /* injected failures still to give */
  sl_pool_stats st;
};

static void **sl_pool_link(const sl_pool *p, void *hdr) {
  return (void **)(void *)((char *)hdr + p->header_size - sizeof(void *));
}

sl_pool *sl_pool_create(size_t header_size) {
  sl_pool *p = calloc(1, sizeof(*p));
  if (p == NULL) return NULL;
  p->header_size = (header_size + sizeof(void *) + 15) & ~(size_t)15;
  return p;
}

void sl_pool_destroy(sl_pool *p) {
  if (p == NULL) return;
  sl_pool_slab *s = p->slabs;
  while (s != NULL) {
    sl_pool_slab *next = s->next;
    free(s);
    s = next;
  }
  free(p);
}

void *sl_pool_alloc(sl_pool *p, size_t size, size_t *usable) {
  if (p->fail_next > 0) {
    p->fail_next--;
    p->st.alloc_failures++;
    errno = ENOMEM;
    return NULL;
  }
  if (size == 0) size = 1;
  void *mem = malloc(size);
  if (mem == NULL) {
    p->st.alloc_failures++;
    return NULL;
  }
  *usable = size;
  p->st.bytes_in_use += size;
  p->st.blocks_in_use++;
  p->st.allocs++;
  return mem;
}

void sl_pool_free(sl_pool *p, void *mem, size_t usable) {
  if (mem == NULL) return;
  SL_ASSERT(p->st.blocks_in_use > 0, "pool block freed twice");
  p->st.bytes_in_use -= usable;
  p->st.blocks_in_use--;
  p->st.frees++;
  free(mem);
}

static int sl_pool_grow_headers(sl_pool *p) {
  sl_pool_slab *s = malloc(16 + p->header_size * SL_POOL_SLAB_HEADERS);
  if (s == NULL) return SL_ERROR;
  s->next = p->slabs;
  p->slabs = s;
  char *h = (char *)s + 16;
  for (int i = 0; i < SL_POOL_SLAB_HEADERS; i++, h += p->header_size) {
    memset(h, 0, p->header_size);
    *sl_pool_link(p, h) = p->free_headers;
    p->free_headers = h;
  }
  p->st.headers_total += SL_POOL_SLAB_HEADERS;
  p->st.headers_free += SL_POOL_SLAB_HEADERS;
  return SL_OK;
}

void *sl_pool_header_get(sl_pool *p) {
  if (p->free_headers == NULL && sl_pool_grow_headers(p) != SL_OK) {
    errno = ENOMEM;
    return NULL;
  }
  void *h = p->free_headers;
  p->free_headers = *sl_pool_link(p, h);
  p->st.headers_free--;
  /* The generation survives reuse: a stale handle keeps seeing a mismatch. */
  return h;
}

void sl_pool_header_put(sl_pool *p, void *hdr) {
  *sl_pool_link(p, hdr) = p->free_headers;
  p->free_headers = hdr;
  p->st.headers_free++;
}

void sl_pool_note_buf(sl_pool *p, int delta, int64_t bytes) {
  p->st.bufs_active = (uint64_t)((int64_t)p->st.bufs_active + delta);
  p->st.bufs_active_bytes = (uint64_t)((int64_t)p->st.bufs_active_bytes + bytes);
}

void sl_pool_fail_next(sl_pool *p, unsigned n) { p->fail_next = n; }

void sl_pool_get_stats(const sl_pool *p, sl_pool_stats *out) { *out = p->st; }
