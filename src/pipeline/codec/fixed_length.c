/* sluice.codec.fixed_length: Netty's FixedLengthFrameDecoder. Every frame
 * is frame_length bytes. */
#include "pipeline/codec/cumulation.h"
#include "pipeline/stages.h"
#include "util/common.h"

typedef struct sl_fixed_conf {
  sl_cum_conf cum;
  int64_t frame_length;
} sl_fixed_conf;

static sl_buf *sl_fixed_step(sl_ctx *ctx, sl_buf *cum, const char **reason) {
  const sl_fixed_conf *cf = ctx->conf;
  if (sl_buf_readable(cum) < (size_t)cf->frame_length) return NULL;
  return sl_buf_read_retained_slice(cum, (size_t)cf->frame_length, reason);
}

static int sl_fixed_configure(void *conf, const sl_opts *o, char *err, size_t errlen) {
  static const char *const keys[] = {"frame_length", NULL};
  sl_fixed_conf *cf = conf;
  cf->cum.step = sl_fixed_step;
  if (sl_opts_check_keys(o, keys, err, errlen) != SL_OK ||
      sl_opts_int(o, "frame_length", 1, INT32_MAX, 1, 0, "a positive integer", &cf->frame_length,
                  err, errlen) != SL_OK)
    return SL_ERROR;
  return SL_OK;
}

const sl_stage_ops sl_codec_fixed_length =
    SL_CUM_DECODER("sluice.codec.fixed_length", sizeof(sl_cum), sizeof(sl_fixed_conf),
                   sl_fixed_configure, NULL);
