#include "buf/leak.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "alloc/pool.h"
#include "buf/buf.h"
#include "util/common.h"
#include "util/log.h"

typedef struct sl_leak_touch {
  char *hint;               /* owned copy, or a static string */
  int is_static;
  int64_t at_us;            /* microseconds after creation */
} sl_leak_touch_rec;

typedef struct sl_leak_rec {
  char *site;               /* creation site (owned), or NULL */
  int64_t created_us;
  uint32_t ntouch;          /* touches so far; the newest 4 are kept */
  sl_leak_touch_rec touch[SL_LEAK_TOUCHES];
} sl_leak_rec;

static const char *const sl_leak_names[] = {"disabled", "simple", "advanced", "paranoid"};

int sl_leak_parse_level(const char *s, int *out) {
  for (int i = 0; i < 4; i++) {
    if (strcmp(s, sl_leak_names[i]) == 0) {
      *out = i;
      return SL_OK;
    }
  }
  return SL_ERROR;
}

const char *sl_leak_level_name(int level) {
  return level >= 0 && level < 4 ? sl_leak_names[level] : "?";
}

static int64_t sl_leak_now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static uint32_t sl_slot(const sl_pool *p, const sl_buf *b) {
  return (uint32_t)(((uintptr_t)b - (uintptr_t)p->hdr_base) / SL_HDR_SIZE);   /* a shift */
}

static sl_buf *sl_slot_buf(const sl_pool *p, uint32_t slot) {
  return (sl_buf *)(void *)(p->hdr_base + (size_t)slot * SL_HDR_SIZE);
}

/* The side tables, mapped on first use (address space only until touched). */
__attribute__((noinline)) static int sl_leak_map(sl_pool *p) {
  size_t n = p->hdr_max;
  size_t len = n * (3 * sizeof(uint32_t) + sizeof(void *));
  void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (m == MAP_FAILED) return SL_ERROR;
  p->leak_rec = m;
  p->leak_next = (uint32_t *)(void *)((void **)m + n);
  p->leak_prev = p->leak_next + n;
  p->leak_derived = p->leak_prev + n;
  p->leak_map_len = len;
  return SL_OK;
}

static inline int sl_leak_maps(sl_pool *p) {
  if (__builtin_expect(p->leak_next != NULL, 1)) return SL_OK;
  return sl_leak_map(p);
}

void sl_buf_set_owner(sl_buf *b, sl_buf_owner *o) {
  sl_buf *r = b->root;
  sl_pool *p = sl_pool_of(r);
  if (p->leak_level == SL_LEAK_DISABLED || r->owner == o) return;
  if (sl_leak_maps(p) != SL_OK) return;
  uint32_t s = sl_slot(p, r);
  sl_buf_owner *old = r->owner;
  if (old != NULL) {
    uint32_t nx = p->leak_next[s], pv = p->leak_prev[s];
    if (pv) p->leak_next[pv] = nx;
    else old->head = nx;
    if (nx) p->leak_prev[nx] = pv;
    old->count--;
    old->bytes -= sl_leak_block_bytes(r);
  }
  r->owner = o;
  r->flags = (uint16_t)(o != NULL ? r->flags | SL_BUF_OWNED : r->flags & ~SL_BUF_OWNED);
  if (o != NULL) {
    p->leak_prev[s] = 0;
    p->leak_next[s] = o->head;
    if (o->head) p->leak_prev[o->head] = s;
    o->head = s;
    o->count++;
    o->bytes += sl_leak_block_bytes(r);
  }
}

/* Gives a record back: what it owns is freed, and the record itself is
 * kept for the next sample while the pool keeps fewer than SL_LEAK_SPARE. */
static void sl_leak_free_rec(sl_pool *p, sl_leak_rec *rec) {
  if (rec->site != NULL) free(rec->site);   /* a sample has none: no call */
  for (uint32_t i = 0; i < SL_LEAK_TOUCHES && i < rec->ntouch; i++)
    if (!rec->touch[i].is_static) free(rec->touch[i].hint);
  if (p->leak_spare_n < SL_LEAK_SPARE) {
    _Static_assert(offsetof(sl_leak_rec, site) == 0, "a spare record links through site");
    *(void **)(void *)rec = p->leak_spare;
    p->leak_spare = rec;
    p->leak_spare_n++;
    return;
  }
  free(rec);
}

/* A record with no touches: a spare one, else a new one. NULL on ENOMEM. */
static sl_leak_rec *sl_leak_new_rec(sl_pool *p) {
  sl_leak_rec *rec = p->leak_spare;
  if (__builtin_expect(rec != NULL, 1)) {
    p->leak_spare = *(void **)(void *)rec;
    p->leak_spare_n--;
  } else {
    rec = malloc(sizeof(*rec));
    if (rec == NULL) return NULL;
  }
  rec->ntouch = 0;   /* touches are read only below ntouch */
  return rec;
}

void sl_leak_sampled(sl_pool *p, sl_buf *b) {
  if (p->leak_level == SL_LEAK_DISABLED) {
    p->leak_countdown = UINT32_MAX;
  } else {
    p->leak_countdown = p->leak_level == SL_LEAK_PARANOID ? 1 : p->leak_sample;
    sl_leak_record(p, b, NULL);
  }
}

void sl_leak_record(sl_pool *p, sl_buf *b, const char *site) {
  if (sl_leak_maps(p) != SL_OK) return;
  sl_leak_rec *rec = sl_leak_new_rec(p);
  if (rec == NULL) return;
  rec->created_us = sl_leak_now_us();
  rec->site = site ? strdup(site) : NULL;
  p->leak_rec[sl_slot(p, b)] = rec;
  p->leak_recorded++;
  b->flags |= SL_BUF_RECORDED;
}

