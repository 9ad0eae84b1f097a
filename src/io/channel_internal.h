/*
 * What channel.c and channel_splice.c share, for the io module alone (the
 * rest of sluice uses channel.h).
 */
#ifndef SL_CHANNEL_INTERNAL_H
#define SL_CHANNEL_INTERNAL_H

#include <stddef.h>
#include <sys/types.h>

#include "io/channel.h"

/* channel.c */

/* Starts or stops the read watcher as the flags say. */
void sl_channel_update_reading(sl_channel *ch);
/* Starts ch's EV_WRITE watcher for bytes that wait for its socket (its
 * queue, or its peer's pipe), and the write timeout's clock with it. */
void sl_channel_wait_writable(sl_channel *ch);
/* Closes ch after a failed write (errno e), with the reason. */
void sl_channel_write_failed(sl_channel *ch, int e);
/* The socket's input ended (EOF): the pipeline hears of it; a channel whose
 * output is closed too closes. */
void sl_channel_input_closed(sl_channel *ch);
/* What a failed read (recv or splice: -1 with errno e) means: 1, try again
 * (EINTR); 0, stop: the socket is empty (why stays empty) or failed (why
 * and *code say how, for the close). */
int sl_channel_read_error(int e, char *why, size_t len, const char **code);

/* channel_splice.c */

/* Gives the channel's pipe back to the worker's pool (closed unless empty). */
void sl_channel_pipe_put(sl_channel *ch);
/* Moves what a clean-closing channel's pipe holds into its peer's queue;
 * returns the bytes that could not move. */
size_t sl_channel_pipe_hand_on(sl_channel *ch);
/* Moves what src's pipe holds into its peer's socket: SL_OK (all of it),
 * SL_AGAIN (the peer's socket is full) or SL_ERROR (the peer failed and was
 * closed). The caller holds a reference on src. */
int sl_channel_splice_drain(sl_channel *src);
/* One wake-up's reads through the pipe: SL_OK, or SL_DECLINED when the
 * caller must read into buffers instead. */
int sl_channel_splice_read(sl_channel *ch);

/* channel_tls.c */

/* The most plaintext a TLS record carries (SSL3_RT_MAX_PLAIN_LENGTH): the
 * largest read and the largest write through TLS. */
#define SL_CHANNEL_TLS_RECORD 16384

/* One handshake step, as its watcher or the accept asks. */
void sl_channel_tls_handshake(sl_channel *ch);
/* ch closes (an idle timeout, a stage, a stop) before its handshake ended:
 * the accept's done(ch, ECONNABORTED) hears of it, from inside the close. */
void sl_channel_tls_abandon(sl_channel *ch);
/* The handshake's time is up: ch closes. */
void sl_channel_tls_timeout(sl_channel *ch);
/* recv through TLS: bytes read, 0 at the input's end, -1 with errno
 * (EAGAIN: nothing now, or a TLS failure whose "tls_error (...)" is in
 * why; another: a socket error). */
ssize_t sl_channel_tls_recv(sl_channel *ch, void *p, size_t len, char *why, size_t wlen);
/* 1 when OpenSSL holds bytes not yet read (the socket may be empty). */
int sl_channel_tls_pending(const sl_channel *ch);
/* sl_outq_write through TLS. SL_ERROR: *e the errno value, or 0 when a TLS
 * failure's text is in ch->reason. */
int sl_channel_tls_send(sl_channel *ch, size_t budget, size_t *n, int *e);
/* A write to ch's socket found a reset: 1 with "tls_error (...)" in why
 * when an alert the peer sent before it is still to be read (a TLS 1.3
 * server that refuses the client's certificate once the client's side of
 * the handshake is done), else 0. */
int sl_channel_tls_reset_alert(sl_channel *ch, char *why, size_t len);
/* Sends close_notify when the session is up and has not sent it. */
void sl_channel_tls_close_notify(sl_channel *ch);
/* Frees ch's SSL (its close). */
void sl_channel_tls_free(sl_channel *ch);

#endif
