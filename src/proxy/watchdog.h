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
 *     (a loop the JIT compiled, a C call that does not return): the worker
 *     is stuck. That is logged once (worker, stage, callback, how long), its
 *     listening sockets leave their SO_REUSEPORT groups (shutdown SHUT_RD:
 *     the other workers take the new connections), and the admin endpoint's
 *     /health answers 503. A stuck worker stays counted until sluice is
 *     restarted, even if its callback ends later.
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

typedef struct sl_watchdog_entry {
  uint64_t step;      /* the worker's step when last seen */
  double since;       /* when that step was first seen busy (seconds, monotonic) */
  int seen;           /* step and since are set */
  int interrupted;    /* the interrupt was sent for step */
  int stuck;          /* declared stuck (for good) */
} sl_watchdog_entry;

typedef struct sl_watchdog {
  sl_watchdog_entry *e;         /* one per worker */
  int n;
  int nstuck;
} sl_watchdog;

/* Seconds between ticks for timeout_ms (a quarter of it, 10 ms to 250 ms);
 * 0 when timeout_ms is 0 (no watchdog). */
double sl_watchdog_period(int timeout_ms);

enum { SL_WATCHDOG_WAIT, SL_WATCHDOG_INTERRUPT, SL_WATCHDOG_STUCK };

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
 * SL_WATCHDOG_UNACKED_S more without), then never again; else
 * SL_WATCHDOG_WAIT. Updates e (zeroed at first). */
int sl_watchdog_judge(sl_watchdog_entry *e, int busy, uint64_t step, int acked, double now,
                      int timeout_ms);

/* Looks at every worker once at now (seconds, monotonic): interrupts the
 * callbacks older than timeout_ms, declares stuck the workers whose
 * callback is older than twice it. workers[i] runs on threads[i]; sets are
 * the listening sockets (worker i's is fds[i]); admin may be NULL. All
 * borrowed. Main thread only. */
void sl_watchdog_tick(sl_watchdog *wd, struct sl_worker **workers, const pthread_t *threads,
                      int n, int timeout_ms, double now, struct sl_listen_set *sets,
                      struct sl_admin *admin);

/* Frees what the ticks allocated. */
void sl_watchdog_free(sl_watchdog *wd);

#endif
