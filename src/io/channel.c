#include "io/channel.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "alloc/poison.h"
#include "alloc/pool.h"
#include "buf/buf.h"
#include "buf/leak.h"
#include "io/channel_internal.h"
#include "io/worker.h"
#include "util/common.h"
#include "util/log.h"

/* ---- adaptive receive sizes ---- */

/* 16..496 in steps of 16, then powers of two up to SL_RECV_MAX (Netty's table). */
static const uint32_t sl_recv_table[] = {
    16,   32,   48,   64,   80,   96,   112,  128,  144,   160,   176,   192,  208,
    224,  240,  256,  272,  288,  304,  320,  336,  352,  368,   384,   400,  416,
    432,  448,  464,  480,  496,  512,  1024, 2048, 4096, 8192, 16384, 32768, 65536};
enum { SL_RECV_MIN_INDEX = 3, SL_RECV_INITIAL_INDEX = 33, SL_RECV_MAX_INDEX = 38,
       SL_RECV_GROW = 4, SL_RECV_SHRINK = 1 };

size_t sl_channel_recv_size(const sl_channel *ch) { return sl_recv_table[ch->recv_index]; }

void sl_channel_recv_reset(sl_channel *ch) {
  ch->recv_index = SL_RECV_INITIAL_INDEX;
  ch->recv_shrink_armed = 0;
}

void sl_channel_recv_record(sl_channel *ch, size_t n) {
  int i = ch->recv_index;
  int lower = i - SL_RECV_SHRINK < 0 ? 0 : i - SL_RECV_SHRINK;
  if (n <= sl_recv_table[lower]) {
    if (ch->recv_shrink_armed) {
      ch->recv_index = (uint8_t)SL_MAX(lower, SL_RECV_MIN_INDEX);
      ch->recv_shrink_armed = 0;
    } else {
      ch->recv_shrink_armed = 1;
    }
  } else if (n >= sl_recv_table[i]) {
    ch->recv_index = (uint8_t)SL_MIN(i + SL_RECV_GROW, SL_RECV_MAX_INDEX);
    ch->recv_shrink_armed = 0;
  }
}

/* ---- lifetime ---- */

static void sl_channel_on_readable(struct ev_loop *loop, ev_io *io, int revents);
static void sl_channel_on_writable(struct ev_loop *loop, ev_io *io, int revents);
static void sl_channel_on_timer(struct ev_loop *loop, ev_timer *t, int revents);
static void sl_channel_on_idle(struct ev_loop *loop, ev_timer *t, int revents);
static void sl_channel_on_write_timeout(struct ev_loop *loop, ev_timer *t, int revents);
static void sl_channel_write_waiting(sl_channel *ch);
static int sl_channel_do_write(sl_channel *ch);
static void sl_channel_write_held(sl_channel *ch);

static void sl_channel_writability(void *ud, int writable) {
  sl_channel *ch = ud;
  if (ch->flags & SL_CH_CLOSED) return;
  ch->w->stats.writability_changes++;
  sl_pipeline_fire_writability(&ch->pipe, writable);
}

static void sl_channel_promise_done(void *ud, uint32_t pid, const char *err) {
  sl_channel *ch = ud;
  if (ch->w->promise_done) ch->w->promise_done(ch, pid, err);
}

/* The queue's limits from cfg; the adaptive gather starts, as Netty's, at
 * twice the socket's send buffer: the first socket of its kind (accepted
 * or connected, kind 0 or 1; -1: no socket) on this worker is asked, the
 * others take its answer. */
static void sl_channel_outq_limits(sl_channel *ch, const sl_channel_config *cfg, int kind) {
  size_t start = SL_OUTQ_GATHER_INITIAL;
  if (kind >= 0) {
    int *sndbuf = &ch->w->sndbuf[kind];
    socklen_t len = sizeof(*sndbuf);
    if (*sndbuf <= 0 && (getsockopt(ch->fd, SOL_SOCKET, SO_SNDBUF, sndbuf, &len) != 0 || *sndbuf < 0))
      *sndbuf = 0;
    if (*sndbuf > 0) start = (size_t)*sndbuf * 2;
  }
  sl_outq_set_write_limits(&ch->outq, cfg->write_spin_count, cfg->max_bytes_per_gathering_write,
                           start);
  ch->outq.limit = cfg->outbound_limit ? cfg->outbound_limit : SL_OUTQ_DEFAULT_LIMIT;
  ch->outq.on_done = sl_channel_promise_done;
}

/* ---- spare channels ----
 *
 * A channel is about 1.2 KiB, above glibc's per-thread cache, so each
 * calloc and free of one took malloc's general path: about a sixth of the
 * user-space instructions of a proxied connection. A worker keeps up to
 * SL_CHANNEL_SPARES freed channels for its next connections (poisoned in
 * ASan builds while spare) and frees them when its pool goes idle. */

static sl_channel *sl_channel_take(sl_worker *w) {
  sl_channel *ch = w->spare_channels;
  if (ch == NULL) return calloc(1, sizeof(*ch));
  SL_UNPOISON(ch, sizeof(*ch));
  w->spare_channels = ch->next;
  w->nspare_channels--;
  memset(ch, 0, sizeof(*ch));
  return ch;
}

static void sl_channel_give(sl_worker *w, sl_channel *ch) {
  if (w->nspare_channels >= SL_CHANNEL_SPARES) {
    free(ch);
    return;
  }
  /* The link is written after the poison (a 0xde fill with SLUICE_POOL_DEBUG). */
  SL_POISON(ch, sizeof(*ch));
  SL_UNPOISON(&ch->next, sizeof(ch->next));
  ch->next = w->spare_channels;
  w->spare_channels = ch;
  w->nspare_channels++;
}

void sl_channel_spares_free(sl_worker *w) {
  while (w->spare_channels != NULL) {
    sl_channel *ch = w->spare_channels;
    w->spare_channels = ch->next;
    SL_UNPOISON(ch, sizeof(*ch));
    free(ch);
  }
  w->nspare_channels = 0;
}

static sl_channel *sl_channel_new(struct sl_worker *w, int fd, const sl_channel_config *cfg,
                                  int kind) {
  sl_channel *ch = sl_channel_take(w);
  if (ch == NULL) return NULL;
  ch->w = w;
  ch->fd = fd;
  ch->refs = 1;
  ch->flags = SL_CH_AUTOREAD | (cfg->no_half_close ? SL_CH_NO_HALF_CLOSE : 0);
  ch->started = ev_now(w->loop);
  ch->last_active = ch->started;
  ch->gen = w->gen;
  if (ch->gen) ch->gen->channels++;
  sl_channel_recv_reset(ch);
  sl_pipeline_init(&ch->pipe, ch);
  sl_outq_init(&ch->outq, cfg->low_water_mark, cfg->high_water_mark,
               sl_channel_writability, ch);
  sl_channel_outq_limits(ch, cfg, kind);
  ev_io_init(&ch->rio, sl_channel_on_readable, fd, EV_READ);
  ev_io_init(&ch->wio, sl_channel_on_writable, fd, EV_WRITE);
  ev_init(&ch->timer, sl_channel_on_timer);
  ev_init(&ch->idle, sl_channel_on_idle);
  ev_init(&ch->wtimer, sl_channel_on_write_timeout);
  ch->write_timeout = cfg->write_timeout;
  ch->next = w->channels;
  if (w->channels) w->channels->prev = ch;
  w->channels = ch;
  w->nchannels++;
  w->stats.channels_opened++;
  return ch;
}

