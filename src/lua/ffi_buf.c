/*
 * Buffer access shims: the C half of sluice.buf's derived buffers, growth,
 * compaction, copies and searches (lua/sluice/buf.lua does the byte access
 * itself, through the FFI). Declared in src/lua/ffi.h ("buffer access shims")
 * and again in lua/sluice/cdef.lua.
 *
 * Each shim takes the Lua handle, not the bare sl_buf, so it can check the
 * generation itself: a stale handle, broken indexes or a bad range give
 * SL_ERROR (or NULL) with a static *err; nothing here aborts, raises or
 * calls back into Lua. Lua validates its arguments first and builds the
 * messages users see; these checks are the second line.
 */
#include <string.h>

#include "alloc/pool.h"
#include "buf/buf.h"
#include "buf/leak.h"
#include "lua/ffi.h"
#include "util/common.h"

/* The live, consistent buffer behind h, or NULL with *err. Borrows h. */
static sl_buf *sl_ffi_buf_checked(const sl_lbuf *h, const char **err) {
  if (h == NULL || h->b == NULL) {
    *err = "no buffer";
    return NULL;
  }
  sl_buf *b = h->b;
  if (h->gen == 0 || b->gen != h->gen || b->root == NULL || b->root->refcnt == 0) {
    *err = "buffer used after release";
    return NULL;
  }
  /* Lua can write the header's fields; never trust them to stay sane. */
  int ok = b->rd <= b->wr && b->wr <= b->cap && b->cap <= b->max_cap;
  if (!(b->flags & SL_BUF_VIEW)) {
    ok = ok && b->root == b && b->cap <= b->block_size;
  } else {
    /* Views and derived buffers: inside the block whose bytes they share. */
    sl_buf *m = sl_buf_memory_root(b);
    ok = ok && m->refcnt > 0 && b->data >= m->data &&
         (size_t)(b->data - m->data) + b->cap <= m->block_size;
  }
  if (!ok) {
    *err = "buffer indexes out of order";
    return NULL;
  }
  return b;
}

/* A view of [index, index + len) of h's capacity (sl_buf_slice), or with
 * retain a derived buffer (sl_buf_retained_slice). Returns the view
 * (borrowed: valid while the buffer's refcount is above zero) or the
 * derived buffer (+1), or NULL with *err. Nothing changes on failure. */
sl_buf *sl_ffi_buf_slice(const sl_lbuf *h, size_t index, size_t len, int retain,
                         const char **err) {
  sl_buf *b = sl_ffi_buf_checked(h, err);
  if (b == NULL) return NULL;
  if (index > b->cap || len > b->cap - index) {
    *err = "slice out of range";
    return NULL;
  }
  if (retain && b->root->refcnt >= 0x7fffffffu) {
    *err = "refcount overflow";
    return NULL;
  }
  sl_buf *v = retain ? sl_buf_retained_slice(b, index, len, err) : sl_buf_slice(b, index, len, err);
  if (v == NULL) {
    *err = "out of buffer memory";
    return NULL;
  }
  return v;
}

/* A view of h's whole capacity with h's indexes (sl_buf_duplicate), or with
 * retain a derived buffer (sl_buf_retained_duplicate). As sl_ffi_buf_slice. */
sl_buf *sl_ffi_buf_duplicate(const sl_lbuf *h, int retain, const char **err) {
  sl_buf *b = sl_ffi_buf_checked(h, err);
  if (b == NULL) return NULL;
  if (retain && b->root->refcnt >= 0x7fffffffu) {
    *err = "refcount overflow";
    return NULL;
  }
  sl_buf *v = retain ? sl_buf_retained_duplicate(b) : sl_buf_duplicate(b);
  if (v == NULL) {
    *err = "out of buffer memory";
    return NULL;
  }
  return v;
}

/* Makes room for n more writable bytes (sl_buf_ensure_writable: a root
 * without views grows within its max capacity; its bytes [0, wr) move to a
 * larger block, the rest of the old capacity is not kept). SL_OK, or
 * SL_ERROR with *err: "exceeds max capacity", "a view cannot grow", "a
 * buffer with views cannot grow", "out of buffer memory". Nothing changes
 * on failure. */
