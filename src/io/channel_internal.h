/*
 * What channel.c and channel_splice.c share, for the io module alone (the
 * rest of sluice uses channel.h).
 */
#ifndef SL_CHANNEL_INTERNAL_H
#define SL_CHANNEL_INTERNAL_H

#include <stddef.h>

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

#endif
