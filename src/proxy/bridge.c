#include "proxy/bridge.h"

#include <string.h>
#include <sys/socket.h>

#include "buf/buf.h"
#include "io/addr.h"
#include "io/channel.h"
#include "io/worker.h"
#include "proxy/config.h"
#include "proxy/server.h"
#include "proxy/upstream.h"
#include "util/common.h"
#include "util/log.h"

typedef struct sl_bridge {
  const sl_listener_cfg *listener;   /* client side only */
} sl_bridge;

static const sl_stage_ops sl_bridge_ops;

/* Whether the bridge is p's only stage. */
static int sl_bridge_alone(const sl_pipeline *p) {
  const sl_ctx *first = p->head.next;
  return first != &p->tail && first->ops == &sl_bridge_ops && first->next == &p->tail;
}

/* Whether the peer of ch's socket is on the loopback interface: a
 * loopback address, or one of this machine's own (the socket's local
 * address: the kernel routes those over loopback too). The socket's own
 * peer, not ch->remote: a PROXY protocol header replaces the client's
 * remote with the address it advertises, but what is written to the
 * socket is read by the process at its other end. */
static int sl_bridge_peer_is_loopback(const sl_channel *ch) {
  /* Remote is the socket's peer unless something set it (the address an
   * upstream connected to, or a client's from accept): no call needed
   * when that is a loopback address. */
  if (!(ch->flags & SL_CH_REMOTE_SET) &&
      sl_addr_is_loopback((const struct sockaddr *)&ch->remote.ss))
    return 1;
  sl_addr peer, self;
  peer.len = self.len = sizeof(peer.ss);
  if (getpeername(ch->fd, (struct sockaddr *)&peer.ss, &peer.len) != 0)
    return sl_addr_is_loopback((const struct sockaddr *)&ch->remote.ss);
  if (sl_addr_is_loopback((const struct sockaddr *)&peer.ss)) return 1;
  return getsockname(ch->fd, (struct sockaddr *)&self.ss, &self.len) == 0 &&
         sl_addr_same_host((const struct sockaddr *)&peer.ss, (const struct sockaddr *)&self.ss);
}

/* The upstream is connected and joined to its client: it gets its own
 * bridge, and the client is read from again. A pass-through pair (no
 * stage but the bridges) may splice (sl_channel_allow_splice) as its
 * listener's splice says: each side into the other, or with "auto" each
 * side into a socket whose peer is off the loopback interface. */
static void sl_bridge_on_connect(sl_channel *up) {
  sl_channel *client = up->peer;
  if (sl_pipeline_add_last(&up->pipe, &sl_bridge_ops, "bridge") == NULL) {
    sl_channel_close(up, "out of memory building the upstream pipeline", 1);
    return;
  }
  const sl_listener_cfg *lc = client != NULL ? sl_server_listener_cfg(client) : NULL;
  if (lc != NULL) {
    sl_server_tcp_keepalive(up, lc);
    if (lc->splice != SL_SPLICE_OFF && sl_bridge_alone(&client->pipe)) {
      int all = lc->splice == SL_SPLICE_ON;
      if (all || !sl_bridge_peer_is_loopback(up)) sl_channel_allow_splice(client);
      if (all || !sl_bridge_peer_is_loopback(client)) sl_channel_allow_splice(up);
    }
  }
  sl_channel_activate(up);
  if (client && !sl_channel_is_closed(client)) sl_channel_set_autoread(client, 1);
}

static void sl_bridge_active(sl_ctx *ctx) {
  sl_bridge *br = ctx->state;
  sl_channel *ch = sl_ctx_channel(ctx);
  /* No upstream yet (a Lua stage may have chosen one with ctx:connect). */
  if (br->listener != NULL && ch->peer == NULL) {
    sl_channel_config cc;
    sl_listener_channel_config(br->listener, &cc);
    sl_upstream_connect(ch, br->listener->upstream, NULL, &cc, br->listener->name,
                        sl_bridge_on_connect);
  }
  sl_ctx_fire_active(ctx);
  /* Speculative I/O: what the client sent already goes out with the
   * connect (sl_channel_flush tries the write at once), which then needs
   * no wait for EV_WRITE; nothing there costs one recv. */
  if (ch->peer != NULL && (ch->peer->flags & SL_CH_CONNECTING)) sl_channel_read_now(ch);
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
      sl_log(SL_LOG_DEBUG, "%s: %s reading from %s (queue %zu bytes)",
             sl_channel_describe(ch), writable ? "resumed" : "paused", sl_channel_describe(peer),
             ch->outq.pending);
    sl_channel_set_autoread(peer, writable);
  }
  sl_ctx_fire_writability(ctx, writable);
}

static void sl_bridge_user_event(sl_ctx *ctx, int event) {
  if (event == SL_UEV_INPUT_CLOSED) {
    /* Half-close: the FIN follows everything queued before it. A listener
     * with half_close = false ends the pair once it is sent
     * (sl_channel_output_done). */
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

int sl_bridge_connect(sl_channel *client, const char *target, const char **err) {
  const sl_upstream_cfg *u = NULL;
  sl_addr addr;
  if (sl_channel_is_closed(client)) {
    *err = "closed";
    return SL_ERROR;
  }
  if (client->peer != NULL) {
    *err = "already connected to an upstream";
    return SL_ERROR;
  }
  const sl_listener_cfg *lc = sl_server_listener_cfg(client);
  if (lc == NULL) {
    *err = "not a client connection";
    return SL_ERROR;
  }
  if (sl_upstream_resolve(client, target, &u, &addr, err) != SL_OK) return SL_ERROR;
  /* A listener without an upstream has no bridge yet: the last stage. */
  sl_ctx *c = client->pipe.head.next;
  while (c != &client->pipe.tail && c->ops != &sl_bridge_ops) c = c->next;
  if (c == &client->pipe.tail && sl_bridge_add_client(&client->pipe, NULL) == NULL) {
    *err = "out of memory";
    return SL_ERROR;
  }
  sl_channel_config cc;
  sl_listener_channel_config(lc, &cc);
  if (sl_upstream_connect(client, u, u ? NULL : &addr, &cc, lc->name, sl_bridge_on_connect) !=
      SL_OK) {
    *err = "upstream unavailable";
    return SL_ERROR;
  }
  return SL_OK;
}
