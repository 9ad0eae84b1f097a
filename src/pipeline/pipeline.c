#include "pipeline/pipeline.h"

#include <stdlib.h>
#include <string.h>

#include "buf/buf.h"
#include "buf/holder.h"
#include "buf/leak.h"
#include "io/channel.h"
#include "util/common.h"
#include "util/log.h"

/* ---- head: outbound operations reach the channel ---- */

static void sl_head_write(sl_ctx *ctx, sl_buf *b) { sl_channel_write(sl_ctx_channel(ctx), b); }
static void sl_head_flush(sl_ctx *ctx) { sl_channel_flush(sl_ctx_channel(ctx)); }
static void sl_head_close(sl_ctx *ctx, const char *reason) {
  sl_channel_close(sl_ctx_channel(ctx), reason, 0);
}

static void sl_head_read(sl_ctx *ctx) { sl_channel_read_request(sl_ctx_channel(ctx)); }

static const sl_stage_ops sl_head_ops = {
    .name = "head",
    .write = sl_head_write,
    .flush = sl_head_flush,
    .close = sl_head_close,
    .read = sl_head_read,
};

/* ---- tail: the end of the inbound path ---- */

static void sl_tail_read(sl_ctx *ctx, sl_buf *b) {
  struct sl_channel *ch = sl_ctx_channel(ctx);
  sl_channel_note_unhandled(ch);
  if (sl_log_enabled(SL_LOG_DEBUG)) {
    sl_log(SL_LOG_DEBUG, "%s: %zu inbound bytes reached the tail of the pipeline and were released",
           sl_channel_describe(ch), sl_buf_readable(b));
  }
  sl_pool *p = sl_pool_of(b->root);
  sl_buf_release_site(p, "the tail of the pipeline (no stage consumed it)");
  sl_buf_release(b);
  sl_buf_release_site(p, NULL);
}

static void sl_tail_user_event(sl_ctx *ctx, int event) {
  /* Nobody took the end of input: finish writing, then close. */
  if (event == SL_UEV_INPUT_CLOSED) sl_channel_shutdown_output(sl_ctx_channel(ctx));
}

static void sl_tail_error(sl_ctx *ctx, const char *err) {
  sl_channel_close(sl_ctx_channel(ctx), err, 1);
}

static void sl_tail_nop(sl_ctx *ctx) { SL_UNUSED(ctx); }
static void sl_tail_writability(sl_ctx *ctx, int w) { SL_UNUSED(ctx); SL_UNUSED(w); }

static const sl_stage_ops sl_tail_ops = {
    .name = "tail",
    .on_active = sl_tail_nop,
    .on_inactive = sl_tail_nop,
    .on_read = sl_tail_read,
    .on_read_complete = sl_tail_nop,
    .on_writability = sl_tail_writability,
    .on_user_event = sl_tail_user_event,
    .on_error = sl_tail_error,
};

static uint32_t sl_ops_mask(const sl_stage_ops *ops) {
  uint32_t m = 0;
  if (ops->on_active) m |= SL_EV_BIT(SL_EV_ACTIVE);
  if (ops->on_inactive) m |= SL_EV_BIT(SL_EV_INACTIVE);
  if (ops->on_read) m |= SL_EV_BIT(SL_EV_READ);
  if (ops->on_read_complete) m |= SL_EV_BIT(SL_EV_READ_COMPLETE);
  if (ops->on_writability) m |= SL_EV_BIT(SL_EV_WRITABILITY);
  if (ops->on_user_event) m |= SL_EV_BIT(SL_EV_USER_EVENT);
  if (ops->on_error) m |= SL_EV_BIT(SL_EV_ERROR);
  if (ops->write) m |= SL_EV_BIT(SL_EV_WRITE);
  if (ops->flush) m |= SL_EV_BIT(SL_EV_FLUSH);
  if (ops->close) m |= SL_EV_BIT(SL_EV_CLOSE);
  if (ops->read) m |= SL_EV_BIT(SL_EV_READ_REQUEST);
  return m;
}

