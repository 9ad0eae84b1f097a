#include "proxy/watchdog.h"

#include <stdio.h>
#include <stdlib.h>

#include "io/listener.h"
#include "io/worker.h"
#include "lua/host.h"
#include "proxy/admin.h"
#include "proxy/server.h"
#include "util/common.h"
#include "util/log.h"

double sl_watchdog_period(int timeout_ms) {
  if (timeout_ms <= 0) return 0;
  return SL_MAX(0.01, SL_MIN(0.25, timeout_ms / 4000.0));
}

/* Takes worker i's listening sockets out of their groups (out: 1) or
 * puts them back (out: 0). The descriptors stay open (the worker owns
 * them). Returns how many failed (each logged). */
static int sl_watchdog_unlisten(int i, struct sl_listen_set *sets, int out) {
  int failed = 0;
  for (struct sl_listen_set *s = sets; s != NULL; s = s->next) {
    /* systemd's socket is every worker's: a shutdown would take it from
     * them all, and the others accept from its one queue anyway. */
    if (i >= s->nfds || s->fds[i] < 0 || s->shared) continue;
    if ((out ? sl_listener_withdraw(s->fds[i]) : sl_listener_listen(s->fds[i], atomic_load(&s->backlog))) == SL_OK) continue;
    sl_log(SL_LOG_WARN, "worker %d: listener %s: %s: %m", i, s->text, out ? "shutdown" : "listen");
    failed++;
  }
  return failed;
}

int sl_watchdog_stuck(const sl_watchdog *wd, int i) {
  return wd->e != NULL && i < wd->n && wd->e[i].stuck;
}

int sl_watchdog_reported(const sl_watchdog *wd) {
  int first = -1;
  for (int i = 0; i < wd->n; i++) {
    if (wd->e[i].stuck && (first < 0 || wd->e[i].stuck_at < wd->e[first].stuck_at)) first = i;
  }
  return first;
}

/* Tells admin how many workers are stuck, and which one's report to show. */
static void sl_watchdog_report(sl_watchdog *wd, struct sl_admin *admin) {
  int first = sl_watchdog_reported(wd);
  sl_admin_set_stuck(admin, wd->nstuck, first >= 0 ? wd->e[first].why : NULL);
}

static void sl_watchdog_declare(sl_watchdog *wd, int i, sl_lua_host *h, int timeout_ms,
                                double now, struct sl_listen_set *sets,
                                struct sl_admin *admin) {
  sl_watchdog_entry *e = &wd->e[i];
  snprintf(e->stage, sizeof(e->stage), "?");
  snprintf(e->cb, sizeof(e->cb), "?");
  sl_lua_host_where(h, e->step, e->stage, sizeof(e->stage), e->cb, sizeof(e->cb));
  wd->nstuck++;
  snprintf(e->why, sizeof(e->why),
           "worker %d: stage %s has run %s for %.1f s and did not stop when interrupted at "
           "lua_timeout_ms (%d ms)", i, e->stage, e->cb, now - e->since, timeout_ms);
  /* Before the line: whoever reads it finds the rest done. */
  if (!wd->shared) (void)sl_watchdog_unlisten(i, sets, 1);
  sl_watchdog_report(wd, admin);
  sl_log(SL_LOG_ERROR,
         "%s: a loop the JIT compiled, a C call that does not return, or a stage that catches "
         "the error (pcall) and goes on; the worker is stuck: %s, its open "
         "connections wait until it runs again (a loop that never ends: restart sluice)",
         e->why, wd->shared ? "the new sluice's workers accept on its listening sockets"
                            : "its listening sockets take no new connections (the other "
                              "workers do)");
}

static void sl_watchdog_recover(sl_watchdog *wd, int i, sl_worker *w, double now,
                                struct sl_listen_set *sets, struct sl_admin *admin) {
  const sl_watchdog_entry *e = &wd->e[i];
  const char *sockets = "";
  wd->nstuck--;
  /* Back in their groups before the line (as when declared); the worker
   * resumes accepting once woken, the kernel queues for it meanwhile. */
  if (!wd->stopping) {
    sockets = sl_watchdog_unlisten(i, sets, 0) == 0
                  ? "; its listening sockets take new connections again"
                  : "; some of its listening sockets could not rejoin their groups (see above)";
    sl_worker_wake(w);
  }
  sl_watchdog_report(wd, admin);
  sl_log(SL_LOG_WARN, "worker %d is no longer stuck: stage %s's %s came back after %.1f s, "
         "%.1f s of them stuck%s", i, e->stage, e->cb, now - e->began, now - e->stuck_at,
         sockets);
}

int sl_watchdog_judge(sl_watchdog_entry *e, int busy, uint64_t step, int acked, double now,
                      int timeout_ms) {
  if (e->stuck) {
    if (busy && step == e->step) return SL_WATCHDOG_WAIT;
    e->stuck = 0;
    e->began = e->since;
    e->seen = 1;
    e->step = step;
    e->since = now;
    e->interrupted = 0;
    return SL_WATCHDOG_RECOVERED;
  }
  if (!e->seen || !busy || step != e->step) {
    e->seen = 1;
    e->step = step;
    e->since = now;
    e->interrupted = 0;
    return SL_WATCHDOG_WAIT;
  }
  double age = now - e->since, limit = timeout_ms / 1000.0;
  if (timeout_ms <= 0 || age < limit) return SL_WATCHDOG_WAIT;
  if (!e->interrupted) {
    e->interrupted = 1;
    return SL_WATCHDOG_INTERRUPT;
  }
  if (age < 2 * limit || (!acked && age < 2 * limit + SL_WATCHDOG_UNACKED_S))
    return SL_WATCHDOG_WAIT;
  e->stuck = 1;
  e->stuck_at = now;
  return SL_WATCHDOG_STUCK;
}

void sl_watchdog_tick(sl_watchdog *wd, struct sl_worker **workers, const pthread_t *threads,
                      int n, int timeout_ms, double now, struct sl_listen_set *sets,
                      struct sl_admin *admin) {
  if (wd->e == NULL || wd->n < n) {
    sl_watchdog_entry *e = calloc((size_t)n, sizeof(*e));
    if (e == NULL) return;
    free(wd->e);
    wd->e = e;
    wd->n = n;
  }
  for (int i = 0; i < n; i++) {
    sl_watchdog_entry *e = &wd->e[i];
    sl_lua_host *h = workers[i] != NULL ? workers[i]->lua : NULL;
    if (h == NULL) continue;
    int busy;
    uint64_t step = sl_lua_host_progress(h, &busy);
    int acked = e->interrupted && sl_lua_host_where(h, step, NULL, 0, NULL, 0) == SL_OK;
    switch (sl_watchdog_judge(e, busy, step, acked, now, timeout_ms)) {
      case SL_WATCHDOG_INTERRUPT:
        if (sl_lua_host_interrupt(h, step, threads[i]) != SL_OK)
          sl_log(SL_LOG_ERROR, "worker %d: cannot interrupt its Lua: pthread_kill failed", i);
        break;
      case SL_WATCHDOG_STUCK:
        sl_watchdog_declare(wd, i, h, timeout_ms, now, sets, admin);
        break;
      case SL_WATCHDOG_RECOVERED:
        sl_watchdog_recover(wd, i, workers[i], now, sets, admin);
        break;
      default: break;
    }
  }
}

void sl_watchdog_free(sl_watchdog *wd) {
  free(wd->e);
  wd->e = NULL;
  wd->n = 0;
}
