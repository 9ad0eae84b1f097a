#include "proxy/health.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io/worker.h"
#include "pipeline/codec/proxy_protocol.h"
#include "proxy/config.h"
#include "proxy/metrics.h"
#include "util/common.h"
#include "util/log.h"

/* Results that are not an errno. */
#define SL_HEALTH_BAD_ANSWER (-1)   /* 4 KiB of answer without `expect` */
#define SL_HEALTH_CLOSED (-2)       /* the server closed before `expect` came */

#define SL_HEALTH_ANSWER_MAX 4096

/* One server's check. In flight while fd >= 0: io and timeout are started
 * (and unreferenced from the loop); otherwise both are stopped. A check
 * connects, then writes `send` (if any), then reads until the answer
 * contains `expect` (if any); all of it within the timeout. */
typedef struct sl_health_check {
  ev_io io;                  /* connect completion, then writing, then reading */
  ev_timer timeout;          /* the whole check's timeout */
  sl_health *h;
  size_t index;              /* server index in the upstream */
  int fd;                    /* -1 when no check is in flight */
  int connected;             /* the connect completed */
  size_t sent;               /* bytes of `send` written */
  size_t got;                /* bytes of answer in `answer` */
  int fails, passes;         /* results in a row */
  char answer[SL_HEALTH_ANSWER_MAX];
} sl_health_check;

struct sl_health {
  ev_timer tick;             /* every interval: starts a check per server */
  uint8_t proxy[SL_PROXY_HEADER_MAX]; /* sent first with send_proxy: no address */
  size_t proxy_len;
  struct sl_worker *w;
  const sl_upstream_cfg *u;
  sl_balancer *b;
  sl_health_check checks[]; /* one per server */
};

/* Ends the check in flight: watchers stopped (given back their loop
 * reference first), socket closed. */
static void sl_health_end(sl_health_check *c) {
  struct ev_loop *loop = c->h->w->loop;
  ev_ref(loop);
  ev_io_stop(loop, &c->io);
  ev_ref(loop);
  ev_timer_stop(loop, &c->timeout);
  close(c->fd);
  c->fd = -1;
}

static void sl_health_finish(sl_health_check *c, int err) {
  sl_health *h = c->h;
  sl_health_end(c);
  if (h->w->stopping) return;
  sl_peer *p = &h->b->peers[c->index];
  const char *server = h->u->server_text[c->index];
  if (err == 0) {
    c->fails = 0;
    c->passes++;
    if (p->check_down && c->passes >= h->u->health.passes) {
      p->check_down = 0;
      sl_log(SL_LOG_INFO, "worker %d: upstream %s: server %s is up (health check: %d passed in a row)",
             h->w->id, h->u->name, server, c->passes);
    }
    return;
  }
  c->passes = 0;
  c->fails++;
  if (!p->check_down && c->fails >= h->u->health.fails) {
    p->check_down = 1;
    sl_metrics_server_down(p->m, SL_METRICS_DOWN_CHECK);
    sl_log(SL_LOG_WARN,
           "worker %d: upstream %s: server %s is down (health check: %d failed in a row, last: %s)",
           h->w->id, h->u->name, server, c->fails,
           err == ETIMEDOUT ? "timed out"
           : err == SL_HEALTH_BAD_ANSWER ? "the answer did not contain the expected bytes"
           : err == SL_HEALTH_CLOSED ? "closed before the expected answer"
           : strerror(err));
  }
}

/* Waits for `events` on the check's socket instead of what it waited for. */
static void sl_health_wait(sl_health_check *c, int events) {
  struct ev_loop *loop = c->h->w->loop;
  ev_ref(loop);
  ev_io_stop(loop, &c->io);
  ev_io_set(&c->io, c->fd, events);
  ev_io_start(loop, &c->io);
  ev_unref(loop);
}

/* What a check writes: the PROXY header (send_proxy), then `send`. */
static size_t sl_health_send_len(const sl_health *h) { return h->proxy_len + h->u->health.send_len; }

/* Writes what is left of it. Returns 0 when all of it is written, 1 to
 * wait for room, or an errno. */
static int sl_health_send(sl_health_check *c) {
  const sl_health *h = c->h;
  const sl_health_cfg *hc = &h->u->health;
  while (c->sent < sl_health_send_len(h)) {
    const char *from = c->sent < h->proxy_len ? (const char *)h->proxy + c->sent
                                              : hc->send + (c->sent - h->proxy_len);
    size_t left = c->sent < h->proxy_len ? h->proxy_len - c->sent
                                         : hc->send_len - (c->sent - h->proxy_len);
    ssize_t n = send(c->fd, from, left, MSG_NOSIGNAL);
    if (n > 0) {
      c->sent += (size_t)n;
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return 1;
    } else {
      return n < 0 ? errno : EPIPE;
    }
  }
  return 0;
}

/* Reads the answer. Returns 0 once it contains `expect`, 1 to wait for
 * more, or a result that fails the check. */
