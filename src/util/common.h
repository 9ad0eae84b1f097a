/* Return codes, assertions and small helpers shared by every sluice module. */
#ifndef SL_COMMON_H
#define SL_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SL_OK        0
#define SL_ERROR    -1
#define SL_AGAIN    -2
#define SL_DONE     -4
#define SL_DECLINED -5

#define SL_VERSION "0.1.0"

#define SL_UNUSED(x) ((void)(x))
#define SL_MIN(a, b) ((a) < (b) ? (a) : (b))
#define SL_MAX(a, b) ((a) > (b) ? (a) : (b))

/* container_of: recover the struct that embeds a member (libev watchers). */
#define SL_CONTAINER_OF(ptr, type, member) \
  ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

/* A broken invariant aborts loudly with the place and the message. */
#define SL_ASSERT(cond, msg)                                                  \
  do {                                                                        \
    if (!(cond)) {                                                            \
      fprintf(stderr, "sluice: assertion failed at %s:%d: %s (%s)\n",         \
              __FILE__, __LINE__, (msg), #cond);                              \
      abort();                                                                \
    }                                                                         \
  } while (0)

/* The expensive level: checks that would weigh on a hot path, made only
 * in debug builds (without NDEBUG: the test builds, with the sanitizers). */
#ifdef NDEBUG
#define SL_ASSERT_DEBUG(cond, msg) ((void)sizeof(!(cond)))
#else
#define SL_ASSERT_DEBUG(cond, msg) SL_ASSERT(cond, msg)
#endif

/* Hides x's value from the optimizer (an empty asm that may change it), so
 * that GCC computes again what it derives from x after this point instead
 * of holding both in registers: a hot path that keeps fewer registers
 * saves none. */
#define SL_OPAQUE(x) __asm__("" : "+r"(x))

/* A zeroed allocation for objects made per connection. glibc's calloc
 * never takes from its per-thread cache, so every calloc went through
 * malloc's general path (and filled the cache with frees it never used);
 * malloc and memset take the cache. (The empty asm keeps GCC from folding
 * the pair back into calloc.) */
static inline void *sl_zalloc(size_t size) {
  void *p = malloc(size);
  if (p == NULL) return NULL;
  __asm__ volatile("" : : "r"(p) : "memory");
  return memset(p, 0, size);
}

/* Appends src to the string in dst (of size bytes), truncating; returns
 * the new length. Per-connection strings are built with it rather than
 * snprintf, which costs a pass through vfprintf per piece. */
static inline size_t sl_str_append(char *dst, size_t size, size_t len, const char *src) {
  if (size == 0) return 0;
  /* src is NUL-terminated: strnlen stops there. Opaque to GCC, which
   * otherwise warns when the bound exceeds a literal src's size. */
  SL_OPAQUE(src);
  size_t n = len + 1 < size ? strnlen(src, size - 1 - len) : 0;
  memcpy(dst + len, src, n);
  len += n;
  dst[len] = '\0';
  return len;
}

#endif
