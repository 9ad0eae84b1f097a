/*
 * The Lua watchdog (lua_timeout_ms): ticks on the main thread, between
 * signals, and watches each worker's Lua state (lua/host.h,
 * sl_lua_host_progress).
 *
 *   - A callback still running lua_timeout_ms after the watchdog first saw
 *     it is interrupted (sl_lua_host_interrupt): the stage raises
 *     "ran longer than lua_timeout_ms", its connection closes, the worker
 *     goes on.
 *   - One still running lua_timeout_ms after that did not see the interrupt
 *     (a loop the JIT compiled, a C call that does not return), or caught
 *     the error and went on (pcall in a loop: raised again, the step stays,
 *     lua/host.c): the worker is stuck. That is logged once (worker, stage,
 *     callback, how long), its listening sockets leave their SO_REUSEPORT
 *     groups (shutdown SHUT_RD: the other workers take the new
 *     connections), and the admin endpoint's /health answers 503.
 *   - A stuck worker seen running again (its step moved, or it is out of
 *     Lua: the C call returned, the loop ended) is no longer stuck: its
 *     sockets rejoin their groups (listen again) and the worker, woken,
 *     accepts on them again (io/listener.h, sl_listener_retry); that is
 *     logged once, and /health answers 200 again when no worker is left
 *     stuck. A loop that never ends stays stuck until sluice is restarted.
 *
 * A callback is known to the watchdog from the first tick that sees it, so
 * one is stopped between lua_timeout_ms and lua_timeout_ms plus a tick
 * (sl_watchdog_period) after it started.
 */
#ifndef SL_WATCHDOG_H
#define SL_WATCHDOG_H

#include <pthread.h>
#include <stdint.h>

struct sl_worker;
struct sl_admin;
struct sl_listen_set;

/* One worker as the watchdog saw it. States: WATCHING (stuck 0) ->
 * STUCK (stuck 1: step is the callback it is stuck in, since when that was
 * first seen) -> WATCHING again once it runs again. */
typedef struct sl_watchdog_entry {
  uint64_t step;      /* the worker's step when last seen */
  double since;       /* when that step was first seen busy (seconds, monotonic) */
  int seen;           /* step and since are set */
  int interrupted;    /* the interrupt was sent for step */
  int stuck;          /* declared stuck, until it runs again */
  double stuck_at;    /* when it was declared stuck (SL_WATCHDOG_STUCK) */
  double began;       /* after SL_WATCHDOG_RECOVERED: when the callback it was
                         stuck in was first seen */
  /* Set by sl_watchdog_tick when it declares the worker stuck: */
  char stage[64];     /* the stage the stuck callback's event went to */
  char cb[64];        /* that callback */
  char why[256];      /* the report (log line, /health) */
} sl_watchdog_entry;

typedef struct sl_watchdog {
  sl_watchdog_entry *e;         /* one per worker */
  int n;
  int nstuck;                   /* entries with stuck set */
  int stopping;                 /* the workers were asked to stop: one that runs
                                   again keeps its sockets out (it closes them) */
  int shared;                   /* the listening sockets are shared with a new sluice
                                   (proxy/upgrade.h): a stuck worker's stay in their
                                   groups, the new one's workers accept on them */
} sl_watchdog;

/* Seconds between ticks for timeout_ms (a quarter of it, 10 ms to 250 ms);
 * 0 when timeout_ms is 0 (no watchdog). */
double sl_watchdog_period(int timeout_ms);

enum { SL_WATCHDOG_WAIT, SL_WATCHDOG_INTERRUPT, SL_WATCHDOG_STUCK, SL_WATCHDOG_RECOVERED };

/* Seconds past twice lua_timeout_ms after which a worker whose thread has
 * not handled the interrupt signal yet is declared stuck all the same (a
 * kernel delivers it at once; valgrind, which runs the threads in turn,
 * can take seconds). */
#define SL_WATCHDOG_UNACKED_S 10.0

/* The rule for one worker seen at now (seconds, monotonic) with its step
 * (sl_lua_host_progress; busy: in Lua); acked: its thread has handled the
 * interrupt for step (sl_lua_host_where). SL_WATCHDOG_INTERRUPT once a
 * step has been seen busy for timeout_ms; SL_WATCHDOG_STUCK once it has
 * been for twice that after an interrupt its thread handled (or
 * SL_WATCHDOG_UNACKED_S more without); then, as long as that step is seen
 * busy, SL_WATCHDOG_WAIT, and SL_WATCHDOG_RECOVERED once it is not (the
 * step moved, or the worker left Lua: e->began and e->stuck_at tell how
 * long it was out), after which the clock starts again from the step seen
 * then. Else SL_WATCHDOG_WAIT. Updates e (zeroed at first). */
int sl_watchdog_judge(sl_watchdog_entry *e, int busy, uint64_t step, int acked, double now,
                      int timeout_ms);

/* Looks at every worker once at now (seconds, monotonic): interrupts the
 * callbacks older than timeout_ms, declares stuck the workers whose
 * callback is older than twice it, and no longer stuck those that run
 * again (their sockets rejoin their groups unless wd->stopping, and they
 * are woken to accept on them). workers[i] runs on threads[i]; sets are
 * the listening sockets (worker i's is fds[i]; they change only by a
 * reload, which is refused while a worker is stuck); admin may be NULL.
 * All borrowed. Main thread only. */
void sl_watchdog_tick(sl_watchdog *wd, struct sl_worker **workers, const pthread_t *threads,
                      int n, int timeout_ms, double now, struct sl_listen_set *sets,
                      struct sl_admin *admin);

/* Whether worker i is stuck now. */
int sl_watchdog_stuck(const sl_watchdog *wd, int i);

/* The stuck worker whose report /health shows: the one declared first
 * among those still stuck; -1 when none is. */
int sl_watchdog_reported(const sl_watchdog *wd);

/* Frees what the ticks allocated. */
void sl_watchdog_free(sl_watchdog *wd);

#endif
