#include "io/splice.h"

#include <fcntl.h>
#include <unistd.h>

#include "util/common.h"

void sl_pipe_pool_init(sl_pipe_pool *pp) {
  pp->nidle = 0;
  pp->open = 0;
  pp->max_open = SL_PIPE_MAX_OPEN;
  pp->created = 0;
  pp->refused = 0;
  pp->gets = 0;
  pp->gets_at_tick = 0;
  pp->quiet_since_ms = 0;
}

int sl_pipe_get(sl_pipe_pool *pp, size_t size, sl_pipe *out) {
  pp->gets++;
  if (pp->nidle > 0) {
    *out = pp->idle[--pp->nidle];
    return SL_OK;
  }
  int fds[2];
  if (pp->open >= pp->max_open || pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) {
    pp->refused++;
    return SL_ERROR;
  }
  size = SL_MAX(SL_MIN(size, (size_t)SL_PIPE_SIZE_MAX), (size_t)SL_PIPE_SIZE_MIN);
  (void)fcntl(fds[1], F_SETPIPE_SZ, (int)size);   /* refused: the default stays */
  int cap = fcntl(fds[1], F_GETPIPE_SZ);
  out->rd = fds[0];
  out->wr = fds[1];
  out->cap = cap > 0 ? (uint32_t)cap : SL_PIPE_SIZE_MIN;
  pp->open++;
  pp->created++;
  return SL_OK;
}

static void sl_pipe_close(sl_pipe_pool *pp, const sl_pipe *p) {
  close(p->rd);
  close(p->wr);
  pp->open--;
}

void sl_pipe_put(sl_pipe_pool *pp, const sl_pipe *p, int empty) {
  if (empty && pp->nidle < SL_PIPE_MAX_OPEN) pp->idle[pp->nidle++] = *p;
  else sl_pipe_close(pp, p);
}

void sl_pipe_pool_trim(sl_pipe_pool *pp) {
  while (pp->nidle > 0) sl_pipe_close(pp, &pp->idle[--pp->nidle]);
}

unsigned sl_pipe_pool_tick(sl_pipe_pool *pp, int64_t now_ms, int64_t idle_ms) {
  if (pp->gets != pp->gets_at_tick || pp->quiet_since_ms == 0) {
    pp->gets_at_tick = pp->gets;
    pp->quiet_since_ms = now_ms;
    return 0;
  }
  if (pp->nidle == 0 || now_ms - pp->quiet_since_ms < idle_ms) return 0;
  unsigned n = pp->nidle;
  sl_pipe_pool_trim(pp);
  return n;
}

ssize_t sl_splice_in(int sock, const sl_pipe *p, size_t max) {
  return splice(sock, NULL, p->wr, NULL, max, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
}

ssize_t sl_splice_out(const sl_pipe *p, int sock, size_t len) {
  return splice(p->rd, NULL, sock, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
}