static void sl_channel_free(sl_channel *ch) {
  sl_worker *w = ch->w;
  sl_pipeline_destroy(&ch->pipe);
  sl_outq_destroy(&ch->outq);
  /* Everything is closed, every stage is gone: what the channel still owns
   * was leaked (held by a script or a stage). Report it and take it back. */
  if (ch->owned.count > 0) {
    char why[200];
    snprintf(why, sizeof(why), "its connection was closed (%s)", sl_channel_describe(ch));
    sl_leak_reclaim_owner(w->pool, &ch->owned, why);
  }
  if (ch->prev) ch->prev->next = ch->next;
  else w->channels = ch->next;
  if (ch->next) ch->next->prev = ch->prev;
  w->nchannels--;
  sl_worker_gen *gen = ch->gen;
  sl_channel_give(w, ch);
  sl_worker_channel_freed(w, gen);
}

void sl_channel_ref(sl_channel *ch) { ch->refs++; }

void sl_channel_unref(sl_channel *ch) {
  SL_ASSERT(ch->refs > 0, "channel reference count underflow");
  if (--ch->refs == 0) sl_channel_free(ch);
}

/* desc_pending: what desc holds is the name after "on" or "for". */
enum { SL_DESC_READY = 0, SL_DESC_CLIENT = 1, SL_DESC_UPSTREAM = 2 };

const char *sl_channel_describe(const sl_channel *cch) {
  sl_channel *ch = (sl_channel *)cch;   /* the text is made on first use */
  if (ch->desc_pending != SL_DESC_READY) {
    int client = ch->desc_pending == SL_DESC_CLIENT;
    char name[sizeof(ch->desc)], a[64];
    memcpy(name, ch->desc, sizeof(name));
    size_t n = sl_str_append(ch->desc, sizeof(ch->desc), 0, client ? "client " : "upstream ");
    n = sl_str_append(ch->desc, sizeof(ch->desc), n,
                      sl_addr_format((const struct sockaddr *)&ch->remote.ss, a, sizeof(a)));
    n = sl_str_append(ch->desc, sizeof(ch->desc), n, client ? " on " : " for ");
    sl_str_append(ch->desc, sizeof(ch->desc), n, name);
    ch->desc_pending = SL_DESC_READY;
  }
  return ch->desc;
}

void sl_channel_note_site(sl_channel *ch, sl_buf *b) {
  char site[160];
  snprintf(site, sizeof(site), "read from %s (src/io/channel.c)", sl_channel_describe(ch));
  sl_leak_set_site(b, site);
}

void sl_channel_note_unhandled(sl_channel *ch) { ch->w->stats.unhandled_inbound++; }

/* An upstream socket: TCP_NODELAY, and the handshake's last ACK held for
 * the first bytes sluice sends (the client's, usually there by then): one
 * packet fewer per connection. TCP_DEFER_ACCEPT on a connecting socket
 * does only that (the kernel checks it when the SYN-ACK arrives); later
 * ACKs keep the kernel's quick start, so a server that writes an answer in
 * small pieces without TCP_NODELAY is not slowed by delayed ACKs, as it
 * would be with TCP_QUICKACK 0. A connect that completes with nothing to
 * send lets the ACK go at once (sl_channel_connected), so a server that
 * speaks first is not kept waiting for it. */
static void sl_socket_tune(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &one, sizeof(one));
}

sl_channel *sl_channel_embedded(struct sl_worker *w, const sl_channel_config *cfg,
                                const char *name) {
  sl_channel *ch = sl_channel_new(w, -1, cfg, -1);
  if (ch == NULL) return NULL;
  ch->flags |= SL_CH_EMBEDDED;
  snprintf(ch->desc, sizeof(ch->desc), "embedded channel %s", name);
  return ch;
}

void sl_channel_set_writable(sl_channel *ch, int on) {
  on = on ? 1 : 0;
  if (ch->outq.writable == on || (ch->flags & SL_CH_CLOSED)) return;
  ch->outq.writable = on;
  sl_pipeline_fire_writability(&ch->pipe, on);
}

sl_channel *sl_channel_accepted(struct sl_worker *w, int fd, const sl_addr *remote,
                                const sl_channel_config *cfg, const char *listener) {
  sl_channel *ch = sl_channel_new(w, fd, cfg, 0);
  if (ch == NULL) {
    close(fd);
    return NULL;
  }
  /* (TCP_NODELAY comes from the listening socket: sl_listener_bind.)
   * No read after its first short one (see sl_channel_read): a client
   * seldom sends its FIN with its request, and the read would cost a
   * syscall per connection for nothing. */
  ch->flags |= SL_CH_PROBED;
  ch->remote = *remote;
  sl_str_append(ch->desc, sizeof(ch->desc), 0, listener);
  ch->desc_pending = SL_DESC_CLIENT;
  return ch;
}

void sl_channel_set_remote(sl_channel *ch, const sl_addr *a) {
  ch->remote = *a;
  ch->flags |= SL_CH_REMOTE_SET;
  if (ch->desc_pending != SL_DESC_READY) return;   /* described from remote when asked */
  /* "client ADDRESS on LISTENER": the listener part stays (cut short if
   * the new address is longer and the name long). */
  const char *on = strstr(ch->desc, " on ");
  char rest[sizeof(ch->desc)];
  snprintf(rest, sizeof(rest), "%s", on ? on : "");
  char text[64];
  sl_addr_format((const struct sockaddr *)&a->ss, text, sizeof(text));
  size_t len = (size_t)snprintf(ch->desc, sizeof(ch->desc), "client %s", text);
  if (len < sizeof(ch->desc)) {
    size_t room = sizeof(ch->desc) - 1 - len;
    size_t take = strlen(rest) < room ? strlen(rest) : room;
    memcpy(ch->desc + len, rest, take);
    ch->desc[len + take] = '\0';
  }
}

