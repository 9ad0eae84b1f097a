/*
 * Holders: which pipeline context holds each live buffer now, for the
 * memory summary (/memory: "which stage is holding the memory").
 *
 * A side table indexed by header slot, like leak tracking's owner lists
 * (buf/leak.c), so the 64-byte header does not grow. Each entry keeps who
 * (an opaque pointer: the sl_ctx that last received the buffer, or the
 * pipeline's head for the outbound queue) and the generation of the buffer
 * it was set for; an entry whose generation differs from the header's is
 * stale (the slot was reused) and means "no holder recorded". So nothing is
 * cleared on allocation or release: setting a holder is two stores.
 *
 * The owner thread writes (sl_buf_hold at each pipeline hop); only the
 * owner thread reads (the summary walks its pool on the worker's thread).
 * A `who` pointer is never dereferenced by this module: readers compare it
 * with the contexts they know to be alive.
 */
#ifndef SL_HOLDER_H
#define SL_HOLDER_H

#include <stddef.h>
#include <stdint.h>

#include "alloc/pool.h"
#include "buf/buf_types.h"

typedef struct sl_holder {
  const void *who;       /* the holding context (opaque), or NULL */
  uint32_t gen;          /* generation of the buffer it was set for */
  uint32_t unused;
} sl_holder;

/* Starts recording holders for p's buffers (maps the table: address space
 * only until slots are used). SL_OK, or SL_ERROR when mmap fails (holders
 * are then not recorded). Owner thread. */
int sl_holder_enable(sl_pool *p);

/* Unmaps p's table (before sl_pool_destroy). */
void sl_holder_disable(sl_pool *p);

/* Records who as the holder of b (a root or a view: its root is marked). */
static inline void sl_buf_hold(const sl_buf *b, const void *who) {
  const sl_buf *r = b->root;
  sl_holder *t = sl_pool_of(r)->holders;
  if (t == NULL) return;
  sl_holder *h = &t[((uintptr_t)r & (SL_HDR_REGION_SPAN - 1)) / SL_HDR_SIZE];
  h->who = who;
  h->gen = r->gen;
}

/* Calls fn for every live root buffer of p with its recorded holder (NULL
 * when none was recorded for it). Owner thread. */
void sl_holder_walk(sl_pool *p, void (*fn)(void *ud, const sl_buf *b, const void *who),
                    void *ud);

#endif
