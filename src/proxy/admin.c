#include "proxy/admin.h"

#include <errno.h>
#include <ev.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc/arena.h"
#include "io/listener.h"
#include "io/worker.h"
#include "proxy/admin_format.h"
#include "proxy/metrics.h"
#include "proxy/upgrade.h"
#include "util/common.h"
#include "util/log.h"

#define SL_ADMIN_MAX_REQUEST 8192     /* bytes a request may take, its blank line included */
#define SL_ADMIN_MAX_CONNS 32
#define SL_ADMIN_TIMEOUT 10.0          /* seconds an admin connection may take */
#define SL_ADMIN_WORKER_TIMEOUT 2.0    /* seconds a worker may take to answer */
#define SL_ADMIN_ACCEPT_PAUSE 0.1      /* seconds accepting stops when out of descriptors */

typedef struct sl_admin_conn sl_admin_conn;

/* One admin connection: reading its request, then writing the answer. */
struct sl_admin_conn {
  ev_io io;
  ev_timer timer;
  sl_admin *a;
  int fd;
  size_t n;                         /* request bytes read */
  char req[SL_ADMIN_MAX_REQUEST + 1]; /* + a NUL after the request line */
  sl_text out;                      /* the response, once known */
  size_t sent;
  sl_admin_conn *prev, *next;
};

struct sl_admin {
  struct ev_loop *loop;
  ev_io accept_io;
  ev_timer accept_retry;            /* restarts accept_io after a pause (out of descriptors) */
  ev_async stop_watcher;
  ev_async handover_watcher;        /* a new sluice answers from now on (proxy/upgrade.h) */
  int fd;
  int shared;                       /* 1: fd is a socket systemd passed (proxy/upgrade.h) */
  pthread_t thread;
  int started;
  _Atomic int draining;
  pthread_mutex_t stuck_lock;
  int stuck;                        /* workers stuck in Lua (stuck_lock) */
  char stuck_why[256];              /* the report /health shows (stuck_lock) */
  _Atomic uint64_t reloads_applied, reloads_refused;
  _Atomic uint64_t dns_changes;     /* host names resolved again to other servers */
  _Atomic int last_reload_ok;       /* 1 at start */
  _Atomic int64_t last_applied_ms;  /* Unix time of the start or the last applied reload */
  struct sl_worker **workers;       /* borrowed */
  int nworkers;
  struct sl_alloc *alloc;           /* borrowed */
  sl_admin_conn *conns;
  int nconns;
  char text[64];
};

/* ---- answers ---- */

static void sl_admin_answer(sl_admin_conn *c, int status, const char *reason, const char *ctype,
                            const char *extra, const char *body, size_t len) {
  sl_text_reset(&c->out);
  sl_text_printf(&c->out,
                 "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s"
                 "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
                 status, reason, ctype, len, extra ? extra : "");
  sl_text_append(&c->out, body, len);
}

static void sl_admin_plain(sl_admin_conn *c, int status, const char *reason, const char *extra,
                           const char *body) {
  sl_admin_answer(c, status, reason, "text/plain; charset=utf-8", extra, body, strlen(body));
}

/* Snapshots of every worker (NULL where a worker did not answer). */
static sl_metrics_snap **sl_admin_collect(sl_admin *a, int memory) {
  sl_metrics_snap **s = calloc((size_t)a->nworkers + 1, sizeof(*s));
  if (s == NULL) return NULL;
  uint64_t *tickets = calloc((size_t)a->nworkers + 1, sizeof(*tickets));
  if (tickets == NULL) {
    free(s);
    return NULL;
  }
  for (int i = 0; i < a->nworkers; i++) tickets[i] = sl_metrics_ask(a->workers[i], memory);
  struct timespec until;
  sl_metrics_deadline(SL_ADMIN_WORKER_TIMEOUT, &until);
  for (int i = 0; i < a->nworkers; i++) {
    s[i] = sl_metrics_wait(a->workers[i], tickets[i], &until);
    /* While running, a worker that does not answer is not returning to its
     * event loop: it serves none of its connections either. (Said once: it
     * is not asked again until it has answered.) */
    if (s[i] == NULL && tickets[i] != 0 && !atomic_load(&a->draining))
      sl_log(SL_LOG_WARN, "admin: worker %d did not answer within %.0f s: it is not returning to "
             "its event loop (a Lua stage that never returns?); not waited for again until it "
             "answers", i, SL_ADMIN_WORKER_TIMEOUT);
  }
  free(tickets);
  return s;
}

