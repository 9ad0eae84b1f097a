#include "alloc/retq.h"

#include <stdlib.h>

#include "util/common.h"

int sl_retq_init(sl_retq *q, size_t cap) {
  size_t n = 2;
  while (n < cap) n <<= 1;
  q->cells = malloc(n * sizeof(*q->cells));
  if (q->cells == NULL) return SL_ERROR;
  for (size_t i = 0; i < n; i++) atomic_init(&q->cells[i].seq, i);
  q->mask = n - 1;
  atomic_init(&q->tail, 0);
  q->head = 0;
  return SL_OK;
}

void sl_retq_destroy(sl_retq *q) {
  free(q->cells);
  q->cells = NULL;
}

int sl_retq_push(sl_retq *q, void *item) {
  size_t pos = atomic_load_explicit(&q->tail, memory_order_relaxed);
  for (;;) {
    sl_retq_cell *c = &q->cells[pos & q->mask];
    size_t seq = atomic_load_explicit(&c->seq, memory_order_acquire);
    intptr_t dif = (intptr_t)seq - (intptr_t)pos;
    if (dif == 0) {
      if (atomic_compare_exchange_weak_explicit(&q->tail, &pos, pos + 1, memory_order_relaxed,
                                                memory_order_relaxed)) {
        c->item = item;
        atomic_store_explicit(&c->seq, pos + 1, memory_order_release);
        return SL_OK;
      }
    } else if (dif < 0) {
      return SL_AGAIN; /* full */
    } else {
      pos = atomic_load_explicit(&q->tail, memory_order_relaxed);
    }
  }
}

void *sl_retq_pop(sl_retq *q) {
  sl_retq_cell *c = &q->cells[q->head & q->mask];
  size_t seq = atomic_load_explicit(&c->seq, memory_order_acquire);
  if ((intptr_t)seq - (intptr_t)(q->head + 1) < 0) return NULL; /* empty */
  void *item = c->item;
  atomic_store_explicit(&c->seq, q->head + q->mask + 1, memory_order_release);
  q->head++;
  return item;
}

size_t sl_retq_capacity(const sl_retq *q) { return q->mask + 1; }
