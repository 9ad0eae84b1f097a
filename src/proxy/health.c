#include "proxy/health.h"

#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <regex.h>
#include <stdio.h>
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
#define SL_HEALTH_WHY (-1)          /* a step failed: why says how */
#define SL_HEALTH_TLS (-3)          /* the TLS handshake or a record failed (why: why) */
#define SL_HEALTH_WAIT (-4)         /* (from the steps) wait for c->want */

#define SL_HEALTH_STR_(x) #x
#define SL_HEALTH_STR(x) SL_HEALTH_STR_(x)

/* One server's check. In flight while fd >= 0: io and timeout are started
 * (and unreferenced from the loop); otherwise both are stopped. A check
 * connects, then runs the steps in order (health_check.steps, or the
 * shorthand send/expect), all of it within the timeout: a send step writes
 * its bytes; an expect step reads until the bytes read since the previous
 * expect step's match (the window: answer[seen..got)) contain its bytes or
 * match its regex, and the window then starts after that match. At most
 * SL_HEALTH_READ_MAX bytes are read in one check. For an upstream with
 * tls, the check is a TLS client as its connections are (same context,
 * names and verification): the PROXY header (send_proxy) goes in the
 * clear, then the handshake must succeed, then the steps go through TLS. */
typedef struct sl_health_check {
  ev_io io;                  /* connect completion, then writing, then reading */
  ev_timer timeout;          /* the whole check's timeout */
  sl_health *h;
  size_t index;              /* server index in the upstream */
  int fd;                    /* -1 when no check is in flight */
  int connected;             /* the connect completed */
  size_t proxied;            /* bytes of the PROXY header written */
  size_t step;               /* the step running (nsteps: all passed) */
  size_t sent;               /* bytes of the send step written */
  size_t seen;               /* answer[0..seen) is consumed by earlier expect steps */
  size_t got;                /* bytes of answer read, <= SL_HEALTH_READ_MAX */
  SSL *ssl;                  /* with tls: the session, NULL otherwise */
  int shaken;                /* with tls: the handshake is done */
  int want;                  /* the event a step waits for (EV_READ or EV_WRITE) */
  char why[320];             /* SL_HEALTH_WHY, SL_HEALTH_TLS: what failed */
  int fails, passes;         /* results in a row */
  char *answer;              /* SL_HEALTH_READ_MAX + 1 bytes when a step expects, else NULL */
} sl_health_check;

