/*
 * sl_outq: a channel's outbound queue, Netty's ChannelOutboundBuffer.
 *
 * Entries are kept in a ring in write order: the first nflushed of them are
 * flushed (they may go to the socket), the rest were written but not yet
 * flushed. sl_outq_write gathers flushed entries into sendmsg calls (at
 * most SL_OUTQ_MAX_IOV entries and `gather` bytes each, at most `spin`
 * calls per sl_outq_write), advances the first entry's reader index on a
 * partial write, and releases each buffer as soon as all of its bytes are
 * written.
 *
 * Entries are numbered in the order they were added (seq, from 0): the first
 * entry in the ring has number first_seq. An entry may carry a promise id
 * (pid, 0 for none); on_done reports it, in queue order, when the entry has
 * been written (err NULL) or dropped by sl_outq_release_all (err given). A
 * marker is an entry without a buffer: it only carries a promise, which
 * completes once everything queued before it has been written.
 *
 * pending counts the readable bytes of every entry plus
 * SL_OUTQ_ENTRY_OVERHEAD per entry (as Netty does), so a flood of tiny
 * writes also crosses the water marks and the limit. Writability: the queue
 * becomes unwritable when pending rises above high, and writable again when
 * it falls below low; each change calls on_writability once.
 *
 * Callbacks (on_writability, on_done) run after the queue's state is
 * consistent again; they may add entries, and sl_outq_release_all may run
 * inside them (the caller closed its channel): sl_outq_write then stops.
 */
#ifndef SL_OUTQ_H
#define SL_OUTQ_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "buf/buf_types.h"

typedef struct sl_outq_entry {
  sl_buf *buf;             /* NULL: a marker */
  uint32_t pid;            /* promise id, 0: none */
  uint32_t pad;
} sl_outq_entry;

/* What one queued buffer really costs besides its bytes: its ring slot
 * (16 B), its sl_buf header (64 B) and its owner links in the leak side
 * table (8 B): 88 bytes on a 64-bit build (Netty counts 96 for its Entry). */
#define SL_OUTQ_ENTRY_OVERHEAD (sizeof(sl_outq_entry) + sizeof(sl_buf) + 2 * sizeof(uint32_t))

#define SL_OUTQ_MAX_IOV 1024                 /* entries per sendmsg (and IOV_MAX) */
#define SL_OUTQ_DEFAULT_SPIN 16              /* sendmsg calls per wake-up (writeSpinCount) */
#define SL_OUTQ_DEFAULT_LIMIT (16u << 20)    /* pending bytes a queue may hold */
#define SL_OUTQ_GATHER_INITIAL 65536         /* adaptive gather start without a socket */
#define SL_OUTQ_GATHER_MIN 4096              /* adaptive gather never shrinks below */
#define SL_OUTQ_GATHER_MAX (8u << 20)        /* adaptive gather never grows above */

typedef void (*sl_outq_writability_fn)(void *ud, int writable);
typedef void (*sl_outq_done_fn)(void *ud, uint32_t pid, const char *err);

typedef struct sl_outq {
  sl_outq_entry *ring;     /* capacity mask + 1 slots */
  uint32_t mask;           /* capacity - 1 (capacity is a power of two) */
  uint32_t head;           /* index of the first entry */
  uint32_t count;          /* entries in the queue */
  uint32_t nflushed;       /* the first nflushed entries are flushed */
  uint64_t first_seq;      /* number of the first entry */
  size_t pending;          /* bytes + per-entry overhead */
  size_t peak;             /* highest pending seen */
  size_t low, high;        /* water marks */
  size_t limit;            /* sl_outq_over_limit's bound */
  int writable;            /* 1 until pending > high, again once < low */
  int gather_adaptive;     /* gather follows what the socket takes (Netty) */
  uint32_t spin;           /* sendmsg calls per sl_outq_write */
  size_t gather;           /* bytes per sendmsg now */
  uint64_t sendmsg_calls;  /* sendmsg calls made */
  uint64_t yields;         /* sl_outq_write returns with the spin count spent */
  sl_outq_writability_fn on_writability;
  sl_outq_done_fn on_done;
  void *ud;                /* for both callbacks */
} sl_outq;

/* An empty queue with water marks low <= high, no limit, the default spin
 * count and an adaptive gather starting at SL_OUTQ_GATHER_INITIAL. */
void sl_outq_init(sl_outq *q, size_t low, size_t high,
                  sl_outq_writability_fn fn, void *ud);

