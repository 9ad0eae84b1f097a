/*
 * A test-and-test-and-set spinlock for the arena. Arenas are normally one
 * per worker, so the lock is almost never contended; when it is (a shared
 * arena, a foreign thread freeing directly), waiters spin briefly, then
 * yield the CPU.
 */
#ifndef SL_SPIN_H
#define SL_SPIN_H

#include <stdatomic.h>

typedef struct sl_spin {
  atomic_int v;
} sl_spin;

static inline void sl_spin_init(sl_spin *l) { atomic_init(&l->v, 0); }

/* The contended case (alloc/arena.c), out of line so that the uncontended
 * one is an exchange and a test in its callers. */
void sl_spin_lock_wait(sl_spin *l);

static inline void sl_spin_lock(sl_spin *l) {
  if (__builtin_expect(atomic_exchange_explicit(&l->v, 1, memory_order_acquire), 0))
    sl_spin_lock_wait(l);
}

/* Takes the lock if it is free: 1, else 0 (no waiting). */
static inline int sl_spin_trylock(sl_spin *l) {
  return atomic_exchange_explicit(&l->v, 1, memory_order_acquire) == 0;
}

static inline void sl_spin_unlock(sl_spin *l) { atomic_store_explicit(&l->v, 0, memory_order_release); }

#endif
