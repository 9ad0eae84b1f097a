/*
 * TLS on a channel's socket: the client side of a listener with tls (the
 * handshake after accept) and the upstream side of an upstream with tls
 * (the handshake after connect), then reads and writes through the SSL
 * object instead of recv and sendmsg (see channel.h, "TLS").
 */
#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "buf/buf.h"
#include "io/channel.h"
#include "io/channel_internal.h"
#include "io/tls.h"
#include "io/worker.h"
#include "pipeline/codec/proxy_protocol.h"
#include "util/common.h"
#include "util/log.h"

/* SSL_write_ex takes one buffer: entries shorter than a record are
 * copied together (up to one record) so that small writes do not each
 * become a record of their own. */
#define SL_TLS_RECORD SL_CHANNEL_TLS_RECORD

/* A failed SSL call (e: its SSL_get_error) is fatal for ch's session.
 * Returns the errno value of a plain socket error (the caller words it),
 * or 0 with "tls_error (what OpenSSL said)" in why. */
static int sl_channel_tls_failure(sl_channel *ch, int e, char *why, size_t len) {
  char text[200];
  ch->tls_state |= SL_TLS_FAILED;   /* no close_notify after a fatal error */
  if (e == SSL_ERROR_SYSCALL && errno != 0 && ERR_peek_error() == 0) return errno;
  const char *t = sl_tls_error_text(text, sizeof(text),
                                    e == SSL_ERROR_ZERO_RETURN || e == SSL_ERROR_SYSCALL
                                        ? "eof" : "error");
  /* A certificate refused (a server's, or a client's with client_ca):
   * what was wrong with it. */
  long v = (SSL_get_verify_mode(ch->ssl) & SSL_VERIFY_PEER)
               ? SSL_get_verify_result(ch->ssl)
               : X509_V_OK;
  if (v != X509_V_OK)
    snprintf(why, len, "tls_error (%s: %s)", t, X509_verify_cert_error_string(v));
  else
    snprintf(why, len, "tls_error (%s)", t);
  return 0;
}

int sl_channel_tls_accept(sl_channel *ch, struct ssl_ctx_st *ctx, double timeout,
                          int proxy_protocol, sl_channel_connect_fn done) {
  sl_proxy_parser *pp = NULL;
  if (proxy_protocol && (pp = calloc(1, sizeof(*pp))) == NULL) return SL_ERROR;
  ERR_clear_error();
  SSL *ssl = SSL_new(ctx);
  if (ssl == NULL || SSL_set_fd(ssl, ch->fd) != 1) {
    SSL_free(ssl);
    free(pp);
    ERR_clear_error();
    return SL_ERROR;
  }
  SSL_set_accept_state(ssl);
  ch->ssl = ssl;
  ch->pp = pp;
  ch->tls_state = pp ? SL_TLS_HANDSHAKE | SL_TLS_PROXY_HEADER : SL_TLS_HANDSHAKE;
  ch->on_connect = done;
  ev_timer_set(&ch->timer, timeout, 0.);
  ev_timer_start(ch->w->loop, &ch->timer);
  /* The ClientHello is often there already (defer_accept, loopback). */
  sl_channel_tls_handshake(ch);
  return SL_OK;
}

int sl_channel_tls_client(sl_channel *ch, struct ssl_ctx_st *ctx, const char *server_name,
                          const char *verify_name, SSL_SESSION **session_slot) {
  SSL *ssl = sl_tls_client_new(ctx, ch->fd, server_name, verify_name, session_slot);
  if (ssl == NULL) return SL_ERROR;
  ch->ssl = ssl;
  ch->tls_state = SL_TLS_CLIENT | SL_TLS_WAIT_CONNECT;
  return SL_OK;
}

