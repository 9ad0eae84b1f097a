/*
 * sl_buf: a reference-counted byte buffer with reader and writer indexes,
 * Netty's ByteBuf semantics. See buf_types.h for the layout and states.
 *
 * Ownership vocabulary: a function that "returns +1" gives the caller one
 * reference to release; "takes ownership" consumes one of the caller's;
 * "borrows" does neither.
 */
#ifndef SL_BUF_H
#define SL_BUF_H

#include <stddef.h>
#include <stdint.h>

#include "buf/buf_types.h"

#include "alloc/pool.h"

#define SL_BUF_MAX_CAPACITY 0x7fffffffu

/* Allocates a buffer of capacity cap that may grow to max_cap (0: cap).
 * Returns +1, or NULL when memory cannot be had. */
sl_buf *sl_buf_alloc(sl_pool *pool, size_t cap, size_t max_cap);

/* Allocates a buffer holding a copy of len bytes. Returns +1 or NULL. */
sl_buf *sl_buf_from(sl_pool *pool, const void *src, size_t len);

/* The owner of pool takes back the buffers foreign threads released
 * (sl_buf_alloc does it when its recycler runs dry, the worker's timer
 * regularly). Returns how many. */
size_t sl_buf_drain(sl_pool *pool);

/* Aborts: release of a released buffer (a broken invariant in C). */
_Noreturn void sl_buf_release_dead(const sl_buf *b);

/* Adds one reference. The buffer must be live (an invariant). */
void sl_buf_retain(sl_buf *b);

/* Who is releasing buffers right now, for "released by ..." in errors
 * about dead handles: a static string, or NULL for "the core". Kept by
 * the headers the next frees put back; reset after each free. */
static inline void sl_buf_release_site(sl_pool *p, const char *site) {
  p->release_site = site ? site : "the core";
}

/* The description a dead header keeps of who released the buffer of
 * generation gen, or NULL when the header was reused since. */
const char *sl_buf_released_by(const sl_buf *b, uint32_t gen);

/* Frees a root or derived buffer whose last reference goes (its refcount
 * is 1, or already 0): sets the refcount to 0 and does what release does
 * at zero (release's slow half). */
void sl_buf_free(sl_buf *r);

/* Drops one reference; at zero, returns the memory (a derived buffer: its
 * header, and its parent's reference) and kills every view. Returns 1 when
 * the refcount reached zero, else 0. Aborts on a dead buffer:
 * in C an over-release is a broken invariant. */
static inline int sl_buf_release(sl_buf *b) {
  sl_buf *r = b->root;
  uint32_t refcnt = r->refcnt;
  if (__builtin_expect(refcnt == 1, 1)) {
    sl_buf_free(r);   /* the refcount goes to 0 there */
    return 1;
  }
  if (__builtin_expect(refcnt == 0, 0)) sl_buf_release_dead(b);
  r->refcnt = refcnt - 1;
  return 0;
}

/* Checked forms for callers that take counts from scripts: refuse instead
 * of aborting. Return 1 (released) or 0 (still live) or SL_ERROR with *err
 * set, e.g. "refcnt 1, decrement 2"; nothing changes on refusal. */
int sl_buf_retain_n(sl_buf *b, uint32_t n, const char **err);
int sl_buf_release_n(sl_buf *b, uint32_t n, const char **err);

/* A view of [index, index + len) of b's capacity, sharing its memory and
 * refcount (no retain: the view is valid while b's refcount is above zero,
 * and dies with it). Returns the view, or NULL on a bad range (*err) or
 * ENOMEM. */
sl_buf *sl_buf_slice(sl_buf *b, size_t index, size_t len, const char **err);

/* A view of b's whole capacity with b's indexes. NULL on ENOMEM. */
sl_buf *sl_buf_duplicate(sl_buf *b);

/* A derived buffer (Netty's retainedSlice): [index, index + len) of b's
 * capacity, reader index 0, writer index len, with its own refcount and one
 * reference on b's refcount holder, released when the derived buffer's
 * refcount reaches zero (its header goes back then). Answers to b's owner.
 * Returns +1, or NULL on a bad range (*err) or ENOMEM (*err). b borrowed. */
sl_buf *sl_buf_retained_slice(sl_buf *b, size_t index, size_t len, const char **err);

/* The same for the next len readable bytes of b, whose reader index
 * advances past them (Netty's readRetainedSlice). Returns +1 or NULL. */
sl_buf *sl_buf_read_retained_slice(sl_buf *b, size_t len, const char **err);

/* A derived buffer over b's whole capacity with b's indexes. +1 or NULL. */
sl_buf *sl_buf_retained_duplicate(sl_buf *b);

/* The header a derived buffer holds its reference on. */
static inline sl_buf *sl_buf_parent(const sl_buf *d) {
  return (sl_buf *)(((uintptr_t)d & ~(SL_HDR_REGION_SPAN - 1)) + d->parent_off);
}

/* The root whose block b's bytes lie in (b itself for a root). */
sl_buf *sl_buf_memory_root(sl_buf *b);

/* 1 when b may move its memory to grow: a root without views and without
 * live derived buffers. Else 0 with
 * *err: "a view cannot grow" or "a buffer with views cannot grow". */
int sl_buf_may_grow(const sl_buf *b, const char **err);

/* Makes room for n more writable bytes, growing a root within max_cap (the
 * contents move to a larger block). SL_OK, or SL_ERROR with *err. */
int sl_buf_ensure_writable(sl_buf *b, size_t n, const char **err);

/* Appends len bytes, growing as ensure_writable does. */
int sl_buf_write(sl_buf *b, const void *src, size_t len, const char **err);

static inline int sl_buf_is_live(const sl_buf *b) { return b->root->refcnt > 0; }
static inline uint32_t sl_buf_refcnt(const sl_buf *b) { return b->root->refcnt; }
static inline size_t sl_buf_readable(const sl_buf *b) { return b->wr - b->rd; }
static inline size_t sl_buf_writable(const sl_buf *b) { return b->cap - b->wr; }
static inline uint8_t *sl_buf_rptr(const sl_buf *b) { return b->data + b->rd; }
static inline uint8_t *sl_buf_wptr(const sl_buf *b) { return b->data + b->wr; }

#endif
