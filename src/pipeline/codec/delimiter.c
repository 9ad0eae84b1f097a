/*
 * sluice.codec.delimiter: Netty's DelimiterBasedFrameDecoder. A frame ends
 * at the first of the delimiters that gives the shortest frame (the first
 * listed on a tie); strip_delimiter (default true) leaves it out of the
 * frame. A frame longer than max_frame_length: frame_too_large, at once
 * with fail_fast (the default), else once its delimiter has gone by (the
 * bytes are discarded, never held). Bytes at the end that may begin a
 * delimiter are not counted against max_frame_length until they are known.
 *
 * Unlike Netty, each byte is searched once per delimiter: a search resumes
 * where the last one ended (less a delimiter's length).
 */
#include <stdlib.h>
#include <string.h>

#include "pipeline/codec/cumulation.h"
#include "pipeline/stages.h"
#include "util/common.h"

typedef struct sl_delim_conf {
  sl_cum_conf cum;
  int64_t max_frame_length;
  int strip;
  int fail_fast;
  size_t n;                  /* delimiters */
  sl_opt_str *delims;        /* copies (owned) */
} sl_delim_conf;

typedef struct sl_delim_state {
  sl_cum cum;
  size_t searched;           /* readable bytes searched without a match */
  int discarding;            /* skipping a frame that is too long */
} sl_delim_state;

/* The length of the longest tail of p[0, n) that a delimiter starts with
 * (it may end in the bytes to come). */
static size_t sl_delim_partial(const sl_delim_conf *cf, const uint8_t *p, size_t n) {
  size_t best = 0;
  for (size_t d = 0; d < cf->n; d++) {
    size_t len = cf->delims[d].len;
    for (size_t k = len - 1; k > best; k--) {
      if (k <= n && memcmp(p + n - k, cf->delims[d].s, k) == 0) {
        best = k;
        break;
      }
    }
  }
  return best;
}

static sl_buf *sl_delim_step(sl_ctx *ctx, sl_buf *cum, const char **reason) {
  const sl_delim_conf *cf = ctx->conf;
  sl_delim_state *st = ctx->state;
  const uint8_t *p = sl_buf_rptr(cum);
  size_t n = sl_buf_readable(cum);
  size_t frame = SIZE_MAX, dlen = 0;
  for (size_t d = 0; d < cf->n; d++) {
    size_t len = cf->delims[d].len;
    /* A match wholly inside the searched bytes would have been found. */
    size_t from = st->searched >= len ? st->searched - len + 1 : 0;
    if (from >= n) continue;
    const uint8_t *hit = memmem(p + from, n - from, cf->delims[d].s, len);
    if (hit != NULL && (size_t)(hit - p) < frame) {
      frame = (size_t)(hit - p);
      dlen = len;
    }
  }
  if (frame == SIZE_MAX) {
    size_t known = n - sl_delim_partial(cf, p, n);
    st->searched = n;
    if (st->discarding || known > (size_t)cf->max_frame_length) {
      cum->rd += (uint32_t)known;
      st->searched = n - known;
      if (!st->discarding && cf->fail_fast) *reason = SL_CODEC_TOO_LARGE;
      st->discarding = 1;
    }
    return NULL;
  }
  st->searched = 0;
  if (st->discarding || frame > (size_t)cf->max_frame_length) {
    cum->rd += (uint32_t)(frame + dlen);
    if (!st->discarding || !cf->fail_fast) *reason = SL_CODEC_TOO_LARGE;
    st->discarding = 0;
    return NULL;
  }
  sl_buf *f = sl_buf_read_retained_slice(cum, cf->strip ? frame : frame + dlen, reason);
  if (f != NULL && cf->strip) cum->rd += (uint32_t)dlen;
  return f;
}

static void sl_delim_unconfigure(void *conf) {
  sl_delim_conf *cf = conf;
  for (size_t i = 0; i < cf->n; i++) free(cf->delims[i].s);
  free(cf->delims);
}

static int sl_delim_configure(void *conf, const sl_opts *o, char *err, size_t errlen) {
  static const char *const keys[] = {"delimiters", "max_frame_length", "strip_delimiter",
                                     "fail_fast", NULL};
  sl_delim_conf *cf = conf;
  const sl_opt_str *list;
  size_t n;
  cf->cum.step = sl_delim_step;
  if (sl_opts_check_keys(o, keys, err, errlen) != SL_OK ||
      sl_opts_strings(o, "delimiters", 1, &list, &n, err, errlen) != SL_OK ||
      sl_opts_int(o, "max_frame_length", 1, INT32_MAX, 1, 0, "a positive integer",
                  &cf->max_frame_length, err, errlen) != SL_OK ||
      sl_opts_bool(o, "strip_delimiter", 1, &cf->strip, err, errlen) != SL_OK ||
      sl_opts_bool(o, "fail_fast", 1, &cf->fail_fast, err, errlen) != SL_OK)
    return SL_ERROR;
  cf->delims = calloc(n, sizeof(*cf->delims));
  if (cf->delims == NULL) {
    snprintf(err, errlen, "out of memory");
    return SL_ERROR;
  }
  for (; cf->n < n; cf->n++) {
    sl_opt_str *d = &cf->delims[cf->n];
    d->s = malloc(list[cf->n].len);
    if (d->s == NULL) {
      snprintf(err, errlen, "out of memory");
      return SL_ERROR;
    }
    memcpy(d->s, list[cf->n].s, list[cf->n].len);
    d->len = list[cf->n].len;
  }
  return SL_OK;
}

const sl_stage_ops sl_codec_delimiter =
    SL_CUM_DECODER("sluice.codec.delimiter", sizeof(sl_delim_state), sizeof(sl_delim_conf),
                   sl_delim_configure, sl_delim_unconfigure);
