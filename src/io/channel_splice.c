/*
 * Kernel splicing for pass-through channels (see channel.h): a channel's
 * reads go socket to socket through a pipe from its worker's pool, which
 * stands in for its peer's outbound queue while bytes are in it.
 */
#include <errno.h>
#include <unistd.h>

#include "buf/buf.h"
#include "io/channel.h"
#include "io/channel_internal.h"
#include "io/worker.h"
#include "util/common.h"
#include "util/log.h"

void sl_channel_pipe_put(sl_channel *ch) {
  sl_pipe_put(&ch->w->pipes, &ch->spl, ch->spl_len == 0);
  ch->w->stats.splice_pipes = ch->w->pipes.open;
  ch->spl_len = 0;
  ch->flags &= ~(uint32_t)(SL_CH_HAS_PIPE | SL_CH_SPLICE_FULL);
}

/* A channel closing without an error while its pipe holds bytes (an idle
 * timeout while its peer was slow): those bytes were read from its socket
 * and go on, as they would from buffers. They move into the peer's queue,
 * empty while the pipe holds bytes (so order is kept), which the peer
 * writes before its own close. Returns the bytes that could not move (no
 * memory, or the peer cannot take writes). */
size_t sl_channel_pipe_hand_on(sl_channel *ch) {
  sl_channel *p = ch->peer;
  while (ch->spl_len > 0 && p != NULL) {
    size_t len = SL_MIN((size_t)ch->spl_len, (size_t)65536);
    sl_buf *b = sl_buf_alloc(ch->w->pool, len, len);
    if (b == NULL) break;
    ssize_t n = read(ch->spl.rd, b->data, len);
    if (n <= 0) {
      sl_buf_release(b);
      break;
    }
    b->wr = (uint32_t)n;
    ch->spl_len -= (uint32_t)n;
    if (sl_channel_write(p, b) != SL_OK) break;
  }
  return ch->spl_len;
}

/* A wake-up that splices less than this gives its pipe back: the
 * exchange has turned interactive, and buffers serve it as well. */
#define SL_SPLICE_MIN_BURST 4096

/* Counts n bytes spliced into dst's socket as sent. */
static void sl_channel_spliced(sl_channel *dst, size_t n) {
  if (n == 0) return;
  sl_worker *w = dst->w;
  dst->bytes_out += n;
  w->stats.bytes_out += n;
  w->stats.spliced_bytes += n;
  dst->last_active = dst->last_written = ev_now(w->loop);
}

/* Moves what src's pipe holds into its peer's socket. SL_OK: all of it
 * (src reads again if it was paused); SL_AGAIN: the peer's socket is full,
 * src stops reading and the peer's EV_WRITE goes on; SL_ERROR: the peer
 * failed and was closed (src with it). The caller holds a reference on
 * src. */
int sl_channel_splice_drain(sl_channel *src) {
  sl_channel *dst = src->peer;
  size_t moved = 0;
  while (src->spl_len > 0) {
    ssize_t m = sl_splice_out(&src->spl, dst->fd, src->spl_len);
    if (m > 0) {
      src->spl_len -= (uint32_t)m;
      moved += (size_t)m;
      continue;
    }
    if (m < 0 && errno == EINTR) continue;
    int e = m < 0 ? errno : EPIPE;
    sl_channel_spliced(dst, moved);
    if (e == EAGAIN || e == EWOULDBLOCK) {
      if (!(src->flags & SL_CH_SPLICE_FULL)) {
        src->flags |= SL_CH_SPLICE_FULL;
        sl_channel_update_reading(src);
        if (sl_log_enabled(SL_LOG_DEBUG))
          sl_log(SL_LOG_DEBUG, "%s: paused reading from %s (%u bytes in its pipe)",
                 sl_channel_describe(dst), sl_channel_describe(src), src->spl_len);
      }
      sl_channel_wait_writable(dst);
      return SL_AGAIN;
    }
    sl_channel_write_failed(dst, e);
    return SL_ERROR;
  }
  sl_channel_spliced(dst, moved);
  /* Empty: back to the pool, so that only bytes in flight hold a pipe. */
  uint32_t was_full = src->flags & SL_CH_SPLICE_FULL;
  sl_channel_pipe_put(src);
  if (was_full) {
    sl_channel_update_reading(src);
    if (sl_log_enabled(SL_LOG_DEBUG))
      sl_log(SL_LOG_DEBUG, "%s: resumed reading from %s (its pipe is empty)",
                 sl_channel_describe(dst), sl_channel_describe(src));
  }
  return SL_OK;
}

