/*
 * sl_outq: a channel's outbound queue, Netty's ChannelOutboundBuffer.
 *
 * Entries are kept in a ring in write order: the first nflushed of them are
 * flushed (they may go to the socket), the rest were written but not yet
 * flushed. sl_outq_write gathers flushed entries into one sendmsg (writev) call at a time,
 * advances the first entry's reader index on a partial write, and releases
 * each buffer as soon as all of its bytes are written.
 *
 * pending counts the readable bytes of every entry plus
 * SL_OUTQ_ENTRY_OVERHEAD per entry (as Netty does), so a flood of tiny
 * writes also crosses the water marks. Writability: the queue becomes
 * unwritable when pending rises above high, and writable again when it
 * falls below low; each change calls on_writability once.
 */
#ifndef SL_OUTQ_H
#define SL_OUTQ_H

#include <stddef.h>
#include <stdint.h>

#include "buf/buf_types.h"

#define SL_OUTQ_ENTRY_OVERHEAD 96
#define SL_OUTQ_MAX_IOV 1024
#define SL_OUTQ_MAX_GATHER_BYTES (1u << 20)

typedef void (*sl_outq_writability_fn)(void *ud, int writable);

typedef struct sl_outq {
  sl_buf **ring;           /* capacity mask + 1 slots, NULL when empty */
  uint32_t mask;           /* capacity - 1 (capacity is a power of two) */
  uint32_t head;           /* index of the first entry */
  uint32_t count;          /* entries in the queue */
  uint32_t nflushed;       /* the first nflushed entries are flushed */
  size_t pending;          /* bytes + per-entry overhead */
  size_t peak;             /* highest pending seen */
  size_t low, high;        /* water marks */
  int writable;            /* 1 until pending > high, again once < low */
  sl_outq_writability_fn on_writability;
  void *ud;
} sl_outq;

void sl_outq_init(sl_outq *q, size_t low, size_t high,
                  sl_outq_writability_fn fn, void *ud);

/* Releases every entry and frees the ring. */
void sl_outq_destroy(sl_outq *q);

/* Appends b (takes ownership) as an unflushed entry. SL_OK, or SL_ERROR when
 * the ring cannot grow (b has been released). */
int sl_outq_add(sl_outq *q, sl_buf *b);

/* Marks every entry written so far as flushed. */
void sl_outq_flush(sl_outq *q);

/* Writes flushed entries to fd with writev, at most budget bytes in total,
 * releasing what is fully written. Returns SL_OK when nothing flushed is
 * left, SL_AGAIN when the socket is full or the budget is spent, SL_ERROR
 * (errno kept) on a write error. *written gets the bytes written. */
int sl_outq_write(sl_outq *q, int fd, size_t budget, size_t *written);

/* Takes the first flushed entry out of the queue, as if it had been written
 * (the in-memory channel of sluice.testing). Returns it (+1), or NULL. */
sl_buf *sl_outq_take(sl_outq *q);

/* Releases every entry (close); pending drops to 0 without a writability
 * event. Returns the number of entries released. */
size_t sl_outq_release_all(sl_outq *q);

static inline int sl_outq_has_flushed(const sl_outq *q) { return q->nflushed > 0; }
static inline int sl_outq_is_empty(const sl_outq *q) { return q->count == 0; }

#endif
