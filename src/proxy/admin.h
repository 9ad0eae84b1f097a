/*
 * The admin endpoint: a small HTTP/1.1 server on a thread of its own with
 * its own ev_loop, off the data path. It answers GET only, one request per
 * connection (Connection: close), requests of at most 8 KiB:
 *
 *   /health   200 "ok" while running, 503 "draining" after SIGTERM/SIGINT,
 *             503 "stuck: ..." while a worker is stuck in Lua (proxy/watchdog.h)
 *   /metrics  Prometheus text format (docs/operations.md lists the names)
 *   /memory   the memory summary: pool memory by arena and worker, the
 *             live buffers by listener and by the stage holding them, the
 *             outbound queues, the Lua heaps
 *
 * Anything else: 400 (malformed or too large), 404 (unknown path), 405
 * (another method). Worker state is read through snapshots each worker
 * builds on its own thread (proxy/metrics.h); the arenas' counters are read
 * under their own locks.
 */
#ifndef SL_ADMIN_H
#define SL_ADMIN_H

#include <stddef.h>

#include "io/addr.h"

struct sl_worker;
struct sl_alloc;
typedef struct sl_admin sl_admin;

/* Main thread: binds addr (text is its "host:port" for messages). Returns
 * the endpoint, not yet serving, or NULL with a message in err. workers
 * (n of them) and alloc are borrowed until sl_admin_stop. */
sl_admin *sl_admin_create(const sl_addr *addr, const char *text, struct sl_worker **workers,
                          int n, struct sl_alloc *alloc, char *err, size_t errlen);

/* Starts the endpoint's thread. SL_OK or SL_ERROR (errno). */
int sl_admin_start(sl_admin *a);

/* The endpoint's listening socket (borrowed), for a new sluice to inherit
 * (proxy/upgrade.h). */
int sl_admin_fd(const sl_admin *a);

/* 1 when that socket is one systemd passed (socket activation, passed on
 * as such to a new sluice), else 0. */
int sl_admin_shared(const sl_admin *a);

/* Any thread: a new sluice has taken over the listening sockets: this one
 * stops accepting admin connections (those open are answered) and closes
 * its copy of the socket, so that every request goes to the new one. */
void sl_admin_hand_over(sl_admin *a);

/* Any thread: /health answers 503 "draining" from now on. */
void sl_admin_set_draining(sl_admin *a);

/* Any thread: n workers are stuck (proxy/watchdog.h), n may be 0 (none
 * any more); while n > 0 /health answers 503 with why (copied, one line;
 * the caller picks which stuck worker's report), /metrics counts them. */
void sl_admin_set_stuck(sl_admin *a, int n, const char *why);

/* Main thread: a reload (SIGHUP) was applied (1) or refused (0), for
 * /metrics. a may be NULL. */
void sl_admin_note_reload(sl_admin *a, int applied);

/* Main thread: new connections got other servers because host names
 * answered differently (resolve_interval_ms), for /metrics. a may be NULL. */
void sl_admin_note_dns_change(sl_admin *a);

/* Stops the thread (closing open admin connections), frees everything.
 * a may be NULL. */
void sl_admin_stop(sl_admin *a);

#endif
