/*
 * sluice.codec.length_field: Netty's LengthFieldBasedFrameDecoder. A frame
 * is length_field_offset bytes, a length field, and the rest; the field's
 * value plus length_adjustment is the length of what follows the field.
 * The frame passed on starts initial_bytes_to_strip bytes in.
 *
 *   frame length = field + length_adjustment + offset + field length
 *
 * A negative 8-byte field, an adjusted length shorter than the header or
 * than initial_bytes_to_strip, or an adjustment that overflows:
 * malformed_frame. A frame longer than max_frame_length: frame_too_large,
 * at once with fail_fast (the default), else once the whole frame has gone
 * by (discarded, never held).
 */
#include "pipeline/codec/cumulation.h"
#include "pipeline/codec/length.h"
#include "pipeline/stages.h"
#include "util/common.h"

typedef struct sl_lf_conf {
  sl_cum_conf cum;
  int64_t max_frame_length;
  int64_t offset;            /* length_field_offset */
  int length;                /* length_field_length */
  int big;                   /* byte_order "big" */
  int64_t adjustment;
  int64_t strip;             /* initial_bytes_to_strip */
  int fail_fast;
  int64_t end_offset;        /* offset + length */
} sl_lf_conf;

typedef struct sl_lf_state {
  sl_cum cum;
  int64_t frame_length;      /* of the frame being received, 0: none yet */
  int discarding;            /* skipping a frame that is too long */
  int64_t bytes_to_discard;
} sl_lf_state;

/* Skips what is there of a frame that is too long. Returns 1 when the
 * whole of it has gone by. */
static int sl_lf_discard(sl_lf_state *st, sl_buf *cum) {
  size_t n = sl_buf_readable(cum);
  if ((int64_t)n > st->bytes_to_discard) n = (size_t)st->bytes_to_discard;
  cum->rd += (uint32_t)n;
  st->bytes_to_discard -= (int64_t)n;
  if (st->bytes_to_discard > 0) return 0;
  st->discarding = 0;
  return 1;
}

static sl_buf *sl_lf_step(sl_ctx *ctx, sl_buf *cum, const char **reason) {
  const sl_lf_conf *cf = ctx->conf;
  sl_lf_state *st = ctx->state;
  if (st->frame_length == 0) {
    if (st->discarding) {
      if (sl_lf_discard(st, cum) && !cf->fail_fast) *reason = SL_CODEC_TOO_LARGE;
      return NULL;
    }
    if ((int64_t)sl_buf_readable(cum) < cf->end_offset) return NULL;
    uint64_t field = sl_length_get(sl_buf_rptr(cum) + cf->offset, cf->length, cf->big);
    int64_t len;
    if (field > (uint64_t)INT64_MAX ||
        __builtin_add_overflow((int64_t)field, cf->adjustment + cf->end_offset, &len) ||
        len < cf->end_offset) {
      *reason = SL_CODEC_MALFORMED;
      return NULL;
    }
    if (len > cf->max_frame_length) {
      int64_t readable = (int64_t)sl_buf_readable(cum);
      if (len < readable) {
        cum->rd += (uint32_t)len;
      } else {
        st->discarding = 1;
        st->bytes_to_discard = len - readable;
        cum->rd = cum->wr;
      }
      /* At once with fail_fast; else when the whole frame has gone by. */
      if (cf->fail_fast || st->bytes_to_discard == 0) {
        st->discarding = 0;
        *reason = SL_CODEC_TOO_LARGE;
      }
      return NULL;
    }
    st->frame_length = len;
  }
  if ((int64_t)sl_buf_readable(cum) < st->frame_length) return NULL;
  if (cf->strip > st->frame_length) {
    *reason = SL_CODEC_MALFORMED;
    return NULL;
  }
  cum->rd += (uint32_t)cf->strip;
  sl_buf *frame = sl_buf_read_retained_slice(cum, (size_t)(st->frame_length - cf->strip), reason);
  if (frame == NULL) return NULL; /* *reason: out of memory */
  st->frame_length = 0;
  return frame;
}

static int sl_lf_configure(void *conf, const sl_opts *o, char *err, size_t errlen) {
  static const char *const keys[] = {"max_frame_length", "length_field_offset",
                                     "length_field_length", "byte_order", "length_adjustment",
                                     "initial_bytes_to_strip", "fail_fast", NULL};
  sl_lf_conf *cf = conf;
  cf->cum.step = sl_lf_step;
  if (sl_opts_check_keys(o, keys, err, errlen) != SL_OK ||
      sl_opts_int(o, "max_frame_length", 1, INT32_MAX, 1, 0, "a positive integer",
                  &cf->max_frame_length, err, errlen) != SL_OK ||
      sl_opts_int(o, "length_field_offset", 0, INT32_MAX, 0, 0,
                  "an integer from 0 to 2147483647", &cf->offset, err, errlen) != SL_OK ||
      sl_length_options(o, &cf->length, &cf->big, &cf->adjustment, err, errlen) != SL_OK ||
      sl_opts_int(o, "initial_bytes_to_strip", 0, INT32_MAX, 0, 0,
                  "an integer from 0 to 2147483647", &cf->strip, err, errlen) != SL_OK ||
      sl_opts_bool(o, "fail_fast", 1, &cf->fail_fast, err, errlen) != SL_OK)
    return SL_ERROR;
  if (cf->offset > cf->max_frame_length - cf->length) {
    snprintf(err, errlen,
             "length_field_offset: expected at most max_frame_length - length_field_length "
             "(%lld), got %lld",
             (long long)(cf->max_frame_length - cf->length), (long long)cf->offset);
    return SL_ERROR;
  }
  cf->end_offset = cf->offset + cf->length;
  return SL_OK;
}

const sl_stage_ops sl_codec_length_field =
    SL_CUM_DECODER("sluice.codec.length_field", sizeof(sl_lf_state), sizeof(sl_lf_conf),
                   sl_lf_configure, NULL);