struct sl_health {
  ev_timer tick;             /* every interval: starts a check per server */
  uint8_t proxy[SL_PROXY_HEADER_MAX]; /* sent first with send_proxy: no address */
  size_t proxy_len;
  struct sl_worker *w;
  const sl_upstream_cfg *u;
  sl_balancer *b;
  sl_health_check checks[]; /* one per server, then their answer buffers */
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

/* What a failed check's result err says, for the log. */
static const char *sl_health_reason(const sl_health_check *c, int err) {
  return err == SL_HEALTH_WHY || err == SL_HEALTH_TLS ? c->why
         : err == ETIMEDOUT                           ? "timed out"
                                                      : strerror(err);
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
  if (p->check_down) return;
  if (c->fails < h->u->health.fails) {
    sl_log(SL_LOG_INFO, "worker %d: upstream %s: health check of %s failed (%d of %d in a row): %s",
           h->w->id, h->u->name, server, c->fails, h->u->health.fails, sl_health_reason(c, err));
    return;
  }
  p->check_down = 1;
  sl_metrics_server_down(p->m, SL_METRICS_DOWN_CHECK);
  sl_log(SL_LOG_WARN,
         "worker %d: upstream %s: server %s is down (health check: %d failed in a row, last: %s)",
         h->w->id, h->u->name, server, c->fails, sl_health_reason(c, err));
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
 * 0 for the end of the stream, or SL_HEALTH_TLS with why (an errno
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
    snprintf(c->why, sizeof(c->why), "tls_error (%s: %s)", t,
             X509_verify_cert_error_string(v));
  else
    snprintf(c->why, sizeof(c->why), "tls_error (%s)", t);
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
    snprintf(c->why, sizeof(c->why), "tls_error (eof)");
    res = SL_HEALTH_TLS;
  }
  return res;
}

/* Writes what is left of the PROXY header, in the clear. 0 once it is
 * written, SL_HEALTH_WAIT, or a result that fails the check. */
static int sl_health_send_proxy(sl_health_check *c) {
  const sl_health *h = c->h;
  while (c->proxied < h->proxy_len) {
    size_t n = 0;
    int r = sl_health_write(c, h->proxy + c->proxied, h->proxy_len - c->proxied, 1, &n);
    if (r != 0) return r;
    c->proxied += n;
  }
  return 0;
}

/* Writes what is left of the send step st. 0 once it is written,
 * SL_HEALTH_WAIT, or a result that fails the check. */
static int sl_health_send(sl_health_check *c, const sl_health_step *st) {
  while (c->sent < st->len) {
    size_t n = 0;
    int r = sl_health_write(c, st->bytes + c->sent, st->len - c->sent, 0, &n);
    if (r != 0) return r;
    c->sent += n;
  }
  return 0;
}

/* 1 when the window answer[seen..got) has what the expect step st wants,
 * the window then starting after the match; 0 otherwise. ended: no more
 * bytes will come (so `$` may match at the window's end). A regex sees
 * the window as text whose `^` matches where a line of the answer
 * starts (and NUL bytes as any other byte, with REG_STARTEND). */
static int sl_health_match(sl_health_check *c, const sl_health_step *st, int ended) {
  const char *w = c->answer + c->seen;
  size_t n = c->got - c->seen;
  if (st->kind == SL_HEALTH_STEP_EXPECT) {
    const char *at = memmem(w, n, st->bytes, st->len);
    if (at == NULL) return 0;
    c->seen = (size_t)(at - c->answer) + st->len;
    return 1;
  }
  int flags = ended ? 0 : REG_NOTEOL;
  if (c->seen > 0 && c->answer[c->seen - 1] != '\n') flags |= REG_NOTBOL;
  regmatch_t m[1];
#ifdef REG_STARTEND
  m[0].rm_so = 0;
  m[0].rm_eo = (regoff_t)n;
  flags |= REG_STARTEND;
#endif
  c->answer[c->got] = '\0';   /* without REG_STARTEND, the window ends at its first NUL */
  if (regexec(st->re, w, 1, m, flags) != 0) return 0;
  c->seen += (size_t)m[0].rm_eo;
  return 1;
}

/* Appends to out (of size len) the step's bytes as a quoted literal or a
 * /regex/, escaped to stay on one line and cut at 64 bytes. */
static void sl_health_show(const sl_health_step *st, char *out, size_t len) {
  int regex = st->kind == SL_HEALTH_STEP_EXPECT_REGEX;
  size_t o = 0, shown = st->len > 64 ? 64 : st->len;
  out[o++] = regex ? '/' : '"';
  for (size_t i = 0; i < shown && o + 8 < len; i++) {
    unsigned char ch = (unsigned char)st->bytes[i];
    const char *esc = ch == '\r' ? "\\r" : ch == '\n' ? "\\n" : ch == '\t' ? "\\t"
                      : ch == '"' && !regex ? "\\\"" : ch == '\\' && !regex ? "\\\\" : NULL;
    if (esc) o += (size_t)snprintf(out + o, len - o, "%s", esc);
    else if (ch < 0x20 || ch >= 0x7f) o += (size_t)snprintf(out + o, len - o, "\\x%02x", ch);
    else out[o++] = (char)ch;
  }
  if (shown < st->len && o + 4 < len) o += (size_t)snprintf(out + o, len - o, "...");
  out[o++] = regex ? '/' : '"';
  out[o] = '\0';
}

/* SL_HEALTH_WHY with why saying that the expect step running did not find
 * what it wanted, and why it stopped looking (how). */
static int sl_health_not_found(sl_health_check *c, const char *how) {
  char shown[160];
  sl_health_show(&c->h->u->health.steps[c->step], shown, sizeof(shown));
  size_t n = c->got - c->seen;
  snprintf(c->why, sizeof(c->why), "step %zu: expected %s not found in %zu byte%s read (%s)",
           c->step + 1, shown, n, n == 1 ? "" : "s", how);
  return SL_HEALTH_WHY;
}

/* Reads until the expect step st finds what it wants. 0 then (the window
 * moved past the match), SL_HEALTH_WAIT to wait for more, or a result
 * that fails the check. */
static int sl_health_expect(sl_health_check *c, const sl_health_step *st) {
  for (;;) {
    if (sl_health_match(c, st, 0)) return 0;
    if (c->got == SL_HEALTH_READ_MAX)
      return sl_health_not_found(c, "the read limit of " SL_HEALTH_STR(SL_HEALTH_READ_MAX)
                                    " bytes per check");
    size_t n = 0;
    int r = sl_health_recv(c, c->answer + c->got, SL_HEALTH_READ_MAX - c->got, &n);
    if (r != 0) return r;
    if (n == 0) return sl_health_match(c, st, 1) ? 0 : sl_health_not_found(c, "the server closed");
    c->got += n;
  }
}

/* A result r of step i that fails the check, with the step named: an
 * errno or a TLS failure during a step says which step it was. */
static int sl_health_step_failed(sl_health_check *c, int r) {
  if (r == SL_HEALTH_WHY || r == SL_HEALTH_WAIT) return r;
  char what[160];
  snprintf(what, sizeof(what), "%s", sl_health_reason(c, r));
  snprintf(c->why, sizeof(c->why), "step %zu: %s", c->step + 1, what);
  return SL_HEALTH_WHY;
}

/* Takes the check as far as it can go now. */
static void sl_health_advance(sl_health_check *c) {
  const sl_health_cfg *hc = &c->h->u->health;
  int r = sl_health_send_proxy(c);
  if (r == 0 && c->ssl && !c->shaken) r = sl_health_handshake(c);
  while (r == 0 && c->step < hc->nsteps) {
    const sl_health_step *st = &hc->steps[c->step];
    r = st->kind == SL_HEALTH_STEP_SEND ? sl_health_send(c, st) : sl_health_expect(c, st);
    if (r == 0) {
      c->step++;
      c->sent = 0;
    } else {
      r = sl_health_step_failed(c, r);
    }
  }
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

/* The timeout: before the steps, "timed out"; during one, it is named
 * (an expect step with what it did not find). */
static void sl_health_on_timeout(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_health_check *c = SL_CONTAINER_OF(t, sl_health_check, timeout);
  const sl_health_cfg *hc = &c->h->u->health;
  int r = ETIMEDOUT;
  if (c->connected && (c->ssl == NULL || c->shaken) && c->proxied == c->h->proxy_len &&
      c->step < hc->nsteps)
    r = hc->steps[c->step].kind == SL_HEALTH_STEP_SEND ? sl_health_step_failed(c, ETIMEDOUT)
                                                       : sl_health_not_found(c, "timed out");
  sl_health_finish(c, r);
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
  c->proxied = 0;
  c->step = 0;
  c->sent = 0;
  c->seen = 0;
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
  size_t answer = u->health.expects ? SL_HEALTH_READ_MAX + 1 : 0;   /* + a NUL */
  sl_health *h = calloc(1, sizeof(*h) + u->nservers * (sizeof(sl_health_check) + answer));
  if (h == NULL) return NULL;
  char *answers = (char *)&h->checks[u->nservers];
  h->w = w;
  h->u = u;
  h->b = b;
  if (u->send_proxy) h->proxy_len = sl_proxy_header(u->send_proxy, NULL, NULL, h->proxy);
  for (size_t i = 0; i < u->nservers; i++) {
    sl_health_check *c = &h->checks[i];
    c->h = h;
    c->index = i;
    c->fd = -1;
    c->answer = answer ? answers + i * answer : NULL;
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