sl_channel *sl_channel_connect(struct sl_worker *w, const sl_addr *addr, double timeout,
                               const sl_channel_config *cfg, sl_channel_connect_fn on_connect,
                               void *ud, const char *for_name) {
  int fd = socket(addr->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return NULL;
  sl_socket_tune(fd);
  if (connect(fd, (const struct sockaddr *)&addr->ss, addr->len) < 0 && errno != EINPROGRESS) {
    int e = errno;
    close(fd);
    errno = e;
    return NULL;
  }
  sl_channel *ch = sl_channel_new(w, fd, cfg, 1);
  if (ch == NULL) {
    close(fd);
    errno = ENOMEM;
    return NULL;
  }
  ch->remote = *addr;
  ch->on_connect = on_connect;
  ch->ud = ud;
  ch->flags |= SL_CH_CONNECTING;
  sl_str_append(ch->desc, sizeof(ch->desc), 0, for_name);
  ch->desc_pending = SL_DESC_UPSTREAM;
  ev_io_start(w->loop, &ch->wio);
  ev_timer_set(&ch->timer, timeout, 0.);
  ev_timer_start(w->loop, &ch->timer);
  return ch;
}

void sl_channel_update_reading(sl_channel *ch) {
  if (ch->flags & SL_CH_EMBEDDED) return;
  int want = (ch->flags & SL_CH_ACTIVE) && (ch->flags & (SL_CH_AUTOREAD | SL_CH_READ_ONCE)) &&
             !(ch->flags & (SL_CH_INPUT_CLOSED | SL_CH_CLOSED | SL_CH_CLOSE_PENDING |
                            SL_CH_READ_PAUSED | SL_CH_SPLICE_FULL));
  /* A lingering channel reads (and drops) until its peer's FIN. */
  if (ch->flags & SL_CH_LINGERING) want = !(ch->flags & (SL_CH_INPUT_CLOSED | SL_CH_CLOSED));
  if (__builtin_expect(ch->tls_state != 0, 0)) {
    if (ch->tls_state & SL_TLS_HANDSHAKE) return;   /* the handshake drives the watchers */
    if (ch->tls_state & SL_TLS_READ_WANTS_WRITE) want = 0;
    if ((ch->tls_state & SL_TLS_WRITE_WANTS_READ) && !(ch->flags & SL_CH_CLOSED)) want = 1;
  }
  if (want && !ev_is_active(&ch->rio)) {
    ev_io_start(ch->w->loop, &ch->rio);
    /* Bytes OpenSSL holds already: no socket event would announce them. */
    if (ch->ssl != NULL && sl_channel_tls_pending(ch))
      ev_feed_event(ch->w->loop, &ch->rio, EV_READ);
  } else if (!want && ev_is_active(&ch->rio)) {
    ev_io_stop(ch->w->loop, &ch->rio);
  }
}

void sl_channel_activate(sl_channel *ch) {
  ch->flags |= SL_CH_ACTIVE | SL_CH_ACTIVATING;
  sl_channel_ref(ch);
  sl_pipeline_fire_active(&ch->pipe);
  ch->flags &= ~(uint32_t)SL_CH_ACTIVATING;
  if (ch->flags & SL_CH_READ_NOW) {
    ch->flags &= ~(uint32_t)SL_CH_READ_NOW;
    sl_channel_read_now(ch);
  }
  sl_channel_update_reading(ch);
  sl_channel_unref(ch);
}

void sl_channel_set_autoread(sl_channel *ch, int on) {
  if (on) ch->flags |= SL_CH_AUTOREAD;
  else ch->flags &= ~(uint32_t)SL_CH_AUTOREAD;
  sl_channel_update_reading(ch);
}

void sl_channel_read_request(sl_channel *ch) {
  if (ch->flags & SL_CH_AUTOREAD) return;
  ch->flags |= SL_CH_READ_ONCE;
  sl_channel_update_reading(ch);
}

void sl_channel_join(sl_channel *a, sl_channel *b) {
  a->peer = b;
  b->peer = a;
  memcpy(&a->peer_addr, &b->remote.ss, SL_MIN(sizeof(a->peer_addr), (size_t)b->remote.len));
  memcpy(&b->peer_addr, &a->remote.ss, SL_MIN(sizeof(b->peer_addr), (size_t)a->remote.len));
}

void sl_channel_allow_splice(sl_channel *src) {
  if (src->peer == NULL || ((src->flags | src->peer->flags) & SL_CH_EMBEDDED)) return;
  if (src->ssl != NULL || src->peer->ssl != NULL) return;   /* TLS bytes are not the peer's */
  src->flags |= SL_CH_SPLICE_OK;
}

/* ---- idle timeout ---- */

/* The timer runs at most once per timeout: reads and writes only note the
 * loop time, and an early expiry re-arms for the time left (libev's
 * "be smart about timeouts"). */
static void sl_channel_on_idle(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(revents);
  sl_channel *ch = SL_CONTAINER_OF(t, sl_channel, idle);
  ev_tstamp left = ch->last_active + ch->idle_timeout - ev_now(loop);
  if (left > 0) {
    ev_timer_set(t, left, 0.);
    ev_timer_start(loop, t);
    return;
  }
  if (ch->flags & SL_CH_LINGERING) {   /* its peer did not close in time: as it is */
    sl_channel_close(ch, ch->reason, 0);
    return;
  }
  sl_channel_close_with(ch, SL_PROMISE_TIMEOUT,
                       (ch->flags & SL_CH_HALF_CLOSED) ? "half_close_timeout" : "idle_timeout", 0);
}

void sl_channel_set_idle_timeout(sl_channel *ch, double seconds) {
  ch->idle_timeout = seconds;
  ev_timer_stop(ch->w->loop, &ch->idle);
  if (seconds <= 0 || (ch->flags & SL_CH_CLOSED)) return;
  ch->last_active = ev_now(ch->w->loop);
  ev_timer_set(&ch->idle, seconds, 0.);
  ev_timer_start(ch->w->loop, &ch->idle);
}

void sl_channel_set_half_close_timeout(sl_channel *ch, double seconds) {
  ch->half_close_timeout = seconds;
}

/* One direction has ended: the shorter timeout from now on (the FIN was
 * activity: the time counts from it). */
static void sl_channel_half_closed(sl_channel *ch) {
  double t = ch->half_close_timeout;
  if (t <= 0 || (ch->flags & (SL_CH_HALF_CLOSED | SL_CH_CLOSED))) return;
  ch->flags |= SL_CH_HALF_CLOSED;
  if (ch->idle_timeout <= 0 || t < ch->idle_timeout) sl_channel_set_idle_timeout(ch, t);
}

/* ---- write timeout ---- */

/* (channel_internal.h) */
void sl_channel_wait_writable(sl_channel *ch) {
  struct ev_loop *loop = ch->w->loop;
  if (ev_is_active(&ch->wio)) return;
  ev_io_start(loop, &ch->wio);
  if (ch->write_timeout <= 0) return;
  /* The wait begins now, not when this loop iteration began (a long Lua
   * callback before this write would have eaten the timeout). Once per
   * wait, not per write. */
  ch->last_written = ev_time();
  if (ev_is_active(&ch->wtimer)) return;   /* from an earlier wait: it re-arms when early */
  ev_timer_set(&ch->wtimer, ch->write_timeout, 0.);
  ev_timer_start(loop, &ch->wtimer);
}

/* Bytes wait for the socket while its EV_WRITE watcher runs (the
 * connect's aside). */
static int sl_channel_waits_to_write(const sl_channel *ch) {
  return ev_is_active(&ch->wio) && !(ch->flags & (SL_CH_CONNECTING | SL_CH_CLOSED));
}

/* As the idle timer: progress only notes the loop time; an early expiry
 * re-arms for the time left, one after the wait ended stops. */
static void sl_channel_on_write_timeout(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(revents);
  sl_channel *ch = SL_CONTAINER_OF(t, sl_channel, wtimer);
  if (!sl_channel_waits_to_write(ch)) return;
  ev_tstamp left = ch->last_written + ch->write_timeout - ev_now(loop);
  if (left <= 0) {
    /* One more try: the loop may have run late (its EV_WRITE not yet
     * seen), and a socket that takes bytes now is a peer that reads. */
    sl_channel_ref(ch);
    sl_channel_write_waiting(ch);
    int waits = sl_channel_waits_to_write(ch);
    left = ch->last_written + ch->write_timeout - ev_now(loop);
    if (waits && left <= 0) {
      ch->w->stats.write_timeouts++;
      sl_channel_close_with(ch, SL_PROMISE_TIMEOUT, "write_timeout", 1);
    }
    sl_channel_unref(ch);
    if (!waits || left <= 0 || ev_is_active(t)) return;   /* (a new wait may have armed it) */
  }
  ev_timer_set(t, left, 0.);
  ev_timer_start(loop, t);
}

int sl_channel_set_keepalive(sl_channel *ch, int idle_s, int interval_s, int count) {
  int on = 1;
  if (setsockopt(ch->fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on)) != 0) return SL_ERROR;
  if (idle_s > 0 && setsockopt(ch->fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle_s, sizeof(idle_s)) != 0)
    return SL_ERROR;
  if (interval_s > 0 &&
      setsockopt(ch->fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval_s, sizeof(interval_s)) != 0)
    return SL_ERROR;
  if (count > 0 && setsockopt(ch->fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof(count)) != 0)
    return SL_ERROR;
  return SL_OK;
}

/* ---- FINs at the end of the loop iteration ---- */