static int sl_health_read(sl_health_check *c) {
  const sl_health_cfg *hc = &c->h->u->health;
  for (;;) {
    if (c->got == sizeof(c->answer)) return SL_HEALTH_BAD_ANSWER;
    ssize_t n = recv(c->fd, c->answer + c->got, sizeof(c->answer) - c->got, 0);
    if (n > 0) {
      /* Search from where the expected bytes could start in what is new. */
      size_t from = c->got >= hc->expect_len ? c->got - hc->expect_len + 1 : 0;
      c->got += (size_t)n;
      if (memmem(c->answer + from, c->got - from, hc->expect, hc->expect_len) != NULL) return 0;
    } else if (n == 0) {
      return SL_HEALTH_CLOSED;
    } else if (errno == EINTR) {
      continue;
    } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return 1;
    } else {
      return errno;
    }
  }
}

/* Takes the check as far as it can go now. */
static void sl_health_advance(sl_health_check *c) {
  const sl_health_cfg *hc = &c->h->u->health;
  if (c->sent < sl_health_send_len(c->h)) {
    int r = sl_health_send(c);
    if (r == 1) return; /* wait for room (EV_WRITE, as for the connect) */
    if (r != 0) {
      sl_health_finish(c, r);
      return;
    }
  }
  if (hc->expect == NULL) {
    sl_health_finish(c, 0);
    return;
  }
  int r = sl_health_read(c);
  if (r != 1) {
    sl_health_finish(c, r);
    return;
  }
  if (!(c->io.events & EV_READ)) sl_health_wait(c, EV_READ);
}

static void sl_health_on_io(struct ev_loop *loop, ev_io *io, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_health_check *c = SL_CONTAINER_OF(io, sl_health_check, io);
  if (!c->connected) {
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err != 0) {
      sl_health_finish(c, err);
      return;
    }
    c->connected = 1;
  }
  sl_health_advance(c);
}

static void sl_health_on_timeout(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_health_finish(SL_CONTAINER_OF(t, sl_health_check, timeout), ETIMEDOUT);
}

static void sl_health_begin(sl_health *h, sl_health_check *c) {
  const sl_addr *a = &h->u->servers[c->index];
  int fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    sl_log(SL_LOG_ERROR, "worker %d: upstream %s: health check of %s: socket: %s", h->w->id,
           h->u->name, h->u->server_text[c->index], strerror(errno));
    return;
  }
  int rc = connect(fd, (const struct sockaddr *)&a->ss, a->len);
  int err = rc == 0 ? 0 : errno;
  c->fd = fd;
  c->connected = 0;
  c->sent = 0;
  c->got = 0;
  struct ev_loop *loop = h->w->loop;
  ev_io_set(&c->io, fd, EV_WRITE);
  ev_io_start(loop, &c->io);
  ev_unref(loop);
  ev_timer_set(&c->timeout, h->u->health.timeout, 0.);
  ev_timer_start(loop, &c->timeout);
  ev_unref(loop);
  if (err == EINPROGRESS) return;
  if (err != 0) {
    sl_health_finish(c, err);
    return;
  }
  c->connected = 1; /* connected at once */
  sl_health_advance(c);
}

static void sl_health_on_tick(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_health *h = SL_CONTAINER_OF(t, sl_health, tick);
  if (h->w->stopping) return;
  for (size_t i = 0; i < h->u->nservers; i++)
    if (h->checks[i].fd < 0) sl_health_begin(h, &h->checks[i]);
}

sl_health *sl_health_start(struct sl_worker *w, const sl_upstream_cfg *u, sl_balancer *b) {
  sl_health *h = calloc(1, sizeof(*h) + u->nservers * sizeof(sl_health_check));
  if (h == NULL) return NULL;
  h->w = w;
  h->u = u;
  h->b = b;
  if (u->send_proxy) h->proxy_len = sl_proxy_header(u->send_proxy, NULL, NULL, h->proxy);
  for (size_t i = 0; i < u->nservers; i++) {
    sl_health_check *c = &h->checks[i];
    c->h = h;
    c->index = i;
    c->fd = -1;
    ev_init(&c->io, sl_health_on_io);
    ev_init(&c->timeout, sl_health_on_timeout);
  }
  /* The first round as soon as the loop runs, then every interval. */
  ev_timer_init(&h->tick, sl_health_on_tick, 0., u->health.interval);
  ev_timer_start(w->loop, &h->tick);
  ev_unref(w->loop);
  return h;
}

void sl_health_stop(sl_health *h) {
  if (h == NULL) return;
  struct ev_loop *loop = h->w->loop;
  for (size_t i = 0; i < h->u->nservers; i++) {
    if (h->checks[i].fd >= 0) sl_health_end(&h->checks[i]);
  }
  ev_ref(loop);
  ev_timer_stop(loop, &h->tick);
  free(h);
}
