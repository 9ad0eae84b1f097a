#include "proxy/health.h"

#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io/tls.h"
#include "io/worker.h"
#include "pipeline/codec/proxy_protocol.h"
#include "proxy/config.h"
#include "proxy/metrics.h"
#include "util/common.h"
#include "util/log.h"

/* Results that are not an errno. */
#define SL_HEALTH_BAD_ANSWER (-1)   /* 4 KiB of answer without `expect` */
#define SL_HEALTH_CLOSED (-2)       /* the server closed before `expect` came */
#define SL_HEALTH_TLS (-3)          /* the TLS handshake or a record failed (why: tls_why) */
#define SL_HEALTH_WAIT (-4)         /* (from the steps) wait for c->want */

#define SL_HEALTH_ANSWER_MAX 4096

/* One server's check. In flight while fd >= 0: io and timeout are started
 * (and unreferenced from the loop); otherwise both are stopped. A check
 * connects, then writes `send` (if any), then reads until the answer
 * contains `expect` (if any); all of it within the timeout. For an
 * upstream with tls, the check is a TLS client as its connections are
 * (same context, names and verification): the PROXY header (send_proxy)
 * goes in the clear, then the handshake must succeed, then `send` and the
 * answer go through TLS. */
typedef struct sl_health_check {
  ev_io io;                  /* connect completion, then writing, then reading */
  ev_timer timeout;          /* the whole check's timeout */
  sl_health *h;
  size_t index;              /* server index in the upstream */
  int fd;                    /* -1 when no check is in flight */
  int connected;             /* the connect completed */
  size_t sent;               /* bytes of `send` written */
  size_t got;                /* bytes of answer in `answer` */
  SSL *ssl;                  /* with tls: the session, NULL otherwise */
  int shaken;                /* with tls: the handshake is done */
  int want;                  /* the event a step waits for (EV_READ or EV_WRITE) */
  char tls_why[160];         /* SL_HEALTH_TLS: what failed */
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
  SSL_free(c->ssl);
  c->ssl = NULL;
  ERR_clear_error();
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
           : err == SL_HEALTH_TLS ? c->tls_why
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

/* A failed SSL call (its SSL_get_error e): SL_HEALTH_WAIT with c->want set,
 * 0 for the end of the stream, or SL_HEALTH_TLS with tls_why (an errno
 * value for a plain socket error). */
static int sl_health_tls_error(sl_health_check *c, int e) {
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
    c->want = e == SSL_ERROR_WANT_READ ? EV_READ : EV_WRITE;
    return SL_HEALTH_WAIT;
  }
  if (e == SSL_ERROR_ZERO_RETURN) return 0;
  if (e == SSL_ERROR_SYSCALL && errno != 0 && ERR_peek_error() == 0) return errno;
  char text[120];
  const char *t = sl_tls_error_text(text, sizeof(text), e == SSL_ERROR_SYSCALL ? "eof" : "error");
  long v = SSL_get_verify_result(c->ssl);
  if (v != X509_V_OK && (SSL_get_verify_mode(c->ssl) & SSL_VERIFY_PEER))
    snprintf(c->tls_why, sizeof(c->tls_why), "tls_error (%s: %s)", t,
             X509_verify_cert_error_string(v));
  else
    snprintf(c->tls_why, sizeof(c->tls_why), "tls_error (%s)", t);
  return SL_HEALTH_TLS;
}

/* Writes n bytes at p in the clear or through TLS. 0 with the bytes taken
 * in *done, SL_HEALTH_WAIT (c->want set), or a result that fails the
 * check. */
static int sl_health_write(sl_health_check *c, const void *p, size_t n, int clear, size_t *done) {
  if (c->ssl == NULL || clear) {
    ssize_t w;
    while ((w = send(c->fd, p, n, MSG_NOSIGNAL)) < 0 && errno == EINTR) {}
    if (w > 0) {
      *done = (size_t)w;
      return 0;
    }
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      c->want = EV_WRITE;
      return SL_HEALTH_WAIT;
    }
    return w < 0 ? errno : EPIPE;
  }
  ERR_clear_error();
  if (SSL_write_ex(c->ssl, p, n, done) == 1) return 0;
  int r = sl_health_tls_error(c, SSL_get_error(c->ssl, 0));
  return r == 0 ? EPIPE : r;
}

/* Reads into p (up to n bytes). 0 with the bytes read in *got (0: the
 * end), SL_HEALTH_WAIT, or a result that fails the check. */