/* A FIN passed on (the peer's input closed) waits until every event of this
 * loop iteration has run: when the channel's own input turns out closed as
 * well (both ends closed at about the same time, as a client and a server
 * of one request often do), close() sends the FIN and the shutdown() call
 * is saved, as is the wake-up that would follow for the half-closed socket. */
static void sl_channel_send_fins(struct ev_loop *loop, ev_prepare *p, int revents) {
  SL_UNUSED(revents);
  sl_worker *w = SL_CONTAINER_OF(p, sl_worker, fin_watcher);
  while (w->fin_list != NULL) {
    sl_channel *ch = w->fin_list;
    w->fin_list = ch->fin_next;
    ch->fin_next = NULL;
    ch->flags &= ~(uint32_t)SL_CH_FIN_PENDING;
    shutdown(ch->fd, SHUT_WR);
  }
  ev_prepare_stop(loop, p);
}

static void sl_channel_fin_later(sl_channel *ch) {
  sl_worker *w = ch->w;
  ch->flags |= SL_CH_FIN_PENDING;
  ch->fin_next = w->fin_list;
  w->fin_list = ch;
  if (!ev_is_active(&w->fin_watcher)) {
    ev_prepare_init(&w->fin_watcher, sl_channel_send_fins);
    ev_prepare_start(w->loop, &w->fin_watcher);
  }
}

/* Closing: its FIN goes with close(). */
static void sl_channel_fin_drop(sl_channel *ch) {
  sl_channel **pp = &ch->w->fin_list;
  while (*pp != ch) pp = &(*pp)->fin_next;
  *pp = ch->fin_next;
  ch->fin_next = NULL;
  ch->flags &= ~(uint32_t)SL_CH_FIN_PENDING;
}

/* ---- writes held until a read burst's FIN is passed on ----
 *
 * A burst that ends at the peer's FIN (the last short read is followed by
 * one more, which finds the FIN: see sl_channel_read) fires read_complete
 * and then input_closed. The writes these ask for wait until both have
 * run: when a stage passes the FIN on (the bridge does), the other side's
 * last bytes then go with its FIN in one segment (MSG_MORE, then
 * shutdown()), and its peer answers both with one ACK, or with its own
 * FIN. Two packets fewer per proxied connection that the server closes. */
static void sl_channel_hold_write(sl_channel *ch) {
  if (ch->flags & SL_CH_WRITE_HELD) return;
  ch->flags |= SL_CH_WRITE_HELD;
  sl_channel_ref(ch);
  ch->held_next = ch->w->held_list;
  ch->w->held_list = ch;
}

static void sl_channel_release_writes(sl_worker *w) {
  w->write_hold = 0;
  while (w->held_list != NULL) {
    sl_channel *ch = w->held_list;
    w->held_list = ch->held_next;
    ch->held_next = NULL;
    ch->flags &= ~(uint32_t)SL_CH_WRITE_HELD;
    if (!(ch->flags & (SL_CH_CLOSED | SL_CH_CONNECTING)) && !ev_is_active(&ch->wio))
      sl_channel_do_write(ch);
    sl_channel_unref(ch);
  }
}

/* ---- closing ---- */

static void sl_channel_close_peer(sl_channel *ch) {
  sl_channel *p = ch->peer;
  if (p == NULL) return;
  ch->peer = NULL;
  p->peer = NULL;
  char why[200];
  if (ch->flags & SL_CH_ERROR) {
    snprintf(why, sizeof(why), "peer closed: %s", ch->reason);
    sl_channel_close(p, why, 1);
  } else if ((p->flags & SL_CH_INPUT_CLOSED) &&
             (p->flags & (SL_CH_OUTPUT_CLOSED | SL_CH_SHUTDOWN_PENDING))) {
    /* Both of p's directions had ended (its FIN passed on may still wait
     * behind its last bytes): it is done on its own account, whichever of
     * the two FINs came first. */
    sl_channel_close_after_flush(p, "eof");
  } else {
    sl_channel_close_after_flush(p, "peer closed");
  }
}

void sl_channel_close_with(sl_channel *ch, const char *promise_err, const char *reason,
                           int is_error) {
  if (ch->flags & SL_CH_CLOSED) return;
  ch->promise_err = promise_err;
  sl_channel_close(ch, reason, is_error);
}

void sl_channel_close(sl_channel *ch, const char *reason, int is_error) {
  if (ch->flags & SL_CH_CLOSED) return;
  sl_worker *w = ch->w;
  ch->flags |= SL_CH_CLOSED;
  ch->writes_at_close = ch->writes;
  if (is_error) ch->flags |= SL_CH_ERROR;
  if (reason != ch->reason) sl_str_append(ch->reason, sizeof(ch->reason), 0, reason ? reason : "closed");
  ev_io_stop(w->loop, &ch->rio);
  ev_io_stop(w->loop, &ch->wio);
  ev_timer_stop(w->loop, &ch->timer);
  ev_timer_stop(w->loop, &ch->idle);
  ev_timer_stop(w->loop, &ch->wtimer);
  if (ch->flags & SL_CH_FIN_PENDING) sl_channel_fin_drop(ch);
  if (ch->flags & SL_CH_WRITE_HELD) sl_channel_write_held(ch);
  size_t pipe_dropped = 0;
  if (ch->flags & SL_CH_HAS_PIPE) {
    pipe_dropped = ch->spl_len;
    if (pipe_dropped > 0 && !is_error && ch->peer != NULL && !(ch->peer->flags & SL_CH_CLOSED))
      pipe_dropped = sl_channel_pipe_hand_on(ch);
    sl_channel_pipe_put(ch);   /* what is still in it is dropped */
  }
  if (ch->ssl != NULL) {
    if (ch->tls_state & SL_TLS_HANDSHAKE) sl_channel_tls_abandon(ch);   /* counted as failed */
    /* close_notify says the stream ended whole: not after an error (the
     * upstream's reset, a timeout), nor with queued bytes dropped. */
    if (!is_error && sl_outq_is_empty(&ch->outq)) sl_channel_tls_close_notify(ch);
    sl_channel_tls_free(ch);
  }
  if (ch->fd >= 0) {
    close(ch->fd);
    ch->fd = -1;
  }
  sl_channel_ref(ch);
  size_t dropped = sl_outq_release_all(&ch->outq,
                                       ch->promise_err ? ch->promise_err : SL_PROMISE_CLOSED);
  w->stats.channels_closed++;
  sl_log_level level = is_error ? SL_LOG_WARN : SL_LOG_INFO;
  if (sl_log_enabled(level))   /* its description is made only for a line that is written */
    sl_log(level, "%s closed: %s (in %llu B, out %llu B, peak queue %zu B, %.0f ms%s)",
           sl_channel_describe(ch), ch->reason, (unsigned long long)ch->bytes_in,
           (unsigned long long)ch->bytes_out, ch->outq.peak,
           (ev_now(w->loop) - ch->started) * 1000.0,
           dropped || pipe_dropped ? ", unsent data dropped" : "");
  if (ch->on_close) ch->on_close(ch);
  sl_channel_close_peer(ch);
  if (ch->flags & SL_CH_ACTIVE) sl_pipeline_fire_inactive(&ch->pipe);
  sl_pipeline_fire_removed(&ch->pipe);
  sl_channel_unref(ch);
  sl_channel_unref(ch); /* the open reference */
}

