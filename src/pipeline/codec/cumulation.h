/*
 * The cumulation shared by the C frame decoders: Netty's ByteToMessageDecoder
 * with its MERGE_CUMULATOR, for one connection.
 *
 *   - The first buffer becomes the cumulation without a copy. Later ones are
 *     copied in behind its writer index when they fit (a root's own
 *     capacity), else both are copied into a new pooled buffer of about
 *     twice the size (read bytes are dropped on the way). Incoming buffers
 *     are released once copied.
 *   - After each read the decoder's step runs until it makes no progress;
 *     each frame it returns (a derived buffer: no copy) is fired at once.
 *   - An empty cumulation is released; otherwise, every 16 reads, read bytes
 *     are discarded when nothing else holds the buffer (Netty's
 *     discardSomeReadBytes).
 *   - Inactive: what is left is decoded once more, then passed on.
 *     Removed because the connection closed, or destroyed: the cumulation
 *     is released. Removed from a running pipeline (a protocol switch):
 *     its readable bytes go on to the next stage (Netty's handlerRemoved).
 *   - A step that fails (malformed or oversized frame) fires the error event
 *     with the reason ("frame_too_large", "malformed_frame"), closes the
 *     connection if no stage did, and releases the cumulation; everything
 *     read after that is released at once.
 *
 * Reentrancy: a frame fired downstream may close the connection (inactive,
 * removed) or deliver another read before the step loop ends; the loop
 * notices (busy, removed) and the cumulation is released exactly once.
 */
#ifndef SL_CODEC_CUMULATION_H
#define SL_CODEC_CUMULATION_H

#include <stdint.h>

#include "buf/buf.h"
#include "pipeline/pipeline.h"

#define SL_CUM_DISCARD_AFTER_READS 16

/* Why a decoder closes a connection. */
#define SL_CODEC_TOO_LARGE "frame_too_large"
#define SL_CODEC_MALFORMED "malformed_frame"

typedef struct sl_cum {
  sl_buf *buf;        /* the cumulation (owned), or NULL */
  uint32_t reads;     /* reads since read bytes were last discarded */
  uint8_t busy;       /* inside the step loop */
  uint8_t removed;    /* left the pipeline: nothing more is decoded */
  uint8_t failed;     /* a step failed: the connection is closing */
  uint8_t pass_on;    /* removed from a running pipeline: the rest goes on */
} sl_cum;

/* One decoding step on cum (its readable bytes; the step advances the
 * reader index past what it consumed). Returns a frame (+1), or NULL: with
 * *reason set the stream is bad ("frame_too_large", "malformed_frame", "out
 * of memory"), else there is no frame yet (the loop ends when no byte was
 * consumed). */
typedef sl_buf *(*sl_cum_step_fn)(sl_ctx *ctx, sl_buf *cum, const char **reason);

/* The first member of every decoder's configuration: its step. */
typedef struct sl_cum_conf {
  sl_cum_step_fn step;
} sl_cum_conf;

/* Callbacks for a decoder stage whose state starts with an sl_cum and
 * whose configuration starts with an sl_cum_conf. */
void sl_cum_on_read(sl_ctx *ctx, sl_buf *b);
void sl_cum_on_inactive(sl_ctx *ctx);
void sl_cum_on_removed(sl_ctx *ctx);
void sl_cum_on_destroy(sl_ctx *ctx);

/* The sl_stage_ops initializer of a decoder built on the cumulation. */
#define SL_CUM_DECODER(module, state_sz, conf_sz, configure_fn, unconfigure_fn)                 \
  {                                                                                        \
    .name = (module), .state_size = (state_sz), .conf_size = (conf_sz),                    \
    .configure = (configure_fn), .unconfigure = (unconfigure_fn),                          \
    .destroy = sl_cum_on_destroy, .on_read = sl_cum_on_read,                               \
    .on_inactive = sl_cum_on_inactive, .on_removed = sl_cum_on_removed,                    \
  }

/* A decoder stage's on_read: cumulates in (takes ownership) and decodes. */
void sl_cum_read(sl_ctx *ctx, sl_cum *c, sl_buf *in, sl_cum_step_fn step);

/* on_inactive: decodes what is left, then passes the event on. */
void sl_cum_inactive(sl_ctx *ctx, sl_cum *c, sl_cum_step_fn step);

/* on_removed (ctx) and destroy (ctx NULL): lets go of the cumulation (now,
 * or when the step loop under way ends), as described above. */
void sl_cum_removed(sl_ctx *ctx, sl_cum *c);

/* Adds in (takes ownership) to the cumulation as described above. SL_OK, or
 * SL_ERROR (out of memory: in is released). Exposed for tests. */
int sl_cum_add(sl_cum *c, sl_buf *in);

#endif
