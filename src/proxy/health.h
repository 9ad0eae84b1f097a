/*
 * Active health checks of one upstream on one worker: every interval, each
 * server gets a non-blocking connect that must complete within the timeout,
 * then the check's steps run in order (as HAProxy's tcp-check send and
 * expect string/rstring): a send step writes its bytes; an expect step
 * reads until the bytes read since the previous expect step's match
 * contain its bytes (expect) or match its POSIX extended regex
 * (expect_regex), and what follows that match is what the next expect step
 * searches. The shorthand send/expect is the steps { send }, { expect }.
 * A check reads at most SL_HEALTH_READ_MAX bytes. All of it within the
 * timeout; then the socket is closed. A failed step is named in the log
 * ("step 3: expected /role:master/ not found in 57 bytes read (timed
 * out)"). With the upstream's send_proxy, a PROXY header without an
 * address goes first. `fails` failed checks in a row mark a server down
 * (sl_peer.check_down: the balancer skips it), `passes` passed checks in a
 * row mark it up again. Servers start up.
 *
 * Every worker checks for itself, so that its balancer's view needs no
 * locks: W workers make W connects per server and interval. The watchers do
 * not keep the worker's loop running, and no check starts once the worker
 * is stopping.
 */
#ifndef SL_HEALTH_H
#define SL_HEALTH_H

#include "proxy/balance.h"

/* The bytes one check reads at most: a server that sends more without what
 * an expect step wants fails the check. */
#define SL_HEALTH_READ_MAX 16384

struct sl_worker;
struct sl_upstream_cfg;
typedef struct sl_health sl_health;

/* Starts checking u's servers on w, writing results into b->peers (which
 * must outlive the checks). Borrows u and b. NULL on ENOMEM. */
sl_health *sl_health_start(struct sl_worker *w, const struct sl_upstream_cfg *u, sl_balancer *b);

/* Stops every timer, closes the checks in flight and frees h. NULL is fine. */
void sl_health_stop(sl_health *h);

#endif
