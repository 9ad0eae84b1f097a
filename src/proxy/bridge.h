/* The bridge stage joins a client channel to an upstream channel: each side
 * writes what it reads into the other, passes end-of-input on as a FIN,
 * and stops the other side's reads while its own queue is over the high
 * water mark. On the client side it also opens the upstream connection. */
#ifndef SL_BRIDGE_H
#define SL_BRIDGE_H

#include "pipeline/pipeline.h"

struct sl_upstream_cfg;
struct sl_listener_cfg;

/* Appends a client-side bridge that connects to the listener's upstream
 * when the client is active (unless a stage connected it already); with
 * listener NULL it only carries bytes once the client has a peer. */
sl_ctx *sl_bridge_add_client(sl_pipeline *p, const struct sl_listener_cfg *listener);

struct sl_channel;

/* ctx:connect: connects client to target (an upstream name or "host:port",
 * see sl_upstream_resolve), appending a bridge when the pipeline has none.
 * SL_OK while connecting; SL_ERROR with *err ("closed", "already connected
 * to an upstream", a bad target, "upstream unavailable" when every try
 * failed at once and the client was closed). Borrows target. */
int sl_bridge_connect(struct sl_channel *client, const char *target, const char **err);

#endif
