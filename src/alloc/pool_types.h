/*
 * sl_pool's layout, visible so that the cache and recycler fast paths in
 * pool.h can be inlined into the buffer code. Only alloc/ and buf/ use it.
 *
 * A pool is one worker's front of the allocator:
 *   - bins: per size class (up to max_cached), a stack of freed blocks;
 *     bounded (small_cache / normal_cache), trimmed every trim_interval
 *     allocations (entries that went unused are given back) and when the
 *     worker has been idle for trim_idle_ms (everything is given back).
 *     An entry is either a bare block (tagged with SL_BIN_BARE: a block
 *     freed without a buffer) or, most often, a
 *     parked header: the dead header of a root buffer released on its
 *     worker, still carrying its block (at SL_HDR_BLOCK_OFFSET), so that a
 *     cache hit is one pop and a release one push. A parked header is dead
 *     as any free header (generation 0, who released it kept) and still
 *     what a root over that block needs (root itself, no views, no owner,
 *     flags 0, block_size and sclass of its bin's class): an allocation
 *     sets only the indexes, capacities, refcount and generation. Taking a
 *     block without a buffer, flushing or trimming gives the header to the
 *     recycler (flushing or trimming a class that owns subpages parks it,
 *     with its block, on the block's owned subpage); a header needed when the recycler and the overflow list are
 *     empty is taken from a parked one near the top of a bin, or first on
 *     an owned subpage's list, whose block stays there bare, before a new
 *     slot is used;
 *   - headers: buffer headers come from a region of address space reserved
 *     for this pool and aligned to SL_HDR_REGION_SPAN, so the pool of any
 *     header is found by masking its address. The region is never unmapped
 *     while the pool lives: a stale Lua handle always reads a header
 *     safely, and a released header's generation is 0, which no live
 *     buffer has. The recycler keeps up to recycler_cap free headers on a
 *     stack; more go to an overflow list (counted); when no header is live
 *     and the worker is idle, the whole region's memory is given back to
 *     the OS (madvise), which zeroes it;
 *   - owned subpages: a small class whose bin holds 8 or more takes whole
 *     subpages from the arena (alloc/chunk.h) and serves its misses from
 *     them without the arena's lock: a miss takes the first item of the
 *     first owned subpage with room, and a release that finds the bin
 *     full puts its block back on its owned subpage. A subpage's free
 *     list holds items as a bin does: a root released on its worker parks
 *     there, header with block (linked through SL_HDR_LINK_OFFSET; nfree
 *     counts it, the subpage's nbare does not), so that a miss is set up
 *     as a hit is; other blocks are bare (SL_BIN_BARE, linked through
 *     their first 8 bytes) and get a header from the recycler. Parked
 *     headers there are free headers (headers_free). Like the arena, the pool keeps at most
 *     one empty subpage per class: a subpage that becomes empty while
 *     others of its class have room goes back to the arena. Trimming
 *     everything (idle, out of memory, destroy) gives every owned subpage
 *     back, so that empty chunks can go to the OS. Whatever gives a
 *     subpage back first moves its parked headers to the recycler (their
 *     blocks stay, bare). The arena's per class counts take the pool's
 *     share (own_allocs, own_frees) whenever the pool takes the arena's
 *     lock, and at every trim;
 *   - retq: buffers released on foreign threads come back through a bounded
 *     queue; when it is full, the releasing thread frees the block straight
 *     into the arena and pushes the headers on a lock-free stack.
 */
#ifndef SL_POOL_TYPES_H
#define SL_POOL_TYPES_H

#include <stdatomic.h>
#include <stdint.h>

#include "alloc/arena.h"
#include "alloc/retq.h"

#define SL_HDR_SIZE 64
/* Free headers on the overflow list and the foreign-return stack are linked
 * through the pointer at this offset: sl_buf's views field, unused in a
 * dead header (buf.c checks the offset), so that a dead header keeps what
 * errors about stale handles read (generation, flags, root, release site). */
#define SL_HDR_LINK_OFFSET 40
#define SL_HDR_REGION_SPAN ((uintptr_t)1 << 27)   /* 2 Mi headers */
/* A parked header keeps its block here: sl_buf's data, as it was while
 * live (buf.c checks the offset; a dead header keeps who released it in
 * its cap and max_cap). */
#define SL_HDR_BLOCK_OFFSET 0
#define SL_BIN_BARE ((uintptr_t)1)   /* a bin entry with this bit is a bare block */

