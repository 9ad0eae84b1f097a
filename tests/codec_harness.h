/*
 * A frame codec in a pipeline of its own, without a socket: shared by the
 * codec tests (tests/test_codec.c) and the fuzz targets (fuzz/).
 *
 *   front  -> codec -> collector
 *
 * front plays the channel's part: a close closes "the connection" as
 * sl_channel_close does (inactive, then removed, synchronously), and writes
 * are recorded and released. collector plays the next stage: it records
 * each frame (4-byte length, then the bytes), checks that it is a derived
 * buffer sharing the cumulation's memory, and releases it, or with
 * keep_every holds every k-th frame until sl_ch_close (so cumulations live
 * on under frames). An error event closes the connection, as the tail does.
 * Every buffer fed in answers to h->owner, as a channel's reads do, so the
 * derived buffers made from them are on its list too.
 */
#ifndef SL_CODEC_HARNESS_H
#define SL_CODEC_HARNESS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc/pool.h"
#include "buf/buf.h"
#include "buf/leak.h"
#include "pipeline/codec/cumulation.h"
#include "pipeline/stages.h"
#include "util/common.h"

#define SL_CH_KEEP_MAX 4096

typedef struct sl_ch {
  sl_pool *pool;
  sl_pipeline pipe;
  const sl_stage_ops *ops;
  void *conf;
  sl_ctx *codec;
  uint8_t *out;               /* frames (or writes): u32 length, bytes */
  size_t out_len, out_cap;
  size_t nframes, max_frame, nwrites;
  sl_buf *kept[SL_CH_KEEP_MAX];
  size_t nkept;
  int keep_every;             /* hold every k-th frame until close (0: none) */
  size_t close_after;         /* close from the collector at this frame (0: never) */
  char reason[64];            /* why it closed; "" while open */
  int closed;
  int bad;                    /* a frame that was not a derived buffer */
  sl_buf_owner owner;         /* what the "connection" answers for */
} sl_ch;

static inline void sl_ch_append(sl_ch *h, const uint8_t *p, size_t n) {
  if (h->out_len + n + 4 > h->out_cap) {
    size_t cap = h->out_cap ? h->out_cap : 4096;
    while (cap < h->out_len + n + 4) cap *= 2;
    h->out = realloc(h->out, cap);
    if (h->out == NULL) abort();
    h->out_cap = cap;
  }
  uint32_t len = (uint32_t)n;
  memcpy(h->out + h->out_len, &len, 4);
  if (n > 0) memcpy(h->out + h->out_len + 4, p, n);
  h->out_len += n + 4;
}

/* The connection closes: inactive, then removed, as sl_channel_close. */
static inline void sl_ch_front_close(sl_ctx *ctx, const char *reason) {
  sl_ch *h = (sl_ch *)(uintptr_t)ctx->conf;
  if (h->closed) return;
  h->closed = 1;
  snprintf(h->reason, sizeof(h->reason), "%s", reason);
  sl_pipeline_fire_inactive(&h->pipe);
  sl_pipeline_fire_removed(&h->pipe);
}

static inline void sl_ch_front_write(sl_ctx *ctx, sl_buf *b) {
  sl_ch *h = (sl_ch *)(uintptr_t)ctx->conf;
  sl_ch_append(h, sl_buf_rptr(b), sl_buf_readable(b));
  h->nwrites++;
  sl_buf_release(b);
}

static inline void sl_ch_front_flush(sl_ctx *ctx) { (void)ctx; }

static const sl_stage_ops sl_ch_front_ops = {
    .name = "front",
    .write = sl_ch_front_write,
    .flush = sl_ch_front_flush,
    .close = sl_ch_front_close,
};

static inline void sl_ch_collect(sl_ctx *ctx, sl_buf *b) {
  sl_ch *h = (sl_ch *)(uintptr_t)ctx->conf;
  if ((b->flags & (SL_BUF_VIEW | SL_BUF_DERIVED)) != (SL_BUF_VIEW | SL_BUF_DERIVED) ||
      b->refcnt != 1) {
    h->bad = 1;
  } else {
    sl_buf *m = sl_buf_memory_root(b);
    if (b->data < m->data || b->data + b->cap > m->data + m->block_size) h->bad = 1;
  }
  size_t n = sl_buf_readable(b);
  sl_ch_append(h, sl_buf_rptr(b), n);
  if (n > h->max_frame) h->max_frame = n;
  h->nframes++;
  if (h->keep_every && h->nframes % (size_t)h->keep_every == 0 && h->nkept < SL_CH_KEEP_MAX)
    h->kept[h->nkept++] = b;
  else
    sl_buf_release(b);
  if (h->close_after && h->nframes == h->close_after) sl_pipeline_close(&h->pipe, "collector");
}

