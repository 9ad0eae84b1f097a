#include "proxy/server.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/channel.h"
#include "io/listener.h"
#include "io/worker.h"
#include "lua/host.h"
#include "pipeline/stages.h"
#include "proxy/bridge.h"
#include "proxy/config.h"
#include "util/common.h"
#include "util/log.h"

typedef struct sl_server {
  const sl_config *cfg;
  sl_listener *listeners;      /* one per cfg->listeners */
  size_t nlisteners;
  uint32_t *rr;                /* round-robin position per upstream */
} sl_server;

static void sl_server_close_listeners(sl_server *s) {
  for (size_t i = 0; i < s->nlisteners; i++) sl_listener_close(&s->listeners[i]);
}

static void sl_server_on_stop(sl_worker *w) { sl_server_close_listeners(w->app); }

static void sl_server_on_accept(sl_listener *l, int fd, const sl_addr *remote) {
  sl_worker *w = l->w;
  const sl_listener_cfg *lc = l->ud;
  sl_channel_config cc = {lc->low_water_mark, lc->high_water_mark};
  sl_channel *ch = sl_channel_accepted(w, fd, remote, &cc, lc->name);
  if (ch == NULL) {
    sl_log(SL_LOG_ERROR, "listener %s: out of memory accepting a connection", lc->name);
    return;
  }
  for (size_t i = 0; i < lc->nstages; i++) {
    const sl_stage_spec *s = &lc->stages[i];
    sl_ctx *ctx = s->ops ? sl_stage_add(&ch->pipe, s->ops, s->module, s->conf)
                         : sl_lua_host_add_stage(w->lua, &ch->pipe, s);
    if (ctx == NULL) {
      sl_channel_close(ch, "out of memory building the pipeline", 1);
      return;
    }
  }
  if (lc->upstream && sl_bridge_add_client(&ch->pipe, lc) == NULL) {
    sl_channel_close(ch, "out of memory building the pipeline", 1);
    return;
  }
  sl_log(SL_LOG_DEBUG, "%s accepted", sl_channel_describe(ch));
  sl_channel_activate(ch);
}

const sl_addr *sl_server_pick(sl_worker *w, const sl_upstream_cfg *u) {
  sl_server *s = w->app;
  size_t idx = (size_t)(u - s->cfg->upstreams);
  uint32_t n = s->rr[idx]++;
  return &u->servers[n % u->nservers];
}

int sl_server_start(sl_worker *w, const sl_config *cfg, char *err, size_t errlen) {
  sl_server *s = calloc(1, sizeof(*s));
  if (s == NULL) {
    snprintf(err, errlen, "out of memory");
    return SL_ERROR;
  }
  s->cfg = cfg;
  s->listeners = calloc(cfg->nlisteners + 1, sizeof(*s->listeners));
  s->rr = calloc(cfg->nupstreams + 1, sizeof(uint32_t));
  w->app = s;
  w->on_stop = sl_server_on_stop;
  if (s->listeners == NULL || s->rr == NULL) {
    snprintf(err, errlen, "out of memory");
    sl_server_free(w);
    return SL_ERROR;
  }
  if (cfg->nlua_stages > 0) {
    w->lua = sl_lua_host_create(w, cfg, err, errlen);
    if (w->lua == NULL) {
      sl_server_free(w);
      return SL_ERROR;
    }
  }
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    const sl_listener_cfg *lc = &cfg->listeners[i];
    if (sl_listener_open(&s->listeners[i], w, &lc->addr, sl_server_on_accept, (void *)lc) != SL_OK) {
      snprintf(err, errlen, "listeners[%zu] (%s): cannot listen on %s: %s", i + 1, lc->name,
               lc->listen_text, strerror(errno));
      sl_server_free(w);
      return SL_ERROR;
    }
    s->nlisteners++;
  }
  return SL_OK;
}

void sl_server_free(sl_worker *w) {
  sl_server *s = w->app;
  if (s == NULL) return;
  sl_server_close_listeners(s);
  sl_lua_host_destroy(w->lua);
  w->lua = NULL;
  free(s->listeners);
  free(s->rr);
  free(s);
  w->app = NULL;
  w->on_stop = NULL;
}