int sl_channel_tls_start(sl_channel *ch, double timeout, const void *prelude, size_t n,
                         sl_channel_connect_fn done) {
  SL_ASSERT(ch->tls_state & SL_TLS_WAIT_CONNECT, "TLS client handshake started twice");
  ch->tls_state = (uint8_t)((ch->tls_state & ~SL_TLS_WAIT_CONNECT) | SL_TLS_HANDSHAKE);
  ch->on_connect = done;
  /* A fresh socket's buffer takes a PROXY header whole (at most 232 bytes). */
  ssize_t sent = 0;
  while (n > 0 && (sent = send(ch->fd, prelude, n, MSG_NOSIGNAL)) < 0 && errno == EINTR) {}
  if (n > 0 && sent != (ssize_t)n) {
    int e = sent < 0 ? errno : EAGAIN;
    ch->on_connect = NULL;
    ch->tls_state = (uint8_t)((ch->tls_state & ~SL_TLS_HANDSHAKE) | SL_TLS_FAILED);
    return e;
  }
  /* Counted as a queued header is on a plain channel. */
  ch->bytes_out += n;
  ch->w->stats.bytes_out += n;
  ev_timer_set(&ch->timer, timeout, 0.);
  ev_timer_start(ch->w->loop, &ch->timer);
  sl_channel_tls_handshake(ch);   /* the ClientHello goes now */
  return 0;
}

/* The handshake ended: done(ch, err) hears of it (with why in ch->reason
 * on a failure); a failure closes ch. */
static void sl_channel_tls_done(sl_channel *ch, int err, const char *why) {
  struct ev_loop *loop = ch->w->loop;
  sl_channel_connect_fn fn = ch->on_connect;
  ch->on_connect = NULL;
  if (err && why && why != ch->reason) sl_str_append(ch->reason, sizeof(ch->reason), 0, why);
  ch->tls_state &= (uint8_t)~(SL_TLS_HANDSHAKE | SL_TLS_PROXY_HEADER);
  free(ch->pp);
  ch->pp = NULL;
  ev_timer_stop(loop, &ch->timer);
  why = err ? ch->reason : why;
  ev_io_stop(loop, &ch->rio);
  ev_io_stop(loop, &ch->wio);
  sl_channel_ref(ch);
  if (fn) fn(ch, err);
  if (err && !(ch->flags & SL_CH_CLOSED)) sl_channel_close_with(ch, SL_PROMISE_ERROR, why, 1);
  else if (!err && !(ch->flags & SL_CH_CLOSED)) sl_channel_flush(ch);   /* what waited for it */
  sl_channel_unref(ch);
}

/* A PROXY protocol header that cannot be read ends the handshake: logged
 * as the stage sluice.proxy_protocol logs it, with the same reason. */
static void sl_channel_tls_proxy_failed(sl_channel *ch, int err, const char *what) {
  char why[160];
  snprintf(why, sizeof(why), "bad PROXY protocol header (%s)", what);
  sl_log(SL_LOG_WARN, "%s: %s", sl_channel_describe(ch), why);
  ch->tls_state |= SL_TLS_FAILED;
  sl_channel_tls_done(ch, err, why);
}

/* Reads the PROXY protocol header off the socket before OpenSSL sees it:
 * what is there is peeked at, and only the bytes the parser takes as the
 * header's are read, so that the client's first TLS bytes stay in the
 * socket. SL_OK: the header is read (its address is the channel's);
 * SL_AGAIN: waiting for EV_READ; SL_ERROR: ch's handshake failed. */
