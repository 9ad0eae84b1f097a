#include "io/outq.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "buf/buf.h"
#include "util/common.h"

#define SL_OUTQ_INITIAL_SLOTS 8

/* Netty shrinks the gather only after attempts above this size. */
#define SL_OUTQ_GATHER_SHRINK_THRESHOLD 4096

void sl_outq_init(sl_outq *q, size_t low, size_t high,
                  sl_outq_writability_fn fn, void *ud) {
  q->ring = NULL;
  q->mask = 0;
  q->head = q->count = q->nflushed = 0;
  q->first_seq = 0;
  q->pending = 0;
  q->peak = 0;
  q->low = low;
  q->high = high;
  q->limit = SIZE_MAX;
  q->writable = 1;
  q->sendmsg_calls = q->yields = 0;
  q->on_writability = fn;
  q->on_done = NULL;
  q->ud = ud;
  sl_outq_set_write_limits(q, 0, 0, SL_OUTQ_GATHER_INITIAL);
}

void sl_outq_set_write_limits(sl_outq *q, uint32_t spin, size_t gather, size_t adaptive_start) {
  q->spin = spin ? spin : SL_OUTQ_DEFAULT_SPIN;
  q->gather_adaptive = gather == 0;
  if (gather == 0)
    gather = SL_MIN(SL_MAX(adaptive_start, (size_t)SL_OUTQ_GATHER_MIN), (size_t)SL_OUTQ_GATHER_MAX);
  q->gather = gather;
}

void sl_outq_destroy(sl_outq *q) {
  q->on_done = NULL;
  q->on_writability = NULL;
  sl_outq_release_all(q, NULL);
  free(q->ring);
  q->ring = NULL;
  q->mask = 0;
}

static int sl_outq_grow(sl_outq *q) {
  uint32_t cap = q->ring == NULL ? SL_OUTQ_INITIAL_SLOTS : (q->mask + 1) * 2;
  if (cap == 0) return SL_ERROR;
  sl_outq_entry *ring = malloc(sizeof(*ring) * cap);
  if (ring == NULL) return SL_ERROR;
  for (uint32_t i = 0; i < q->count; i++) ring[i] = q->ring[(q->head + i) & q->mask];
  free(q->ring);
  q->ring = ring;
  q->mask = cap - 1;
  q->head = 0;
  return SL_OK;
}

static void sl_outq_pending_add(sl_outq *q, size_t n) {
  q->pending += n;
  if (q->pending > q->peak) q->peak = q->pending;
  if (q->writable && q->pending > q->high) {
    q->writable = 0;
    if (q->on_writability) q->on_writability(q->ud, 0);
  }
}

static void sl_outq_pending_sub(sl_outq *q, size_t n) {
  q->pending -= SL_MIN(n, q->pending);
  if (!q->writable && q->pending < q->low) {
    q->writable = 1;
    if (q->on_writability) q->on_writability(q->ud, 1);
  }
}

static int sl_outq_push(sl_outq *q, sl_buf *b, uint32_t pid) {
  if ((q->ring == NULL || q->count == q->mask + 1) && sl_outq_grow(q) != SL_OK) return SL_ERROR;
  sl_outq_entry *e = &q->ring[(q->head + q->count) & q->mask];
  e->buf = b;
  e->pid = pid;
  e->pad = 0;
  q->count++;
  sl_outq_pending_add(q, (b ? sl_buf_readable(b) : 0) + SL_OUTQ_ENTRY_OVERHEAD);
  return SL_OK;
}

int sl_outq_add(sl_outq *q, sl_buf *b, uint32_t pid) {
  if (sl_outq_push(q, b, pid) != SL_OK) {
    sl_buf_release(b);
    return SL_ERROR;
  }
  return SL_OK;
}

int sl_outq_add_marker(sl_outq *q, uint32_t pid) { return sl_outq_push(q, NULL, pid); }

int sl_outq_set_promise(sl_outq *q, uint64_t seq, uint32_t pid) {
  if (seq < q->first_seq) return SL_DONE;
  SL_ASSERT(seq < sl_outq_next_seq(q), "promise for an entry not yet queued");
  sl_outq_entry *e = &q->ring[(q->head + (uint32_t)(seq - q->first_seq)) & q->mask];
  if (e->pid != 0) return SL_DECLINED;
  e->pid = pid;
  return SL_OK;
}

