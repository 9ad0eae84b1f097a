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
 * one is a bit test and set and a branch in its callers. */
void sl_spin_lock_wait(sl_spin *l);

/* Takes the lock if it is free: 0, else 1 (held by another, no waiting).
 * One locked bit test and set on x86-64, where an exchange needs its 1 in
 * a register first; GCC finds that instruction only when the bit's old
 * value is tested as here, so callers branch on the result as it is. */
static inline int sl_spin_trylock_busy(sl_spin *l) {
  return (atomic_fetch_or_explicit(&l->v, 1, memory_order_acquire) & 1) != 0;
}

static inline void sl_spin_lock(sl_spin *l) {
  if (__builtin_expect(sl_spin_trylock_busy(l), 0)) sl_spin_lock_wait(l);
}

static inline void sl_spin_unlock(sl_spin *l) { atomic_store_explicit(&l->v, 0, memory_order_release); }

#endif
