/*
 * Active health checks of one upstream on one worker: every interval, each
 * server gets a non-blocking connect that must complete within the timeout;
 * with `send`, those bytes are written; with `expect`, the server's answer
 * must contain those bytes within its first 4 KiB (as HAProxy's tcp-check
 * send/expect). All of it within the timeout; then the socket is closed.
 * With the upstream's send_proxy, a PROXY header without an address goes
 * before `send`. `fails` failed checks in a row mark
 * a server down (sl_peer.check_down: the balancer skips it), `passes`
 * passed checks in a row mark it up again. Servers start up.
 *
 * Every worker checks for itself, so that its balancer's view needs no
 * locks: W workers make W connects per server and interval. The watchers do
 * not keep the worker's loop running, and no check starts once the worker
 * is stopping.
 */
#ifndef SL_HEALTH_H
#define SL_HEALTH_H

#include "proxy/balance.h"

struct sl_worker;
struct sl_upstream_cfg;
typedef struct sl_health sl_health;

/* Starts checking u's servers on w, writing results into b->peers (which
 * must outlive the checks). Borrows u and b. NULL on ENOMEM. */
sl_health *sl_health_start(struct sl_worker *w, const struct sl_upstream_cfg *u, sl_balancer *b);

/* Stops every timer, closes the checks in flight and frees h. NULL is fine. */
void sl_health_stop(sl_health *h);

#endif
