#include "proxy/runtime.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "alloc/arena.h"
#include "alloc/pool.h"
#include "io/listener.h"
#include "io/worker.h"
#include "proxy/admin.h"
#include "proxy/config.h"
#include "proxy/metrics.h"
#include "proxy/notify.h"
#include "proxy/resolver.h"
#include "proxy/server.h"
#include "proxy/upgrade.h"
#include "proxy/watchdog.h"
#include "lua/host.h"
#include "util/common.h"
#include "util/log.h"

#define SL_MAX_WORKERS 256
/* A worker still running this long after the drain deadline (or after a
 * second SIGINT or SIGTERM) no longer returns to its event loop: a Lua
 * stage that never returns. sluice then exits without it (status 3). */
#define SL_STOP_GRACE_S 5.0

typedef struct sl_runtime {
  sl_config *cfg;              /* the configuration new connections get (one reference) */
  struct sl_alloc *alloc;
  sl_worker *workers[SL_MAX_WORKERS];
  pthread_t threads[SL_MAX_WORKERS];
  int nworkers;
  int nthreads;                /* threads started */
  _Atomic int nexited;         /* threads whose loop has ended */
  _Atomic int exited[SL_MAX_WORKERS]; /* 1 once that worker's loop has ended */
  sl_listen_set *sets;         /* the sockets of cfg's listeners */
  sl_listen_set *retired;      /* dropped by reloads; their gates live until exit */
  int stderr_copy;             /* standard error as sluice started (access_log "stderr") */
  int access_fd;               /* the access log's descriptor, never closed while running */
  sl_admin *admin;             /* the admin endpoint, or NULL */
  sl_watchdog watchdog;        /* lua_timeout_ms: ticks between signals */
  sl_resolver *resolver;       /* upstream host names resolved again, or NULL */
  int resolve_pending;         /* 1: new answers wait for a stuck worker */
  const char *changing;        /* what a change of configuration under way is, for its log
                                  lines: "SIGHUP", "upstream host names" */
  pid_t successor;             /* a new sluice started by SIGUSR2 (proxy/upgrade.h), or 0 */
} sl_runtime;

/* ---- logs ---- */

