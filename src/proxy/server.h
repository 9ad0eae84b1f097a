/* The proxy on one worker: its listeners, and the pipelines it builds for
 * each accepted connection. */
#ifndef SL_SERVER_H
#define SL_SERVER_H

#include <stddef.h>

#include "io/addr.h"

struct sl_worker;
struct sl_config;
struct sl_upstream_cfg;

/* Opens every listener of cfg on w and loads its Lua stages. SL_OK, or
 * SL_ERROR with a message in err (nothing is left open). */
int sl_server_start(struct sl_worker *w, const struct sl_config *cfg, char *err, size_t errlen);

/* Closes the listeners and frees the server and the Lua host (after the
 * worker's channels are gone). */
void sl_server_free(struct sl_worker *w);

#endif