void sl_pipeline_init(sl_pipeline *p, struct sl_channel *ch) {
  memset(p, 0, sizeof(*p));
  p->ch = ch;
  p->head.ops = &sl_head_ops;
  p->head.name = "head";
  p->head.pipe = p;
  p->head.mask = SL_EV_BIT(SL_EV_WRITE) | SL_EV_BIT(SL_EV_FLUSH) | SL_EV_BIT(SL_EV_CLOSE) |
                 SL_EV_BIT(SL_EV_READ_REQUEST);
  p->tail.ops = &sl_tail_ops;
  p->tail.name = "tail";
  p->tail.pipe = p;
  p->tail.mask = SL_EV_INBOUND_MASK;
  p->head.next = &p->tail;
  p->tail.prev = &p->head;
}

sl_ctx *sl_pipeline_insert(sl_pipeline *p, sl_ctx *before, const sl_stage_ops *ops,
                           const char *name) {
  SL_ASSERT(before != &p->head && before->pipe == p && !before->removed,
            "a stage is inserted before a live context of its own pipeline");
  sl_ctx *ctx = sl_zalloc(sizeof(*ctx) + ops->state_size);
  if (ctx == NULL) return NULL;
  ctx->ops = ops;
  ctx->pipe = p;
  ctx->name = name ? name : ops->name;
  ctx->mask = sl_ops_mask(ops);
  ctx->state = ops->state_size ? (void *)(ctx + 1) : NULL;
  ctx->prev = before->prev;
  ctx->next = before;
  before->prev->next = ctx;
  before->prev = ctx;
  p->nstages++;
  return ctx;
}

sl_ctx *sl_pipeline_add_last(sl_pipeline *p, const sl_stage_ops *ops, const char *name) {
  return sl_pipeline_insert(p, &p->tail, ops, name);
}

void sl_pipeline_remove(sl_ctx *ctx) {
  sl_pipeline *p = ctx->pipe;
  SL_ASSERT(ctx != &p->head && ctx != &p->tail, "head and tail stay");
  if (ctx->removed) return;
  ctx->prev->next = ctx->next;
  ctx->next->prev = ctx->prev;
  /* ctx keeps its next and prev: an event it sends while it is being
   * removed still reaches its old neighbours, as in Netty. */
  ctx->removed = 1;
  ctx->gone = p->removed;
  p->removed = ctx;
  p->nstages--;
  if (ctx->ops->on_removed) ctx->ops->on_removed(ctx);
}

void sl_pipeline_fire_removed(sl_pipeline *p) {
  for (sl_ctx *ctx = p->head.next; ctx != &p->tail; ctx = ctx->next)
    if (ctx->ops->on_removed) ctx->ops->on_removed(ctx);
}

void sl_pipeline_destroy(sl_pipeline *p) {
  sl_ctx *ctx = p->head.next;
  while (ctx != &p->tail) {
    sl_ctx *next = ctx->next;
    if (ctx->ops->destroy) ctx->ops->destroy(ctx);
    free(ctx);
    ctx = next;
  }
  while (p->removed != NULL) {
    sl_ctx *gone = p->removed;
    p->removed = gone->gone;
    if (gone->ops->destroy) gone->ops->destroy(gone);
    free(gone);
  }
  p->head.next = &p->tail;
  p->tail.prev = &p->head;
  p->nstages = 0;
}

sl_ctx *sl_ctx_next_handler(sl_ctx *ctx, sl_event ev) {
  uint32_t bit = SL_EV_BIT(ev);
  if (bit & SL_EV_INBOUND_MASK) {
    sl_ctx *n = ctx->next;
    while (!(n->mask & bit)) n = n->next;
    return n;
  }
  sl_ctx *n = ctx->prev;
  while (!(n->mask & bit)) n = n->prev;
  return n;
}

