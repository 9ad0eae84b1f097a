#include "io/listener.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "io/worker.h"
#include "util/common.h"
#include "util/log.h"

#define SL_ACCEPTS_PER_WAKEUP 16

/* ---- the gate ---- */

void sl_listen_gate_init(sl_listen_gate *g, uint32_t max, void (*wake)(void *), void *ud) {
  atomic_init(&g->open, 0);
  atomic_init(&g->max, max);
  atomic_init(&g->waiting, 0);
  atomic_init(&g->rate, 0);
  atomic_init(&g->rate_due, 0);
  g->wake = wake;
  g->wake_ud = ud;
}

/* Takes a place: SL_OK, or SL_AGAIN at the limit. */
static int sl_listen_gate_enter(sl_listen_gate *g) {
  uint32_t n = atomic_load(&g->open);
  for (;;) {
    uint32_t max = atomic_load(&g->max);
    if (max != 0 && n >= max) return SL_AGAIN;
    if (atomic_compare_exchange_weak(&g->open, &n, n + 1)) return SL_OK;
  }
}

static int sl_listen_gate_has_room(sl_listen_gate *g) {
  uint32_t max = atomic_load(&g->max);
  return max == 0 || atomic_load(&g->open) < max;
}

void sl_listen_gate_leave(sl_listen_gate *g) {
  atomic_fetch_sub(&g->open, 1);
  /* Pairs with the store-then-check in sl_listener_pause_at_limit: either
   * the pausing worker sees the room, or this sees it waiting. */
  if (atomic_load(&g->waiting) && atomic_exchange(&g->waiting, 0) && g->wake)
    g->wake(g->wake_ud);
}

#define SL_SECOND_NS 1000000000LL

double sl_listen_gate_rate_take(sl_listen_gate *g, int64_t now_ns) {
  uint32_t rate = atomic_load_explicit(&g->rate, memory_order_relaxed);
  if (rate == 0) return 0;
  int64_t interval = SL_SECOND_NS / rate;
  int64_t due = atomic_load_explicit(&g->rate_due, memory_order_relaxed);
  for (;;) {
    int64_t next = (due > now_ns ? due : now_ns) + interval;
    /* More than a second's worth ahead of now: over the rate. */
    int64_t ahead = next - now_ns - SL_SECOND_NS;
    if (ahead > 0) return (double)ahead / 1e9;
    if (atomic_compare_exchange_weak(&g->rate_due, &due, next)) return 0;
  }
}

void sl_listen_gate_rate_give_back(sl_listen_gate *g) {
  uint32_t rate = atomic_load_explicit(&g->rate, memory_order_relaxed);
  if (rate != 0) atomic_fetch_sub(&g->rate_due, SL_SECOND_NS / rate);
}

void sl_listen_gate_set_rate(sl_listen_gate *g, uint32_t rate) {
  if (atomic_exchange(&g->rate, rate) != rate) atomic_store(&g->rate_due, 0);
}

/* ---- accepting ---- */

static int64_t sl_listener_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Stops the watcher for wait seconds at the gate's rate (the retry timer
 * starts it again). */
static void sl_listener_pause_at_rate(sl_listener *l, double wait) {
  struct ev_loop *loop = l->w->loop;
  ev_io_stop(loop, &l->io);
  ev_now_update(loop);   /* the wait counts from now, not from the loop's last look */
  ev_timer_set(&l->retry, wait < 0.001 ? 0.001 : wait, 0.);
  ev_timer_start(loop, &l->retry);
  if (l->on_rate_pause) l->on_rate_pause(l);
  /* One line at most every 10 s per listener and worker: the pauses come
   * as often as connections do. */
  if (l->rate_logged == 0 || ev_now(loop) - l->rate_logged >= 10.0) {
    l->rate_logged = ev_now(loop);
    sl_log(SL_LOG_INFO, "listener %s: max_connection_rate (%u/s) reached on worker %d: "
           "accepting paused for %.0f ms (connections wait in the queue; said again at most "
           "every 10 s)", l->name, (unsigned)atomic_load(&l->gate->rate), l->w->id,
           wait * 1000.0);
  }
}

/* Stops the watcher at the gate's limit. Returns 1 when paused, 0 when a
 * place freed up meanwhile (keep accepting). */
static int sl_listener_pause_at_limit(sl_listener *l) {
  atomic_store(&l->gate->waiting, 1);
  if (sl_listen_gate_has_room(l->gate)) return 0;
  ev_io_stop(l->w->loop, &l->io);
  if (!l->at_limit)
    sl_log(SL_LOG_INFO, "listener %s: %u connections open, its max_connections: accepting paused",
           l->name, (unsigned)atomic_load(&l->gate->open));
  l->at_limit = 1;
  return 1;
}

/* Does fd listen (an OUT listener's socket put back in its group)? */
static int sl_listener_listening(int fd) {
  int v = 0;
  socklen_t len = sizeof(v);
  return getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &len) == 0 && v != 0;
}