static int sl_runtime_open_append(const char *path) {
  return open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

/* Points fd at target ("stderr" or a path). SL_OK, or SL_ERROR with errno. */
static int sl_runtime_point(sl_runtime *rt, int fd, const char *target) {
  int src = strcmp(target, "stderr") == 0 ? rt->stderr_copy : sl_runtime_open_append(target);
  if (src < 0) return SL_ERROR;
  int rc = dup2(src, fd) < 0 ? SL_ERROR : SL_OK;
  int e = errno;
  if (src != rt->stderr_copy) close(src);
  errno = e;
  return rc;
}

/* Opens (or reopens, for rotation) the error and access logs of cfg. A
 * target that cannot be opened is reported and the previous one kept. */
static int sl_runtime_open_logs(sl_runtime *rt, const sl_config *cfg, int starting) {
  int rc = SL_OK;
  if (sl_runtime_point(rt, STDERR_FILENO, cfg->error_log) != SL_OK) {
    if (starting)
      fprintf(stderr, "sluice: cannot start: error_log: cannot open %s: %s\n", cfg->error_log,
              strerror(errno));
    else
      sl_log(SL_LOG_ERROR, "error_log: cannot open %s: %s (logging where it did)", cfg->error_log,
             strerror(errno));
    rc = SL_ERROR;
  }
  if (strcmp(cfg->access_log, "off") == 0) {
    atomic_store(&sl_access_log_fd, -1);
    return rc;
  }
  atomic_store(&sl_access_log_json, cfg->access_log_json);
  if (sl_runtime_point(rt, rt->access_fd, cfg->access_log) != SL_OK) {
    if (starting)
      fprintf(stderr, "sluice: cannot start: access_log: cannot open %s: %s\n", cfg->access_log,
              strerror(errno));
    else
      sl_log(SL_LOG_ERROR, "access_log: cannot open %s: %s (logging where it did)",
             cfg->access_log, strerror(errno));
    return SL_ERROR;
  }
  atomic_store(&sl_access_log_fd, rt->access_fd);
  return rc;
}

/* ---- listening sockets ---- */

static void sl_runtime_wake_all(void *ud) {
  sl_runtime *rt = ud;
  for (int i = 0; i < rt->nworkers; i++) sl_worker_wake(rt->workers[i]);
}

static void sl_runtime_free_set(sl_listen_set *set) {
  for (int i = 0; i < set->nfds; i++)
    if (set->fds[i] >= 0) close(set->fds[i]);
  free(set->fds);
  sl_client_limit_free(&set->clients);
  free(set);
}

/* One socket per worker on lc's address. With several workers they share
 * the port (SO_REUSEPORT); a plain bind first makes sure no other process
 * holds it, since the kernel would otherwise share the port with it too. */
static sl_listen_set *sl_runtime_bind(sl_runtime *rt, const sl_listener_cfg *lc, size_t index,
                                      char *err, size_t errlen) {
  sl_listen_set *set = calloc(1, sizeof(*set));
  int *fds = calloc((size_t)rt->nworkers, sizeof(int));
  if (set == NULL || fds == NULL) {
    free(set);
    free(fds);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  set->addr = lc->addr;
  snprintf(set->text, sizeof(set->text), "%s", lc->listen_text);
  set->fds = fds;
  set->nfds = rt->nworkers;
  for (int i = 0; i < rt->nworkers; i++) fds[i] = -1;
  sl_listen_gate_init(&set->gate, lc->max_connections, sl_runtime_wake_all, rt);
  sl_client_limit_init(&set->clients, lc->max_per_client);
  atomic_init(&set->backlog, lc->backlog);
  char why[256];
  int inherited = sl_upgrade_take(&lc->addr, fds, rt->nworkers, lc->backlog, &set->shared, why,
                                  sizeof(why));
  if (inherited != 0) {
    if (inherited > 0) return set;
    snprintf(err, errlen, "listeners[%zu] (%s): %s: %s", index + 1, lc->name, lc->listen_text,
             why);
    sl_runtime_free_set(set);
    return NULL;
  }
  int reuseport = rt->nworkers > 1;
  int probe = reuseport ? sl_listener_bind(&lc->addr, 0, lc->backlog) : 0;
  if (probe >= 0 && reuseport) close(probe);
  for (int i = 0; probe >= 0 && i < rt->nworkers; i++) {
    fds[i] = sl_listener_bind(&lc->addr, reuseport, lc->backlog);
    if (fds[i] < 0) probe = -1;
  }
  if (probe < 0) {
    int e = errno;
    char note[256] = "";
    if (e == EADDRINUSE) sl_upgrade_explain_in_use(&lc->addr, note, sizeof(note));
    snprintf(err, errlen, "listeners[%zu] (%s): cannot listen on %s: %s%s", index + 1, lc->name,
             lc->listen_text, strerror(e), note);
    sl_runtime_free_set(set);
    return NULL;
  }
  return set;
}

/* A kept listen address whose backlog a reload changed: listen(2) again on
 * each of its sockets (a new length for the queue; nothing queued is lost). */
static void sl_runtime_set_backlog(sl_listen_set *set, const sl_listener_cfg *lc) {
  if (atomic_load(&set->backlog) == lc->backlog) return;
  atomic_store(&set->backlog, lc->backlog);
  for (int k = 0; k < set->nfds; k++) {
    if (set->fds[k] >= 0 && sl_listener_listen(set->fds[k], lc->backlog) != SL_OK)
      sl_log(SL_LOG_WARN, "listener %s: cannot set backlog %d on %s: %s", lc->name, lc->backlog,
             lc->listen_text, strerror(errno));
  }
}

static sl_listen_set *sl_runtime_find_set(sl_listen_set *list, const char *text) {
  for (; list; list = list->next)
    if (strcmp(list->text, text) == 0) return list;
  return NULL;
}

/* The sockets for cfg's listeners in sets[] (in listener order): those of
 * current (the running configuration's) that keep their address, and new
 * ones. SL_OK, or SL_ERROR with err (the new sockets are closed). */
static int sl_runtime_sets_for(sl_runtime *rt, const sl_config *cfg, sl_listen_set *current,
                               sl_listen_set **sets, char *err, size_t errlen) {
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    sets[i] = sl_runtime_find_set(current, cfg->listeners[i].listen_text);
    if (sets[i] == NULL) sets[i] = sl_runtime_bind(rt, &cfg->listeners[i], i, err, errlen);
    /* Kept sockets too: a reload may turn defer_accept on or off. */
    for (int k = 0; sets[i] != NULL && k < sets[i]->nfds; k++) {
      if (sets[i]->fds[k] < 0 ||
          sl_listener_defer_accept(sets[i]->fds[k], cfg->listeners[i].defer_accept) == SL_OK)
        continue;
      snprintf(err, errlen, "listeners[%zu] (%s): cannot set defer_accept on %s: %s", i + 1,
               cfg->listeners[i].name, cfg->listeners[i].listen_text, strerror(errno));
      if (!sl_runtime_find_set(current, sets[i]->text)) sl_runtime_free_set(sets[i]);
      sets[i] = NULL;
    }
    if (sets[i] == NULL) {
      for (size_t j = 0; j < i; j++)
        if (!sl_runtime_find_set(current, sets[j]->text)) sl_runtime_free_set(sets[j]);
      return SL_ERROR;
    }
  }
  return SL_OK;
}

/* ---- workers ---- */

static void *sl_runtime_thread(void *arg) {
  sl_worker *w = arg;
  sl_lua_host_bind_thread(w);
  sl_worker_run(w);
  sl_metrics_gone(w);
  sl_runtime *rt = w->app;
  atomic_store(&rt->exited[w->id], 1);
  atomic_fetch_add(&rt->nexited, 1);
  return NULL;
}

static double sl_runtime_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sl_runtime_watch(sl_runtime *rt) {
  if (rt->cfg == NULL || rt->cfg->lua_timeout_ms <= 0) return;
  sl_watchdog_tick(&rt->watchdog, rt->workers, rt->threads, rt->nthreads, rt->cfg->lua_timeout_ms,
                   sl_runtime_now(), rt->sets, rt->admin);
}

/* While a reload waits for a worker: the watchdog goes on, so that a
 * callback running too long is interrupted (and the worker answers). A
 * worker found stuck cannot answer: the reload cannot finish, and the main
 * thread, which reads the signals, would wait for ever; sluice exits as a
 * stop with a stuck worker does. */
static void sl_runtime_reload_tick(void *ud) {
  sl_runtime *rt = ud;
  sl_runtime_watch(rt);
  if (rt->watchdog.nstuck > 0) {
    sl_log(SL_LOG_ERROR, "%s: a worker is stuck in Lua while the change waits for it; the "
                         "change cannot finish: exiting (3)",
           rt->changing ? rt->changing : "SIGHUP");
    _exit(3);
  }
}

static int sl_runtime_reload_call(sl_runtime *rt, int i, sl_worker_call_fn fn, void *arg) {
  double period = rt->cfg ? sl_watchdog_period(rt->cfg->lua_timeout_ms) : 0;
  return sl_worker_call_ticking(rt->workers[i], fn, arg, sl_runtime_reload_tick, rt, period);
}

/* Waits for one of the signals in set, ticking the watchdog meanwhile.
 * Returns the signal, and who sent it in info. */
static int sl_runtime_wait(sl_runtime *rt, const sigset_t *set, siginfo_t *info) {
  for (;;) {
    memset(info, 0, sizeof(*info));
    if (rt->resolve_pending && rt->watchdog.nstuck == 0) return SL_SIG_RESOLVED;
    double period = sl_watchdog_period(rt->cfg->lua_timeout_ms);
    int sig = 0;
    if (period <= 0) {
      sig = sigwaitinfo(set, info);
      if (sig > 0) return sig;
      continue;
    }
    struct timespec ts = {0, (long)(period * 1e9)};
    sig = sigtimedwait(set, info, &ts);
    sl_runtime_watch(rt);
    if (sig > 0) return sig;
  }
}

/* Asks every worker to stop and waits for their threads; a second SIGINT
 * or SIGTERM meanwhile closes every connection at once. Returns SL_OK once
 * every thread is joined, or SL_ERROR, after logging which workers, when
 * some are still running SL_STOP_GRACE_S after the drain deadline (or
 * after a second signal): their threads are left running. */
static int sl_runtime_stop_workers(sl_runtime *rt, const sigset_t *set) {
  rt->watchdog.stopping = 1; /* a stuck worker that comes back closes its sockets */
  for (int i = 0; i < rt->nthreads; i++) sl_worker_request_stop(rt->workers[i]);
  double give_up = sl_runtime_now() + (rt->cfg ? rt->cfg->drain_timeout : 0) + SL_STOP_GRACE_S;
  while (atomic_load(&rt->nexited) < rt->nthreads) {
    struct timespec ts = {0, 20 * 1000 * 1000};
    siginfo_t info;
    memset(&info, 0, sizeof(info));
    int sig = sigtimedwait(set, &info, &ts);
    sl_runtime_watch(rt); /* a callback that runs too long while draining is stopped too */
    if (sig == SIGTERM && rt->successor > 0 && info.si_pid == rt->successor) {
      /* The new sluice of an upgrade, taking over while this one stops
       * anyway: not a second stop signal. */
      continue;
    }
    if (sig == SIGINT || sig == SIGTERM) {
      sl_log(SL_LOG_INFO, "%s again: closing every connection now",
             sig == SIGINT ? "SIGINT" : "SIGTERM");
      for (int i = 0; i < rt->nthreads; i++) sl_worker_request_stop(rt->workers[i]);
      if (sl_runtime_now() + SL_STOP_GRACE_S < give_up) give_up = sl_runtime_now() + SL_STOP_GRACE_S;
    } else if (sig == SIGHUP || sig == SIGUSR1 || sig == SIGUSR2) {
      sl_log(SL_LOG_INFO, "%s: stopping; ignored",
             sig == SIGHUP ? "SIGHUP" : sig == SIGUSR1 ? "SIGUSR1" : "SIGUSR2");
    }
    if (atomic_load(&rt->nexited) < rt->nthreads && sl_runtime_now() >= give_up) {
      for (int i = 0; i < rt->nthreads; i++) {
        if (atomic_load(&rt->exited[i])) continue;
        sl_log(SL_LOG_ERROR, "worker %d has not stopped %.3g s after the drain deadline: it "
               "does not return to its event loop (a Lua stage that never returns?)", i,
               SL_STOP_GRACE_S);
      }
      return SL_ERROR;
    }
  }
  for (int i = 0; i < rt->nthreads; i++) pthread_join(rt->threads[i], NULL);
  return SL_OK;
}

/* Frees what the workers, the sockets and the pools hold. Returns the
 * number of leaked buffers. */
static uint64_t sl_runtime_release(sl_runtime *rt) {
  uint64_t leaked = 0;
  sl_admin_stop(rt->admin);
  rt->admin = NULL;
  for (int i = 0; i < rt->nworkers; i++) {
    sl_worker *w = rt->workers[i];
    if (w == NULL) continue;
    /* The worker's thread is gone: this thread owns its pool now, and the
     * Lua state's finalizers release into it. */
    sl_pool_bind_thread(w->pool);
    sl_server_free(w);
    sl_metrics_detach(w);
    leaked += sl_worker_destroy(w);
    rt->workers[i] = NULL;
  }
  while (rt->sets) {
    sl_listen_set *next = rt->sets->next;
    sl_runtime_free_set(rt->sets);
    rt->sets = next;
  }
  while (rt->retired) {
    sl_listen_set *next = rt->retired->next;
    sl_runtime_free_set(rt->retired);
    rt->retired = next;
  }
  if (rt->alloc) sl_alloc_destroy(rt->alloc);
  rt->alloc = NULL;
  sl_watchdog_free(&rt->watchdog);
  return leaked;
}

/* ---- reload ---- */

typedef struct sl_reload_msg {
  sl_config *cfg;
  sl_listen_set **sets;
  sl_listen_set **dropped;
  char err[1024];
} sl_reload_msg;

static int sl_runtime_prepare_fn(sl_worker *w, void *arg) {
  sl_reload_msg *m = arg;
  return sl_server_prepare(w, m->cfg, m->err, sizeof(m->err));
}

static int sl_runtime_abort_fn(sl_worker *w, void *arg) {
  sl_reload_msg *m = arg;
  sl_server_abort(w, m->cfg);
  return SL_OK;
}

static int sl_runtime_commit_fn(sl_worker *w, void *arg) {
  sl_reload_msg *m = arg;
  return sl_server_commit(w, m->cfg, m->sets, m->dropped);
}

static int sl_runtime_env_set(const char *name) {
  const char *v = getenv(name);
  return v != NULL && *v != '\0';
}

/* Settings that a running process keeps until it is restarted (nc's values
 * that the environment overrides are taken as the running ones first). */
static void sl_runtime_note_fixed(const sl_config *old, sl_config *nc) {
  if (sl_runtime_env_set("SLUICE_ALLOCATOR")) nc->alloc.type = old->alloc.type;
  if (sl_runtime_env_set("SLUICE_LEAK_DETECTION")) nc->alloc.leak_level = old->alloc.leak_level;
  if (sl_runtime_env_set("SLUICE_LOG_LEVEL")) nc->log_level = old->log_level;
  if (old->workers != nc->workers)
    sl_log(SL_LOG_WARN, "SIGHUP: workers changed: takes effect at the next start");
  const sl_alloc_config *a = &old->alloc, *b = &nc->alloc;
  if (a->type != b->type || a->arenas != b->arenas || a->page_size != b->page_size ||
      a->chunk_size != b->chunk_size || a->small_cache != b->small_cache ||
      a->normal_cache != b->normal_cache || a->max_cached != b->max_cached ||
      a->trim_interval != b->trim_interval || a->trim_idle_ms != b->trim_idle_ms ||
      a->max_memory != b->max_memory || a->leak_level != b->leak_level ||
      a->leak_sample != b->leak_sample)
    sl_log(SL_LOG_WARN,
           "SIGHUP: allocator or leak_detection changed: takes effect at the next start");
  if (old->max_pipes != nc->max_pipes)
    sl_log(SL_LOG_WARN, "SIGHUP: max_pipes changed: takes effect at the next start");
  if (old->log_level != nc->log_level)
    sl_log(SL_LOG_WARN, "SIGHUP: log_level changed: takes effect at the next start");
  if ((old->admin_text == NULL) != (nc->admin_text == NULL) ||
      (old->admin_text && strcmp(old->admin_text, nc->admin_text) != 0))
    sl_log(SL_LOG_WARN, "SIGHUP: admin changed: takes effect at the next start");
}

/* SL_OK: new connections use the new configuration; SL_ERROR: refused (the
 * running one stays), the reason in why. */
static int sl_runtime_reload(sl_runtime *rt, char *why, size_t whylen) {
  sl_reload_msg m;
  memset(&m, 0, sizeof(m));
  if (rt->successor > 0) {
    /* A new listener bound here now could keep the new sluice from
     * binding it; the new one reads the file anyway. */
    sl_log(SL_LOG_WARN, "SIGHUP: reload refused: a new sluice (pid %d) is taking over (SIGUSR2); "
           "it reads the configuration file itself, send SIGHUP to it once it serves",
           (int)rt->successor);
    snprintf(why, whylen, "a new sluice (pid %d) is taking over", (int)rt->successor);
    return SL_ERROR;
  }
  sl_runtime_watch(rt); /* a worker that has just come back is not refused */
  if (rt->watchdog.nstuck > 0) {
    /* A reload waits for every worker: it would wait for ever. */
    int n = rt->watchdog.nstuck;
    sl_log(SL_LOG_ERROR, "SIGHUP: reload refused: %d worker%s stuck in Lua (see above); send "
           "SIGHUP again once %s no longer, or restart sluice", n, n == 1 ? " is" : "s are",
           n == 1 ? "it is" : "they are");
    snprintf(why, whylen, "%d worker%s stuck in Lua", n, n == 1 ? "" : "s");
    return SL_ERROR;
  }
  sl_config *nc = sl_config_load(rt->cfg->path, m.err, sizeof(m.err));
  if (nc == NULL) {
    sl_log(SL_LOG_ERROR, "SIGHUP: reload refused, the running configuration stays: %s", m.err);
    snprintf(why, whylen, "%s", m.err);
    sl_runtime_open_logs(rt, rt->cfg, 0);
    return SL_ERROR;
  }
  sl_runtime_note_fixed(rt->cfg, nc);
  /* The environment's choices hold for the whole run. */
  nc->alloc = rt->cfg->alloc;
  nc->log_level = rt->cfg->log_level;
  sl_config_rebase(nc, rt->cfg);
  size_t ncurrent = 0, ndropped = 0;
  for (sl_listen_set *s = rt->sets; s; s = s->next) ncurrent++;
  sl_listen_set **sets = calloc(nc->nlisteners + 1, sizeof(*sets));
  sl_listen_set **dropped = calloc(ncurrent + 1, sizeof(*dropped));
  if (sets == NULL || dropped == NULL) {
    sl_log(SL_LOG_ERROR, "SIGHUP: reload refused: out of memory");
    snprintf(m.err, sizeof(m.err), "out of memory");
    goto refused;
  }
  if (sl_runtime_sets_for(rt, nc, rt->sets, sets, m.err, sizeof(m.err)) != SL_OK) {
    sl_log(SL_LOG_ERROR, "SIGHUP: reload refused, the running configuration stays: %s", m.err);
    goto refused;
  }
  m.cfg = nc;
  m.sets = sets;
  int prepared = 0;
  for (; prepared < rt->nthreads; prepared++) {
    if (sl_runtime_reload_call(rt, prepared, sl_runtime_prepare_fn, &m) != SL_OK) break;
  }
  if (prepared < rt->nthreads) {
    sl_log(SL_LOG_ERROR, "SIGHUP: reload refused, the running configuration stays: worker %d: %s",
           prepared, m.err);
    for (int i = 0; i < prepared; i++) sl_runtime_reload_call(rt, i, sl_runtime_abort_fn, &m);
    for (size_t i = 0; i < nc->nlisteners; i++)
      if (!sl_runtime_find_set(rt->sets, sets[i]->text)) sl_runtime_free_set(sets[i]);
    goto refused;
  }
  /* Every worker has the new stages: switch. */
  size_t kept = 0;
  for (sl_listen_set *s = rt->sets; s; s = s->next) {
    int used = 0;
    for (size_t i = 0; i < nc->nlisteners && !used; i++) used = sets[i] == s;
    if (used) kept++;
    else dropped[ndropped++] = s;
  }
  m.dropped = dropped;
  for (int i = 0; i < rt->nthreads; i++) {
    if (sl_runtime_reload_call(rt, i, sl_runtime_commit_fn, &m) != SL_OK)
      sl_log(SL_LOG_ERROR, "SIGHUP: worker %d: out of memory switching configurations; it "
                           "keeps the one before", i);
  }
  for (size_t i = 0; i < nc->nlisteners; i++) sl_runtime_set_backlog(sets[i], &nc->listeners[i]);
  for (size_t i = 0; i < ndropped; i++) {
    dropped[i]->next = rt->retired;
    rt->retired = dropped[i];
  }
  rt->sets = NULL;
  for (size_t i = nc->nlisteners; i-- > 0;) {
    sets[i]->next = rt->sets;
    rt->sets = sets[i];
  }
  sl_config_unref(rt->cfg);
  rt->cfg = nc;
  rt->resolve_pending = 0;   /* nc's names were resolved just now */
  if (rt->resolver) sl_resolver_watch(rt->resolver, nc);
  sl_runtime_open_logs(rt, nc, 0);
  sl_config_log_resolved(nc);
  sl_log(SL_LOG_INFO,
         "SIGHUP: configuration reloaded from %s: %zu listener%s (%zu kept, %zu added, %zu "
         "removed); open connections keep the configuration they started with",
         nc->path, nc->nlisteners, nc->nlisteners == 1 ? "" : "s", kept,
         nc->nlisteners - kept, ndropped);
  free(sets);
  free(dropped);
  return SL_OK;
refused:
  snprintf(why, whylen, "%s", m.err);
  free(sets);
  free(dropped);
  sl_config_unref(nc);
  sl_runtime_open_logs(rt, rt->cfg, 0);
  return SL_ERROR;
}

/* ---- host names resolved again ---- */

/* Logs the servers of an upstream that host names changed: was (the
 * running configuration's) and now (the new one's). */
static void sl_runtime_log_servers(const sl_upstream_cfg *was, const sl_upstream_cfg *now) {
  char list[2][900];
  const sl_upstream_cfg *u[2] = {now, was};
  for (int k = 0; k < 2; k++) {
    size_t len = 0;
    list[k][0] = '\0';
    for (size_t j = 0; j < u[k]->nservers && len < sizeof(list[k]) - 64; j++)
      len += (size_t)snprintf(list[k] + len, sizeof(list[k]) - len, "%s%s%s", j ? ", " : "",
                              u[k]->server_text[j], u[k]->backups[j] ? " (backup)" : "");
  }
  sl_log(SL_LOG_INFO, "upstream %s: host names resolved again: servers %s (were %s); new "
         "connections use them", now->name, list[0], list[1]);
}

/* The resolver's answers changed: new connections get a configuration
 * derived from the running one with the servers those answers give, when
 * any changed. Waits (resolve_pending) while a worker is stuck in Lua. */
static void sl_runtime_reresolve(sl_runtime *rt) {
  rt->resolve_pending = 0;
  sl_runtime_watch(rt);   /* the stuck count is fresh */
  if (rt->watchdog.nstuck > 0) {
    rt->resolve_pending = 1;
    return;
  }
  char err[1200];
  sl_config *d = sl_config_derive(rt->cfg, sl_resolver_lookup, rt->resolver, err, sizeof(err));
  if (d == NULL) {
    sl_log(SL_LOG_WARN, "upstream host names: new answers not used: %s", err);
    return;
  }
  if (sl_config_same_servers(rt->cfg, d)) {
    sl_config_unref(d);
    return;
  }
  sl_listen_set **sets = calloc(d->nlisteners + 1, sizeof(*sets));
  sl_listen_set *none = NULL;
  if (sets == NULL) {
    sl_log(SL_LOG_ERROR, "upstream host names: new answers not used: out of memory");
    sl_config_unref(d);
    return;
  }
  for (size_t i = 0; i < d->nlisteners; i++)
    sets[i] = sl_runtime_find_set(rt->sets, d->listeners[i].listen_text);
  sl_reload_msg m = {.cfg = d, .sets = sets, .dropped = &none};
  int failed = 0;
  rt->changing = "upstream host names";
  for (int i = 0; i < rt->nthreads; i++) {
    if (sl_runtime_reload_call(rt, i, sl_runtime_commit_fn, &m) == SL_OK) continue;
    sl_log(SL_LOG_ERROR, "upstream host names: worker %d: out of memory switching to the new "
           "servers; it keeps the ones before", i);
    failed = 1;
  }
  rt->changing = NULL;
  free(sets);
  for (size_t i = 0; i < d->nupstreams; i++) {
    const sl_upstream_cfg *was = &rt->cfg->upstreams[i], *now = &d->upstreams[i];
    if (!sl_upstream_same_servers(was, now)) sl_runtime_log_servers(was, now);
  }
  sl_config_unref(rt->cfg);
  rt->cfg = d;
  if (!failed) sl_admin_note_dns_change(rt->admin);
}

/* ---- binary upgrade (proxy/upgrade.h) ---- */

/* The shared sockets are this process's alone again (an upgrade failed),
 * and the new sluice may have changed them before it exited (listen(2)
 * again with its backlog, its defer_accept): this one's settings come
 * back, and a stuck worker's sockets leave their groups, as they would
 * have without the sharing. */
static void sl_runtime_restore_sockets(sl_runtime *rt) {
  rt->watchdog.shared = 0;
  for (size_t i = 0; i < rt->cfg->nlisteners; i++) {
    const sl_listener_cfg *lc = &rt->cfg->listeners[i];
    sl_listen_set *set = sl_runtime_find_set(rt->sets, lc->listen_text);
    for (int k = 0; set != NULL && k < set->nfds; k++) {
      int fd = set->fds[k];
      if (fd < 0) continue;
      int rc = sl_watchdog_stuck(&rt->watchdog, k) && !set->shared
                   ? sl_listener_withdraw(fd)
                   : sl_listener_listen(fd, atomic_load(&set->backlog));
      if (rc != SL_OK || sl_listener_defer_accept(fd, lc->defer_accept) != SL_OK)
        sl_log(SL_LOG_WARN, "listener %s: cannot set its socket back as it was after the failed "
               "upgrade: %s", lc->name, strerror(errno));
    }
  }
}

/* SIGUSR2: starts a new sluice that inherits the listening sockets. This
 * one serves on until the new one takes over (its SIGTERM), or goes on
 * when the new one exits first (sl_runtime_reap). */
static void sl_runtime_reap(sl_runtime *rt);

static void sl_runtime_upgrade(sl_runtime *rt) {
  sl_runtime_reap(rt);   /* one that failed just now (its SIGCHLD not taken yet) */
  if (rt->successor > 0) {
    sl_log(SL_LOG_WARN, "SIGUSR2: the new sluice (pid %d) has not taken over yet; ignored",
           (int)rt->successor);
    return;
  }
  int n = rt->admin ? 1 : 0;
  for (sl_listen_set *s = rt->sets; s; s = s->next) n += s->nfds;
  int *fds = calloc((size_t)n + 1, sizeof(*fds)), *shared = calloc((size_t)n + 1, sizeof(*shared));
  if (fds == NULL || shared == NULL) {
    free(fds);
    free(shared);
    sl_log(SL_LOG_ERROR, "SIGUSR2: cannot start a new sluice: out of memory; this one goes on");
    return;
  }
  int k = 0;
  for (sl_listen_set *s = rt->sets; s; s = s->next) {
    for (int i = 0; i < s->nfds; i++) {
      if (s->fds[i] < 0) continue;
      shared[k] = s->shared;
      fds[k++] = s->fds[i];
      if (s->shared) break;   /* systemd's socket: once (the others are duplicates) */
    }
  }
  if (rt->admin) {
    shared[k] = sl_admin_shared(rt->admin);
    fds[k++] = sl_admin_fd(rt->admin);
  }
  char err[256];
  pid_t pid = sl_upgrade_spawn(fds, shared, k, rt->stderr_copy, sl_notify_socket(), err,
                               sizeof(err));
  free(fds);
  free(shared);
  if (pid < 0) {
    sl_log(SL_LOG_ERROR, "SIGUSR2: cannot start a new sluice: %s; this one goes on", err);
    return;
  }
  rt->successor = pid;
  rt->watchdog.shared = 1;
  sl_log(SL_LOG_INFO, "SIGUSR2: started a new sluice (pid %d) with this one's %d listening "
         "socket%s; this one (pid %d) serves until it takes over", (int)pid, k,
         k == 1 ? "" : "s", (int)getpid());
}

/* SIGCHLD: a new sluice that exits before it took over failed to start
 * (its own lines say why): this one goes on. */
static void sl_runtime_reap(sl_runtime *rt) {
  int status = 0;
  if (rt->successor <= 0) return;
  pid_t r = waitpid(rt->successor, &status, WNOHANG);
  if (r == 0) return;   /* still starting */
  char how[96];
  if (r < 0)
    snprintf(how, sizeof(how), "is gone (%s)", strerror(errno));
  else if (WIFEXITED(status))
    snprintf(how, sizeof(how), "exited with status %d%s", WEXITSTATUS(status),
             WEXITSTATUS(status) == 127 ? " (it could not be run)" : "");
  else
    snprintf(how, sizeof(how), "was killed by signal %d", WTERMSIG(status));
  sl_log(SL_LOG_ERROR, "SIGUSR2: the new sluice (pid %d) %s before it took over; this one "
         "goes on serving", (int)rt->successor, how);
  rt->successor = 0;
  sl_runtime_restore_sockets(rt);
}

/* A sluice started for an upgrade, once its workers run: the one it
 * replaces drains its connections and exits. */
static void sl_runtime_take_over(void) {
  pid_t old = sl_upgrade_predecessor();
  if (old <= 0) return;
  if (kill(old, SIGTERM) != 0) {
    sl_log(SL_LOG_WARN, "upgrade: cannot tell the sluice this one replaces (pid %d) to stop: "
           "%s", (int)old, strerror(errno));
    return;
  }
  sl_log(SL_LOG_INFO, "upgrade: this sluice (pid %d) serves the listening sockets of pid %d "
         "now, which drains its connections (SIGTERM)", (int)getpid(), (int)old);
}

/* ---- the run ---- */

static int sl_runtime_workers(const sl_config *cfg) {
  if (cfg->workers > 0) return cfg->workers;
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n < 1 ? 1 : (int)SL_MIN(n, SL_MAX_WORKERS);
}

/* Splice pipes per worker: max_pipes shared by the workers (rounded up),
 * or by default a quarter of the open-files limit (two descriptors each),
 * so that connections keep the rest; at most SL_PIPE_MAX_OPEN either way. */
static unsigned sl_runtime_pipes_per_worker(int nworkers, int max_pipes) {
  rlim_t n = (rlim_t)(nworkers > 0 ? nworkers : 1), per;
  if (max_pipes >= 0) {
    per = ((rlim_t)max_pipes + n - 1) / n;
  } else {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return 0;
    if (rl.rlim_cur == RLIM_INFINITY) return SL_PIPE_MAX_OPEN;
    per = rl.rlim_cur / 8 / n;
  }
  return (unsigned)(per < SL_PIPE_MAX_OPEN ? per : SL_PIPE_MAX_OPEN);
}

static int sl_runtime_start(sl_runtime *rt, char *err, size_t errlen) {
  sl_config *cfg = rt->cfg;
  sl_alloc_config acfg = cfg->alloc;
  if (acfg.arenas == 0) acfg.arenas = rt->nworkers;
  const char *aerr = NULL;
  rt->alloc = sl_alloc_create(&acfg, &aerr);
  if (rt->alloc == NULL) {
    snprintf(err, errlen, "allocator: %s", aerr);
    return SL_ERROR;
  }
  unsigned pipes = sl_runtime_pipes_per_worker(rt->nworkers, cfg->max_pipes);
  for (int i = 0; i < rt->nworkers; i++) {
    rt->workers[i] = sl_worker_create(i, rt->alloc);
    if (rt->workers[i] == NULL) {
      snprintf(err, errlen, "out of memory");
      return SL_ERROR;
    }
    rt->workers[i]->pipes.max_open = pipes;
    rt->workers[i]->app = rt;
    if (sl_metrics_attach(rt->workers[i], cfg->admin_text != NULL) != SL_OK) {
      snprintf(err, errlen, "out of memory");
      return SL_ERROR;
    }
  }
  sl_listen_set **sets = calloc(cfg->nlisteners + 1, sizeof(*sets));
  if (sets == NULL) {
    snprintf(err, errlen, "out of memory");
    return SL_ERROR;
  }
  if (sl_runtime_sets_for(rt, cfg, NULL, sets, err, errlen) != SL_OK) {
    free(sets);
    return SL_ERROR;
  }
  for (size_t i = cfg->nlisteners; i-- > 0;) {
    sets[i]->next = rt->sets;
    rt->sets = sets[i];
  }
  if (cfg->admin_text != NULL) {
    rt->admin = sl_admin_create(&cfg->admin_addr, cfg->admin_text, rt->workers, rt->nworkers,
                                rt->alloc, err, errlen);
    if (rt->admin == NULL) {
      free(sets);
      return SL_ERROR;
    }
  }
  int rc = SL_OK;
  for (int i = 0; i < rt->nworkers && rc == SL_OK; i++) {
    char werr[1024];
    rc = sl_server_start(rt->workers[i], cfg, sets, werr, sizeof(werr));
    if (rc != SL_OK) snprintf(err, errlen, "worker %d: %s", i, werr);
  }
  free(sets);
  return rc;
}

/* Each proxied connection takes two descriptors: the soft open-files limit
 * goes up to the hard one (as nginx's worker_rlimit_nofile, HAProxy's
 * automatic setting). Logged when it changes. */
static void sl_runtime_raise_nofile(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max) return;
  rlim_t was = rl.rlim_cur;
  rl.rlim_cur = rl.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
    sl_log(SL_LOG_INFO, "open files: soft limit raised from %llu to the hard limit, %llu",
           (unsigned long long)was, (unsigned long long)rl.rlim_max);
}

