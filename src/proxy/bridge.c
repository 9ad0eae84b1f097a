#include "proxy/bridge.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "buf/buf.h"
#include "io/addr.h"
#include "io/channel.h"
#include "io/worker.h"
#include "proxy/config.h"
#include "proxy/resolver.h"
#include "proxy/server.h"
#include "proxy/upstream.h"
#include "util/common.h"
#include "util/log.h"

typedef struct sl_bridge_lookup sl_bridge_lookup;

typedef struct sl_bridge {
  const sl_listener_cfg *listener;   /* client side only */
  /* Client side, while ctx:connect's host name is being looked up: the
   * lookup, what the client sent meanwhile (passed on once connected) and
   * whether its FIN came. */
  sl_bridge_lookup *lookup;
  sl_buf **held;
  uint32_t nheld, cap;
  size_t held_bytes;
  int fin_held;
} sl_bridge;

/* A lookup for ctx:connect("name:port"): the resolver answers it and the
 * worker runs sl_bridge_lookup_done. */
struct sl_bridge_lookup {
  sl_lookup l;                       /* first: the resolver's part */
  sl_channel *client;                /* NULL once the client is gone */
  int port;
};

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
  /* Reading resumes unless what the client sent meanwhile filled the
   * upstream's queue past its high mark already (its writability brings
   * reading back). */
  if (client && !sl_channel_is_closed(client) && sl_channel_is_writable(up))
    sl_channel_set_autoread(client, 1);
}

