/*
 * The running configuration: what lua/sluice/config.lua validated and
 * normalized, read into C structs. The config's own lua_State stays open
 * because Lua stage options live there until each worker copies them into
 * its state.
 */
#ifndef SL_CONFIG_H
#define SL_CONFIG_H

#include <stddef.h>

#include "alloc/arena.h"
#include "io/addr.h"
#include "pipeline/pipeline.h"
#include "util/log.h"

typedef struct lua_State lua_State;

typedef struct sl_stage_spec {
  char *module;                /* module name, also the stage's name in logs */
  const sl_stage_ops *ops;     /* C stages; NULL for Lua stages */
  void *conf;                  /* C stages: parsed options (sl_stage_configure) */
  char *file;                  /* Lua stages: the file that was found */
  int options_ref;             /* Lua stages: options table in the config state */
  int lua_key;                 /* Lua stages: 1-based index among all Lua stages */
} sl_stage_spec;

typedef struct sl_upstream_cfg {
  char *name;
  sl_addr *servers;
  char **server_text;
  size_t nservers;
  double connect_timeout;      /* seconds */
} sl_upstream_cfg;

typedef struct sl_listener_cfg {
  char *name;
  char *listen_text;
  sl_addr addr;
  sl_upstream_cfg *upstream;   /* NULL: the pipeline answers */
  sl_stage_spec *stages;
  size_t nstages;
  size_t low_water_mark, high_water_mark;
} sl_listener_cfg;

typedef struct sl_config {
  char *path;
  char *root;                  /* sluice's own folder (lua/, examples/) */
  char *search_path;           /* package.path for stage modules */
  sl_log_level log_level;
  sl_alloc_config alloc;       /* arenas 0: one per worker */
  sl_listener_cfg *listeners;
  size_t nlisteners;
  sl_upstream_cfg *upstreams;
  size_t nupstreams;
  int nlua_stages;
  lua_State *L;
} sl_config;

/* sluice's own folder: $SLUICE_ROOT, else the folder it was built from. */
const char *sl_config_root(void);

/* Loads and validates path. Returns the config, or NULL with the message
 * ("config error: listeners[1].listen: expected ...") in err. */
sl_config *sl_config_load(const char *path, char *err, size_t errlen);

void sl_config_free(sl_config *c);

#endif
