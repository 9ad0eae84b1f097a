#include "proxy/client_limit.h"

#include <stdlib.h>
#include <string.h>

#include "util/common.h"

#define SL_CLIENT_MIN_CAP 64

static size_t sl_client_hash(const sl_addr_key *k) {
  /* FNV-1a over the 17 bytes, then a final mix. */
  uint64_t h = 1469598103934665603ull;
  const uint8_t *p = (const uint8_t *)k;
  for (size_t i = 0; i < sizeof(*k); i++) h = (h ^ p[i]) * 1099511628211ull;
  h ^= h >> 29;
  return (size_t)h;
}

static int sl_client_same(const sl_addr_key *a, const sl_addr_key *b) {
  return memcmp(a, b, sizeof(*a)) == 0;
}

void sl_client_limit_init(sl_client_limit *cl, uint32_t max) {
  memset(cl, 0, sizeof(*cl));
  pthread_mutex_init(&cl->mu, NULL);
  atomic_init(&cl->max, max);
}

void sl_client_limit_free(sl_client_limit *cl) {
  free(cl->slots);
  cl->slots = NULL;
  cl->cap = cl->n = 0;
  pthread_mutex_destroy(&cl->mu);
}

/* The slot of k, or the free slot where it would go. */
static size_t sl_client_find(const sl_client_limit *cl, const sl_addr_key *k) {
  size_t mask = cl->cap - 1, i = sl_client_hash(k) & mask;
  while (cl->slots[i].open != 0 && !sl_client_same(&cl->slots[i].key, k)) i = (i + 1) & mask;
  return i;
}

/* Rebuilds the table with cap slots. SL_ERROR (nothing changed) when out
 * of memory. */
static int sl_client_resize(sl_client_limit *cl, size_t cap) {
  sl_client_entry *old = cl->slots;
  size_t old_cap = cl->cap;
  sl_client_entry *slots = calloc(cap, sizeof(*slots));
  if (slots == NULL) return SL_ERROR;
  cl->slots = slots;
  cl->cap = cap;
  for (size_t i = 0; i < old_cap; i++)
    if (old[i].open != 0) slots[sl_client_find(cl, &old[i].key)] = old[i];
  free(old);
  return SL_OK;
}

int sl_client_limit_enter(sl_client_limit *cl, const sl_addr_key *k) {
  uint32_t max = atomic_load_explicit(&cl->max, memory_order_relaxed);
  if (max == 0 || k->family == 0) return SL_CLIENT_UNCOUNTED;
  int rc = SL_CLIENT_UNCOUNTED;
  pthread_mutex_lock(&cl->mu);
  /* At most half full, so that a probe always ends at a free slot. */
  if ((cl->n + 1) * 2 <= cl->cap ||
      sl_client_resize(cl, cl->cap ? cl->cap * 2 : SL_CLIENT_MIN_CAP) == SL_OK) {
    sl_client_entry *e = &cl->slots[sl_client_find(cl, k)];
    if (e->open == 0) {
      e->key = *k;
      cl->n++;
    }
    if (e->open >= max) {
      rc = SL_CLIENT_REFUSED;
    } else {
      e->open++;
      rc = SL_CLIENT_COUNTED;
    }
  }
  pthread_mutex_unlock(&cl->mu);
  return rc;
}

void sl_client_limit_leave(sl_client_limit *cl, const sl_addr_key *k) {
  pthread_mutex_lock(&cl->mu);
  SL_ASSERT(cl->cap > 0, "client limit: a connection left a table that never counted one");
  size_t mask = cl->cap - 1, i = sl_client_find(cl, k);
  SL_ASSERT(cl->slots[i].open > 0, "client limit: a connection left that was not counted");
  if (--cl->slots[i].open == 0) {
    /* Backward-shift deletion: later entries of the probe run move up, so
     * that no search stops early at the hole. */
    cl->n--;
    size_t hole = i;
    for (size_t j = (i + 1) & mask; cl->slots[j].open != 0; j = (j + 1) & mask) {
      size_t home = sl_client_hash(&cl->slots[j].key) & mask;
      /* j may fill the hole when its home is not in (hole, j]. */
      if (((j - home) & mask) >= ((j - hole) & mask)) {
        cl->slots[hole] = cl->slots[j];
        cl->slots[j].open = 0;
        hole = j;
      }
    }
    /* Shrink after a crowd has gone (never below the minimum). */
    if (cl->cap > SL_CLIENT_MIN_CAP && cl->n * 8 < cl->cap) (void)sl_client_resize(cl, cl->cap / 2);
  }
  pthread_mutex_unlock(&cl->mu);
}

uint32_t sl_client_limit_open(sl_client_limit *cl, const sl_addr_key *k) {
  pthread_mutex_lock(&cl->mu);
  uint32_t n = cl->cap ? cl->slots[sl_client_find(cl, k)].open : 0;
  pthread_mutex_unlock(&cl->mu);
  return n;
}
