/*
 * The proxy on one worker: its listeners, the pipelines it builds for each
 * accepted connection, its access log lines, and the configurations
 * (generations) its connections still use.
 *
 * Listen sets are shared by all workers: one listen address, one socket per
 * worker, one gate counting the address's connections. The main thread
 * creates them (sluice's runtime) and hands each worker its socket.
 *
 * A reload reaches a worker in two calls on its thread: sl_server_prepare
 * loads the new configuration's Lua stages (nothing changes for traffic),
 * then sl_server_commit switches new connections to it, or
 * sl_server_abort forgets what prepare loaded. Open connections keep the
 * configuration, listener settings and stage tables they started with; a
 * configuration is released by a worker once none of its connections is
 * left.
 */
#ifndef SL_SERVER_H
#define SL_SERVER_H

#include <stdatomic.h>
#include <stddef.h>

#include "io/addr.h"
#include "io/listener.h"
#include "proxy/client_limit.h"

struct sl_worker;
struct sl_config;
struct sl_upstream_cfg;

typedef struct sl_listen_set {
  sl_addr addr;
  char text[64];               /* "127.0.0.1:7000" */
  int *fds;                    /* one per worker; a worker closes its own when dropped */
  int nfds;
  int shared;                  /* 1: fds are descriptors of one socket (systemd's, shared
                                  by the workers), not one SO_REUSEPORT socket each */
  sl_listen_gate gate;
  sl_client_limit clients;     /* connections per client address (max_connections_per_client) */
  _Atomic int backlog;         /* its sockets' listen(2) queue length (a reload may change it) */
  struct sl_listen_set *next;  /* the runtime's list */
} sl_listen_set;

/* Where access log lines go: -1 (off) or a file descriptor that the
 * runtime may swap (dup2) at any time. */
extern _Atomic int sl_access_log_fd;

/* The access log's format: 1 JSON, 0 logfmt (access_log_format; the
 * runtime sets it with the descriptor). */
extern _Atomic int sl_access_log_json;

/* Main thread, before w runs: loads cfg's Lua stages into a new Lua state
 * and starts accepting on sets[i]->fds[w->id] for cfg->listeners[i]. Takes
 * a reference on cfg. SL_OK, or SL_ERROR with a message in err. */
int sl_server_start(struct sl_worker *w, struct sl_config *cfg, sl_listen_set **sets,
                    char *err, size_t errlen);

/* On w's thread: loads cfg's Lua stages. SL_OK or SL_ERROR (message in err,
 * nothing of cfg left loaded). */
int sl_server_prepare(struct sl_worker *w, const struct sl_config *cfg, char *err,
                      size_t errlen);

/* On w's thread: forgets what sl_server_prepare loaded for cfg. */
void sl_server_abort(struct sl_worker *w, const struct sl_config *cfg);

/* On w's thread: new connections use cfg (a reference is taken), accepted
 * on sets[i] for cfg->listeners[i]; the previous configuration's listeners
 * stop accepting, and w closes its socket of each set in dropped (NULL
 * terminated). SL_OK, or SL_ERROR when out of memory (nothing changed). */
int sl_server_commit(struct sl_worker *w, struct sl_config *cfg, sl_listen_set **sets,
                     sl_listen_set **dropped);

struct sl_channel;
struct sl_upstreams;
struct sl_listener_cfg;

/* The listener a client channel was accepted on (the configuration it
 * started with), or NULL for another channel. */
const struct sl_listener_cfg *sl_server_listener_cfg(const struct sl_channel *ch);

/* Turns on TCP keepalive on ch's socket as lc says (nothing when it says
 * off); a refusal is logged, the connection goes on. */
void sl_server_tcp_keepalive(struct sl_channel *ch, const struct sl_listener_cfg *lc);

/* The upstreams (balancing and health state on this worker) of the
 * configuration ch was created under, or NULL outside a server. */
struct sl_upstreams *sl_server_upstreams(const struct sl_channel *ch);

struct sl_worker_gen;

/* The upstreams of generation g on its worker (NULL: none). */
struct sl_upstreams *sl_server_gen_upstreams(struct sl_worker_gen *g);

/* After w's loop has ended: frees the generations and the Lua state, and
 * releases the configurations. */
void sl_server_free(struct sl_worker *w);

#endif