void sl_ctx_fire_active(sl_ctx *ctx) {
  sl_ctx *n = sl_ctx_next_handler(ctx, SL_EV_ACTIVE);
  n->ops->on_active(n);
}

void sl_ctx_fire_inactive(sl_ctx *ctx) {
  sl_ctx *n = sl_ctx_next_handler(ctx, SL_EV_INACTIVE);
  n->ops->on_inactive(n);
}

void sl_ctx_fire_read(sl_ctx *ctx, sl_buf *b) {
  sl_ctx *n = sl_ctx_next_handler(ctx, SL_EV_READ);
  sl_buf_hold(b, n);
  if (b->root->flags & SL_BUF_RECORDED) sl_leak_touch(b, n->name, 1);
  n->ops->on_read(n, b);
}

void sl_ctx_fire_read_complete(sl_ctx *ctx) {
  sl_ctx *n = sl_ctx_next_handler(ctx, SL_EV_READ_COMPLETE);
  n->ops->on_read_complete(n);
}

void sl_ctx_fire_writability(sl_ctx *ctx, int writable) {
  sl_ctx *n = sl_ctx_next_handler(ctx, SL_EV_WRITABILITY);
  n->ops->on_writability(n, writable);
}

void sl_ctx_fire_user_event(sl_ctx *ctx, int event) {
  sl_ctx *n = sl_ctx_next_handler(ctx, SL_EV_USER_EVENT);
  n->ops->on_user_event(n, event);
}

void sl_ctx_fire_error(sl_ctx *ctx, const char *err) {
  sl_ctx *n = sl_ctx_next_handler(ctx, SL_EV_ERROR);
  n->ops->on_error(n, err);
}

void sl_ctx_write(sl_ctx *ctx, sl_buf *b) {
  sl_ctx *n = sl_ctx_next_handler(ctx, SL_EV_WRITE);
  sl_buf_hold(b, n); /* the head: the outbound queue holds it */
  if (b->root->flags & SL_BUF_RECORDED) sl_leak_touch(b, n->name, 1);
  n->ops->write(n, b);
}

void sl_ctx_flush(sl_ctx *ctx) {
  sl_ctx *n = sl_ctx_next_handler(ctx, SL_EV_FLUSH);
  n->ops->flush(n);
}

void sl_ctx_close(sl_ctx *ctx, const char *reason) {
  sl_ctx *n = sl_ctx_next_handler(ctx, SL_EV_CLOSE);
  n->ops->close(n, reason);
}

void sl_ctx_read(sl_ctx *ctx) {
  sl_ctx *n = sl_ctx_next_handler(ctx, SL_EV_READ_REQUEST);
  n->ops->read(n);
}

void sl_pipeline_fire_active(sl_pipeline *p) { sl_ctx_fire_active(&p->head); }
void sl_pipeline_fire_inactive(sl_pipeline *p) { sl_ctx_fire_inactive(&p->head); }
void sl_pipeline_fire_read(sl_pipeline *p, sl_buf *b) { sl_ctx_fire_read(&p->head, b); }
void sl_pipeline_fire_read_complete(sl_pipeline *p) { sl_ctx_fire_read_complete(&p->head); }
void sl_pipeline_fire_writability(sl_pipeline *p, int w) { sl_ctx_fire_writability(&p->head, w); }
void sl_pipeline_fire_user_event(sl_pipeline *p, int e) { sl_ctx_fire_user_event(&p->head, e); }
void sl_pipeline_fire_error(sl_pipeline *p, const char *err) { sl_ctx_fire_error(&p->head, err); }
void sl_pipeline_write(sl_pipeline *p, sl_buf *b) { sl_ctx_write(&p->tail, b); }
void sl_pipeline_flush(sl_pipeline *p) { sl_ctx_flush(&p->tail); }
void sl_pipeline_close(sl_pipeline *p, const char *reason) { sl_ctx_close(&p->tail, reason); }
void sl_pipeline_read(sl_pipeline *p) { sl_ctx_read(&p->tail); }
