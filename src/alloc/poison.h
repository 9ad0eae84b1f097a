/* Poisoning of free pool memory: through AddressSanitizer in ASan builds
 * (touching a free block is reported), a 0xde fill with SLUICE_POOL_DEBUG,
 * nothing otherwise. Memory is unpoisoned before it is unmapped, so that
 * whatever is mapped there later is clean. */
#ifndef SL_POISON_H
#define SL_POISON_H

#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define SL_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define SL_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#elif defined(SLUICE_POOL_DEBUG)
#define SL_POISON(p, n) memset((p), 0xde, (n))
#define SL_UNPOISON(p, n) ((void)0)
#else
#define SL_POISON(p, n) ((void)0)
#define SL_UNPOISON(p, n) ((void)0)
#endif

#endif