static void sl_admin_free_snaps(sl_admin *a, sl_metrics_snap **s) {
  if (s == NULL) return;
  for (int i = 0; i < a->nworkers; i++) sl_metrics_snap_free(s[i]);
  free(s);
}

static void sl_admin_respond(sl_admin_conn *c, const char *path) {
  sl_admin *a = c->a;
  if (strcmp(path, "/health") == 0) {
    char why[300];
    pthread_mutex_lock(&a->stuck_lock);
    snprintf(why, sizeof(why), "stuck: %s\n", a->stuck_why);
    int stuck = a->stuck;
    pthread_mutex_unlock(&a->stuck_lock);
    if (atomic_load(&a->draining)) sl_admin_plain(c, 503, "Service Unavailable", NULL, "draining\n");
    else if (stuck) sl_admin_plain(c, 503, "Service Unavailable", NULL, why);
    else sl_admin_plain(c, 200, "OK", NULL, "ok\n");
    return;
  }
  static const struct {
    const char *path, *ctype;
    void (*format)(sl_text *out, const sl_admin_report *r);
  } pages[] = {
      {"/metrics", "text/plain; version=0.0.4; charset=utf-8", sl_admin_format_metrics},
      {"/memory", "text/plain; charset=utf-8", sl_admin_format_memory},
      {"/upstreams", "application/json", sl_admin_format_upstreams},
  };
  size_t page = 0;
  while (page < sizeof(pages) / sizeof(pages[0]) && strcmp(path, pages[page].path) != 0) page++;
  if (page == sizeof(pages) / sizeof(pages[0])) {
    sl_admin_plain(c, 404, "Not Found", NULL,
                   "not found: try /metrics, /memory, /upstreams or /health\n");
    return;
  }
  int memory = pages[page].format == sl_admin_format_memory;
  sl_metrics_snap **snaps = sl_admin_collect(a, memory);
  sl_text body = {0};
  pthread_mutex_lock(&a->stuck_lock);
  int stuck = a->stuck;
  pthread_mutex_unlock(&a->stuck_lock);
  sl_admin_report r = {snaps, a->nworkers, a->alloc, atomic_load(&a->draining), stuck,
                       atomic_load(&a->reloads_applied), atomic_load(&a->reloads_refused),
                       atomic_load(&a->last_reload_ok),
                       (double)atomic_load(&a->last_applied_ms) / 1000.0,
                       atomic_load(&a->dns_changes), {{0}, 0}};
  sl_dns_stats_get(&r.dns);
  if (snaps != NULL) pages[page].format(&body, &r);
  if (snaps == NULL || body.failed) {
    sl_admin_plain(c, 500, "Internal Server Error", NULL, "out of memory\n");
  } else {
    sl_admin_answer(c, 200, "OK", pages[page].ctype, NULL, body.p, body.len);
  }
  sl_text_reset(&body);
  sl_admin_free_snaps(a, snaps);
}

/* Is s[0..n) an HTTP token (a method): 1 to 15 visible characters? */
static int sl_admin_is_token(const char *s, size_t n) {
  if (n == 0 || n > 15) return 0;
  for (size_t i = 0; i < n; i++)
    if (s[i] <= ' ' || s[i] >= 0x7f) return 0;
  return 1;
}

/* Parses the request in c->req (complete up to its blank line, no NUL in
 * it) and fills c->out with the answer. The request line must be exactly
 * `METHOD SP /target SP HTTP/1.x` (1.0 or 1.1), ended by CRLF or LF. */
