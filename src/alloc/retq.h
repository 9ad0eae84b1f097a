/*
 * A bounded multi-producer, single-consumer queue of pointers (Vyukov's
 * bounded queue: a sequence number per cell, one CAS per push). Foreign
 * threads push buffers they released; the owning worker pops them. Full
 * means full: the caller frees directly instead of queueing more.
 */
#ifndef SL_RETQ_H
#define SL_RETQ_H

#include <stdatomic.h>
#include <stddef.h>

typedef struct sl_retq_cell {
  atomic_size_t seq;
  void *item;
} sl_retq_cell;

typedef struct sl_retq {
  sl_retq_cell *cells;
  size_t mask;                   /* capacity - 1 */
  _Alignas(64) atomic_size_t tail;   /* producers */
  _Alignas(64) size_t head;          /* the consumer */
} sl_retq;

/* cap is rounded up to a power of two. SL_OK or SL_ERROR (ENOMEM). */
int sl_retq_init(sl_retq *q, size_t cap);
void sl_retq_destroy(sl_retq *q);

/* Any thread. SL_OK, or SL_AGAIN when full. */
int sl_retq_push(sl_retq *q, void *item);

/* The owner only. The oldest item, or NULL when empty. */
void *sl_retq_pop(sl_retq *q);

size_t sl_retq_capacity(const sl_retq *q);

#endif
