#include "proxy/watchdog.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

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

/* Takes worker i's listening sockets out of their groups: the kernel gives
 * their new connections to the other workers' sockets. The descriptors
 * stay open (the worker owns them). */
static void sl_watchdog_unlisten(int i, struct sl_listen_set *sets) {
  for (struct sl_listen_set *s = sets; s != NULL; s = s->next) {
    if (i < s->nfds && s->fds[i] >= 0 && shutdown(s->fds[i], SHUT_RD) != 0)
      sl_log(SL_LOG_WARN, "worker %d: listener %s: shutdown: %m", i, s->text);
  }
}

static void sl_watchdog_declare(sl_watchdog *wd, int i, sl_lua_host *h, uint64_t step,
                                int timeout_ms, double age, struct sl_listen_set *sets,
                                struct sl_admin *admin) {
  char stage[64] = "?", cb[64] = "?", why[256];
  sl_lua_host_where(h, step, stage, sizeof(stage), cb, sizeof(cb));
  wd->nstuck++;
  snprintf(why, sizeof(why),
           "worker %d: stage %s has run %s for %.1f s and did not stop when interrupted at "
           "lua_timeout_ms (%d ms)", i, stage, cb, age, timeout_ms);
  /* Before the line: whoever reads it finds the rest done. */
  sl_watchdog_unlisten(i, sets);
  sl_admin_set_stuck(admin, wd->nstuck, why);
  sl_log(SL_LOG_ERROR,
         "%s: a loop the JIT compiled or a C call that does not return; the worker is stuck: "
         "its listening sockets take no new connections (the other workers do), its open "
         "connections wait; restart sluice", why);
}

int sl_watchdog_judge(sl_watchdog_entry *e, int busy, uint64_t step, int acked, double now,
                      int timeout_ms) {
  if (e->stuck) return SL_WATCHDOG_WAIT;
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
        sl_watchdog_declare(wd, i, h, step, timeout_ms, now - e->since, sets, admin);
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
