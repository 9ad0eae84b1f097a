/*
 * Size classes, as Netty's SizeClasses: a 16-byte quantum and four classes
 * per doubling. The first group is 16, 32, 48, 64; after it each group g
 * (delta d = 2^(g+4)) holds 5d, 6d, 7d, 8d: 80, 96, 112, 128, then 160, 192,
 * 224, 256, and so on up to the chunk size.
 *
 * Classes up to SL_SC_SMALL_MAX (28 KiB) are "small" and come from subpages;
 * larger classes up to the chunk size are "normal" and come from runs of
 * pages; anything above the chunk size is "huge" and is mapped directly.
 */
#ifndef SL_SIZE_CLASS_H
#define SL_SIZE_CLASS_H

#include <stddef.h>
#include <stdint.h>

#define SL_SC_SMALL_MAX (28u * 1024u)
#define SL_SC_MAX_CLASSES 80         /* enough for chunks up to 32 MiB */
#define SL_SC_MAX_CHUNK (32u << 20)  /* the largest chunk_size accepted */
#define SL_SC_LOOKUP_MAX 65536       /* sizes up to this use a table by 16 B */

/* Hidden: the tables are read on every allocation, and a hidden symbol is
 * addressed directly rather than through the GOT in position-independent
 * code (the core is also built into a shared library). */
#define SL_SC_HIDDEN __attribute__((visibility("hidden")))
extern SL_SC_HIDDEN uint16_t sl_sc_lookup[SL_SC_LOOKUP_MAX / 16 + 1];
#define SL_SC_LOOKUP_SHIFT 6   /* sl_sc_lookup holds class << this: a 64-byte bin's offset */
extern SL_SC_HIDDEN const uint32_t sl_sc_sizes[SL_SC_MAX_CLASSES];

/* The size of class idx: 16 * (idx + 1) for idx < 4; then with g = (idx - 4) / 4
 * and i = (idx - 4) % 4, (5 + i) << (g + 4). From a table for the classes
 * a chunk can hold (hot paths read sl_sc_sizes directly). */
static inline size_t sl_sc_size(unsigned idx) {
  if (idx < SL_SC_MAX_CLASSES) return sl_sc_sizes[idx];
  unsigned g = (idx - 4) >> 2, i = (idx - 4) & 3;
  return (size_t)(5 + i) << (g + 4);
}

/* The smallest class whose size is at least size (0 maps to class 0). */
static inline unsigned sl_sc_index(size_t size) {
  if (size <= SL_SC_LOOKUP_MAX) return sl_sc_lookup[(size + 15) >> 4] >> SL_SC_LOOKUP_SHIFT;
  /* 4d < size <= 8d with d = 2^k: k = floor(log2(size - 1)) - 2 */
  unsigned log2 = 63u - (unsigned)__builtin_clzll((unsigned long long)(size - 1));
  unsigned k = log2 - 2;
  size_t d = (size_t)1 << k;
  unsigned i = (unsigned)((size + d - 1) >> k) - 5; /* 0..3 */
  return 4 + ((k - 4) << 2) + i;
}

/* Number of classes up to and including max_size (a class size). */
unsigned sl_sc_count(size_t max_size);

#endif