static void sl_bridge_active(sl_ctx *ctx) {
  sl_bridge *br = ctx->state;
  sl_channel *ch = sl_ctx_channel(ctx);
  /* No upstream yet (a Lua stage may have chosen one with ctx:connect). */
  if (br->listener != NULL && ch->peer == NULL && br->lookup == NULL) {
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

/* Keeps b until the lookup under way connects the client. */
static void sl_bridge_hold(sl_ctx *ctx, sl_bridge *br, sl_buf *b) {
  if (br->nheld == br->cap) {
    uint32_t cap = br->cap ? br->cap * 2 : 8;
    sl_buf **grown = realloc(br->held, cap * sizeof(*grown));
    if (grown == NULL) {
      sl_buf_release(b);
      sl_channel_close(sl_ctx_channel(ctx), "out of memory holding bytes for the upstream", 1);
      return;
    }
    br->held = grown;
    br->cap = cap;
  }
  br->held[br->nheld++] = b;
  /* A stage that turned reading on again during the lookup: no more than
   * a high water mark waits here. */
  br->held_bytes += sl_buf_readable(b);
  sl_channel *ch = sl_ctx_channel(ctx);
  if (br->held_bytes > ch->outq.high) sl_channel_set_autoread(ch, 0);   /* the listener's mark */
}

/* Releases what the bridge holds (the client closed, or its lookup failed). */
static void sl_bridge_drop_held(sl_bridge *br) {
  for (uint32_t i = 0; i < br->nheld; i++) sl_buf_release(br->held[i]);
  free(br->held);
  br->held = NULL;
  br->nheld = br->cap = 0;
  br->held_bytes = 0;
  br->fin_held = 0;
}

static void sl_bridge_read(sl_ctx *ctx, sl_buf *b) {
  sl_channel *peer = sl_ctx_channel(ctx)->peer;
  if (peer == NULL) {
    sl_bridge *br = ctx->state;
    if (br->lookup != NULL) sl_bridge_hold(ctx, br, b);
    else sl_buf_release(b);
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
    sl_bridge *br = ctx->state;
    if (peer) sl_channel_shutdown_output(peer);
    else if (br->lookup != NULL) br->fin_held = 1;
    return;
  }
  sl_ctx_fire_user_event(ctx, event);
}

static void sl_bridge_removed(sl_ctx *ctx) {
  sl_bridge *br = ctx->state;
  if (br->lookup != NULL) br->lookup->client = NULL;   /* its answer finds no one */
  br->lookup = NULL;
  sl_bridge_drop_held(br);
}

static const sl_stage_ops sl_bridge_ops = {
    .name = "bridge",
    .state_size = sizeof(sl_bridge),
    .on_removed = sl_bridge_removed,
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

/* The client's bridge (the last stage), or NULL. */
static sl_bridge *sl_bridge_of(sl_channel *client) {
  for (sl_ctx *c = client->pipe.head.next; c != &client->pipe.tail; c = c->next)
    if (c->ops == &sl_bridge_ops) return c->state;
  return NULL;
}

/* Connects client to addr (one try), then hands the upstream what the
 * bridge held while a lookup ran. */
static int sl_bridge_connect_to(sl_channel *client, sl_bridge *br, const sl_upstream_cfg *u,
                                const sl_addr *addr) {
  const sl_listener_cfg *lc = sl_server_listener_cfg(client);
  sl_channel_config cc;
  sl_listener_channel_config(lc, &cc);
  if (sl_upstream_connect(client, u, u ? NULL : addr, &cc, lc->name, sl_bridge_on_connect) !=
      SL_OK)
    return SL_ERROR;   /* client closed: its bridge (br) let go of what it held */
  sl_channel *peer = client->peer;
  uint32_t n = br->nheld;
  for (uint32_t i = 0; i < n; i++) sl_pipeline_write(&peer->pipe, br->held[i]);
  br->nheld = 0;
  if (n > 0) sl_pipeline_flush(&peer->pipe);   /* queued until the connect completes */
  if (br->fin_held) sl_channel_shutdown_output(peer);
  sl_bridge_drop_held(br);
  return SL_OK;
}

/* The resolver answered a ctx:connect host name (on the client's worker,
 * or with w NULL when sluice stopped first). */
static void sl_bridge_lookup_done(sl_worker *w, sl_worker_msg *msg) {
  sl_bridge_lookup *lk = (sl_bridge_lookup *)(void *)msg;   /* msg is its first member */
  sl_channel *client = w != NULL ? lk->client : NULL;
  sl_bridge *br = client != NULL ? sl_bridge_of(client) : NULL;
  if (br == NULL) {   /* the client went first */
    free(lk);
    return;
  }
  br->lookup = NULL;
  sl_channel_ref(client);   /* a close below must not free it under us */
  sl_addr addr;
  if (lk->l.rc != SL_OK ||
      sl_addr_parse(&addr, lk->l.text[lk->l.pick], lk->port) != SL_OK) {
    sl_log(SL_LOG_WARN, "%s: ctx:connect: cannot resolve %s: %s", sl_channel_describe(client),
           lk->l.host, lk->l.rc != SL_OK && lk->l.why ? lk->l.why : "no usable address");
    sl_channel_close(client, "upstream_unavailable", 1);   /* the bridge drops what it held */
  } else {
    sl_bridge_connect_to(client, br, NULL, &addr);
  }
  sl_channel_unref(client);
  free(lk);
}

/* Starts looking host up for client (reading from it paused meanwhile). */
static int sl_bridge_look_up(sl_channel *client, sl_bridge *br, const char *host, int port,
                             const char **err) {
  sl_resolver *r = sl_resolver_shared();
  if (r == NULL) {
    *err = "host names are not resolved here";
    return SL_ERROR;
  }
  char text[46];
  int family;
  sl_addr addr;
  if (sl_resolver_cached(r, host, text, &family) == SL_OK &&
      sl_addr_parse(&addr, text, port) == SL_OK) {
    if (sl_bridge_connect_to(client, br, NULL, &addr) != SL_OK) {
      *err = "upstream unavailable";
      return SL_ERROR;
    }
    return SL_OK;
  }
  sl_bridge_lookup *lk = calloc(1, sizeof(*lk));
  if (lk == NULL) {
    *err = "out of memory";
    return SL_ERROR;
  }
  lk->l.msg.fn = sl_bridge_lookup_done;
  lk->l.w = client->w;
  snprintf(lk->l.host, sizeof(lk->l.host), "%s", host);
  lk->client = client;
  lk->port = port;
  if (sl_resolver_start_lookup(r, &lk->l, err) != SL_OK) {
    free(lk);
    return SL_ERROR;
  }
  br->lookup = lk;
  sl_channel_set_autoread(client, 0);   /* until connected, as for an address */
  return SL_OK;
}

int sl_bridge_connect(sl_channel *client, const char *target, const char **err) {
  const sl_upstream_cfg *u = NULL;
  sl_addr addr;
  if (sl_channel_is_closed(client)) {
    *err = "closed";
    return SL_ERROR;
  }
  sl_bridge *br = sl_bridge_of(client);
  if (client->peer != NULL || (br != NULL && br->lookup != NULL)) {
    *err = "already connected to an upstream";
    return SL_ERROR;
  }
  const sl_listener_cfg *lc = sl_server_listener_cfg(client);
  if (lc == NULL) {
    *err = "not a client connection";
    return SL_ERROR;
  }
  char host[256];
  int port = 0;
  int kind = sl_upstream_resolve(client, target, &u, &addr, host, &port, err);
  if (kind == SL_ERROR) return SL_ERROR;
  /* A listener without an upstream has no bridge yet: the last stage. */
  if (br == NULL) {
    sl_ctx *c = sl_bridge_add_client(&client->pipe, NULL);
    if (c == NULL) {
      *err = "out of memory";
      return SL_ERROR;
    }
    br = c->state;
  }
  if (kind == SL_UPSTREAM_HOST_NAME) return sl_bridge_look_up(client, br, host, port, err);
  if (sl_bridge_connect_to(client, br, u, &addr) != SL_OK) {
    *err = "upstream unavailable";
    return SL_ERROR;
  }
  return SL_OK;
}