/* One wake-up's reads through the pipe (see channel.h). SL_DECLINED when
 * the peer cannot take spliced bytes now (its queue holds bytes that must
 * go first, it is connecting or its output is closed) or no pipe is to be
 * had: the caller reads into buffers instead. */
int sl_channel_splice_read(sl_channel *ch) {
  sl_worker *w = ch->w;
  sl_channel *dst = ch->peer;
  if (dst == NULL ||
      (dst->flags & (SL_CH_ACTIVE | SL_CH_CONNECTING | SL_CH_CLOSED | SL_CH_OUTPUT_CLOSED |
                     SL_CH_SHUTDOWN_PENDING | SL_CH_CLOSE_PENDING)) != SL_CH_ACTIVE ||
      !sl_outq_is_empty(&dst->outq))
    return SL_DECLINED;
  if (!(ch->flags & SL_CH_HAS_PIPE)) {
    if (sl_pipe_get(&w->pipes, dst->outq.high, &ch->spl) != SL_OK) {
      ch->flags &= ~(uint32_t)SL_CH_SPLICING;   /* buffers from now on */
      w->stats.splice_refused++;
      return SL_DECLINED;
    }
    ch->flags |= SL_CH_HAS_PIPE;
    w->stats.splice_pipes = w->pipes.open;
  }
  sl_channel_ref(ch);
  size_t total = 0;
  int eof = 0, rc = SL_OK;
  char why[128];
  const char *why_code = NULL;
  why[0] = '\0';
  /* Fills the pipe as a read burst fills buffers (until the socket is
   * empty or the pipe full), then hands it all to the peer at once, as
   * the bridge flushes a burst: fewer, larger writes wake the reader on the
   * other side less often. */
  for (int i = 0; i < SL_RECV_MAX_READS; i++) {
    if (!ev_is_active(&ch->rio)) break; /* autoread turned off, or closed */
    size_t room = ch->spl.cap - ch->spl_len;
    if (room == 0) break;
    ssize_t n = sl_splice_in(ch->fd, &ch->spl, room);
    if (n > 0) {
      ch->spl_len += (uint32_t)n;
      total += (size_t)n;
      ch->bytes_in += (uint64_t)n;
      w->stats.bytes_in += (uint64_t)n;
      if ((size_t)n < room) break;   /* the socket is empty, most likely */
      continue;
    }
    if (n == 0) {
      eof = 1;
      break;
    }
    if (sl_channel_read_error(errno, why, sizeof(why), &why_code)) continue;
    break;
  }
  if (total > 0) ch->last_active = ev_now(w->loop);
  if (ch->spl_len > 0) rc = sl_channel_splice_drain(ch);   /* what was read goes on first */
  if (why[0] != '\0' && !(ch->flags & SL_CH_CLOSED)) sl_channel_close_with(ch, why_code, why, 1);
  if (!(ch->flags & SL_CH_CLOSED)) {
    if (ch->spl_len == 0 && (ch->flags & SL_CH_HAS_PIPE)) sl_channel_pipe_put(ch);
    if (eof && rc == SL_OK) {
      sl_channel_input_closed(ch);
    } else if (total < SL_SPLICE_MIN_BURST && ch->spl_len == 0) {
      ch->flags &= ~(uint32_t)SL_CH_SPLICING;   /* interactive again: buffers */
      sl_channel_recv_reset(ch);
    }
  }
  sl_channel_unref(ch);
  return SL_OK;
}
