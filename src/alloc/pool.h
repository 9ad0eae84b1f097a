/*
 * sl_pool: where buffer memory and buffer headers come from.
 *
 * One pool per worker; it is not thread-safe and needs none (a worker is one
 * thread). This version is backed by malloc: blocks are exact-size malloc
 * allocations. The pooled allocator (arenas, chunks, subpages, caches) replaces
 * the inside of these functions without changing their contract.
 *
 * Headers are type-stable: a header given back with sl_pool_header_put goes to
 * a free list and its memory is only returned to the system by
 * sl_pool_destroy. A Lua handle may therefore always read a header's
 * generation number, even after the buffer it described was released.
 */
#ifndef SL_POOL_H
#define SL_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef struct sl_pool sl_pool;

typedef struct sl_pool_stats {
  uint64_t bytes_in_use;     /* sum of usable sizes of live blocks */
  uint64_t blocks_in_use;    /* live blocks */
  uint64_t allocs;           /* blocks handed out since creation */
  uint64_t frees;            /* blocks given back since creation */
  uint64_t alloc_failures;   /* requests refused (out of memory, injected) */
  uint64_t headers_total;    /* headers ever created (type-stable memory) */
  uint64_t headers_free;     /* headers on the free list */
  uint64_t bufs_active;      /* live sl_buf roots (maintained by buf) */
  uint64_t bufs_active_bytes;/* capacity of live sl_buf roots */
} sl_pool_stats;

/* Creates a pool whose headers are header_size bytes. Returns NULL on ENOMEM. */
sl_pool *sl_pool_create(size_t header_size);

/* Frees everything the pool owns. Live blocks at this point are a leak; the
 * caller reports them first (sl_pool_stats). */
void sl_pool_destroy(sl_pool *p);

/* Returns a block of at least size bytes and stores its usable size in
 * *usable, or NULL when the memory cannot be had (errno ENOMEM). */
void *sl_pool_alloc(sl_pool *p, size_t size, size_t *usable);

/* Gives back a block from sl_pool_alloc; usable is the size it reported. */
void sl_pool_free(sl_pool *p, void *mem, size_t usable);

/* Returns a zeroed header (type-stable memory), or NULL on ENOMEM. */
void *sl_pool_header_get(sl_pool *p);

/* Gives a header back to the free list. The caller has already bumped its
 * generation; only the first sizeof(void *) bytes after `keep` are reused
 * as the free-list link, so fields before `keep` stay readable. */
void sl_pool_header_put(sl_pool *p, void *hdr);

/* Counters kept by buf for live roots. */
void sl_pool_note_buf(sl_pool *p, int delta, int64_t bytes);

/* Test aid: make the next n allocations fail (0 turns it off). */
void sl_pool_fail_next(sl_pool *p, unsigned n);

void sl_pool_get_stats(const sl_pool *p, sl_pool_stats *out);

#endif
