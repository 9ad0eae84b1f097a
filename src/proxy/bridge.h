/* The bridge stage joins a client channel to an upstream channel: each side
 * writes what it reads into the other, passes end-of-input on as a FIN,
 * and stops the other side's reads while its own queue is over the high
 * water mark. On the client side it also opens the upstream connection. */
#ifndef SL_BRIDGE_H
#define SL_BRIDGE_H

#include "pipeline/pipeline.h"

struct sl_upstream_cfg;
struct sl_listener_cfg;

/* Appends a client-side bridge that connects to up when the client is active. */
sl_ctx *sl_bridge_add_client(sl_pipeline *p, const struct sl_listener_cfg *listener);

#endif