int sl_leak_map_tables(sl_pool *p) { return sl_leak_maps(p); }

uint32_t sl_buf_derived_count(const sl_buf *b) {
  const sl_pool *p = sl_pool_of(b);
  if (!(b->flags & SL_BUF_SHARED) || p->leak_derived == NULL) return 0;
  return p->leak_derived[sl_slot(p, b)];
}

void sl_leak_forget(sl_pool *p, const sl_buf *r) {
  uint32_t s = sl_slot(p, r);
  sl_leak_free_rec(p, p->leak_rec[s]);
  p->leak_rec[s] = NULL;
  p->leak_recorded--;
}

void sl_leak_on_free(sl_pool *p, sl_buf *r) {
  if (r->owner) sl_buf_set_owner(r, NULL);
  if (r->flags & SL_BUF_RECORDED) {
    r->flags &= (uint16_t)~SL_BUF_RECORDED;
    sl_leak_forget(p, r);
  }
}

static sl_leak_rec *sl_leak_rec_of(const sl_buf *b) {
  const sl_buf *r = b->root;
  if (r->flags & SL_BUF_VIEW) r = sl_buf_memory_root((sl_buf *)(uintptr_t)r);
  if (!(r->flags & SL_BUF_RECORDED)) return NULL;
  sl_pool *p = sl_pool_of(r);
  return p->leak_rec[sl_slot(p, r)];
}

void sl_leak_touch(sl_buf *b, const char *hint, int is_static) {
  sl_pool *p = sl_pool_of(b->root);
  if (p->leak_level < SL_LEAK_ADVANCED) return;
  sl_leak_rec *rec = sl_leak_rec_of(b);
  if (rec == NULL) return;
  sl_leak_touch_rec *t = &rec->touch[rec->ntouch % SL_LEAK_TOUCHES];
  if (rec->ntouch >= SL_LEAK_TOUCHES && !t->is_static) free(t->hint);
  t->is_static = is_static;
  t->hint = is_static ? (char *)(uintptr_t)hint : strdup(hint ? hint : "?");
  t->at_us = sl_leak_now_us() - rec->created_us;
  rec->ntouch++;
}

void sl_leak_set_site(sl_buf *b, const char *site) {
  sl_leak_rec *rec = sl_leak_rec_of(b);
  if (rec == NULL) return;
  free(rec->site);
  rec->site = site ? strdup(site) : NULL;
}

void sl_leak_report(sl_pool *p, const sl_buf *b, const char *why) {
  const sl_buf *r = b->root;
  char text[8192];
  int derived = (r->flags & SL_BUF_VIEW) != 0;
  size_t n = (size_t)snprintf(text, sizeof(text),
                              "LEAK: %s of %u bytes was not released before %s "
                              "(refcnt %u); %s",
                              derived ? "retained view" : "buffer",
                              derived ? r->cap : r->block_size, why, r->refcnt,
                              derived ? "its references were released"
                                      : "its memory was reclaimed");
  const sl_leak_rec *rec = sl_leak_rec_of(r);
  if (rec == NULL) {
    if (p->leak_level == SL_LEAK_DISABLED && n < sizeof(text))
      n += (size_t)snprintf(text + n, sizeof(text) - n,
                            "\n  (leak_detection is \"disabled\": nothing was recorded)");
    else if (p->leak_level != SL_LEAK_PARANOID && n < sizeof(text))
      n += (size_t)snprintf(text + n, sizeof(text) - n,
                            "\n  (where it was allocated is recorded for 1 in %u buffers; "
                            "leak_detection = \"paranoid\" records every one)",
                            p->leak_sample);
  } else {
    uint32_t kept = rec->ntouch < SL_LEAK_TOUCHES ? rec->ntouch : SL_LEAK_TOUCHES;
    for (uint32_t k = 0; k < kept && n < sizeof(text); k++) {
      const sl_leak_touch_rec *t = &rec->touch[(rec->ntouch - 1 - k) % SL_LEAK_TOUCHES];
      n += (size_t)snprintf(text + n, sizeof(text) - n, "\n  #%u touched by %s, %.3f ms after creation",
                            rec->ntouch - k, t->hint ? t->hint : "?", (double)t->at_us / 1000.0);
    }
    if (rec->ntouch > SL_LEAK_TOUCHES && n < sizeof(text))
      n += (size_t)snprintf(text + n, sizeof(text) - n, "\n  (%u older touches not kept)",
                            rec->ntouch - SL_LEAK_TOUCHES);
    if (n < sizeof(text))
      n += (size_t)snprintf(text + n, sizeof(text) - n, "\n  created at: %s",
                            rec->site ? rec->site : "(site not recorded)");
  }
  sl_log_text(SL_LOG_ERROR, text);
}

size_t sl_leak_reclaim_owner(sl_pool *p, sl_buf_owner *o, const char *why) {
  size_t n = 0;
  while (o->head != 0) {
    uint32_t s = o->head;
    sl_buf *r = sl_slot_buf(p, s);
    /* References held by derived buffers are theirs to answer for: the
     * rest were leaked. Only those are released. */
    uint32_t held = p->leak_derived != NULL ? p->leak_derived[s] : 0;
    sl_buf_set_owner(r, NULL);
    if (r->refcnt <= held) continue;
    sl_leak_report(p, r, why);
    p->leaks++;
    p->leaked_bytes += sl_leak_block_bytes(r);
    const char *err;
    sl_buf_release_site(p, "leak detection, when its connection was closed");
    sl_buf_release_n(r, r->refcnt - held, &err);
    sl_buf_release_site(p, NULL);
    n++;
  }
  return n;
}