int sl_ffi_buf_ensure_writable(const sl_lbuf *h, size_t n, const char **err) {
  sl_buf *b = sl_ffi_buf_checked(h, err);
  if (b == NULL) return SL_ERROR;
  if (n <= (size_t)(b->cap - b->wr)) return SL_OK;
  if (!sl_buf_may_grow(b, err)) return SL_ERROR;
  /* Checked here: sl_buf_ensure_writable computes wr + n unchecked. */
  if (n > (size_t)(b->max_cap - b->wr)) {
    *err = "exceeds max capacity";
    return SL_ERROR;
  }
  if (sl_buf_ensure_writable(b, n, err) != SL_OK) {
    *err = "out of buffer memory";
    return SL_ERROR;
  }
  return SL_OK;
}

/* Moves the readable bytes [rd, wr) to index 0: wr -= rd, rd = 0 (Netty's
 * discardReadBytes; bytes past the new writer index are unspecified). Returns
 * the number of bytes discarded, or SL_ERROR with *err. */
int sl_ffi_buf_discard_read_bytes(const sl_lbuf *h, const char **err) {
  sl_buf *b = sl_ffi_buf_checked(h, err);
  if (b == NULL) return SL_ERROR;
  uint32_t rd = b->rd;
  if (rd == 0) return 0;
  memmove(b->data, b->data + rd, b->wr - rd);
  b->wr -= rd;
  b->rd = 0;
  return (int)rd;
}

/* A new root from the calling thread's pool holding a copy of
 * [index, index + len) of h's capacity: reader index 0, writer index len,
 * max capacity that of h (at least len), answerable to h's owner when h's
 * buffer comes from the same pool. Returns +1, or NULL with *err. */
sl_buf *sl_ffi_buf_copy(const sl_lbuf *h, size_t index, size_t len, const char **err) {
  sl_buf *b = sl_ffi_buf_checked(h, err);
  if (b == NULL) return NULL;
  if (index > b->cap || len > b->cap - index) {
    *err = "copy out of range";
    return NULL;
  }
  sl_pool *pool = sl_pool_current();
  if (pool == NULL) {
    *err = "no buffer pool on this thread";
    return NULL;
  }
  size_t max_cap = b->max_cap > len ? b->max_cap : len;
  sl_buf *c = sl_buf_alloc(pool, len, max_cap);
  if (c == NULL) {
    *err = "out of buffer memory";
    return NULL;
  }
  if (len > 0) memcpy(c->data, b->data + index, len);
  c->wr = (uint32_t)len;
  sl_buf *r = b->root;
  if (r->owner != NULL && sl_pool_of(r) == pool) sl_buf_set_owner(c, r->owner);
  return c;
}

/* Searches [from, to) of h's capacity for the nlen bytes at needle (an
 * empty needle matches at from). Returns 1 and sets *at to the absolute
 * index of the first match, 0 when there is none, or SL_ERROR with *err. */
int sl_ffi_buf_find(const sl_lbuf *h, size_t from, size_t to, const void *needle, size_t nlen,
                    size_t *at, const char **err) {
  sl_buf *b = sl_ffi_buf_checked(h, err);
  if (b == NULL) return SL_ERROR;
  if (from > to || to > b->cap) {
    *err = "find out of range";
    return SL_ERROR;
  }
  if (needle == NULL && nlen > 0) {
    *err = "no needle";
    return SL_ERROR;
  }
  if (nlen > to - from) return 0;
  const uint8_t *base = b->data + from;
  const uint8_t *hit;
  if (nlen == 0) hit = base;
  else if (nlen == 1) hit = memchr(base, *(const uint8_t *)needle, to - from);
  else hit = memmem(base, to - from, needle, nlen);
  if (hit == NULL) return 0;
  *at = (size_t)(hit - b->data);
  return 1;
}
