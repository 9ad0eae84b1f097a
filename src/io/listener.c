#include "io/listener.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io/worker.h"
#include "util/common.h"
#include "util/log.h"

#define SL_ACCEPTS_PER_WAKEUP 16

static void sl_listener_on_accept(struct ev_loop *loop, ev_io *io, int revents) {
  SL_UNUSED(revents);
  sl_listener *l = SL_CONTAINER_OF(io, sl_listener, io);
  for (int i = 0; i < SL_ACCEPTS_PER_WAKEUP; i++) {
    sl_addr remote;
    remote.len = sizeof(remote.ss);
    int fd = accept4(l->fd, (struct sockaddr *)&remote.ss, &remote.len,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        sl_log(SL_LOG_ERROR, "listener %s: accept: %s; pausing accepts for 100 ms",
               l->text, strerror(errno));
        ev_io_stop(loop, &l->io);
        ev_timer_set(&l->retry, 0.1, 0.);
        ev_timer_start(loop, &l->retry);
        return;
      }
      sl_log(SL_LOG_ERROR, "listener %s: accept: %s", l->text, strerror(errno));
      return;
    }
    l->on_accept(l, fd, &remote);
    if (l->fd < 0) return; /* closed by the callback */
  }
}

static void sl_listener_on_retry(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(revents);
  sl_listener *l = SL_CONTAINER_OF(t, sl_listener, retry);
  if (l->fd >= 0) ev_io_start(loop, &l->io);
}

int sl_listener_open(sl_listener *l, struct sl_worker *w, const sl_addr *addr,
                     sl_listener_accept_fn fn, void *ud) {
  l->w = w;
  l->on_accept = fn;
  l->ud = ud;
  sl_addr_format((const struct sockaddr *)&addr->ss, l->text, sizeof(l->text));
  int fd = socket(addr->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return SL_ERROR;
  int one = 1;
  /* No SO_REUSEPORT while one worker listens: a second process on the same
   * port must fail to bind rather than silently share the connections. */
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd, (const struct sockaddr *)&addr->ss, addr->len) < 0 || listen(fd, 511) < 0) {
    int e = errno;
    close(fd);
    errno = e;
    return SL_ERROR;
  }
  l->fd = fd;
  ev_io_init(&l->io, sl_listener_on_accept, fd, EV_READ);
  ev_timer_init(&l->retry, sl_listener_on_retry, 0., 0.);
  ev_io_start(w->loop, &l->io);
  return SL_OK;
}

void sl_listener_close(sl_listener *l) {
  if (l->fd < 0) return;
  ev_io_stop(l->w->loop, &l->io);
  ev_timer_stop(l->w->loop, &l->retry);
  close(l->fd);
  l->fd = -1;
}