typedef struct sl_pool sl_pool;

/* One size class of a pool: its cache bin and its counters, one cache line,
 * so that a hit reads and writes one line beside the buffer header.
 *
 * Each allocation and each release is counted once, in one of these: the
 * blocks this pool handed out are allocs_rest + used + own_allocs, those
 * it got back frees_rest + own_frees (sl_pool_class_allocs and
 * sl_pool_class_frees). A hit counts used (what the trim reads), a miss
 * served by an owned subpage own_allocs, a release parked on one
 * own_frees (what the arena is told); the trim folds used into allocs_rest,
 * and a report to the arena (sl_pool_own_report) folds own_allocs and
 * own_frees into allocs_rest and frees_rest. A normal class no bin caches
 * (normal_pages set) counts the runs its fast paths take from the arena
 * and give back in own_allocs and own_frees, under the arena's lock: the
 * arena's readers add them to its counts (sl_pool_arena_share) until a
 * report moves them into the arena's counts, under the same lock. A cached block that a trim or
 * a flush gives to its owned subpage counts in own_frees for the arena and
 * leaves frees_rest (the pool's release was counted when it was cached). */
typedef struct sl_cache_bin {
  void **items;
  uint32_t n;             /* cached now */
  uint32_t cap;
  uint32_t used;          /* hits since the last trim */
  uint32_t own_allocs;    /* blocks taken from owned subpages (a normal class: runs
                             from the arena's fast path), not yet in the arena's
                             counts */
  uint64_t tail;          /* the last 8 bytes of a root header over a block of this
                             class (block_size, sclass, flags: 0, or SL_BUF_UNBINNED
                             for a normal class no bin caches): one store */
  uint64_t allocs_rest;   /* blocks handed out by this pool, but for used and own_allocs */
  uint64_t frees_rest;    /* blocks given back to it, but for own_frees */
  struct sl_subpage *own; /* owned subpages of this class with a free element, or
                             &sl_pool_own_none (sl_pool_own_first) */
  uint32_t own_frees;     /* blocks given back to owned subpages, likewise */
  uint16_t owns;          /* 1: a miss takes from owned subpages (a small class whose
                             bin holds 8 or more); a release into the full bin parks
                             on its block's subpage when the pool owns that */
  uint16_t normal_pages;  /* a normal class no bin caches, of runs shorter than
                             SL_AVAIL_LENS pages: its run length (the arena's fast
                             paths, sl_arena_normal_head); else 0 */
} sl_cache_bin;

_Static_assert(sizeof(sl_cache_bin) == 64, "a class is one cache line");

struct sl_pool {
  /* hot: the fast paths touch only these */
  sl_sub_owner sub_owner;         /* this pool as the owner of subpages: first, so that
                                     a subpage's owner compares with the pool's address
                                     (written by other threads only when they free an
                                     owned subpage's element, which is rare) */
  void *free_tp;                  /* owner_tp, or NULL while the next header freed is to
                                     wait in the quarantine: what sl_buf_free's fast
                                     path compares the thread pointer with */
  size_t max_cached_size;         /* largest size the bins serve (0: none, or failing) */
  size_t lookup_max_size;         /* the same, at most SL_SC_LOOKUP_MAX (one table load) */
  size_t normal_max_size;         /* largest size a chunk serves (0: unpooled, or failing) */
  size_t normal_lookup_max;       /* the same, at most SL_SC_LOOKUP_MAX (one table load) */
  uint32_t nsmall;                /* classes below this are small (subpages) */
  uint32_t rec_n, rec_cap;        /* recycler stack */
  void **recycler;
  union {
    uint64_t gen_word;            /* the next buffer's refcount and generation as its
                                     header holds them (one store): */
    struct {
      uint32_t gen_refcnt;        /* 1, */
      uint32_t gen_next;          /* and the generation (odd, never 0): the next one is
                                     2 more, one add to this half */
    };
  };
  uintptr_t chunk_mask;           /* ~(chunk_size - 1): a block's chunk */
  uint32_t countdown;             /* allocations until the next event: a count-based
                                     trim or a leak sample (see sl_pool_event); not
                                     next to gen_next (the compiler would add both
                                     with one vector add) */
  uint32_t page_shift;            /* log2(page_size): a block's page in it */
  /* Per size class: the cache bin and the counters (read through
   * sl_pool_class_allocs and sl_pool_class_frees). */
  _Alignas(64) sl_cache_bin bins[SL_SC_MAX_CLASSES];   /* each bin on a line of its own */
  /* sl_sc_lookup's copy: the table an allocation reads, addressed from the
   * pool (no address of a table of its own to form first) */
  uint16_t lookup[SL_SC_LOOKUP_MAX / 16 + 1];