void sl_listener_retry(sl_listener *l) {
  if (l->fd < 0) return;
  if (l->out) {
    /* (OUT and at_limit never meet: each has the watcher stopped, and only
     * the watcher's callback sets either.) */
    if (!sl_listener_listening(l->fd)) return;
    l->out = 0;
    sl_log(SL_LOG_INFO, "listener %s: accepting again on worker %d (its socket is back in its "
           "group)", l->name, l->w->id);
    /* At the gate's limit meanwhile: the first accept pauses it. */
    if (!ev_is_active(&l->retry)) ev_io_start(l->w->loop, &l->io);
    return;
  }
  if (!l->at_limit) return;
  if (!sl_listen_gate_has_room(l->gate)) {
    atomic_store(&l->gate->waiting, 1);
    if (!sl_listen_gate_has_room(l->gate)) return;
  }
  l->at_limit = 0;
  sl_log(SL_LOG_INFO, "listener %s: below max_connections: accepting resumed", l->name);
  if (!ev_is_active(&l->retry)) ev_io_start(l->w->loop, &l->io);
}

static void sl_listener_on_accept(struct ev_loop *loop, ev_io *io, int revents) {
  SL_UNUSED(revents);
  sl_listener *l = SL_CONTAINER_OF(io, sl_listener, io);
  int limited = atomic_load_explicit(&l->gate->rate, memory_order_relaxed) != 0;
  for (int i = 0; i < SL_ACCEPTS_PER_WAKEUP; i++) {
    /* A place in the rate first (given back when accept finds nothing). */
    double wait = limited ? sl_listen_gate_rate_take(l->gate, sl_listener_now_ns()) : 0;
    if (wait > 0) {
      sl_listener_pause_at_rate(l, wait);
      return;
    }
    if (sl_listen_gate_enter(l->gate) != SL_OK) {
      if (limited) sl_listen_gate_rate_give_back(l->gate);
      if (sl_listener_pause_at_limit(l)) return;
      continue;
    }
    sl_addr remote;
    remote.len = sizeof(remote.ss);
    int fd = accept4(l->fd, (struct sockaddr *)&remote.ss, &remote.len,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      int e = errno;
      sl_listen_gate_leave(l->gate);
      if (limited) sl_listen_gate_rate_give_back(l->gate);
      if (e == EINTR || e == ECONNABORTED) continue;
      if (e == EAGAIN || e == EWOULDBLOCK) return;
      if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) {
        sl_log(SL_LOG_ERROR, "listener %s: accept: %s; pausing accepts for 100 ms",
               l->name, strerror(e));
        ev_io_stop(loop, &l->io);
        ev_timer_set(&l->retry, 0.1, 0.);
        ev_timer_start(loop, &l->retry);
        return;
      }
      if (e == EINVAL) {
        /* Withdrawn by the Lua watchdog (proxy/watchdog.h) while this
         * worker was stuck: OUT until the watchdog puts it back and wakes
         * the worker (sl_listener_retry). */
        sl_log(SL_LOG_WARN, "listener %s: not accepting on worker %d: its socket was taken out "
               "of its group while the worker was stuck (until the worker is no longer)",
               l->name, l->w->id);
        l->out = 1;
        ev_io_stop(loop, &l->io);
        return;
      }
      sl_log(SL_LOG_ERROR, "listener %s: accept: %s", l->name, strerror(e));
      return;
    }
    l->on_accept(l, fd, &remote);
    if (l->fd < 0 || !ev_is_active(&l->io)) return; /* stopped by the callback */
  }
}

static void sl_listener_on_retry(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(revents);
  sl_listener *l = SL_CONTAINER_OF(t, sl_listener, retry);
  if (l->fd >= 0 && !l->at_limit && !l->out) ev_io_start(loop, &l->io);
}

int sl_listener_bind(const sl_addr *addr, int reuseport, int backlog) {
  int fd = socket(addr->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (addr->ss.ss_family == AF_INET6) {
    /* [::] means IPv6 only: 0.0.0.0 is a listener of its own. */
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
  }
  /* Accepted sockets inherit TCP_NODELAY from their listener (Linux copies
   * the listener's TCP options): one setsockopt here instead of one per
   * connection. */
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if ((reuseport && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0) ||
      bind(fd, (const struct sockaddr *)&addr->ss, addr->len) < 0 ||
      listen(fd, backlog) < 0) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

int sl_listener_withdraw(int fd) { return shutdown(fd, SHUT_RD) == 0 ? SL_OK : SL_ERROR; }

int sl_listener_listen(int fd, int backlog) { return listen(fd, backlog) == 0 ? SL_OK : SL_ERROR; }

int sl_listener_defer_accept(int fd, int on) {
  int secs = on ? 1 : 0;
  return setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &secs, sizeof(secs)) == 0 ? SL_OK : SL_ERROR;
}

void sl_listener_start(sl_listener *l, struct sl_worker *w, int fd, sl_listen_gate *gate,
                       const char *name, sl_listener_accept_fn fn, void *ud) {
  l->w = w;
  l->fd = fd;
  l->gate = gate;
  l->name = name;
  l->on_accept = fn;
  l->ud = ud;
  l->at_limit = 0;
  l->out = 0;
  l->rate_logged = 0;
  l->on_rate_pause = NULL;
  ev_io_init(&l->io, sl_listener_on_accept, fd, EV_READ);
  ev_timer_init(&l->retry, sl_listener_on_retry, 0., 0.);
  ev_io_start(w->loop, &l->io);
}

void sl_listener_stop(sl_listener *l) {
  if (l->fd < 0) return;
  ev_io_stop(l->w->loop, &l->io);
  ev_timer_stop(l->w->loop, &l->retry);
  l->fd = -1;
}
