/*
 * The sluice command line: load and check the config, apply the
 * environment's overrides, and hand over to the runtime (src/proxy/runtime.c).
 *
 * Exit codes: 0 after a clean stop or a good --check, 1 when start-up fails
 * (a port in use), 2 on a bad command line, a bad config or a bad
 * environment (systemd's LISTEN_FDS included).
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc/arena.h"
#include "buf/leak.h"
#include "proxy/config.h"
#include "proxy/runtime.h"
#include "proxy/upgrade.h"
#include "util/common.h"
#include "util/log.h"

static void sl_usage(FILE *out) {
  fprintf(out,
          "usage: sluice -c FILE        run the proxy described by FILE\n"
          "       sluice --check FILE   validate FILE and exit (0: valid, 2: invalid);\n"
          "                             also --check -c FILE\n"
          "       sluice --version\n"
          "       sluice --help\n"
          "\n"
          "Signals: SIGINT and SIGTERM stop accepting, let open connections finish for\n"
          "         drain_timeout_ms, close the rest and exit 0 (a second one closes at once);\n"
          "         SIGHUP reloads FILE and reopens the log files; SIGUSR1 reopens the log files;\n"
          "         SIGUSR2 starts a new sluice (the executable's file as it is now) that takes\n"
          "         over the listening sockets, and this one then drains and exits.\n"
          "Environment: SLUICE_ROOT (sluice's own Lua library), SLUICE_LOG_LEVEL,\n"
          "             SLUICE_ALLOCATOR (pooled or unpooled),\n"
          "             SLUICE_LEAK_DETECTION (disabled, simple, advanced, paranoid);\n"
          "             LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES: listening sockets from\n"
          "             systemd (socket activation), taken by the listeners on their addresses.\n");
}

/* Applies SLUICE_LOG_LEVEL, SLUICE_ALLOCATOR and SLUICE_LEAK_DETECTION to cfg
 * (borrowed) and sets the log level. Returns SL_ERROR, after saying why on
 * stderr, when one holds a value that is not allowed. */
static int sl_apply_env(sl_config *cfg) {
  sl_log_level level = cfg->log_level;
  const char *env = getenv("SLUICE_LOG_LEVEL");
  if (env && *env && sl_log_parse_level(env, &level) != SL_OK) {
    fprintf(stderr, "sluice: SLUICE_LOG_LEVEL: expected debug, info, warn or error, got \"%s\"\n",
            env);
    return SL_ERROR;
  }
  sl_log_set_level(level);
  const char *atype = getenv("SLUICE_ALLOCATOR");
  if (atype && *atype) {
    if (strcmp(atype, "unpooled") == 0) cfg->alloc.type = SL_ALLOC_UNPOOLED;
    else if (strcmp(atype, "pooled") == 0) cfg->alloc.type = SL_ALLOC_POOLED;
    else {
      fprintf(stderr, "sluice: SLUICE_ALLOCATOR: expected pooled or unpooled, got \"%s\"\n", atype);
      return SL_ERROR;
    }
  }
  const char *leak = getenv("SLUICE_LEAK_DETECTION");
  if (leak && *leak && sl_leak_parse_level(leak, &cfg->alloc.leak_level) != SL_OK) {
    fprintf(stderr, "sluice: SLUICE_LEAK_DETECTION: expected disabled, simple, advanced or "
                    "paranoid, got \"%s\"\n", leak);
    return SL_ERROR;
  }
  return SL_OK;
}

int main(int argc, char **argv) {
  static const struct option longopts[] = {
      {"config", required_argument, NULL, 'c'},
      {"check", no_argument, NULL, 'k'},
      {"version", no_argument, NULL, 'V'},
      {"help", no_argument, NULL, 'h'},
      {NULL, 0, NULL, 0},
  };
  sl_upgrade_cloexec();   /* before the configuration's Lua can start a process */
  const char *path = NULL;
  int check_only = 0;
  int opt;
  while ((opt = getopt_long(argc, argv, "c:hV", longopts, NULL)) != -1) {
    switch (opt) {
      case 'c': path = optarg; break;
      case 'k': check_only = 1; break;
      case 'V': printf("sluice %s\nLua library: %s/lua\n", SL_VERSION, sl_config_root()); return 0;
      case 'h': sl_usage(stdout); return 0;
      default: sl_usage(stderr); return 2;
    }
  }
  /* --check FILE: the file is the one operand. */
  if (check_only && path == NULL && optind == argc - 1) path = argv[optind++];
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
  /* The environment's overrides are checked by --check too: a value that
   * would stop the start must not pass the check. */
  if (sl_apply_env(cfg) != SL_OK) {
    sl_config_free(cfg);
    return 2;
  }
  if (check_only) {
    printf("config ok: %s (%zu listener%s, %zu upstream%s)\n", path, cfg->nlisteners,
           cfg->nlisteners == 1 ? "" : "s", cfg->nupstreams, cfg->nupstreams == 1 ? "" : "s");
    sl_config_free(cfg);
    return 0;
  }
  if (sl_upgrade_init(argc, argv, err, sizeof(err)) != SL_OK) {
    fprintf(stderr, "sluice: %s\n", err);
    sl_config_free(cfg);
    return 2;
  }
  return sl_runtime_run(cfg);
}
