/*
 * sluice.codec.length_field_prepender: Netty's LengthFieldPrepender. Each
 * buffer written through it goes out after a length field holding its
 * readable bytes plus length_adjustment: two writes, the field in a small
 * buffer of its own and the message itself (no copy). A length that is
 * negative or does not fit the field closes the connection
 * (malformed_frame, frame_too_large) and releases the message.
 */
#include "alloc/pool.h"
#include "pipeline/codec/cumulation.h"
#include "pipeline/codec/length.h"
#include "pipeline/stages.h"
#include "util/common.h"

typedef struct sl_prepender_conf {
  int length;
  int big;
  int64_t adjustment;
} sl_prepender_conf;

static void sl_prepender_write(sl_ctx *ctx, sl_buf *b) {
  const sl_prepender_conf *cf = ctx->conf;
  int64_t len = (int64_t)sl_buf_readable(b) + cf->adjustment;
  const char *reason = NULL;
  if (len < 0) reason = SL_CODEC_MALFORMED;
  else if (cf->length < 8 && (uint64_t)len >> (8 * cf->length) != 0) reason = SL_CODEC_TOO_LARGE;
  sl_buf *field = NULL;
  if (reason == NULL) {
    sl_pool *pool = sl_pool_current();
    field = sl_buf_alloc(pool ? pool : sl_pool_of(b->root), (size_t)cf->length, 0);
    if (field == NULL) reason = "out of memory";
  }
  if (reason != NULL) {
    sl_pool *p = sl_pool_of(b->root);
    sl_buf_release_site(p, "a length field prepender, refusing it");
    sl_buf_release(b);
    sl_buf_release_site(p, NULL);
    sl_ctx_fire_error(ctx, reason); /* the tail closes the connection */
    sl_ctx_close(ctx, reason);      /* (if a stage took the error) */
    return;
  }
  sl_length_put(field->data, cf->length, cf->big, (uint64_t)len);
  field->wr = (uint32_t)cf->length;
  sl_ctx_write(ctx, field);
  sl_ctx_write(ctx, b);
}

static int sl_prepender_configure(void *conf, const sl_opts *o, char *err, size_t errlen) {
  static const char *const keys[] = {"length_field_length", "byte_order", "length_adjustment",
                                     NULL}; /* the order of checks, as in c_stage_options.lua */
  sl_prepender_conf *cf = conf;
  if (sl_opts_check_keys(o, keys, err, errlen) != SL_OK ||
      sl_length_options(o, &cf->length, &cf->big, &cf->adjustment, err, errlen) != SL_OK)
    return SL_ERROR;
  return SL_OK;
}

const sl_stage_ops sl_codec_length_field_prepender = {
    .name = "sluice.codec.length_field_prepender",
    .conf_size = sizeof(sl_prepender_conf),
    .configure = sl_prepender_configure,
    .write = sl_prepender_write,
};