/* ---- lingering (half_close = false) ----
 *
 * With half_close = false the first FIN ends the pair: the side that did
 * not send it (ch) gets its FIN after what was queued for it, and its own
 * input is dropped from then on (SL_CH_DISCARD), so that the FIN sender's
 * queue no longer grows and it closes once that is written. ch must not
 * then simply close(): with input unread, or arriving later, the kernel
 * answers with a reset and throws away what ch's socket has not yet
 * delivered. So ch closes at once only when its peer has acknowledged
 * every byte (SIOCOUTQ 0: a reset can lose nothing); else it lingers:
 * reads and drops until its peer's FIN or an error, for at most
 * SL_CHANNEL_LINGER_S (or half_close_timeout_ms when shorter). */
#define SL_CHANNEL_LINGER_S 5.0

/* Whether ch now lingers (1) or may close at once (0). */
static int sl_channel_linger(sl_channel *ch) {
  if (ch->flags & SL_CH_LINGERING) return 1;
  if (!(ch->flags & SL_CH_DISCARD) || (ch->flags & (SL_CH_INPUT_CLOSED | SL_CH_EMBEDDED)) ||
      ch->fd < 0)
    return 0;
  int unacked = 0;
  if (ioctl(ch->fd, SIOCOUTQ, &unacked) != 0 || unacked == 0) return 0;
  ch->flags |= SL_CH_LINGERING;
  double t = SL_CHANNEL_LINGER_S;
  if (ch->half_close_timeout > 0 && ch->half_close_timeout < t) t = ch->half_close_timeout;
  sl_channel_set_idle_timeout(ch, t);
  sl_channel_update_reading(ch);
  return 1;
}

/* Reads and drops what a DISCARD channel's peer sends; at its FIN a
 * lingering channel closes. */