  /* cold */
  uint32_t run_pages[SL_SC_MAX_CLASSES];   /* the allocator's: pages per normal block */
  void *owner_tp;                 /* thread pointer of the bound thread */
  size_t cached_limit;            /* max_cached_size when not failing on purpose */
  size_t normal_limit;            /* normal_max_size likewise */
  uint32_t trim_interval;
  uint32_t trim_countdown;        /* allocations until the next count-based trim, */
  uint32_t leak_countdown;        /* and the next leak sample, as of the time */
  uint32_t countdown_set;         /* countdown was last set to this (sl_pool_event) */
  unsigned fail_next;             /* injected failures still to give */
  uint64_t other_allocs, other_frees;   /* huge and unpooled blocks */
  uint64_t cache_hits;            /* hits folded in at each trim (see bins[].used) */
  uint64_t unpark_frees;          /* the classes' frees (sl_pool_class_frees) when a
                                     search last found no parked header in the bins
                                     (sl_pool_unpark) */
  sl_alloc *alloc;
  sl_arena *arena;
  sl_pool *arena_next;            /* the next pool using arena (its pools list) */
  struct sl_subpage *owned;       /* every subpage it owns (own_prev, own_next) */
  int own_alloc;                  /* created with the pool (tests) */
  int id;
  uint8_t *hdr_base;              /* region start (the first slot holds this pool) */
  void *hdr_map;                  /* what mmap returned */
  size_t hdr_map_len;
  uint32_t hdr_next;              /* next never-used slot */
  uint32_t hdr_max;               /* slots in the region */
  void *hdr_overflow;             /* free headers beyond the recycler */
  uint64_t hdr_overflow_n;
  _Atomic(void *) hdr_remote;     /* headers freed by foreign threads */
  _Atomic(void *) bufs_remote;    /* whole buffers freed by foreign threads that the
                                     owner must take back itself (tracked ones) */
  sl_retq retq;
  uint64_t alloc_failures;
  uint64_t trims, idle_trims;
  uint64_t recycler_overflows;    /* headers that did not fit the recycler */
  uint64_t region_resets;         /* header memory given back to the OS */
  uint64_t unpooled_bytes;        /* unpooled and huge blocks live now */
  uint64_t drained;               /* buffers taken back from the return queue */
  atomic_uint_fast64_t remote_queued;   /* pushed by foreign threads */
  atomic_uint_fast64_t remote_direct;   /* freed directly: queue was full */
  atomic_uint_fast64_t remote_direct_bytes;
  atomic_uint_fast64_t remote_direct_cls[SL_SC_MAX_CLASSES];   /* of those, by class */
  atomic_uint_fast64_t remote_stacked;  /* handed over through bufs_remote */
  int64_t last_activity_ms;
  uint64_t allocs_at_tick;
  /* leak tracking (buf/leak.c); level 0 leaves the rest unused */
  int leak_level;
  uint32_t leak_sample;
  uint32_t *leak_next, *leak_prev;       /* per header slot: owner list links */
  uint32_t *leak_derived;                /* per header slot: live derived buffers */
  void **leak_rec;                       /* per header slot: record or NULL */
  void *leak_spare;                      /* records kept for the next samples (malloc'd,
                                            linked through their first word) */
  uint32_t leak_spare_n;                 /* at most SL_LEAK_SPARE (buf/leak.h) */
  size_t leak_map_len;
  uint64_t leaks, leaked_bytes, leak_recorded;
  const char *release_site;              /* who releases now; kept in dead headers */
  int quarantine_next;                   /* the next freed header waits its turn
                                            (sl_pool_quarantine_next) */
  void *quarantine[64];                  /* headers released from Lua, oldest reused first */
  unsigned quarantine_head, quarantine_n;
  char release_ring[64][160];            /* recent release sites with file:line */
  unsigned release_ring_next;
  /* holders (buf/holder.c): per header slot, who holds the buffer now */
  struct sl_holder *holders;             /* NULL: not tracked */
  size_t holders_map_len;
};

#endif
