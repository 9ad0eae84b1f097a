/*
 * The sluice command line: load and check the config, start the workers,
 * wait for a signal, stop them, and report what the pools still hold.
 *
 * Exit codes: 0 after a clean stop or a good --check, 1 when start-up fails
 * (a port in use), 2 on a bad command line or a bad config.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc/arena.h"
#include "alloc/pool.h"
#include "buf/leak.h"
#include "io/worker.h"
#include "proxy/config.h"
#include "proxy/server.h"
#include "util/common.h"
#include "util/log.h"

#define SL_MAX_WORKERS 1

static void sl_usage(FILE *out) {
  fprintf(out,
          "usage: sluice -c FILE        run the proxy described by FILE\n"
          "       sluice --check FILE   validate FILE and exit (0: valid, 2: invalid)\n"
          "       sluice --version\n"
          "       sluice --help\n"
          "\n"
          "Signals: SIGINT and SIGTERM stop accepting, close connections and exit 0.\n"
          "Environment: SLUICE_ROOT (sluice's own Lua library), SLUICE_LOG_LEVEL,\n"
          "             SLUICE_ALLOCATOR (pooled or unpooled),\n"
          "             SLUICE_LEAK_DETECTION (disabled, simple, advanced, paranoid).\n");
}

static void *sl_worker_thread(void *arg) {
  sl_worker_run(arg);
  return NULL;
}

static int sl_run(sl_config *cfg) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  /* Workers inherit the mask: only this thread takes the signals. */
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  signal(SIGPIPE, SIG_IGN);

  sl_worker *workers[SL_MAX_WORKERS];
  int nworkers = SL_MAX_WORKERS;
  char err[512];
  sl_alloc_config acfg = cfg->alloc;
  if (acfg.arenas == 0) acfg.arenas = nworkers;
  const char *aerr = NULL;
  sl_alloc *alloc = sl_alloc_create(&acfg, &aerr);
  if (alloc == NULL) {
    fprintf(stderr, "sluice: cannot start: allocator: %s\n", aerr);
    return 1;
  }
  for (int i = 0; i < nworkers; i++) {
    workers[i] = sl_worker_create(i, alloc);
    if (workers[i] == NULL || sl_server_start(workers[i], cfg, err, sizeof(err)) != SL_OK) {
      fprintf(stderr, "sluice: cannot start: %s\n", workers[i] ? err : "out of memory");
      for (int j = 0; j <= i; j++) {
        if (workers[j] == NULL) continue;
        sl_server_free(workers[j]);
        sl_worker_destroy(workers[j]);
      }
      sl_alloc_destroy(alloc);
      return 1;
    }
  }
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const sl_listener_cfg *l = &cfg->listeners[i];
    sl_log(SL_LOG_INFO, "listener %s on %s -> %s (%zu stage%s)", l->name, l->listen_text,
           l->upstream ? l->upstream->name : "pipeline", l->nstages, l->nstages == 1 ? "" : "s");
  }
  sl_log(SL_LOG_INFO, "sluice %s started with %d worker%s, %s allocator (config %s)", SL_VERSION,
         nworkers, nworkers == 1 ? "" : "s",
         acfg.type == SL_ALLOC_UNPOOLED ? "unpooled" : "pooled", cfg->path);

  pthread_t threads[SL_MAX_WORKERS];
  for (int i = 0; i < nworkers; i++) pthread_create(&threads[i], NULL, sl_worker_thread, workers[i]);

  for (;;) {
    int sig = 0;
    if (sigwait(&set, &sig) != 0) continue;
    if (sig == SIGHUP) {
      sl_log(SL_LOG_WARN, "SIGHUP: configuration reload is not supported yet; ignored");
      continue;
    }
    sl_log(SL_LOG_INFO, "%s: stopping", sig == SIGINT ? "SIGINT" : "SIGTERM");
    break;
  }
  for (int i = 0; i < nworkers; i++) sl_worker_request_stop(workers[i]);
  uint64_t leaked = 0;
  for (int i = 0; i < nworkers; i++) {
    pthread_join(threads[i], NULL);
    /* The worker thread is gone: this thread owns the pool now, and the
     * Lua state's finalizers release into it. */
    sl_pool_bind_thread(workers[i]->pool);
    sl_server_free(workers[i]);
    leaked += sl_worker_destroy(workers[i]);
  }
  sl_alloc_destroy(alloc);
  sl_log(SL_LOG_INFO, "stopped%s", leaked ? " with leaked buffers" : "");
  return 0;
}

int main(int argc, char **argv) {
  static const struct option longopts[] = {
      {"config", required_argument, NULL, 'c'},
      {"check", required_argument, NULL, 'k'},
      {"version", no_argument, NULL, 'V'},
      {"help", no_argument, NULL, 'h'},
      {NULL, 0, NULL, 0},
  };
  const char *path = NULL;
  int check_only = 0;
  int opt;
  while ((opt = getopt_long(argc, argv, "c:hV", longopts, NULL)) != -1) {
    switch (opt) {
      case 'c': path = optarg; break;
      case 'k': path = optarg; check_only = 1; break;
      case 'V': printf("sluice %s\n", SL_VERSION); return 0;
      case 'h': sl_usage(stdout); return 0;
      default: sl_usage(stderr); return 2;
    }
  }
  if (path == NULL || optind < argc) {
    sl_usage(stderr);
    return 2;
  }
  char err[1024];
  sl_config *cfg = sl_config_load(path, err, sizeof(err));
  if (cfg == NULL) {
    fprintf(stderr, "%s\n", err);
    return 2;
  }
  if (check_only) {
    printf("config ok: %s (%zu listener%s, %zu upstream%s)\n", path, cfg->nlisteners,
           cfg->nlisteners == 1 ? "" : "s", cfg->nupstreams, cfg->nupstreams == 1 ? "" : "s");
    sl_config_free(cfg);
    return 0;
  }
  sl_log_level level = cfg->log_level;
  const char *env = getenv("SLUICE_LOG_LEVEL");
  if (env && *env && sl_log_parse_level(env, &level) != SL_OK) {
    fprintf(stderr, "sluice: SLUICE_LOG_LEVEL: expected debug, info, warn or error, got \"%s\"\n",
            env);
    sl_config_free(cfg);
    return 2;
  }
  sl_log_set_level(level);
  const char *atype = getenv("SLUICE_ALLOCATOR");
  if (atype && *atype) {
    if (strcmp(atype, "unpooled") == 0) cfg->alloc.type = SL_ALLOC_UNPOOLED;
    else if (strcmp(atype, "pooled") == 0) cfg->alloc.type = SL_ALLOC_POOLED;
    else {
      fprintf(stderr, "sluice: SLUICE_ALLOCATOR: expected pooled or unpooled, got \"%s\"\n", atype);
      sl_config_free(cfg);
      return 2;
    }
  }
  const char *leak = getenv("SLUICE_LEAK_DETECTION");
  if (leak && *leak && sl_leak_parse_level(leak, &cfg->alloc.leak_level) != SL_OK) {
    fprintf(stderr, "sluice: SLUICE_LEAK_DETECTION: expected disabled, simple, advanced or "
                    "paranoid, got \"%s\"\n", leak);
    sl_config_free(cfg);
    return 2;
  }
  int rc = sl_run(cfg);
  sl_config_free(cfg);
  return rc;
}