static int sl_channel_tls_proxy_header(sl_channel *ch) {
  uint8_t peek[512];
  for (;;) {
    ssize_t n = recv(ch->fd, peek, sizeof(peek), MSG_PEEK);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      ev_io_stop(ch->w->loop, &ch->wio);
      if (!ev_is_active(&ch->rio)) ev_io_start(ch->w->loop, &ch->rio);
      return SL_AGAIN;
    }
    if (n < 0) {
      int e = errno;
      sl_channel_tls_proxy_failed(ch, e, strerror(e));
      return SL_ERROR;
    }
    if (n == 0) {
      sl_channel_tls_proxy_failed(ch, ECONNRESET,
                                  "the client closed before the header was complete");
      return SL_ERROR;
    }
    size_t used = 0;
    const char *why = NULL;
    sl_addr client;
    int r = sl_proxy_parse(ch->pp, peek, (size_t)n, &used, &client, &why);
    if (r < 0) {
      sl_channel_tls_proxy_failed(ch, EPROTO, why);
      return SL_ERROR;
    }
    /* The bytes were peeked at: they are there to be read, all of them. */
    ssize_t got;
    do got = recv(ch->fd, peek, used, 0);
    while (got < 0 && errno == EINTR);
    if (got != (ssize_t)used) {
      int e = got < 0 ? errno : EIO;
      sl_channel_tls_proxy_failed(ch, e, got < 0 ? strerror(e) : "short read");
      return SL_ERROR;
    }
    if (r == 0) continue;   /* (the header is not counted as bytes in) */
    if (client.len > 0) sl_channel_set_remote(ch, &client);
    ch->tls_state &= (uint8_t)~SL_TLS_PROXY_HEADER;
    free(ch->pp);
    ch->pp = NULL;
    return SL_OK;
  }
}

void sl_channel_tls_handshake(sl_channel *ch) {
  struct ev_loop *loop = ch->w->loop;
  if ((ch->tls_state & SL_TLS_PROXY_HEADER) && sl_channel_tls_proxy_header(ch) != SL_OK) return;
  ERR_clear_error();
  int r = SSL_do_handshake(ch->ssl);
  if (r == 1) {
    if (sl_log_enabled(SL_LOG_DEBUG))
      sl_log(SL_LOG_DEBUG, "%s: %s handshake done (%s)", sl_channel_describe(ch),
             SSL_get_version(ch->ssl), SSL_get_cipher_name(ch->ssl));
    ch->tls_version = SSL_get_version(ch->ssl);   /* a static string */
    sl_channel_tls_done(ch, 0, NULL);
    return;
  }
  int e = SSL_get_error(ch->ssl, r);
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
    ev_io *on = e == SSL_ERROR_WANT_READ ? &ch->rio : &ch->wio;
    ev_io *off = e == SSL_ERROR_WANT_READ ? &ch->wio : &ch->rio;
    ev_io_stop(loop, off);
    if (!ev_is_active(on)) ev_io_start(loop, on);
    return;
  }
  char why[240];
  int sys = sl_channel_tls_failure(ch, e, why, sizeof(why));
  if (sys) snprintf(why, sizeof(why), "tls_error (%s)", strerror(sys));
  sl_channel_tls_done(ch, sys ? sys : EPROTO, why);
}

void sl_channel_tls_abandon(sl_channel *ch) {
  sl_channel_connect_fn fn = ch->on_connect;
  ch->on_connect = NULL;
  ch->tls_state = (uint8_t)((ch->tls_state & ~(SL_TLS_HANDSHAKE | SL_TLS_PROXY_HEADER)) |
                            SL_TLS_FAILED);
  if (fn) fn(ch, ECONNABORTED);
}

void sl_channel_tls_timeout(sl_channel *ch) {
  ch->tls_state |= SL_TLS_FAILED;
  sl_channel_tls_done(ch, ETIMEDOUT, "tls_handshake_timeout");
}

ssize_t sl_channel_tls_recv(sl_channel *ch, void *p, size_t len, char *why, size_t wlen) {
  size_t n = 0;
  ERR_clear_error();
  int r = SSL_read_ex(ch->ssl, p, len, &n);
  if (r == 1) return (ssize_t)n;
  int e = SSL_get_error(ch->ssl, r);
  switch (e) {
    case SSL_ERROR_ZERO_RETURN:   /* close_notify, or a TCP end without it */
      ERR_clear_error();
      return 0;
    case SSL_ERROR_WANT_READ:
      errno = EAGAIN;
      return -1;
    case SSL_ERROR_WANT_WRITE:
      /* A record OpenSSL must send first (a key update): the read waits
       * for EV_WRITE, not EV_READ. */
      ch->tls_state |= SL_TLS_READ_WANTS_WRITE;
      sl_channel_update_reading(ch);
      if (!ev_is_active(&ch->wio)) ev_io_start(ch->w->loop, &ch->wio);
      errno = EAGAIN;
      return -1;
    default: {
      int sys = sl_channel_tls_failure(ch, e, why, wlen);
      errno = sys ? sys : EAGAIN;   /* EAGAIN: why says it, the read ends */
      return -1;
    }
  }
}