void sl_outq_flush(sl_outq *q) { q->nflushed = q->count; }

/* Takes the first entry out of the ring. */
static sl_outq_entry sl_outq_shift(sl_outq *q) {
  sl_outq_entry e = q->ring[q->head];
  q->ring[q->head].buf = NULL;
  q->head = (q->head + 1) & q->mask;
  q->count--;
  q->first_seq++;
  return e;
}

static void sl_outq_release_entry(sl_buf *b, const char *site) {
  if (b == NULL) return;
  sl_pool *p = sl_pool_of(b->root);
  sl_buf_release_site(p, site);
  sl_buf_release(b);
  sl_buf_release_site(p, NULL);
}

/* Removes the first (flushed, written) entry: releases its buffer, reports
 * its promise, then accounts what it still counted (as Netty's remove()). */
static void sl_outq_pop(sl_outq *q, size_t bytes_left) {
  sl_outq_entry e = sl_outq_shift(q);
  q->nflushed--;
  sl_outq_release_entry(e.buf, "the outbound queue, after writing it");
  if (e.pid && q->on_done) q->on_done(q->ud, e.pid, NULL);
  sl_outq_pending_sub(q, bytes_left + SL_OUTQ_ENTRY_OVERHEAD);
}

sl_buf *sl_outq_take(sl_outq *q) {
  while (q->nflushed > 0) {
    sl_outq_entry e = sl_outq_shift(q);
    q->nflushed--;
    size_t len = e.buf ? sl_buf_readable(e.buf) : 0;
    if (e.pid && q->on_done) q->on_done(q->ud, e.pid, NULL);
    sl_outq_pending_sub(q, len + SL_OUTQ_ENTRY_OVERHEAD);
    if (e.buf) return e.buf;
  }
  return NULL;
}

/* Accounts n written bytes: pops entries that are done (empty ones and
 * markers too), advances a partially written one. Stops if a callback
 * released the queue. */
static void sl_outq_consume(sl_outq *q, size_t n) {
  while (q->nflushed > 0) {
    sl_buf *b = q->ring[q->head].buf;
    size_t left = b ? sl_buf_readable(b) : 0;
    if (n < left) {
      if (n > 0) {
        b->rd += (uint32_t)n;
        sl_outq_pending_sub(q, n);
      }
      return;
    }
    n -= left;
    sl_outq_pop(q, left);
  }
}

/* Netty's adjustMaxBytesPerGatheringWrite. */
static void sl_outq_adapt_gather(sl_outq *q, size_t attempted, size_t written) {
  if (!q->gather_adaptive) return;
  if (attempted == written) {
    if (attempted * 2 > q->gather) q->gather = SL_MIN(attempted * 2, (size_t)SL_OUTQ_GATHER_MAX);
  } else if (attempted > SL_OUTQ_GATHER_SHRINK_THRESHOLD && written < attempted / 2) {
    q->gather = SL_MAX(attempted / 2, (size_t)SL_OUTQ_GATHER_MIN);
  }
}

/* sendmsg rather than writev: MSG_NOSIGNAL turns SIGPIPE into EPIPE. One
 * span (most writes of a request and its answer) goes with send(), which
 * spares the kernel the message header's and the vector's copy. */
static inline __attribute__((always_inline)) ssize_t sl_outq_send(int fd, const struct iovec *iov,
                                                                  int n, int flags) {
  if (n == 1) return send(fd, iov[0].iov_base, iov[0].iov_len, flags);
  struct msghdr msg = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n};
  return sendmsg(fd, &msg, flags);
}

static ssize_t sl_outq_sendmsg(void *ud, const struct iovec *iov, int n) {
  return sl_outq_send(*(int *)ud, iov, n, MSG_NOSIGNAL);
}

static ssize_t sl_outq_sendmsg_more(void *ud, const struct iovec *iov, int n) {
  return sl_outq_send(*(int *)ud, iov, n, MSG_NOSIGNAL | MSG_MORE);
}

