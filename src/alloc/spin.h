/*
 * A test-and-test-and-set spinlock for the arena. Arenas are normally one
 * per worker, so the lock is almost never contended; when it is (a shared
 * arena, a foreign thread freeing directly), waiters spin briefly, then
 * yield the CPU.
 */
#ifndef SL_SPIN_H
#define SL_SPIN_H

#include <sched.h>
#include <stdatomic.h>

typedef struct sl_spin {
  atomic_int v;
} sl_spin;

static inline void sl_spin_init(sl_spin *l) { atomic_init(&l->v, 0); }

static inline void sl_spin_lock(sl_spin *l) {
  while (atomic_exchange_explicit(&l->v, 1, memory_order_acquire)) {
    for (int i = 0; atomic_load_explicit(&l->v, memory_order_relaxed); i++) {
      if (i < 64) __builtin_ia32_pause();
      else sched_yield();
    }
  }
}

static inline void sl_spin_unlock(sl_spin *l) { atomic_store_explicit(&l->v, 0, memory_order_release); }

#endif
