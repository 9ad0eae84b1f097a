/*
 * The sl_buf layout. It is visible to LuaJIT through lua/sluice/cdef.lua,
 * which must mirror it exactly; nothing here depends on build flags.
 *
 * A buffer is one of three kinds:
 *   root      owns a memory block and a refcount.
 *   view      (slice, duplicate) shares the memory and the refcount of its
 *             refcount holder `root` (a root or a derived view) and has its
 *             own indexes; it holds no reference and dies with its holder
 *             (it is on the holder's `views` list).
 *   derived   (retained slice, retained duplicate: Netty's
 *             AbstractPooledDerivedByteBuf) shares memory but has its own
 *             refcount, starting at 1, and holds one reference on its
 *             parent (the refcount holder it was made from). Its `root` is
 *             itself, so release is the same for every kind; at zero its
 *             header goes back, its views die and the parent's reference is
 *             released. The parent is found through `parent_off`.
 *
 * States of a root:
 *   live      refcnt > 0, gen != 0; data points at a block of block_size
 *             bytes from the pool
 *   released  refcnt == 0, gen == 0; the block is back in the pool and the
 *             header on its free list (it may be reused, with a new gen).
 *             Views of a released root are released with it.
 *
 * Generations come from a per-pool counter and are never 0, so a handle
 * (which keeps the gen it saw) can tell that its buffer is gone by one
 * compare, whatever happened to the header since. Headers live in memory
 * that stays mapped as long as their pool (alloc/pool_types.h).
 *
 * A live derived buffer keeps its parent's refcount at 1 or more, so its
 * memory cannot go back before it does. A parent that had derived buffers
 * has SL_BUF_SHARED set; it does not move its memory (grow) while any of
 * them lives (their count is kept beside the headers, buf/leak.c).
 *
 * Invariants: 0 <= rd <= wr <= cap <= max_cap; a view's or a derived
 * buffer's [data, data + cap) lies inside the block of the root whose
 * memory it shares; views never outlive their refcount holder (they die
 * together). sizeof(sl_buf) == 64.
 */
#ifndef SL_BUF_TYPES_H
#define SL_BUF_TYPES_H

#include <stdint.h>

typedef struct sl_buf sl_buf;

struct sl_buf {
  uint8_t *data;         /* first byte of this buffer */
  uint32_t rd;           /* reader index */
  uint32_t wr;           /* writer index */
  uint32_t cap;          /* capacity */
  uint32_t max_cap;      /* roots may grow to this; views: == cap */
  uint32_t refcnt;       /* roots and derived; views use root->refcnt */
  uint32_t gen;          /* != 0 while live; handles keep a copy */
  sl_buf *root;          /* refcount holder: self for a root or derived */
  sl_buf *views;         /* with SL_BUF_HAS_VIEWS: the first view; a view: its next
                            sibling; a root without views: its block's subpage for
                            a small class (the release reads it), else a stand-in
                            subpage no pool owns (alloc/pool.h's sl_pool_own_none) */
  struct sl_buf_owner *owner; /* roots, derived: who answers for it (a channel) */
  union {
    uint32_t block_size; /* roots: usable size of the block */
    uint32_t parent_off; /* derived: the parent header's offset in its region */
  };
  uint16_t sclass;       /* roots: the block's size class (SL_SC_NONE: huge) */
  uint16_t flags;        /* SL_BUF_* */
};                       /* the pool is sl_pool_of(header) */

#define SL_BUF_VIEW 0x1u
#define SL_BUF_RECORDED 0x2u   /* leak tracking keeps a record (site, touches) */
#define SL_BUF_DERIVED 0x4u    /* with SL_BUF_VIEW: a derived buffer */
#define SL_BUF_SHARED 0x8u     /* derived buffers were made from it */
/* Kept with the fields they stand for, so that a release tests one word:
 * owner != NULL, a view list in views (test the flag, not views, which a
 * root without views uses for its block's subpage), a block no cache bin
 * takes (huge, unpooled, a normal class above max_cached). */
#define SL_BUF_OWNED 0x10u
#define SL_BUF_HAS_VIEWS 0x20u
#define SL_BUF_UNBINNED 0x40u

/* Something buffers can be owned by (a channel embeds one): the live roots
 * it answers for, linked through a per-pool side table (buf/leak.c). */
typedef struct sl_buf_owner {
  uint32_t head;         /* first buffer's header slot, 0: none */
  uint32_t count;        /* buffers owned now */
  uint64_t bytes;        /* their block bytes */
} sl_buf_owner;

/* A Lua handle: what a script holds. refs is the number of references this
 * handle owns (a handle that passed its buffer on owns none); fin is 1
 * while the handle carries its finalizer (attached lazily: see buf.lua). */
typedef struct sl_lbuf {
  sl_buf *b;
  uint32_t gen;
  int32_t refs;
  int32_t fin;
  int32_t owner;         /* the Lua stage that owns its references (0: any) */
} sl_lbuf;

#endif
