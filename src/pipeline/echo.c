/* sluice.stages.echo: a service in the pipeline. Writes every inbound buffer
 * back to the peer, flushes after each read burst, and stops reading while
 * the peer does not keep up (the outbound queue is over its high mark). */
#include "io/channel.h"
#include "pipeline/stages.h"

static void sl_echo_read(sl_ctx *ctx, sl_buf *b) { sl_ctx_write(ctx, b); }

static void sl_echo_read_complete(sl_ctx *ctx) { sl_ctx_flush(ctx); }

static void sl_echo_writability(sl_ctx *ctx, int writable) {
  sl_channel_set_autoread(sl_ctx_channel(ctx), writable);
  sl_ctx_fire_writability(ctx, writable);
}

const sl_stage_ops sl_stage_echo = {
    .name = "sluice.stages.echo",
    .on_read = sl_echo_read,
    .on_read_complete = sl_echo_read_complete,
    .on_writability = sl_echo_writability,
};