static inline void sl_ch_error(sl_ctx *ctx, const char *err) {
  sl_ch *h = (sl_ch *)(uintptr_t)ctx->conf;
  sl_pipeline_close(&h->pipe, err);
}

static inline void sl_ch_nop(sl_ctx *ctx) { (void)ctx; }

static const sl_stage_ops sl_ch_collector_ops = {
    .name = "collector",
    .on_read = sl_ch_collect,
    .on_error = sl_ch_error,
    .on_read_complete = sl_ch_nop,
    .on_inactive = sl_ch_nop,
};

/* Sets h up around the C stage `module` configured with opts. SL_OK, or
 * SL_ERROR with err (the options were refused). */
static inline int sl_ch_open(sl_ch *h, sl_pool *pool, const char *module, const sl_opts *opts,
                             char *err, size_t errlen) {
  memset(h, 0, sizeof(*h));
  h->pool = pool;
  h->ops = sl_stage_builtin(module);
  if (h->ops == NULL) {
    snprintf(err, errlen, "no C stage %s", module);
    return SL_ERROR;
  }
  if (sl_stage_configure(h->ops, opts, &h->conf, err, errlen) != SL_OK) return SL_ERROR;
  sl_pipeline_init(&h->pipe, NULL);
  if (sl_stage_add(&h->pipe, &sl_ch_front_ops, "front", h) == NULL ||
      (h->codec = sl_stage_add(&h->pipe, h->ops, module, h->conf)) == NULL ||
      sl_stage_add(&h->pipe, &sl_ch_collector_ops, "collector", h) == NULL)
    abort();
  sl_pipeline_fire_active(&h->pipe);
  return SL_OK;
}

/* One read of n bytes (a fresh buffer, as a socket read gives). */
static inline void sl_ch_feed(sl_ch *h, const uint8_t *p, size_t n) {
  sl_buf *b = sl_buf_from(h->pool, p, n);
  if (b == NULL) abort();
  sl_buf_set_owner(b, &h->owner);
  sl_pipeline_fire_read(&h->pipe, b);
  if (!h->closed) sl_pipeline_fire_read_complete(&h->pipe);
}

/* A tiny deterministic generator (xorshift64*), for chunkings. */
static inline uint64_t sl_ch_rand(uint64_t *s) {
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * 2685821657736338717ull;
}

/* Feeds p in reads of 1..max_chunk bytes chosen by seed. */
static inline void sl_ch_feed_chunked(sl_ch *h, const uint8_t *p, size_t n, uint64_t seed,
                                      size_t max_chunk) {
  uint64_t s = seed | 1;
  size_t off = 0;
  while (off < n) {
    size_t c = 1 + (size_t)(sl_ch_rand(&s) % max_chunk);
    if (c > n - off) c = n - off;
    sl_ch_feed(h, p + off, c);
    off += c;
  }
}

/* An outbound write of n bytes through the stage (the prepender). */
static inline void sl_ch_write(sl_ch *h, const uint8_t *p, size_t n) {
  sl_buf *b = sl_buf_from(h->pool, p, n);
  if (b == NULL) abort();
  sl_pipeline_write(&h->pipe, b);
}

/* Closes (if still open, as "eof"), frees the pipeline, the held frames
 * and the configuration; h->out stays until sl_ch_free. */
static inline void sl_ch_close(sl_ch *h) {
  if (!h->closed) sl_pipeline_close(&h->pipe, "eof");
  sl_pipeline_destroy(&h->pipe);
  for (size_t i = 0; i < h->nkept; i++) sl_buf_release(h->kept[i]);
  h->nkept = 0;
  sl_stage_unconfigure(h->ops, h->conf);
  h->conf = NULL;
}

static inline void sl_ch_free(sl_ch *h) {
  free(h->out);
  h->out = NULL;
}

#endif