static void sl_channel_discard_input(sl_channel *ch) {
  char scratch[16384];
  for (int i = 0; i < SL_RECV_MAX_READS; i++) {
    ssize_t n = recv(ch->fd, scratch, sizeof(scratch), 0);
    if (n > 0) {
      /* Counted as bytes in, unless they are TLS records: bytes_in counts
       * plaintext, and these are never decrypted. */
      if (ch->ssl == NULL) {
        ch->bytes_in += (uint64_t)n;
        ch->w->stats.bytes_in += (uint64_t)n;
      }
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    /* The FIN, or an error: nothing more can arrive. */
    ch->flags |= SL_CH_INPUT_CLOSED;
    sl_channel_update_reading(ch);
    if (ch->flags & (SL_CH_LINGERING | SL_CH_CLOSE_PENDING))
      sl_channel_close(ch, ch->reason[0] ? ch->reason : "peer closed", 0);
    return;
  }
}

static void sl_channel_output_done(sl_channel *ch) {
  if (ch->flags & SL_CH_CLOSE_PENDING) {
    if (sl_channel_linger(ch)) return;
    sl_channel_close(ch, ch->reason[0] ? ch->reason : "closed", 0);
    return;
  }
  if (ch->flags & SL_CH_SHUTDOWN_PENDING) {
    /* A TLS client's handshake under way: a FIN now would cut it short
     * (OpenSSL still has records to send); it goes once the handshake is
     * done (sl_channel_tls_done flushes). */
    if (ch->tls_state & SL_TLS_UNREADY) return;
    ch->flags &= ~(uint32_t)SL_CH_SHUTDOWN_PENDING;
    ch->flags |= SL_CH_OUTPUT_CLOSED;
    /* Both ways done: close() sends the FIN itself (the input is at EOF, so
     * nothing unread turns it into a reset); one syscall less per connection. */
    if (ch->flags & SL_CH_INPUT_CLOSED) {
      sl_channel_close(ch, "eof", 0);
      return;
    }
    /* half_close = false: the FIN just passed on ends the pair. This side's
     * input is dropped from now on; its FIN goes at the end of the loop
     * iteration (or with its close()); the FIN's sender closes once it has
     * written what is queued for it ("eof"), then this side ("peer
     * closed": at once, or after lingering, above). */
    sl_channel *p = ch->peer;
    sl_channel_tls_close_notify(ch);   /* (nothing without TLS) */
    sl_channel_fin_later(ch);
    if ((ch->flags & SL_CH_NO_HALF_CLOSE) && p != NULL && (p->flags & SL_CH_INPUT_CLOSED)) {
      ch->flags |= SL_CH_DISCARD;
      sl_channel_close_after_flush(p, "eof");
    }
  }
}

/* What a socket error fails queued promises with. */
static const char *sl_channel_errno_reason(int e) {
  switch (e) {
    case ECONNRESET: case EPIPE: case ECONNABORTED: case ECONNREFUSED: return SL_PROMISE_RESET;
    case ETIMEDOUT: return SL_PROMISE_TIMEOUT;
    default: return SL_PROMISE_ERROR;
  }
}

/* sl_outq_write under SL_CH_WRITING, counting what went out; the caller
 * holds a reference. *e gets errno. */
static inline __attribute__((always_inline)) int sl_channel_send(sl_channel *ch, size_t *n,
                                                                 int *e) {
  ch->flags |= SL_CH_WRITING;
  int rc;
  if (ch->ssl != NULL) {
    rc = sl_channel_tls_send(ch, SIZE_MAX, n, e);
  } else {
    /* Passing a FIN on: it joins the last segment (sl_channel_output_done
     * shuts the socket down once the queue is empty). Not when that FIN
     * ends the pair while this side's input is open (half_close = false):
     * the channel then closes without lingering only if its peer has
     * acknowledged every byte (sl_channel_linger), which bytes held back
     * for the FIN never are by then. */
    if (__builtin_expect((ch->flags & SL_CH_SHUTDOWN_PENDING) != 0, 0) &&
        (ch->flags & (SL_CH_NO_HALF_CLOSE | SL_CH_INPUT_CLOSED)) != SL_CH_NO_HALF_CLOSE)
      rc = sl_outq_write_before_fin(&ch->outq, ch->fd, SIZE_MAX, n);
    else
      rc = sl_outq_write(&ch->outq, ch->fd, SIZE_MAX, n);
    *e = errno;
  }
  ch->flags &= ~(uint32_t)SL_CH_WRITING;
  if (*n > 0) ch->last_active = ch->last_written = ev_now(ch->w->loop);
  ch->bytes_out += *n;
  ch->w->stats.bytes_out += *n;
  return rc;
}

/* A channel closing while a read burst holds its writes (a stage that
 * answers and closes at the end of input): what it flushed goes now, as
 * the flush would have written it. Errors are the close's to ignore. */
static void sl_channel_write_held(sl_channel *ch) {
  if (ch->fd < 0 || (ch->flags & (SL_CH_CONNECTING | SL_CH_WRITING)) ||
      (ch->tls_state & SL_TLS_UNREADY) || !sl_outq_has_flushed(&ch->outq))
    return;
  size_t n = 0;
  int e = 0;
  sl_channel_send(ch, &n, &e);
}

/* A write (sendmsg or splice) failed with errno e: closes ch as an error. */
void sl_channel_write_failed(sl_channel *ch, int e) {
  char why[240];
  const char *code = sl_channel_errno_reason(e);
  /* Through TLS, a reset may follow an alert that says why. */
  if (ch->ssl != NULL && (e == ECONNRESET || e == EPIPE) &&
      sl_channel_tls_reset_alert(ch, why, sizeof(why))) {
    sl_channel_close_with(ch, code, why, 1);
    return;
  }
  snprintf(why, sizeof(why), "%s (%s)", strcmp(code, SL_PROMISE_ERROR) == 0 ? "write error" : code,
           strerror(e));
  sl_channel_close_with(ch, code, why, 1);
}

/* One write burst: at most write_spin_count sendmsg calls. Socket full, or
 * the burst spent with more to write: EV_WRITE brings the channel back (on
 * the next loop iteration at the latest, after the other ready channels).
 * Returns SL_OK, SL_AGAIN (more to write) or SL_ERROR (closed). Re-entered
 * from a callback of the burst (a promise, a writability change), it
 * returns SL_AGAIN: the running burst writes what was flushed since. */
static int sl_channel_do_write(sl_channel *ch) {
  if (ch->flags & SL_CH_WRITING) return SL_AGAIN;
  if (__builtin_expect(ch->w->write_hold != 0, 0)) {
    sl_channel_hold_write(ch);
    return SL_AGAIN;
  }
  if (ch->tls_state & SL_TLS_UNREADY) return SL_AGAIN;   /* written once it is done */
  size_t n = 0;
  int e = 0;
  sl_channel_ref(ch);
  int rc = sl_channel_send(ch, &n, &e);
  if (ch->flags & SL_CH_CLOSED) {
    rc = SL_ERROR; /* a callback closed it */
  } else if (rc == SL_ERROR) {
    if (e == 0) sl_channel_close_with(ch, SL_PROMISE_ERROR, ch->reason, 1);   /* TLS: why */
    else sl_channel_write_failed(ch, e);
  } else if (rc != SL_OK || sl_outq_has_flushed(&ch->outq)) {
    rc = SL_AGAIN;
    if (ch->tls_state & SL_TLS_WRITE_WANTS_READ) {   /* EV_READ brings it back, not EV_WRITE */
      if (ev_is_active(&ch->wio) && !(ch->tls_state & SL_TLS_READ_WANTS_WRITE))
        ev_io_stop(ch->w->loop, &ch->wio);
      sl_channel_update_reading(ch);
    } else {
      sl_channel_wait_writable(ch);
    }
  } else {
    if (ev_is_active(&ch->wio) && !(ch->tls_state & SL_TLS_READ_WANTS_WRITE))
      ev_io_stop(ch->w->loop, &ch->wio);
    if (sl_outq_is_empty(&ch->outq)) sl_channel_output_done(ch);
  }
  sl_channel_unref(ch);
  return rc;
}

static void sl_channel_drop_write(sl_channel *ch, sl_buf *b, const char *site) {
  ch->flags |= SL_CH_LAST_WRITE_DROPPED;
  sl_pool *p = sl_pool_of(b->root);
  sl_buf_release_site(p, site);
  sl_buf_release(b);
  sl_buf_release_site(p, NULL);
}

int sl_channel_write(sl_channel *ch, sl_buf *b) {
  ch->writes++;
  if (ch->flags & (SL_CH_CLOSED | SL_CH_OUTPUT_CLOSED | SL_CH_SHUTDOWN_PENDING)) {
    if (sl_log_enabled(SL_LOG_DEBUG))
      sl_log(SL_LOG_DEBUG, "%s: write of %zu bytes after close or shutdown dropped",
             sl_channel_describe(ch), sl_buf_readable(b));
    sl_channel_drop_write(ch, b, "a write on a closed connection");
    return SL_ERROR;
  }
  size_t len = sl_buf_readable(b);
  if (sl_outq_over_limit(&ch->outq, len)) {
    /* Beyond Netty (#7123): a peer that does not read cannot make this
     * queue grow without bound. */
    char why[160];
    snprintf(why, sizeof(why),
             "outbound_limit (%zu B queued, a write of %zu B, limit %zu B)",
             ch->outq.pending, len, ch->outq.limit);
    sl_channel_drop_write(ch, b, "a write over the outbound limit");
    sl_channel_close_with(ch, SL_PROMISE_OUTBOUND_LIMIT, why, 1);
    return SL_ERROR;
  }
  sl_buf_set_owner(b, &ch->owned); /* queued here: this channel answers for it */
  uint64_t seq = sl_outq_next_seq(&ch->outq);
  if (sl_outq_add(&ch->outq, b, 0) != SL_OK) {
    ch->flags |= SL_CH_LAST_WRITE_DROPPED;
    sl_channel_close(ch, "out of memory queueing a write", 1);
    return SL_ERROR;
  }
  ch->flags &= ~(uint32_t)SL_CH_LAST_WRITE_DROPPED;
  ch->last_seq = seq;
  return SL_OK;
}

void sl_channel_promise_attach(sl_channel *ch, uint64_t mark, uint32_t pid) {
  if (pid == 0) return;
  const char *err = NULL;
  int rc = SL_DECLINED;
  if (ch->flags & SL_CH_CLOSED) {
    /* Closed by this write call (its write reached the head first)? */
    err = ch->writes_at_close > mark && ch->promise_err ? ch->promise_err : SL_PROMISE_CLOSED;
  } else if (ch->writes != mark && (ch->flags & SL_CH_LAST_WRITE_DROPPED)) {
    err = SL_PROMISE_CLOSED;      /* output closed: it will never be written */
  } else if (ch->writes == mark &&
             (ch->flags & (SL_CH_OUTPUT_CLOSED | SL_CH_SHUTDOWN_PENDING))) {
    err = SL_PROMISE_CLOSED;
  } else if (ch->writes != mark) {
    rc = sl_outq_set_promise(&ch->outq, ch->last_seq, pid);
    if (rc == SL_OK) return;
  }
  /* Nothing queued by this call, or its last entry has a promise already:
   * a marker after everything queued. */
  if (err == NULL && rc == SL_DECLINED) {
    if (sl_outq_add_marker(&ch->outq, pid) == SL_OK) return;
    sl_channel_close(ch, "out of memory queueing a write", 1);
    err = SL_PROMISE_CLOSED;
  }
  /* err NULL here: SL_DONE, the last entry has been written already. */
  sl_channel_promise_done(ch, pid, err);
}

static void sl_channel_connected(sl_channel *ch, int err);

/* Speculative I/O: the first flush while connecting tries sendmsg at once
 * instead of waiting for EV_WRITE (on loopback and fast networks the
 * handshake is often done by then). Bytes taken prove the connect (no
 * getsockopt, no EV_WRITE wake-up); EAGAIN or ENOTCONN: still under way,
 * EV_WRITE decides as before; another error is the connect's failure, and
 * what is queued stays queued (sl_channel_move_queue hands it to a retry). */
static void sl_channel_write_early(sl_channel *ch) {
  if (ch->flags & (SL_CH_SPECULATED | SL_CH_WRITING) || !sl_outq_has_flushed(&ch->outq)) return;
  if (ch->ssl != NULL) return;   /* TLS: the handshake goes first */
  ch->flags |= SL_CH_SPECULATED;
  size_t n = 0;
  int e = 0;
  sl_channel_ref(ch);
  int rc = sl_channel_send(ch, &n, &e);
  if (ch->flags & SL_CH_CLOSED) {
    /* a callback closed it */
  } else if (n > 0) {
    sl_channel_connected(ch, 0);               /* writes the rest, if any */
  } else if (rc == SL_ERROR && e != ENOTCONN) {
    sl_channel_connected(ch, e);
  }
  sl_channel_unref(ch);
}

void sl_channel_flush(sl_channel *ch) {
  if (ch->flags & SL_CH_CLOSED) return;
  sl_outq_flush(&ch->outq);
  if (ch->flags & SL_CH_EMBEDDED) return;     /* the test reads what is flushed */
  if (ch->flags & SL_CH_CONNECTING) {         /* written once connected */
    sl_channel_write_early(ch);
    return;
  }
  if (ev_is_active(&ch->wio)) return;         /* the socket is full: wait */
  sl_channel_do_write(ch);
}

void sl_channel_shutdown_output(sl_channel *ch) {
  if (ch->flags & (SL_CH_CLOSED | SL_CH_OUTPUT_CLOSED | SL_CH_SHUTDOWN_PENDING)) return;
  ch->flags |= SL_CH_SHUTDOWN_PENDING;
  sl_channel_half_closed(ch);
  sl_outq_flush(&ch->outq);
  if (ch->flags & SL_CH_CONNECTING) return;
  if (sl_outq_is_empty(&ch->outq)) sl_channel_output_done(ch);
  else if (!ev_is_active(&ch->wio)) sl_channel_do_write(ch);
}

static void sl_channel_adopt(void *ud, sl_buf *b) {
  sl_buf_set_owner(b, &((sl_channel *)ud)->owned);
}

int sl_channel_move_queue(sl_channel *from, sl_channel *to) {
  if (sl_outq_is_empty(&from->outq)) return SL_OK;
  if (to->flags & (SL_CH_CLOSED | SL_CH_OUTPUT_CLOSED | SL_CH_SHUTDOWN_PENDING)) return SL_ERROR;
  if (sl_outq_move(&from->outq, &to->outq, sl_channel_adopt, to) != SL_OK) {
    sl_channel_close(to, "out of memory queueing a write", 1);
    return SL_ERROR;
  }
  to->last_seq = sl_outq_next_seq(&to->outq) - 1;
  sl_channel_flush(to);
  return SL_OK;
}

void sl_channel_close_after_flush(sl_channel *ch, const char *reason) {
  if (ch->flags & SL_CH_CLOSED) return;
  if (!(ch->flags & SL_CH_CLOSE_PENDING))
    sl_str_append(ch->reason, sizeof(ch->reason), 0, reason);
  ch->flags |= SL_CH_CLOSE_PENDING;
  sl_channel_update_reading(ch);
  sl_outq_flush(&ch->outq);
  /* Still connecting, or in a TLS client's handshake: nothing queued has
   * been written, and the peer that queued it is gone; the try ends now
   * (the connect's callback, which still holds that peer, runs no more). */
  int unsent = (ch->flags & SL_CH_CONNECTING) ||
               (ch->tls_state & SL_TLS_UNREADY);
  if (unsent || sl_outq_is_empty(&ch->outq)) {
    if (!unsent && sl_channel_linger(ch)) return;
    sl_channel_close(ch, ch->reason, 0);
    return;
  }
  if (!ev_is_active(&ch->wio)) sl_channel_do_write(ch);
}

/* ---- events ---- */

/* The peer sent FIN. Stages hear of it first (the bridge passes it on);
 * a channel whose output is already shut is then done. */
void sl_channel_input_closed(sl_channel *ch) {
  ch->flags |= SL_CH_INPUT_CLOSED;
  sl_channel_update_reading(ch);
  sl_channel_half_closed(ch);
  sl_pipeline_fire_user_event(&ch->pipe, SL_UEV_INPUT_CLOSED);
  if ((ch->flags & (SL_CH_OUTPUT_CLOSED | SL_CH_CLOSED)) == SL_CH_OUTPUT_CLOSED)
    sl_channel_close(ch, "eof", 0);
}

/* (channel_internal.h) */
int sl_channel_read_error(int e, char *why, size_t len, const char **code) {
  if (e == EINTR) return 1;
  if (e == EAGAIN || e == EWOULDBLOCK) return 0;
  *code = sl_channel_errno_reason(e);
  if (e == ECONNRESET) snprintf(why, len, "reset (%s)", strerror(e));
  else snprintf(why, len, "read error (%s)", strerror(e));
  return 0;
}

/* One wake-up's reads: up to SL_RECV_MAX_READS while the read watcher stays
 * on; speculative (sl_channel_read_now): one read, watcher or not. */
static void sl_channel_read(sl_channel *ch, int speculative) {
  if (ch->flags & SL_CH_DISCARD) {
    sl_channel_discard_input(ch);
    return;
  }
  if ((ch->flags & SL_CH_SPLICING) && !speculative && sl_channel_splice_read(ch) == SL_OK) return;
  sl_worker *w = ch->w;
  struct ev_loop *loop = w->loop;
  size_t total = 0;
  int eof = 0;
  int drained = 0;   /* the last read found nothing (EAGAIN: OpenSSL wants the socket) */
  int probing = 0;   /* this read follows a short one */
  char why[128];
  const char *why_code = NULL;
  why[0] = '\0';
  sl_channel_ref(ch);
  uint32_t was_reading = ch->flags & SL_CH_READING;
  ch->flags |= SL_CH_READING;
  /* Every read of this wake-up reaches Lua stages in one transition. */
  if (w->lua) w->lua_hold(w->lua, 1);
  for (int i = 0; i < (speculative ? 1 : SL_RECV_MAX_READS); i++) {
    if (!speculative && !ev_is_active(&ch->rio)) break; /* autoread turned off, or closed */
    size_t size = sl_channel_recv_size(ch);
    /* SSL_read_ex gives at most a record's plaintext per call. */
    if (ch->ssl != NULL && size > SL_CHANNEL_TLS_RECORD) size = SL_CHANNEL_TLS_RECORD;
    sl_buf *b = sl_buf_alloc(w->pool, size, size);
    if (b == NULL) {
      /* Out of buffer memory: pause this channel and retry shortly (said
       * once, not at every retry). */
      ch->flags |= SL_CH_READ_PAUSED;
      sl_channel_update_reading(ch);
      ev_timer_set(&ch->timer, 0.05, 0.);
      ev_timer_start(w->loop, &ch->timer);
      if (ch->mem_retries++ == 0)
        sl_log(SL_LOG_WARN, "%s: no buffer memory, reading paused (retried every 50 ms)",
               sl_channel_describe(ch));
      break;
    }
    if (__builtin_expect(ch->mem_retries != 0, 0)) {
      sl_log(SL_LOG_INFO, "%s: buffer memory again, reading resumed after %u retries",
             sl_channel_describe(ch), ch->mem_retries);
      ch->mem_retries = 0;
    }
    sl_buf_set_owner(b, &ch->owned);
    if (b->flags & SL_BUF_RECORDED) sl_channel_note_site(ch, b);
    ssize_t n = ch->ssl == NULL ? recv(ch->fd, b->data, size, 0)
                                : sl_channel_tls_recv(ch, b->data, size, why, sizeof(why));
    if (n > 0) {
      /* A short read drained the socket; through TLS, only if OpenSSL
       * holds nothing more (read-ahead). */
      int more = (size_t)n == size || (ch->ssl != NULL && sl_channel_tls_pending(ch));
      b->wr = (uint32_t)n;
      total += (size_t)n;
      ch->bytes_in += (uint64_t)n;
      w->stats.bytes_in += (uint64_t)n;
      if ((size_t)n == size) {
        sl_channel_recv_record(ch, (size_t)n); /* grow fast */
        /* A bulk stream on a pass-through pair: splice from the next wake-up. */
        if ((ch->flags & SL_CH_SPLICE_OK) && ch->recv_index == SL_RECV_MAX_INDEX)
          ch->flags |= SL_CH_SPLICING;
      }
      sl_pipeline_fire_read(&ch->pipe, b);
      if (more) continue;
      /* Drained. Read again anyway while no such read has found nothing
       * (upstream channels: sl_channel_accepted marks clients PROBED): a
       * server that closes after its answer (HTTP/1.0, Connection: close)
       * has often sent its FIN with it, and finding it now lets the FIN
       * passed on go with those bytes (see "writes held" above). */
      if (speculative || (ch->flags & SL_CH_PROBED) || ch->ssl != NULL) break;
      probing = 1;
      continue;
    }
    sl_buf_release(b);
    if (n == 0) {
      eof = 1;
      break;
    }
    if (sl_channel_read_error(errno, why, sizeof(why), &why_code)) continue;
    if (probing) ch->flags |= SL_CH_PROBED;
    drained = 1;
    break;
  }
  if (w->lua) w->lua_hold(w->lua, 0);
  /* An error found by a read after a short one (a reset right after the
   * last bytes) closes once read_complete has passed those bytes on: the
   * close drops what the peer's queue holds unflushed. */
  int error_after = probing && why[0] != '\0';
  if (why[0] != '\0' && !error_after && !(ch->flags & SL_CH_CLOSED))
    sl_channel_close_with(ch, why_code, why, 1);
  if (!speculative && (ch->flags & SL_CH_READ_ONCE)) {
    ch->flags &= ~(uint32_t)SL_CH_READ_ONCE; /* one wake-up's reads were asked for */
    sl_channel_update_reading(ch);
  }
  if (total > 0) ch->last_active = ev_now(loop);
  /* Bytes and the FIN in one burst: writes wait until both are handled. */
  int hold = eof && total > 0 && !w->write_hold;
  if (hold) w->write_hold = 1;
  if (total > 0 && !(ch->flags & SL_CH_CLOSED)) {
    sl_channel_recv_record(ch, total);
    sl_pipeline_fire_read_complete(&ch->pipe);
  }
  if (eof && !(ch->flags & SL_CH_CLOSED)) sl_channel_input_closed(ch);
  if (hold) sl_channel_release_writes(w);
  if (error_after && !(ch->flags & SL_CH_CLOSED)) sl_channel_close_with(ch, why_code, why, 1);
  /* The burst ended (its read count spent) with bytes inside OpenSSL:
   * read them on the next iteration, as for a socket still readable. Not
   * when OpenSSL asked for the socket: what it holds is then a record's
   * beginning, and the socket's own event brings the rest. */
  if (ch->ssl != NULL && !drained && ev_is_active(&ch->rio) && sl_channel_tls_pending(ch))
    ev_feed_event(loop, &ch->rio, EV_READ);
  ch->flags = (ch->flags & ~(uint32_t)SL_CH_READING) | was_reading;
  sl_channel_unref(ch);
}

/* A TLS channel's EV_READ: its handshake, or a write that waited for it,
 * before its reads. */
static void sl_channel_tls_readable(sl_channel *ch) {
  if (ch->tls_state & SL_TLS_HANDSHAKE) {
    sl_channel_tls_handshake(ch);
    return;
  }
  if (ch->tls_state & SL_TLS_WRITE_WANTS_READ) {
    ch->tls_state &= (uint8_t)~SL_TLS_WRITE_WANTS_READ;
    sl_channel_ref(ch);
    sl_channel_update_reading(ch);
    sl_channel_write_waiting(ch);
    int closed = (ch->flags & SL_CH_CLOSED) != 0;
    sl_channel_unref(ch);
    if (closed) return;
  }
  sl_channel_read(ch, 0);
}

static void sl_channel_on_readable(struct ev_loop *loop, ev_io *io, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_channel *ch = SL_CONTAINER_OF(io, sl_channel, rio);
  if (__builtin_expect(ch->tls_state != 0, 0)) sl_channel_tls_readable(ch);
  else sl_channel_read(ch, 0);
}

void sl_channel_read_now(sl_channel *ch) {
  if ((ch->flags & (SL_CH_ACTIVE | SL_CH_EMBEDDED | SL_CH_INPUT_CLOSED | SL_CH_CLOSED |
                    SL_CH_CLOSE_PENDING | SL_CH_READ_PAUSED | SL_CH_READING)) != SL_CH_ACTIVE)
    return;
  if (ch->flags & SL_CH_ACTIVATING) {   /* not inside a stage's channel_active */
    ch->flags |= SL_CH_READ_NOW;
    return;
  }
  sl_channel_read(ch, 1);
}

static void sl_channel_connected(sl_channel *ch, int err) {
  sl_channel_connect_fn fn = ch->on_connect;
  ch->on_connect = NULL;
  ch->flags &= ~(uint32_t)SL_CH_CONNECTING;
  ev_timer_stop(ch->w->loop, &ch->timer);
  if (ev_is_active(&ch->wio)) ev_io_stop(ch->w->loop, &ch->wio);
  if (err) ch->promise_err = sl_channel_errno_reason(err); /* what queued writes fail with */
  sl_channel_ref(ch);
  fn(ch, err);
  /* Writes queued while connecting go out now. */
  if (!err && !(ch->flags & SL_CH_CLOSED) && sl_outq_has_flushed(&ch->outq))
    sl_channel_do_write(ch);
  else if (!err && !(ch->flags & SL_CH_CLOSED) && sl_outq_is_empty(&ch->outq) &&
           (ch->flags & (SL_CH_SHUTDOWN_PENDING | SL_CH_CLOSE_PENDING)))
    sl_channel_output_done(ch);
  /* Nothing sent with the handshake's ACK: send it alone now (see
   * sl_socket_tune). (A TLS client's ClientHello has taken it.) */
  if (!err && ch->bytes_out == 0 && !(ch->flags & SL_CH_CLOSED) && ch->fd >= 0 &&
      ch->ssl == NULL) {
    int one = 1;
    setsockopt(ch->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
  }
  sl_channel_unref(ch);
}

/* Writes what waits for ch's socket: its peer's spliced bytes first (its
 * queue waits behind them), then its queue. */
static void sl_channel_write_waiting(sl_channel *ch) {
  sl_channel_ref(ch);
  sl_channel *src = ch->peer;
  if (src != NULL && src->spl_len > 0) {
    sl_channel_ref(src);
    int rc = sl_channel_splice_drain(src);
    sl_channel_unref(src);
    if (rc != SL_OK) {
      sl_channel_unref(ch);
      return;
    }
  }
  sl_channel_do_write(ch);
  sl_channel_unref(ch);
}

static void sl_channel_on_writable(struct ev_loop *loop, ev_io *io, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_channel *ch = SL_CONTAINER_OF(io, sl_channel, wio);
  if (__builtin_expect(ch->tls_state != 0, 0)) {
    if (ch->tls_state & SL_TLS_HANDSHAKE) {
      sl_channel_tls_handshake(ch);
      return;
    }
    if (ch->tls_state & SL_TLS_READ_WANTS_WRITE) {   /* the read that waited goes first */
      ch->tls_state &= (uint8_t)~SL_TLS_READ_WANTS_WRITE;
      sl_channel_ref(ch);
      if (!sl_outq_has_flushed(&ch->outq)) ev_io_stop(loop, &ch->wio);
      sl_channel_update_reading(ch);
      if (ev_is_active(&ch->rio)) sl_channel_read(ch, 0);
      int done = (ch->flags & SL_CH_CLOSED) || !ev_is_active(&ch->wio);
      sl_channel_unref(ch);
      if (done) return;
    }
  }
  if (ch->flags & SL_CH_CONNECTING) {
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(ch->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    sl_channel_connected(ch, err);
    return;
  }
  sl_channel_write_waiting(ch);
}

static void sl_channel_on_timer(struct ev_loop *loop, ev_timer *t, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_channel *ch = SL_CONTAINER_OF(t, sl_channel, timer);
  if (ch->flags & SL_CH_CONNECTING) {
    sl_channel_connected(ch, ETIMEDOUT);
    return;
  }
  if (ch->tls_state & SL_TLS_HANDSHAKE) {
    sl_channel_tls_timeout(ch);
    return;
  }
  if (ch->flags & SL_CH_READ_PAUSED) {
    ch->flags &= ~(uint32_t)SL_CH_READ_PAUSED;
    sl_channel_update_reading(ch);
  }
}
