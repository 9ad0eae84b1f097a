#include "proxy/bridge.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "buf/buf.h"
#include "io/channel.h"
#include "io/worker.h"
#include "proxy/config.h"
#include "proxy/server.h"
#include "util/common.h"
#include "util/log.h"

typedef struct sl_bridge {
  const sl_listener_cfg *listener;   /* client side only */
} sl_bridge;

static const sl_stage_ops sl_bridge_ops;

static void sl_bridge_on_connect(sl_channel *up, int err) {
  sl_channel *client = up->peer;
  const sl_listener_cfg *l = up->ud;
  if (err) {
    char why[200];
    char a[64];
    snprintf(why, sizeof(why), "upstream %s connect failed: %s",
             sl_addr_format((const struct sockaddr *)&up->remote.ss, a, sizeof(a)),
             err == ETIMEDOUT ? "timed out" : strerror(err));
    up->peer = NULL;
    if (client) {
      client->peer = NULL;
      sl_channel_close(client, why, 1);
    }
    sl_channel_close(up, why, 1);
    return;
  }
  SL_UNUSED(l);
  if (sl_pipeline_add_last(&up->pipe, &sl_bridge_ops, "bridge") == NULL) {
    sl_channel_close(up, "out of memory building the upstream pipeline", 1);
    return;
  }
  sl_channel_activate(up);
  if (client && !sl_channel_is_closed(client)) sl_channel_set_autoread(client, 1);
}

static void sl_bridge_active(sl_ctx *ctx) {
  sl_bridge *br = ctx->state;
  sl_channel *ch = sl_ctx_channel(ctx);
  if (br->listener != NULL && ch->peer == NULL) {
    const sl_upstream_cfg *u = br->listener->upstream;
    const sl_addr *addr = sl_server_pick(ch->w, u);
    sl_channel_config cc = {br->listener->low_water_mark, br->listener->high_water_mark};
    /* Nothing is read from the client until the upstream is there. */
    sl_channel_set_autoread(ch, 0);
    sl_channel *up = sl_channel_connect(ch->w, addr, u->connect_timeout, &cc,
                                        sl_bridge_on_connect, (void *)br->listener,
                                        br->listener->name);
    if (up == NULL) {
      char why[200];
      char a[64];
      snprintf(why, sizeof(why), "upstream %s connect failed: %s",
               sl_addr_format((const struct sockaddr *)&addr->ss, a, sizeof(a)), strerror(errno));
      sl_channel_close(ch, why, 1);
      return;
    }
    sl_channel_join(ch, up);
  }
  sl_ctx_fire_active(ctx);
}

static void sl_bridge_read(sl_ctx *ctx, sl_buf *b) {
  sl_channel *peer = sl_ctx_channel(ctx)->peer;
  if (peer == NULL) {
    sl_buf_release(b);
    return;
  }
  sl_pipeline_write(&peer->pipe, b);
  /* Over the high water mark: write now instead of at the end of the read
   * burst. A socket that takes it all makes the queue writable again and
   * the read loop goes on; one that does not stops reading (backpressure)
   * with the bytes already on their way. */
  if (!sl_channel_is_writable(peer)) sl_pipeline_flush(&peer->pipe);
}

static void sl_bridge_read_complete(sl_ctx *ctx) {
  sl_channel *peer = sl_ctx_channel(ctx)->peer;
  if (peer) sl_pipeline_flush(&peer->pipe);
  sl_ctx_fire_read_complete(ctx);
}

static void sl_bridge_writability(sl_ctx *ctx, int writable) {
  /* Our queue is full: stop reading from the side that fills it. */
  sl_channel *ch = sl_ctx_channel(ctx);
  sl_channel *peer = ch->peer;
  if (peer) {
    if (sl_log_enabled(SL_LOG_DEBUG))
      sl_log(SL_LOG_DEBUG, "%s: %s reading from %s (queue %zu bytes)", ch->desc,
             writable ? "resumed" : "paused", peer->desc, ch->outq.pending);
    sl_channel_set_autoread(peer, writable);
  }
  sl_ctx_fire_writability(ctx, writable);
}

static void sl_bridge_user_event(sl_ctx *ctx, int event) {
  if (event == SL_UEV_INPUT_CLOSED) {
    /* Half-close: the FIN follows everything queued before it. */
    sl_channel *peer = sl_ctx_channel(ctx)->peer;
    if (peer) sl_channel_shutdown_output(peer);
    return;
  }
  sl_ctx_fire_user_event(ctx, event);
}

static const sl_stage_ops sl_bridge_ops = {
    .name = "bridge",
    .state_size = sizeof(sl_bridge),
    .on_active = sl_bridge_active,
    .on_read = sl_bridge_read,
    .on_read_complete = sl_bridge_read_complete,
    .on_writability = sl_bridge_writability,
    .on_user_event = sl_bridge_user_event,
};

sl_ctx *sl_bridge_add_client(sl_pipeline *p, const sl_listener_cfg *listener) {
  sl_ctx *ctx = sl_pipeline_add_last(p, &sl_bridge_ops, "bridge");
  if (ctx) ((sl_bridge *)ctx->state)->listener = listener;
  return ctx;
}