static void sl_admin_handle(sl_admin_conn *c) {
  char *line_end = memchr(c->req, '\n', c->n);
  if (line_end == NULL) {
    sl_admin_plain(c, 400, "Bad Request", NULL, "bad request\n");
    return;
  }
  size_t len = (size_t)(line_end - c->req);
  if (len > 0 && c->req[len - 1] == '\r') len--;
  c->req[len] = '\0';
  char *method = c->req;
  char *sp1 = memchr(method, ' ', len);
  char *target = sp1 ? sp1 + 1 : NULL;
  char *sp2 = target ? memchr(target, ' ', len - (size_t)(target - c->req)) : NULL;
  char *version = sp2 ? sp2 + 1 : NULL;
  if (version == NULL || !sl_admin_is_token(method, (size_t)(sp1 - method)) ||
      target[0] != '/' || (size_t)(sp2 - target) >= 1024 ||
      (strcmp(version, "HTTP/1.1") != 0 && strcmp(version, "HTTP/1.0") != 0)) {
    sl_admin_plain(c, 400, "Bad Request", NULL, "bad request\n");
    return;
  }
  *sp1 = *sp2 = '\0';
  if (strcmp(method, "GET") != 0) {
    sl_admin_plain(c, 405, "Method Not Allowed", "Allow: GET\r\n", "method not allowed: GET only\n");
    return;
  }
  char *q = strchr(target, '?');
  if (q) *q = '\0';
  sl_admin_respond(c, target);
}

/* ---- connections ---- */

static void sl_admin_conn_close(sl_admin_conn *c) {
  sl_admin *a = c->a;
  ev_io_stop(a->loop, &c->io);
  ev_timer_stop(a->loop, &c->timer);
  close(c->fd);
  if (c->prev) c->prev->next = c->next;
  else a->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  a->nconns--;
  sl_text_reset(&c->out);
  free(c);
}

/* After the answer: reads and drops whatever the client still sends until
 * it closes (or the connection's timeout), so that closing with unread
 * bytes does not reset the connection before the answer is read. */
static void sl_admin_on_linger(struct ev_loop *loop, ev_io *io, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_admin_conn *c = SL_CONTAINER_OF(io, sl_admin_conn, io);
  for (;;) {
    ssize_t n = recv(c->fd, c->req, sizeof(c->req), 0);
    if (n > 0) continue;
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    break;
  }
  sl_admin_conn_close(c);
}