static int sl_health_recv(sl_health_check *c, void *p, size_t n, size_t *got) {
  *got = 0;
  if (c->ssl == NULL) {
    ssize_t r;
    while ((r = recv(c->fd, p, n, 0)) < 0 && errno == EINTR) {}
    if (r >= 0) {
      *got = (size_t)r;
      return 0;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      c->want = EV_READ;
      return SL_HEALTH_WAIT;
    }
    return errno;
  }
  ERR_clear_error();
  int ok = SSL_read_ex(c->ssl, p, n, got);
  if (ok == 1) return 0;
  return sl_health_tls_error(c, SSL_get_error(c->ssl, ok));   /* 0: the end, *got 0 */
}

/* What a check writes: the PROXY header (send_proxy), then `send`. */
static size_t sl_health_send_len(const sl_health *h) { return h->proxy_len + h->u->health.send_len; }

/* Writes what is left of it (up to `upto` bytes of it). Returns 0 when
 * that is written, SL_HEALTH_WAIT to wait, or a result that fails the
 * check. */
static int sl_health_send(sl_health_check *c, size_t upto) {
  const sl_health *h = c->h;
  const sl_health_cfg *hc = &h->u->health;
  while (c->sent < upto) {
    int clear = c->sent < h->proxy_len;   /* the PROXY header precedes TLS */
    const char *from = clear ? (const char *)h->proxy + c->sent
                             : hc->send + (c->sent - h->proxy_len);
    size_t left = clear ? h->proxy_len - c->sent : hc->send_len - (c->sent - h->proxy_len);
    size_t n = 0;
    int r = sl_health_write(c, from, left, clear, &n);
    if (r != 0) return r;
    c->sent += n;
  }
  return 0;
}

/* Reads the answer. Returns 0 once it contains `expect`, SL_HEALTH_WAIT
 * to wait for more, or a result that fails the check. */
static int sl_health_read(sl_health_check *c) {
  const sl_health_cfg *hc = &c->h->u->health;
  for (;;) {
    if (c->got == sizeof(c->answer)) return SL_HEALTH_BAD_ANSWER;
    size_t n = 0;
    int r = sl_health_recv(c, c->answer + c->got, sizeof(c->answer) - c->got, &n);
    if (r != 0) return r;
    if (n > 0) {
      /* Search from where the expected bytes could start in what is new. */
      size_t from = c->got >= hc->expect_len ? c->got - hc->expect_len + 1 : 0;
      c->got += n;
      if (memmem(c->answer + from, c->got - from, hc->expect, hc->expect_len) != NULL) return 0;
    } else {
      return SL_HEALTH_CLOSED;
    }
  }
}

/* With tls: one handshake step. 0 once done, SL_HEALTH_WAIT, or a result
 * that fails the check. */
static int sl_health_handshake(sl_health_check *c) {
  ERR_clear_error();
  int r = SSL_do_handshake(c->ssl);
  if (r == 1) {
    c->shaken = 1;
    return 0;
  }
  int res = sl_health_tls_error(c, SSL_get_error(c->ssl, r));
  if (res == 0) {
    snprintf(c->tls_why, sizeof(c->tls_why), "tls_error (eof)");
    res = SL_HEALTH_TLS;
  }
  return res;
}

/* Takes the check as far as it can go now. */
static void sl_health_advance(sl_health_check *c) {
  const sl_health_cfg *hc = &c->h->u->health;
  int r = sl_health_send(c, c->h->proxy_len);
  if (r == 0 && c->ssl && !c->shaken) r = sl_health_handshake(c);
  if (r == 0) r = sl_health_send(c, sl_health_send_len(c->h));
  if (r == 0 && hc->expect != NULL) r = sl_health_read(c);
  if (r != SL_HEALTH_WAIT) {
    sl_health_finish(c, r);
    return;
  }
  if (!(c->io.events & c->want) || (c->io.events & ~c->want & (EV_READ | EV_WRITE)))
    sl_health_wait(c, c->want);
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

/* A TLS client for the check of c's server, as its connections have. */
static int sl_health_tls(sl_health *h, sl_health_check *c) {
  char host[256], addr[64];
  const char *sni, *verify;
  sl_upstream_tls_names(h->u, c->index, host, addr, &sni, &verify);
  c->ssl = sl_tls_client_new(h->u->tls, c->fd, sni, verify, NULL);
  return c->ssl ? SL_OK : SL_ERROR;
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
  c->shaken = 0;
  if (h->u->tls != NULL && sl_health_tls(h, c) != SL_OK) err = ENOMEM;
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
