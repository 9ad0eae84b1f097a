#include "pipeline/codec/cumulation.h"

#include <string.h>

#include "alloc/pool.h"
#include "buf/leak.h"
#include "util/common.h"

/* The capacity for a cumulation of n bytes: Netty's calculateNewCapacity
 * (powers of two from 64 up to 4 MiB, then steps of 4 MiB). */
static size_t sl_cum_capacity(size_t n) {
  const size_t step = (size_t)4 << 20;
  if (n > step) {
    size_t c = (n + step - 1) / step * step;
    return c > SL_BUF_MAX_CAPACITY ? SL_BUF_MAX_CAPACITY : c;
  }
  size_t c = 64;
  while (c < n) c <<= 1;
  return c;
}

static void sl_cum_release(sl_buf *b) {
  sl_pool *p = sl_pool_of(b->root);
  sl_buf_release_site(p, "a frame decoder");
  sl_buf_release(b);
  sl_buf_release_site(p, NULL);
}

int sl_cum_add(sl_cum *c, sl_buf *in) {
  sl_buf *cum = c->buf;
  if (cum == NULL || sl_buf_readable(cum) == 0) {
    if (cum != NULL) sl_cum_release(cum);
    c->buf = in;
    return SL_OK;
  }
  size_t old = sl_buf_readable(cum), n = sl_buf_readable(in);
  /* Behind the writer index of a root of our own: frames end before it. */
  if (!(cum->flags & (SL_BUF_VIEW | SL_BUF_HAS_VIEWS)) && n <= sl_buf_writable(cum)) {
    memcpy(sl_buf_wptr(cum), sl_buf_rptr(in), n);
    cum->wr += (uint32_t)n;
    sl_cum_release(in);
    return SL_OK;
  }
  if (n > SL_BUF_MAX_CAPACITY - old) {
    sl_cum_release(in);
    return SL_ERROR;
  }
  sl_pool *pool = sl_pool_current();
  if (pool == NULL) pool = sl_pool_of(in->root);
  size_t cap = sl_cum_capacity(old + n);
  sl_buf *nb = sl_buf_alloc(pool, cap, cap);
  if (nb == NULL) {
    sl_cum_release(in);
    return SL_ERROR;
  }
  if (in->root->owner != NULL) sl_buf_set_owner(nb, in->root->owner);
  memcpy(nb->data, sl_buf_rptr(cum), old);
  memcpy(nb->data + old, sl_buf_rptr(in), n);
  nb->wr = (uint32_t)(old + n);
  sl_cum_release(cum);
  sl_cum_release(in);
  c->buf = nb;
  return SL_OK;
}

/* The stream is bad: nothing more is decoded; the error event goes down
 * the pipeline (the tail closes the connection with the reason), and if a
 * stage took the error without closing, the connection is closed anyway. */
static void sl_cum_fail(sl_ctx *ctx, sl_cum *c, const char *reason) {
  c->failed = 1;
  if (c->buf != NULL) {
    sl_cum_release(c->buf);
    c->buf = NULL;
  }
  sl_ctx_fire_error(ctx, reason);
  if (!c->removed) sl_ctx_close(ctx, reason);
}

/* The stage leaves: with the connection open (taken out of a running
 * pipeline) what is left goes on to the next stage, as Netty's
 * handlerRemoved does; with the connection closed it is released. */
static void sl_cum_leave(sl_ctx *ctx, sl_cum *c) {
  sl_buf *b = c->buf;
  c->buf = NULL;
  if (b == NULL) return;
  if (ctx != NULL && c->pass_on && !c->failed && sl_buf_readable(b) > 0) {
    sl_ctx_fire_read(ctx, b);
    sl_ctx_fire_read_complete(ctx);
    return;
  }
  sl_cum_release(b);
}

/* Runs step until it makes no progress; returns how many frames it fired. */
static size_t sl_cum_decode(sl_ctx *ctx, sl_cum *c, sl_cum_step_fn step) {
  size_t frames = 0;
  c->busy = 1;
  while (c->buf != NULL && !c->removed && !c->failed) {
    sl_buf *cum = c->buf;
    size_t before = sl_buf_readable(cum);
    if (before == 0) break;
    const char *reason = NULL;
    sl_buf *frame = step(ctx, cum, &reason);
    if (frame != NULL) {
      frames++;
      sl_ctx_fire_read(ctx, frame);
      continue;
    }
    if (reason != NULL) {
      sl_cum_fail(ctx, c, reason);
      break;
    }
    if (sl_buf_readable(cum) == before) break;
  }
  c->busy = 0;
  if (c->removed) sl_cum_leave(ctx, c);
  return frames;
}

/* Netty's discardSomeReadBytes, when nothing else holds the cumulation. */
static void sl_cum_discard_some(sl_buf *b) {
  if ((b->flags & (SL_BUF_VIEW | SL_BUF_HAS_VIEWS)) || b->refcnt != 1 || b->rd == 0) return;
  if (b->rd == b->wr) {
    b->rd = b->wr = 0;
  } else if (b->rd >= b->cap / 2) {
    memmove(b->data, b->data + b->rd, b->wr - b->rd);
    b->wr -= b->rd;
    b->rd = 0;
  }
}

void sl_cum_read(sl_ctx *ctx, sl_cum *c, sl_buf *in, sl_cum_step_fn step) {
  if (c->failed || c->removed) {
    sl_cum_release(in);
    return;
  }
  if (sl_cum_add(c, in) != SL_OK) {
    sl_cum_fail(ctx, c, "out of memory");
    return;
  }
  if (c->busy) return; /* a read delivered while a frame was being fired */
  sl_cum_decode(ctx, c, step);
  sl_buf *cum = c->buf;
  if (cum == NULL) return;
  if (sl_buf_readable(cum) == 0) {
    sl_cum_release(cum);
    c->buf = NULL;
    c->reads = 0;
  } else if (++c->reads >= SL_CUM_DISCARD_AFTER_READS) {
    c->reads = 0;
    sl_cum_discard_some(cum);
  }
}

void sl_cum_inactive(sl_ctx *ctx, sl_cum *c, sl_cum_step_fn step) {
  if (!c->busy && !c->failed && !c->removed && c->buf != NULL) {
    if (sl_cum_decode(ctx, c, step) > 0) sl_ctx_fire_read_complete(ctx);
  }
  sl_ctx_fire_inactive(ctx);
}

void sl_cum_removed(sl_ctx *ctx, sl_cum *c) {
  c->removed = 1;
  c->pass_on = ctx != NULL && ctx->removed;
  if (!c->busy) sl_cum_leave(ctx, c);
}

void sl_cum_on_read(sl_ctx *ctx, sl_buf *b) {
  sl_cum_read(ctx, ctx->state, b, ((const sl_cum_conf *)ctx->conf)->step);
}

void sl_cum_on_inactive(sl_ctx *ctx) {
  sl_cum_inactive(ctx, ctx->state, ((const sl_cum_conf *)ctx->conf)->step);
}

void sl_cum_on_removed(sl_ctx *ctx) { sl_cum_removed(ctx, ctx->state); }

void sl_cum_on_destroy(sl_ctx *ctx) { sl_cum_removed(NULL, ctx->state); }