static void sl_admin_on_write(struct ev_loop *loop, ev_io *io, int revents) {
  SL_UNUSED(revents);
  sl_admin_conn *c = SL_CONTAINER_OF(io, sl_admin_conn, io);
  while (c->sent < c->out.len) {
    ssize_t n = send(c->fd, c->out.p + c->sent, c->out.len - c->sent, MSG_NOSIGNAL);
    if (n > 0) {
      c->sent += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    sl_admin_conn_close(c);
    return;
  }
  shutdown(c->fd, SHUT_WR);
  ev_io_stop(loop, &c->io);
  ev_io_set(&c->io, c->fd, EV_READ);
  ev_set_cb(&c->io, sl_admin_on_linger);
  ev_io_start(loop, &c->io);
}

static void sl_admin_on_read(struct ev_loop *loop, ev_io *io, int revents) {
  SL_UNUSED(revents);
  sl_admin_conn *c = SL_CONTAINER_OF(io, sl_admin_conn, io);
  ssize_t n = recv(c->fd, c->req + c->n, SL_ADMIN_MAX_REQUEST - c->n, 0);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
  if (n <= 0) {
    sl_admin_conn_close(c);
    return;
  }
  size_t before = c->n;
  c->n += (size_t)n;
  /* The blank line may straddle two reads: look from 3 bytes back. */
  size_t from = before > 3 ? before - 3 : 0;
  if (memchr(c->req + before, '\0', (size_t)n) != NULL) {
    sl_admin_plain(c, 400, "Bad Request", NULL, "bad request: a NUL byte\n");
  } else if (memmem(c->req + from, c->n - from, "\r\n\r\n", 4) != NULL ||
             memmem(c->req + from, c->n - from, "\n\n", 2) != NULL) {
    sl_admin_handle(c);
  } else if (c->n >= SL_ADMIN_MAX_REQUEST) {
    sl_admin_plain(c, 400, "Bad Request", NULL, "bad request: larger than 8 KiB\n");
  } else {
    return;
  }
  if (c->out.failed) {
    sl_admin_conn_close(c);
    return;
  }
  ev_io_stop(loop, &c->io);
  ev_io_set(&c->io, c->fd, EV_WRITE);
  ev_set_cb(&c->io, sl_admin_on_write);
  ev_io_start(loop, &c->io);
  sl_admin_on_write(loop, &c->io, EV_WRITE);
}

static void sl_admin_on_timeout(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_admin_conn_close(SL_CONTAINER_OF(t, sl_admin_conn, timer));
}

static void sl_admin_on_accept(struct ev_loop *loop, ev_io *io, int revents) {
  SL_UNUSED(revents);
  sl_admin *a = SL_CONTAINER_OF(io, sl_admin, accept_io);
  for (;;) {
    int fd = accept4(a->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      int e = errno;
      if (e == EINTR || e == ECONNABORTED) continue;
      if (e == EAGAIN || e == EWOULDBLOCK) return;
      if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) {
        /* The connection stays queued and the watcher (level-triggered)
         * would fire again at once: pause, as the workers' listeners do. */
        sl_log(SL_LOG_ERROR, "admin %s: accept: %s; pausing accepts for 100 ms", a->text,
               strerror(e));
        ev_io_stop(loop, &a->accept_io);
        ev_timer_set(&a->accept_retry, SL_ADMIN_ACCEPT_PAUSE, 0.);
        ev_timer_start(loop, &a->accept_retry);
        return;
      }
      sl_log(SL_LOG_WARN, "admin %s: accept: %s", a->text, strerror(e));
      return;
    }
    sl_admin_conn *c = a->nconns < SL_ADMIN_MAX_CONNS ? calloc(1, sizeof(*c)) : NULL;
    if (c == NULL) {
      close(fd); /* at the limit: the client retries */
      continue;
    }
    c->a = a;
    c->fd = fd;
    c->next = a->conns;
    if (a->conns) a->conns->prev = c;
    a->conns = c;
    a->nconns++;
    ev_io_init(&c->io, sl_admin_on_read, fd, EV_READ);
    ev_io_start(loop, &c->io);
    ev_timer_init(&c->timer, sl_admin_on_timeout, SL_ADMIN_TIMEOUT, 0.);
    ev_timer_start(loop, &c->timer);
  }
}

static void sl_admin_on_accept_retry(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(revents);
  sl_admin *a = SL_CONTAINER_OF(t, sl_admin, accept_retry);
  ev_io_start(loop, &a->accept_io);
}

/* ---- life cycle ---- */

static void sl_admin_on_stop(struct ev_loop *loop, ev_async *w, int revents) {
  SL_UNUSED(revents);
  sl_admin *a = SL_CONTAINER_OF(w, sl_admin, stop_watcher);
  ev_io_stop(loop, &a->accept_io);
  ev_timer_stop(loop, &a->accept_retry);
  ev_async_stop(loop, &a->stop_watcher);
  ev_async_stop(loop, &a->handover_watcher);
  while (a->conns) sl_admin_conn_close(a->conns);
}

static void sl_admin_on_handover(struct ev_loop *loop, ev_async *w, int revents) {
  SL_UNUSED(revents);
  sl_admin *a = SL_CONTAINER_OF(w, sl_admin, handover_watcher);
  /* This copy of the socket closes: when the new sluice took it, the
   * socket and what is queued in it stay, the new one's to accept; when
   * its configuration has no admin there, the socket closes with it and
   * clients are refused instead of waiting in a queue nobody reads. */
  ev_io_stop(loop, &a->accept_io);
  ev_timer_stop(loop, &a->accept_retry);
  ev_async_stop(loop, &a->handover_watcher);
  close(a->fd);
  a->fd = -1;
}

static void *sl_admin_thread(void *arg) {
  sl_admin *a = arg;
  ev_run(a->loop, 0);
  return NULL;
}

static int64_t sl_admin_unix_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

