/*
 * sluice.codec.line: Netty's LineBasedFrameDecoder. Frames end at "\n" or
 * "\r\n"; strip_delimiter (default true) leaves the ending out of the frame.
 * A line longer than max_length (not counting its ending): frame_too_large,
 * once its end has gone by (discarded, never held), or at once with
 * fail_fast. A "\r" at the end of what has arrived is not counted against
 * max_length while its "\n" may follow.
 */
#include <string.h>

#include "pipeline/codec/cumulation.h"
#include "pipeline/stages.h"
#include "util/common.h"

typedef struct sl_line_conf {
  sl_cum_conf cum;
  int64_t max_length;
  int strip;
  int fail_fast;
} sl_line_conf;

typedef struct sl_line_state {
  sl_cum cum;
  size_t searched;       /* readable bytes known to hold no "\n" */
  int discarding;        /* skipping a line that is too long */
} sl_line_state;

static sl_buf *sl_line_step(sl_ctx *ctx, sl_buf *cum, const char **reason) {
  const sl_line_conf *cf = ctx->conf;
  sl_line_state *st = ctx->state;
  const uint8_t *p = sl_buf_rptr(cum);
  size_t n = sl_buf_readable(cum);
  const uint8_t *lf = memchr(p + st->searched, '\n', n - st->searched);
  if (lf == NULL) {
    st->searched = n;
    size_t pending = n - (p[n - 1] == '\r'); /* the "\r" of a "\r\n" to come */
    if (st->discarding) {
      cum->rd = cum->wr - (uint32_t)(n - pending);
      st->searched = n - pending;
    } else if (pending > (size_t)cf->max_length) {
      st->discarding = 1;
      cum->rd = cum->wr - (uint32_t)(n - pending);
      st->searched = n - pending;
      if (cf->fail_fast) *reason = SL_CODEC_TOO_LARGE;
    }
    return NULL;
  }
  st->searched = 0;
  size_t eol = (size_t)(lf - p);
  size_t delim = 1;
  if (eol > 0 && p[eol - 1] == '\r') {
    eol--;
    delim = 2;
  }
  if (st->discarding) {
    st->discarding = 0;
    cum->rd += (uint32_t)(eol + delim);
    if (!cf->fail_fast) *reason = SL_CODEC_TOO_LARGE;
    return NULL;
  }
  if (eol > (size_t)cf->max_length) {
    cum->rd += (uint32_t)(eol + delim);
    *reason = SL_CODEC_TOO_LARGE;
    return NULL;
  }
  sl_buf *frame = sl_buf_read_retained_slice(cum, cf->strip ? eol : eol + delim, reason);
  if (frame != NULL && cf->strip) cum->rd += (uint32_t)delim;
  return frame;
}

static int sl_line_configure(void *conf, const sl_opts *o, char *err, size_t errlen) {
  static const char *const keys[] = {"max_length", "strip_delimiter", "fail_fast", NULL};
  sl_line_conf *cf = conf;
  cf->cum.step = sl_line_step;
  if (sl_opts_check_keys(o, keys, err, errlen) != SL_OK ||
      sl_opts_int(o, "max_length", 1, INT32_MAX, 1, 0, "a positive integer", &cf->max_length,
                  err, errlen) != SL_OK ||
      sl_opts_bool(o, "strip_delimiter", 1, &cf->strip, err, errlen) != SL_OK ||
      sl_opts_bool(o, "fail_fast", 0, &cf->fail_fast, err, errlen) != SL_OK)
    return SL_ERROR;
  return SL_OK;
}

const sl_stage_ops sl_codec_line =
    SL_CUM_DECODER("sluice.codec.line", sizeof(sl_line_state), sizeof(sl_line_conf),
                   sl_line_configure, NULL);