/* The write loop of sl_outq_write and sl_outq_write_via; max > 0: a fixed
 * bound per call instead of the (adaptive) gather. Inlined into each, so
 * that sl_outq_write calls sendmsg directly. */
static inline __attribute__((always_inline)) int sl_outq_write_loop(
    sl_outq *q, sl_outq_writev_fn fn, void *ud, size_t max, size_t budget, size_t *written) {
  *written = 0;
  int max_iov = SL_MIN(SL_OUTQ_MAX_IOV, IOV_MAX);
  struct iovec iov[SL_OUTQ_MAX_IOV];
  uint32_t calls = 0;
  while (q->nflushed > 0) {
    if (budget == 0) return SL_DONE;
    if (calls == q->spin) {
      q->yields++;
      return SL_DONE;
    }
    int n = 0;
    size_t bytes = 0;
    size_t limit = SL_MIN(budget, max ? max : q->gather);
    for (uint32_t i = 0; i < q->nflushed && n < max_iov && bytes < limit; i++) {
      sl_buf *b = q->ring[(q->head + i) & q->mask].buf;
      size_t len = b ? sl_buf_readable(b) : 0;
      if (len == 0) continue;
      if (len > limit - bytes) len = limit - bytes;
      iov[n].iov_base = sl_buf_rptr(b);
      iov[n].iov_len = len;
      n++;
      bytes += len;
    }
    if (n == 0) { /* only empty entries and markers are flushed */
      sl_outq_consume(q, 0);
      continue;
    }
    calls++;
    q->sendmsg_calls++;
    ssize_t w = fn(ud, iov, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return SL_AGAIN;
      return SL_ERROR;
    }
    *written += (size_t)w;
    budget -= SL_MIN(budget, (size_t)w);
    if (max == 0) sl_outq_adapt_gather(q, bytes, (size_t)w);
    sl_outq_consume(q, (size_t)w);
    if ((size_t)w < bytes) return SL_AGAIN; /* the socket took less: it is full */
  }
  return SL_OK;
}

int sl_outq_write(sl_outq *q, int fd, size_t budget, size_t *written) {
  return sl_outq_write_loop(q, sl_outq_sendmsg, &fd, 0, budget, written);
}

int sl_outq_write_before_fin(sl_outq *q, int fd, size_t budget, size_t *written) {
  return sl_outq_write_loop(q, sl_outq_sendmsg_more, &fd, 0, budget, written);
}

int sl_outq_write_via(sl_outq *q, sl_outq_writev_fn fn, void *ud, size_t max, size_t budget,
                      size_t *written) {
  return sl_outq_write_loop(q, fn, ud, max, budget, written);
}

int sl_outq_move(sl_outq *from, sl_outq *to, void (*adopt)(void *ud, sl_buf *b), void *ud) {
  while (from->count > 0) {
    sl_outq_entry *e = &from->ring[from->head];
    size_t cost = (e->buf ? sl_buf_readable(e->buf) : 0) + SL_OUTQ_ENTRY_OVERHEAD;
    if (sl_outq_push(to, e->buf, e->pid) != SL_OK) return SL_ERROR;
    if (e->buf && adopt) adopt(ud, e->buf);
    sl_outq_shift(from);
    if (from->nflushed > 0) from->nflushed--;
    from->pending -= SL_MIN(cost, from->pending);
  }
  from->pending = 0;
  from->writable = 1;
  return SL_OK;
}

size_t sl_outq_release_all(sl_outq *q, const char *err) {
  size_t n = 0;
  /* Nothing is flushed or pending from here on; an entry a callback adds
   * on the way is released with the rest. */
  while (q->count > 0) {
    q->nflushed = 0;
    q->pending = 0;
    q->writable = 1;
    sl_outq_entry e = sl_outq_shift(q);
    n++;
    sl_outq_release_entry(e.buf, "its connection's close, unsent");
    if (e.pid && q->on_done) q->on_done(q->ud, e.pid, err);
  }
  q->nflushed = 0;
  q->pending = 0;
  q->writable = 1;
  return n;
}
