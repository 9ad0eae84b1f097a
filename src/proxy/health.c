#include "proxy/health.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io/worker.h"
#include "proxy/config.h"
#include "proxy/metrics.h"
#include "util/common.h"
#include "util/log.h"

/* One server's check. In flight while fd >= 0: io and timeout are started
 * (and unreferenced from the loop); otherwise both are stopped. */
typedef struct sl_health_check {
  ev_io io;                  /* connect completion */
  ev_timer timeout;          /* the check's connect timeout */
  sl_health *h;
  size_t index;              /* server index in the upstream */
  int fd;                    /* -1 when no check is in flight */
  int fails, passes;         /* results in a row */
} sl_health_check;

struct sl_health {
  ev_timer tick;             /* every interval: starts a check per server */
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
           err == ETIMEDOUT ? "timed out" : strerror(err));
  }
}

static void sl_health_on_io(struct ev_loop *loop, ev_io *io, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_health_check *c = SL_CONTAINER_OF(io, sl_health_check, io);
  int err = 0;
  socklen_t len = sizeof(err);
  if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
  sl_health_finish(c, err);
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
  struct ev_loop *loop = h->w->loop;
  ev_io_set(&c->io, fd, EV_WRITE);
  ev_io_start(loop, &c->io);
  ev_unref(loop);
  ev_timer_set(&c->timeout, h->u->health.timeout, 0.);
  ev_timer_start(loop, &c->timeout);
  ev_unref(loop);
  if (err != EINPROGRESS) sl_health_finish(c, err);   /* done at once: passed or failed */
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