/* Write limits: spin sendmsg calls per sl_outq_write (0: the default); gather
 * bytes per call, fixed when gather > 0, else adaptive from adaptive_start
 * (doubles after a call the socket took whole, halves after one that took
 * less than half; between SL_OUTQ_GATHER_MIN and SL_OUTQ_GATHER_MAX). */
void sl_outq_set_write_limits(sl_outq *q, uint32_t spin, size_t gather, size_t adaptive_start);

/* Releases every entry without reporting promises (the owner is going away;
 * it has failed them already with sl_outq_release_all) and frees the ring. */
void sl_outq_destroy(sl_outq *q);

/* Appends b (takes ownership) as an unflushed entry with promise pid (0:
 * none). SL_OK, or SL_ERROR when the ring cannot grow (b has been released,
 * pid not reported). */
int sl_outq_add(sl_outq *q, sl_buf *b, uint32_t pid);

/* Appends a marker carrying pid (non-zero). SL_OK, or SL_ERROR (ENOMEM). */
int sl_outq_add_marker(sl_outq *q, uint32_t pid);

/* Gives the entry numbered seq promise pid. SL_OK; SL_DONE when that entry
 * has left the queue already (written, if the caller knows the queue was
 * not released since); SL_DECLINED when it carries a promise already. */
int sl_outq_set_promise(sl_outq *q, uint64_t seq, uint32_t pid);

/* 1 when adding len readable bytes would take pending above the limit. */
static inline int sl_outq_over_limit(const sl_outq *q, size_t len) {
  return q->pending + len + SL_OUTQ_ENTRY_OVERHEAD > q->limit;
}

/* Marks every entry written so far as flushed. */
void sl_outq_flush(sl_outq *q);

/* Writes flushed entries to fd with sendmsg, at most budget bytes and spin
 * calls in all, releasing what is fully written and reporting its promise.
 * Returns SL_OK when nothing flushed is left, SL_AGAIN when the socket is
 * full, SL_DONE when the budget or the spin count ran out first (the
 * socket still took everything offered: call again soon), SL_ERROR (errno
 * kept) on a write error. *written gets the bytes written. */
int sl_outq_write(sl_outq *q, int fd, size_t budget, size_t *written);

/* sl_outq_write for the last bytes before a FIN: sendmsg with MSG_MORE, so
 * that the kernel holds back a short last segment until the caller's
 * shutdown() or close(), which must follow, adds the FIN to it. */
int sl_outq_write_before_fin(sl_outq *q, int fd, size_t budget, size_t *written);

/* Writes one span of flushed bytes somewhere (a TLS connection): as
 * writev, bytes taken, or -1 with errno (EAGAIN: nothing taken now). */
struct iovec;
typedef ssize_t (*sl_outq_writev_fn)(void *ud, const struct iovec *iov, int n);

/* sl_outq_write through fn instead of sendmsg, at most max bytes offered
 * per call (no adaptive gather). Same returns; an error keeps fn's errno. */
int sl_outq_write_via(sl_outq *q, sl_outq_writev_fn fn, void *ud, size_t max, size_t budget,
                      size_t *written);

/* Takes the first flushed buffer out of the queue, as if it had been
 * written (the in-memory channel of sluice.testing): its promise, and those
 * of markers before it, complete. Returns it (+1), or NULL. */
sl_buf *sl_outq_take(sl_outq *q);

/* Moves every entry of from, in order and with its promise, to the end of
 * to, unflushed (nothing is reported: the entries are still to be written,
 * now by to). adopt(ud, b), when not NULL, runs for each moved buffer. from
 * ends empty, its pending 0 without a writability event; to's pending rises
 * as with sl_outq_add. SL_OK, or SL_ERROR when to's ring cannot grow (the
 * entries not moved yet stay in from). */
int sl_outq_move(sl_outq *from, sl_outq *to, void (*adopt)(void *ud, sl_buf *b), void *ud);

/* Releases every entry (close), failing each promise with err; pending
 * drops to 0 without a writability event. Returns the number of entries. */
size_t sl_outq_release_all(sl_outq *q, const char *err);

static inline int sl_outq_has_flushed(const sl_outq *q) { return q->nflushed > 0; }
static inline int sl_outq_is_empty(const sl_outq *q) { return q->count == 0; }
/* The number the next entry added will get. */
static inline uint64_t sl_outq_next_seq(const sl_outq *q) { return q->first_seq + q->count; }

#endif