int sl_runtime_run(sl_config *cfg) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGUSR1);
  sigaddset(&set, SIGUSR2);
  sigaddset(&set, SIGCHLD);
  sigaddset(&set, SL_SIG_RESOLVED);
  /* Threads inherit the mask: only this thread takes the signals. */
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  signal(SIGPIPE, SIG_IGN);
  /* Ignored by whoever started sluice, SIGCHLD would reap a new sluice of
   * an upgrade by itself, and its failure would go unseen. */
  signal(SIGCHLD, SIG_DFL);
  sl_notify_init();   /* before any thread: it edits the environment */

  static sl_runtime runtime;
  sl_runtime *rt = &runtime;
  rt->cfg = cfg;
  rt->nworkers = sl_runtime_workers(cfg);
  rt->stderr_copy = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
  rt->access_fd = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
  if (rt->stderr_copy < 0 || rt->access_fd < 0) {
    fprintf(stderr, "sluice: cannot start: %s\n", strerror(errno));
    sl_config_unref(cfg);
    return 1;
  }
  char err[1200];
  if (sl_runtime_open_logs(rt, cfg, 1) != SL_OK) {
    sl_config_unref(cfg);
    return 1;
  }
  sl_runtime_raise_nofile();
  if (sl_lua_timeout_install() != SL_OK) {
    fprintf(stderr, "sluice: cannot start: sigaction: %s\n", strerror(errno));
    sl_config_unref(cfg);
    return 1;
  }
  if (sl_runtime_start(rt, err, sizeof(err)) != SL_OK) {
    if (strcmp(cfg->error_log, "stderr") != 0) sl_log(SL_LOG_ERROR, "cannot start: %s", err);
    dprintf(rt->stderr_copy, "sluice: cannot start: %s\n", err);
    sl_runtime_release(rt);
    sl_config_unref(cfg);
    return 1;
  }
  (void)sl_upgrade_close_rest();
  sl_config_log_resolved(cfg);
  /* Before the workers: ctx:connect may look host names up at once. */
  rt->resolver = sl_resolver_create(pthread_self(), SL_SIG_RESOLVED);
  if (rt->resolver) sl_resolver_watch(rt->resolver, cfg);
  sl_resolver_share(rt->resolver);
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const sl_listener_cfg *l = &cfg->listeners[i];
    const sl_listen_set *ls = sl_runtime_find_set(rt->sets, l->listen_text);
    sl_log(SL_LOG_INFO, "listener %s on %s -> %s (%zu stage%s)%s", l->name, l->listen_text,
           l->upstream ? l->upstream->name : "pipeline", l->nstages, l->nstages == 1 ? "" : "s",
           ls != NULL && ls->shared ? ", on the socket systemd passed (LISTEN_FDS), which the "
                                      "workers share" : "");
  }
  for (int i = 0; i < rt->nworkers; i++) {
    if (pthread_create(&rt->threads[i], NULL, sl_runtime_thread, rt->workers[i]) != 0) {
      fprintf(stderr, "sluice: cannot start: worker %d: cannot create its thread: %s\n", i,
              strerror(errno));
      (void)sl_runtime_stop_workers(rt, &set);
      (void)sl_resolver_destroy(rt->resolver);
      sl_runtime_release(rt);
      sl_config_unref(rt->cfg);
      return 1;
    }
    rt->nthreads++;
  }
  if (rt->admin && sl_admin_start(rt->admin) != SL_OK) {
    fprintf(stderr, "sluice: cannot start: admin: cannot create its thread: %s\n", strerror(errno));
    (void)sl_runtime_stop_workers(rt, &set);
    (void)sl_resolver_destroy(rt->resolver);
    sl_runtime_release(rt);
    sl_config_unref(rt->cfg);
    return 1;
  }
  sl_log(SL_LOG_INFO, "sluice %s started with %d worker%s, %s allocator (config %s, pid %d)",
         SL_VERSION, rt->nworkers, rt->nworkers == 1 ? "" : "s",
         cfg->alloc.type == SL_ALLOC_UNPOOLED ? "unpooled" : "pooled", cfg->path, (int)getpid());
  sl_notify("READY=1\nSTATUS=serving %zu listener%s with %d worker%s\nMAINPID=%d",
            cfg->nlisteners, cfg->nlisteners == 1 ? "" : "s", rt->nworkers,
            rt->nworkers == 1 ? "" : "s", (int)getpid());
  sl_runtime_take_over();

  for (;;) {
    siginfo_t info;
    int sig = sl_runtime_wait(rt, &set, &info);
    if (sig == SL_SIG_RESOLVED) {
      sl_runtime_reresolve(rt);
      continue;
    }
    if (sig == SIGHUP) {
      sl_log(SL_LOG_INFO, "SIGHUP: reloading %s", rt->cfg->path);
      sl_notify_reloading();
      char why[1200];
      int ok = sl_runtime_reload(rt, why, sizeof(why)) == SL_OK;
      sl_admin_note_reload(rt->admin, ok);
      if (ok) sl_notify("READY=1\nSTATUS=configuration reloaded from %s", rt->cfg->path);
      else sl_notify("READY=1\nSTATUS=reload refused, the running configuration stays: %.*s",
                     (int)strcspn(why, "\n"), why);
      continue;
    }
    if (sig == SIGUSR2) {
      sl_runtime_upgrade(rt);
      continue;
    }
    if (sig == SIGCHLD) {
      sl_runtime_reap(rt);
      continue;
    }
    if (sig == SIGUSR1) {
      if (sl_runtime_open_logs(rt, rt->cfg, 0) == SL_OK)
        sl_log(SL_LOG_INFO, "SIGUSR1: log files reopened");
      else
        sl_log(SL_LOG_WARN, "SIGUSR1: log files reopened but for the one above");
      continue;
    }
    int handed_over = sig == SIGTERM && rt->successor > 0 && info.si_pid == rt->successor;
    if (handed_over) {
      /* The new sluice serves the sockets (admin's too) and told systemd
       * it is the service's main process: nothing says stopping. */
      sl_log(SL_LOG_INFO, "SIGTERM from the new sluice (pid %d), which serves the listening "
             "sockets now: no new connections here; open ones have %.3g s to finish",
             (int)rt->successor, rt->cfg->drain_timeout);
      sl_admin_hand_over(rt->admin);
      break;
    }
    sl_log(SL_LOG_INFO, "%s: stopping: no new connections; open ones have %.3g s to finish",
           sig == SIGINT ? "SIGINT" : "SIGTERM", rt->cfg->drain_timeout);
    if (rt->successor > 0) {
      /* A stop means sluice stops: the one starting to take over too. */
      sl_log(SL_LOG_INFO, "%s: the new sluice (pid %d) that was taking over is stopped too",
             sig == SIGINT ? "SIGINT" : "SIGTERM", (int)rt->successor);
      (void)kill(rt->successor, SIGTERM);
    }
    sl_admin_set_draining(rt->admin);
    sl_notify("STOPPING=1\nSTATUS=stopping: draining open connections");
    break;
  }
  if (sl_runtime_stop_workers(rt, &set) != SL_OK) {
    /* A stuck thread still uses its pool, its Lua state and the arenas:
     * nothing can be freed or checked, and exit handlers must not run
     * beside it. */
    sl_log(SL_LOG_ERROR, "stopped without its stuck workers (exit 3)");
    _exit(3);
  }
  if (sl_resolver_destroy(rt->resolver) == SL_OK) rt->resolver = NULL;

  uint64_t leaked = sl_runtime_release(rt);
  sl_log(SL_LOG_INFO, "stopped%s", leaked ? " with leaked buffers" : "");
  sl_notify_close();
  atomic_store(&sl_access_log_fd, -1);
  close(rt->access_fd);
  close(rt->stderr_copy);
  sl_config_unref(rt->cfg);
  rt->cfg = NULL;
  return 0;
}