int sl_channel_tls_pending(const sl_channel *ch) {
  return ch->ssl != NULL && SSL_has_pending(ch->ssl);
}

/* sl_outq_write_via's writer: one SSL_write_ex of at most a record. */
static ssize_t sl_channel_tls_writev(void *ud, const struct iovec *iov, int n) {
  sl_channel *ch = ud;
  unsigned char scratch[SL_TLS_RECORD];
  const void *p = iov[0].iov_base;
  size_t len = iov[0].iov_len;
  if (n > 1 && len < SL_TLS_RECORD) {
    len = 0;
    for (int i = 0; i < n && len < SL_TLS_RECORD; i++) {
      size_t take = SL_MIN(iov[i].iov_len, SL_TLS_RECORD - len);
      memcpy(scratch + len, iov[i].iov_base, take);
      len += take;
    }
    p = scratch;
  }
  size_t w = 0;
  ERR_clear_error();
  int r = SSL_write_ex(ch->ssl, p, len, &w);
  if (r == 1) return (ssize_t)w;
  int e = SSL_get_error(ch->ssl, r);
  if (e == SSL_ERROR_WANT_WRITE) {
    errno = EAGAIN;
    return -1;
  }
  if (e == SSL_ERROR_WANT_READ) {   /* waits for EV_READ (channel.c) */
    ch->tls_state |= SL_TLS_WRITE_WANTS_READ;
    errno = EAGAIN;
    return -1;
  }
  int sys = sl_channel_tls_failure(ch, e, ch->reason, sizeof(ch->reason));
  errno = sys ? sys : EPROTO;
  return -1;
}

int sl_channel_tls_send(sl_channel *ch, size_t budget, size_t *n, int *e) {
  /* At most a record per call, and never less than the call before offered
   * when it has to be repeated (OpenSSL's rule): the queue's head only
   * grows until bytes are taken. */
  int rc = sl_outq_write_via(&ch->outq, sl_channel_tls_writev, ch, SL_TLS_RECORD, budget, n);
  *e = errno;
  if (rc == SL_ERROR && *e == EPROTO && (ch->tls_state & SL_TLS_FAILED))
    *e = 0;   /* why is in ch->reason */
  return rc;
}

int sl_channel_tls_reset_alert(sl_channel *ch, char *why, size_t len) {
  /* The records before the alert are read and dropped, as the close that
   * follows would drop them; nothing more in the socket: no alert. */
  unsigned char scratch[SL_TLS_RECORD];
  for (int i = 0; i < 8; i++) {
    size_t n = 0;
    ERR_clear_error();
    int r = SSL_read_ex(ch->ssl, scratch, sizeof(scratch), &n);
    if (r == 1) continue;
    int e = SSL_get_error(ch->ssl, r);
    if (e != SSL_ERROR_SSL) break;
    sl_channel_tls_failure(ch, e, why, len);
    return 1;
  }
  ERR_clear_error();
  return 0;
}

void sl_channel_tls_close_notify(sl_channel *ch) {
  if (ch->ssl == NULL ||
      (ch->tls_state & (SL_TLS_UNREADY | SL_TLS_FAILED)) ||
      (SSL_get_shutdown(ch->ssl) & SSL_SENT_SHUTDOWN))
    return;
  /* Best effort: a socket too full for the alert gets the FIN alone. */
  ERR_clear_error();
  SSL_shutdown(ch->ssl);
  ERR_clear_error();
}

void sl_channel_tls_free(sl_channel *ch) {
  free(ch->pp);
  ch->pp = NULL;
  if (ch->ssl == NULL) return;
  SSL_free(ch->ssl);
  ch->ssl = NULL;
}
