/*
 * Leak tracking: who owns each live buffer, and where it came from.
 *
 * Levels (Netty's): disabled, simple, advanced, paranoid.
 *   - From simple up, every root buffer allocated for a channel (and every
 *     derived buffer made from one) is on that
 *     channel's owner list; when the channel is torn down, whatever is still
 *     on it is reported at once and its memory reclaimed (no waiting for a
 *     garbage collector). Buffers queued on another channel move to it.
 *   - simple records where 1 in sample_rate buffers were allocated; advanced
 *     also records touches (each pipeline hop and buf:touch(hint)), keeping
 *     the newest 4; paranoid records every buffer.
 * The lists and records live in side tables indexed by header slot, so the
 * 64-byte header does not grow; so does the count of derived buffers that
 * hold a reference on each header (kept at every level). Owner thread only.
 */
#ifndef SL_LEAK_H
#define SL_LEAK_H

#include <stddef.h>
#include <stdint.h>

#include "alloc/pool_types.h"
#include "buf/buf_types.h"

typedef enum {
  SL_LEAK_DISABLED = 0,
  SL_LEAK_SIMPLE = 1,
  SL_LEAK_ADVANCED = 2,
  SL_LEAK_PARANOID = 3,
} sl_leak_level;

#define SL_LEAK_TOUCHES 4
/* Records a pool keeps for reuse (about 30 KiB), so that a sample costs
 * no malloc and no free while fewer than this many recorded buffers live
 * at once (1 in 128 of 32 Ki live buffers); an idle pool frees them. */
#define SL_LEAK_SPARE 256

/* Parses "disabled", "simple", "advanced", "paranoid". SL_OK or SL_ERROR. */
int sl_leak_parse_level(const char *s, int *out);
const char *sl_leak_level_name(int level);

static inline int sl_leak_level_of(const sl_pool *p) { return p->leak_level; }

/* Makes o answerable for root b (NULL: nobody). Borrows both. */
void sl_buf_set_owner(sl_buf *b, sl_buf_owner *o);

/* Starts a record for root b (site: a C description, copied; NULL: the
 * caller sets it later with sl_leak_set_site). */
void sl_leak_record(sl_pool *p, sl_buf *b, const char *site);

/* The leak countdown reached zero on the allocation of root b: record b
 * (or, disabled, wind the countdown back up without recording) and set the
 * countdown for the next sample (paranoid counts from 1, simple and advanced
 * from the sample rate, disabled from 2^32). The buffer code counts
 * allocations down with the pool's shared countdown (sl_pool_event): the
 * caller has synced it (sl_pool_countdown_sync) and arms it after. */
void sl_leak_sampled(sl_pool *p, sl_buf *b);

/* Maps the side tables (once). SL_OK, or SL_ERROR when they cannot be. */
int sl_leak_map_tables(sl_pool *p);

/* The side-table index of header b. */
static inline uint32_t sl_leak_slot(const sl_pool *p, const sl_buf *b) {
  return (uint32_t)(((const uint8_t *)b - p->hdr_base) / SL_HDR_SIZE);
}

/* Called when derived buffer d is made from parent: counts it against the
 * parent (a side table, mapped on first use: SL_ERROR when it cannot be)
 * and makes the parent's owner answer for it (sl_buf_set_owner for a new
 * derived buffer, inline: no bytes, no previous owner). */
static inline int sl_leak_on_derive(sl_pool *p, sl_buf *parent, sl_buf *d) {
  if (__builtin_expect(p->leak_derived == NULL, 0) && sl_leak_map_tables(p) != 0) return -1;
  p->leak_derived[sl_leak_slot(p, parent)]++;
  sl_buf_owner *o = parent->owner;
  if (o != NULL) {
    uint32_t s = sl_leak_slot(p, d);
    d->owner = o;
    d->flags |= SL_BUF_OWNED;
    p->leak_prev[s] = 0;
    p->leak_next[s] = o->head;
    if (o->head) p->leak_prev[o->head] = s;
    o->head = s;
    o->count++;
  }
  return 0;
}

/* Called when derived buffer d is freed: off its owner's list (inline, as
 * sl_buf_set_owner(d, NULL) does it) and its parent's count. */
static inline void sl_leak_on_free_derived(sl_pool *p, sl_buf *d, sl_buf *parent) {
  sl_buf_owner *o = d->owner;
  if (o != NULL) {
    uint32_t s = sl_leak_slot(p, d);
    uint32_t nx = p->leak_next[s], pv = p->leak_prev[s];
    if (pv) p->leak_next[pv] = nx;
    else o->head = nx;
    if (nx) p->leak_prev[nx] = pv;
    o->count--;
    d->owner = NULL;
    d->flags &= (uint16_t)~SL_BUF_OWNED;
  }
  p->leak_derived[sl_leak_slot(p, parent)]--;
}

/* How many live derived buffers hold a reference on b. */
uint32_t sl_buf_derived_count(const sl_buf *b);

/* The block bytes an owner answers for through b: a root's block, nothing
 * for a derived buffer (its root's block is counted once, with the root). */
static inline uint32_t sl_leak_block_bytes(const sl_buf *b) {
  return (b->flags & SL_BUF_VIEW) ? 0 : b->block_size;
}

/* Called when a root that is owned or recorded is freed. */
void sl_leak_on_free(sl_pool *p, sl_buf *r);

/* The record of header r goes back (r, whose SL_BUF_RECORDED the caller
 * has cleared, had one). For the release of a sampled root with no owner,
 * after its header parked: nothing else of r is read. */
void sl_leak_forget(sl_pool *p, const sl_buf *r);

/* Records a touch (advanced and up, recorded buffers only). hint is copied
 * unless is_static. */
void sl_leak_touch(sl_buf *b, const char *hint, int is_static);

/* Sets or replaces the creation site of a recorded buffer (copied). */
void sl_leak_set_site(sl_buf *b, const char *site);

/* Reports every buffer o still owns as leaked "before <why>", releases
 * their references (memory goes back) and returns how many there were.
 * References held by derived buffers are not leaks of o's: a buffer whose
 * only references are those is disowned and left to them. */
size_t sl_leak_reclaim_owner(sl_pool *p, sl_buf_owner *o, const char *why);

/* Writes one LEAK log record for root b: "LEAK: buffer of N bytes was not
 * released before <why>", then its creation site and touches if recorded. */
void sl_leak_report(sl_pool *p, const sl_buf *b, const char *why);


#endif