sl_admin *sl_admin_create(const sl_addr *addr, const char *text, struct sl_worker **workers,
                          int n, struct sl_alloc *alloc, char *err, size_t errlen) {
  sl_admin *a = calloc(1, sizeof(*a));
  if (a == NULL) {
    snprintf(err, errlen, "admin: out of memory");
    return NULL;
  }
  snprintf(a->text, sizeof(a->text), "%s", text);
  char why[256];
  int inherited = sl_upgrade_take(addr, &a->fd, 1, 511, &a->shared, why, sizeof(why));
  if (inherited < 0) {
    snprintf(err, errlen, "admin.listen: %s: %s", text, why);
    free(a);
    return NULL;
  }
  if (inherited == 0) a->fd = sl_listener_bind(addr, 0, 511);
  if (a->fd < 0) {
    int e = errno;
    char note[256] = "";
    if (e == EADDRINUSE) sl_upgrade_explain_in_use(addr, note, sizeof(note));
    snprintf(err, errlen, "admin.listen: cannot listen on %s: %s%s", text, strerror(e), note);
    free(a);
    return NULL;
  }
  a->loop = ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
  if (a->loop == NULL) {
    snprintf(err, errlen, "admin: cannot create its event loop");
    close(a->fd);
    free(a);
    return NULL;
  }
  a->workers = workers;
  a->nworkers = n;
  a->alloc = alloc;
  pthread_mutex_init(&a->stuck_lock, NULL);
  atomic_store(&a->last_reload_ok, 1);
  atomic_store(&a->last_applied_ms, sl_admin_unix_ms());
  ev_io_init(&a->accept_io, sl_admin_on_accept, a->fd, EV_READ);
  ev_io_start(a->loop, &a->accept_io);
  ev_timer_init(&a->accept_retry, sl_admin_on_accept_retry, 0., 0.);
  ev_async_init(&a->stop_watcher, sl_admin_on_stop);
  ev_async_start(a->loop, &a->stop_watcher);
  ev_async_init(&a->handover_watcher, sl_admin_on_handover);
  ev_async_start(a->loop, &a->handover_watcher);
  return a;
}

int sl_admin_start(sl_admin *a) {
  int rc = pthread_create(&a->thread, NULL, sl_admin_thread, a);
  if (rc != 0) {
    errno = rc;
    return SL_ERROR;
  }
  a->started = 1;
  sl_log(SL_LOG_INFO, "admin endpoint on %s (/metrics, /memory, /upstreams, /health)", a->text);
  return SL_OK;
}

void sl_admin_set_draining(sl_admin *a) {
  if (a) atomic_store(&a->draining, 1);
}

int sl_admin_fd(const sl_admin *a) { return a->fd; }

int sl_admin_shared(const sl_admin *a) { return a->shared; }

void sl_admin_hand_over(sl_admin *a) {
  if (a == NULL) return;
  if (a->started) ev_async_send(a->loop, &a->handover_watcher);
}

void sl_admin_note_reload(sl_admin *a, int applied) {
  if (a == NULL) return;
  atomic_fetch_add(applied ? &a->reloads_applied : &a->reloads_refused, 1);
  atomic_store(&a->last_reload_ok, applied ? 1 : 0);
  if (applied) atomic_store(&a->last_applied_ms, sl_admin_unix_ms());
}

void sl_admin_note_dns_change(sl_admin *a) {
  if (a) atomic_fetch_add(&a->dns_changes, 1);
}

void sl_admin_set_stuck(sl_admin *a, int n, const char *why) {
  if (a == NULL) return;
  pthread_mutex_lock(&a->stuck_lock);
  if (why == NULL) why = "";
  snprintf(a->stuck_why, sizeof(a->stuck_why), "%.*s", (int)strcspn(why, "\n"), why);
  a->stuck = n;
  pthread_mutex_unlock(&a->stuck_lock);
}

void sl_admin_stop(sl_admin *a) {
  if (a == NULL) return;
  if (a->started) {
    ev_async_send(a->loop, &a->stop_watcher);
    pthread_join(a->thread, NULL);
  } else {
    sl_admin_on_stop(a->loop, &a->stop_watcher, 0);
  }
  ev_loop_destroy(a->loop);
  if (a->fd >= 0) close(a->fd);
  pthread_mutex_destroy(&a->stuck_lock);
  free(a);
}
