/*
 * A chunk: chunk_size bytes mapped from the OS, aligned to chunk_size, split
 * into pages. Its metadata lives in its own first pages, so the chunk of any
 * block is found by masking the block's address.
 *
 * Pages are handed out in runs. Free runs sit in buckets by length (a bitmap
 * says which buckets are non-empty), so an allocation takes the smallest
 * free run that fits and splits it, and a freed run merges with free
 * neighbours on both sides (their lengths are kept at both ends of every
 * free run). A run serves either one normal block or a subpage: equal
 * elements of one small size class tracked by a bitmap. Not thread-safe:
 * the owning arena's lock covers every call.
 */
#ifndef SL_CHUNK_H
#define SL_CHUNK_H

#include <stddef.h>
#include <stdint.h>

struct sl_arena;
typedef struct sl_chunk sl_chunk;
typedef struct sl_subpage sl_subpage;

struct sl_subpage {
  sl_chunk *chunk;
  sl_subpage *prev, *next;     /* the arena's list of subpages with free elements */
  uint8_t *base;               /* first element */
  uint32_t first_page, npages; /* the run */
  uint32_t elem_size, nelems, nfree;
  uint32_t sclass;
  uint32_t nwords;             /* bitmap words */
  uint32_t hint;               /* a word that may have a free bit */
  uint64_t bits[];             /* 1 = element in use */
};

struct sl_chunk {
  struct sl_arena *arena;
  sl_chunk *prev, *next;       /* the arena's usage list */
  uint8_t *mem;                /* == (uint8_t *)this */
  uint32_t npages;             /* pages in the chunk, metadata included */
  uint32_t meta_pages;         /* pages holding this struct and its maps */
  uint32_t free_pages;
  uint32_t max_free;           /* length of the longest free run */
  int list;                    /* index of the usage list it is on */
  int64_t empty_since_ms;      /* when it last became empty */
  uint32_t page_shift;
  uint32_t *run_len;           /* at an allocated run's first page: its length */
  uint32_t *free_head;         /* at a free run's first page: its length */
  uint32_t *free_tail;         /* at a free run's last page: its length */
  uint32_t *free_next;         /* at a free run's first page: bucket list links */
  uint32_t *free_prev;
  uint32_t *bucket;            /* per length 0..npages: first free run, or NONE */
  uint64_t *nonempty;          /* bit per length: its bucket has a run */
  sl_subpage **sub;            /* per page of a subpage run: the subpage */
};

/* Pages a chunk of this geometry spends on its own metadata. */
uint32_t sl_chunk_meta_pages(size_t chunk_size, size_t page_size);

/* Maps a new chunk. NULL when the OS refuses. */
sl_chunk *sl_chunk_new(struct sl_arena *arena, size_t chunk_size, size_t page_size);
void sl_chunk_delete(sl_chunk *c, size_t chunk_size);

/* Allocates a run of n pages (the smallest free run that fits, split);
 * returns its first page index or -1. */
int sl_chunk_run_alloc(sl_chunk *c, uint32_t n);
/* Frees the run of n pages that starts at page, merging free neighbours. */
void sl_chunk_run_free(sl_chunk *c, uint32_t page, uint32_t n);

/* Turns a run into a subpage of elem_size elements. NULL on ENOMEM (the run
 * is left allocated; the caller frees it). */
sl_subpage *sl_subpage_new(sl_chunk *c, uint32_t first_page, uint32_t npages,
                           uint32_t elem_size, uint32_t sclass);
void *sl_subpage_alloc(sl_subpage *s);
/* Returns 1 when the subpage became empty. */
int sl_subpage_free(sl_subpage *s, void *p);

static inline sl_chunk *sl_chunk_of(const void *p, size_t chunk_size) {
  return (sl_chunk *)(void *)((uintptr_t)p & ~((uintptr_t)chunk_size - 1));
}

static inline uint32_t sl_chunk_usable_pages(const sl_chunk *c) {
  return c->npages - c->meta_pages;
}

#endif
