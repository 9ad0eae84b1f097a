#include "io/outq.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "buf/buf.h"
#include "util/common.h"

#define SL_OUTQ_INITIAL_SLOTS 8

void sl_outq_init(sl_outq *q, size_t low, size_t high,
                  sl_outq_writability_fn fn, void *ud) {
  q->ring = NULL;
  q->mask = 0;
  q->head = q->count = q->nflushed = 0;
  q->pending = 0;
  q->peak = 0;
  q->low = low;
  q->high = high;
  q->writable = 1;
  q->on_writability = fn;
  q->ud = ud;
}

void sl_outq_destroy(sl_outq *q) {
  sl_outq_release_all(q);
  free(q->ring);
  q->ring = NULL;
  q->mask = 0;
}

static int sl_outq_grow(sl_outq *q) {
  uint32_t cap = q->ring == NULL ? SL_OUTQ_INITIAL_SLOTS : (q->mask + 1) * 2;
  sl_buf **ring = malloc(sizeof(*ring) * cap);
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
  q->pending -= n;
  if (!q->writable && q->pending < q->low) {
    q->writable = 1;
    if (q->on_writability) q->on_writability(q->ud, 1);
  }
}

int sl_outq_add(sl_outq *q, sl_buf *b) {
  if ((q->ring == NULL || q->count == q->mask + 1) && sl_outq_grow(q) != SL_OK) {
    sl_buf_release(b);
    return SL_ERROR;
  }
  q->ring[(q->head + q->count) & q->mask] = b;
  q->count++;
  sl_outq_pending_add(q, sl_buf_readable(b) + SL_OUTQ_ENTRY_OVERHEAD);
  return SL_OK;
}

void sl_outq_flush(sl_outq *q) { q->nflushed = q->count; }

/* Removes the first entry, releasing its buffer. */
static void sl_outq_pop(sl_outq *q, size_t bytes_left) {
  sl_buf *b = q->ring[q->head];
  q->ring[q->head] = NULL;
  q->head = (q->head + 1) & q->mask;
  q->count--;
  q->nflushed--;
  sl_pool *p = sl_pool_of(b->root);
  sl_buf_release_site(p, "the outbound queue, after writing it");
  sl_buf_release(b);
  sl_buf_release_site(p, NULL);
  sl_outq_pending_sub(q, bytes_left + SL_OUTQ_ENTRY_OVERHEAD);
}

sl_buf *sl_outq_take(sl_outq *q) {
  if (q->nflushed == 0) return NULL;
  sl_buf *b = q->ring[q->head];
  q->ring[q->head] = NULL;
  q->head = (q->head + 1) & q->mask;
  q->count--;
  q->nflushed--;
  sl_outq_pending_sub(q, sl_buf_readable(b) + SL_OUTQ_ENTRY_OVERHEAD);
  return b;
}

/* Accounts n written bytes: pops entries that are done (empty ones too),
 * advances a partially written one. */
static void sl_outq_consume(sl_outq *q, size_t n) {
  while (q->nflushed > 0) {
    sl_buf *b = q->ring[q->head];
    size_t left = sl_buf_readable(b);
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

int sl_outq_write(sl_outq *q, int fd, size_t budget, size_t *written) {
  *written = 0;
  int max_iov = SL_MIN(SL_OUTQ_MAX_IOV, IOV_MAX);
  struct iovec iov[SL_OUTQ_MAX_IOV];
  while (q->nflushed > 0) {
    if (budget == 0) return SL_AGAIN;
    int n = 0;
    size_t bytes = 0;
    size_t limit = SL_MIN(budget, (size_t)SL_OUTQ_MAX_GATHER_BYTES);
    for (uint32_t i = 0; i < q->nflushed && n < max_iov && bytes < limit; i++) {
      sl_buf *b = q->ring[(q->head + i) & q->mask];
      size_t len = sl_buf_readable(b);
      if (len == 0) continue;
      if (len > limit - bytes) len = limit - bytes;
      iov[n].iov_base = sl_buf_rptr(b);
      iov[n].iov_len = len;
      n++;
      bytes += len;
    }
    if (n == 0) { /* only empty entries are flushed */
      while (q->nflushed > 0) sl_outq_pop(q, 0);
      return SL_OK;
    }
    /* sendmsg rather than writev: MSG_NOSIGNAL turns SIGPIPE into EPIPE. */
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
    ssize_t w = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return SL_AGAIN;
      return SL_ERROR;
    }
    *written += (size_t)w;
    budget -= SL_MIN(budget, (size_t)w);
    sl_outq_consume(q, (size_t)w);
    if ((size_t)w < bytes) return SL_AGAIN; /* the socket took less: it is full */
  }
  return SL_OK;
}

size_t sl_outq_release_all(sl_outq *q) {
  size_t n = q->count;
  while (q->count > 0) {
    sl_buf *b = q->ring[q->head];
    q->ring[q->head] = NULL;
    q->head = (q->head + 1) & q->mask;
    q->count--;
    sl_pool *p = sl_pool_of(b->root);
    sl_buf_release_site(p, "its connection's close, unsent");
    sl_buf_release(b);
    sl_buf_release_site(p, NULL);
  }
  q->nflushed = 0;
  q->pending = 0;
  q->writable = 1;
  return n;
}
