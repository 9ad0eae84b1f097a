/*
 * Upstreams on one worker: the balancing state of every upstream of a
 * config (src/proxy/balance.h), its health checks (src/proxy/health.h), and
 * the way a client connection reaches its upstream: pick a server, connect,
 * on a failed or timed-out connect try the next one, up to `tries`.
 *
 * Each worker has its own sl_upstreams per configuration it runs (the
 * server keeps one per generation): it balances its own connections and
 * counts its own active connections and failures, with no locks (a client
 * and its upstream connection live on one worker).
 *
 * Lifetime: the creator holds one reference; every connection in progress
 * or open holds another (so a set replaced by a config reload stays valid
 * for the connections that still use it). Health checks stop when the
 * creator lets go.
 */
#ifndef SL_UPSTREAM_H
#define SL_UPSTREAM_H

#include <stddef.h>

#include "io/addr.h"

struct sl_worker;
struct sl_config;
struct sl_channel;
struct sl_channel_config;
struct sl_upstream_cfg;
struct sl_peer;
struct sl_metrics_server;
typedef struct sl_upstreams sl_upstreams;

/* How long a connect to a plain address (ctx:connect("host:port")) may take. */
#define SL_UPSTREAM_ADDRESS_TIMEOUT 5.0

/* Called once the upstream channel is connected and joined to its client
 * (up->peer): the caller builds its pipeline and activates it. */
typedef void (*sl_upstream_ready_fn)(struct sl_channel *up);

/* Creates w's state for every upstream of cfg and starts their health
 * checks (their watchers do not keep the loop running). Borrows cfg, which
 * must outlive the set. NULL on ENOMEM. */
sl_upstreams *sl_upstreams_create(struct sl_worker *w, const struct sl_config *cfg);

/* Gives the servers of s that from has too (same upstream name, same
 * address) from's health: failed connects in a row, a passive mark, a
 * health check holding it down, and the TLS session to resume (same TLS
 * context). For a configuration that replaces from's
 * only because host names answered differently: a server that stays keeps
 * its state. Either may be NULL. */
void sl_upstreams_inherit(sl_upstreams *s, const sl_upstreams *from);

/* Stops the health checks (a configuration that new connections no longer
 * use); servers they held down count as up again. NULL is fine. */
void sl_upstreams_stop_checks(sl_upstreams *s);

/* Stops the health checks and drops the creator's reference. NULL is fine. */
void sl_upstreams_destroy(sl_upstreams *s);

/* What sl_upstream_resolve returns for "name:port" with a host name. */
#define SL_UPSTREAM_HOST_NAME 1

/* Resolves a ctx:connect target for client: the name of an upstream of the
 * configuration the client started with (*u set), or "host:port" with a
 * numeric IPv4 host, an IPv6 host in brackets or localhost (*u NULL, *addr
 * filled): SL_OK. Or "name:port" with a host name (sl_addr_is_host_name):
 * SL_UPSTREAM_HOST_NAME with the name in host (256 bytes) and *port; the
 * caller looks it up. SL_ERROR with *err otherwise. */
int sl_upstream_resolve(const struct sl_channel *client, const char *target,
                        const struct sl_upstream_cfg **u, sl_addr *addr, char *host, int *port,
                        const char **err);

/* Connects client to upstream u (balanced, retried, with passive health,
 * using the upstream state of the client's configuration) or,
 * when u is NULL, to addr (one try). Stops reading from the client until the
 * upstream is there; the connecting channel is joined to the client, so a
 * client that closes meanwhile abandons the attempt. When every try has
 * failed, the client is closed with the reason "upstream_unavailable" and a
 * line naming the servers tried is logged. cc configures the upstream
 * channel and for_name names the listener in its log lines (both copied). Returns SL_OK while a connect is under way, SL_ERROR
 * when the client is closed (already, or because every try failed at once). */
int sl_upstream_connect(struct sl_channel *client, const struct sl_upstream_cfg *u,
                        const sl_addr *addr, const struct sl_channel_config *cc,
                        const char *for_name, sl_upstream_ready_fn ready);

/* The server counters of a connected upstream channel (a plain address's
 * under SL_METRICS_DIRECT), until its close has added its bytes to them;
 * NULL for any other channel (a client, one still connecting). Borrowed. */
struct sl_metrics_server *sl_upstream_metrics_of(const struct sl_channel *ch);

/* Calls fn for every server of every upstream of s (NULL: none), with its
 * upstream, the upstream's index in the configuration and the server's. */
typedef void (*sl_upstreams_peer_fn)(void *ud, const struct sl_upstream_cfg *u, size_t ui,
                                     size_t index, const struct sl_peer *p);
void sl_upstreams_each(const sl_upstreams *s, sl_upstreams_peer_fn fn, void *ud);

#endif
