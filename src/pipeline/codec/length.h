/*
 * Length fields, shared by sluice.codec.length_field and
 * sluice.codec.length_field_prepender: reading and writing an unsigned
 * field of 1, 2, 3, 4 or 8 bytes in either byte order, and the options that
 * describe one.
 */
#ifndef SL_CODEC_LENGTH_H
#define SL_CODEC_LENGTH_H

#include <stddef.h>
#include <stdint.h>

#include "pipeline/opts.h"

/* The n bytes at p (n in 1, 2, 3, 4, 8) as an unsigned number. */
static inline uint64_t sl_length_get(const uint8_t *p, int n, int big) {
  uint64_t v = 0;
  if (big) {
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
  } else {
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
  }
  return v;
}

/* Writes the low n bytes of v at p. */
static inline void sl_length_put(uint8_t *p, int n, int big, uint64_t v) {
  for (int i = 0; i < n; i++) {
    p[big ? n - 1 - i : i] = (uint8_t)v;
    v >>= 8;
  }
}

/* length_field_length (1, 2, 3, 4 or 8; default 4), byte_order ("big" by
 * default, or "little") and length_adjustment (an int, default 0). SL_OK,
 * or SL_ERROR with "<key>: expected ..., got ..." in err. */
int sl_length_options(const sl_opts *o, int *length, int *big, int64_t *adjustment, char *err,
                      size_t errlen);

#endif
