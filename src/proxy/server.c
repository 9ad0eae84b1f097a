#include "proxy/server.h"

#include <errno.h>
#include <stdio.h>
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
#include "proxy/metrics.h"
#include "proxy/upstream.h"
#include "util/common.h"
#include "util/log.h"

_Atomic int sl_access_log_fd = -1;
_Atomic int sl_access_log_json = 0;

typedef struct sl_server_gen sl_server_gen;

/* One listener of one configuration on one worker. Its client channels
 * point at it (ud) until they close. */
typedef struct sl_server_listener {
  sl_listener l;
  const sl_listener_cfg *lc;   /* borrowed from gen->cfg */
  sl_listen_set *set;          /* borrowed from the runtime */
  uint16_t metrics;            /* index in the worker's metrics (proxy/metrics.h) */
} sl_server_listener;

/* A configuration as one worker runs it. Invariant: freed only once no
 * channel created under it is left (its listeners stopped long before). */
struct sl_server_gen {
  sl_worker_gen base;
  sl_config *cfg;              /* one reference */
  sl_server_listener *ls;      /* one per cfg->listeners */
  sl_upstreams *ups;           /* balancing and health of cfg's upstreams on this worker */
};

static sl_server_gen *sl_server_gen_of(sl_worker_gen *g) {
  return SL_CONTAINER_OF(g, sl_server_gen, base);
}

/* ---- access log ---- */

/* Appends s to out as a logfmt value: quoted, with " and \ escaped and
 * control characters replaced. */
static size_t sl_server_quote(char *out, size_t room, const char *s) {
  size_t n = 0;
  if (room < 3) return 0;
  out[n++] = '"';
  for (; *s && n + 3 < room; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') out[n++] = '\\';
    out[n++] = c < 0x20 ? ' ' : (char)c;
  }
  out[n++] = '"';
  return n;
}

/* The length of the UTF-8 sequence at s (end: where the text ends), or 0
 * when it is not a valid one: a stray byte, an overlong form, a surrogate,
 * above U+10FFFF, or cut short (a reason cut at its length limit). */
static size_t sl_server_utf8_len(const unsigned char *s, const unsigned char *end) {
  unsigned c = s[0], lo = 0x80, hi = 0xBF;
  size_t n;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if ((size_t)(end - s) < n || s[1] < lo || s[1] > hi) return 0;
  for (size_t i = 2; i < n; i++)
    if (s[i] < 0x80 || s[i] > 0xBF) return 0;
  return n;
}

/* Appends s to out as a JSON string of at most room bytes, quotes
 * included: " and \ escaped, control characters as \u00XX, valid UTF-8 as
 * it is and any other byte as U+FFFD, so that the line is valid JSON in
 * UTF-8 whatever bytes a stage gave; cut on a character boundary when
 * room runs out. Returns the bytes written. */
static size_t sl_server_json_string(char *out, size_t room, const char *s) {
  const unsigned char *p = (const unsigned char *)s, *end = p + strlen(s);
  size_t n = 0;
  if (room < 2) return 0;
  out[n++] = '"';
  room--;   /* the closing quote */
  while (p < end) {
    unsigned c = *p;
    size_t k = c < 0x80 ? 1 : sl_server_utf8_len(p, end);
    if (c == '"' || c == '\\') {
      if (n + 2 > room) break;
      out[n++] = '\\';
      out[n++] = (char)c;
    } else if (c < 0x20 || c == 0x7f) {
      if (n + 6 > room) break;
      n += (size_t)snprintf(out + n, 7, "\\u%04x", c);
    } else if (k == 0) {
      if (n + 6 > room) break;
      memcpy(out + n, "\\ufffd", 6);
      n += 6;
      k = 1;
    } else {
      if (n + k > room) break;
      memcpy(out + n, p, k);
      n += k;
    }
    p += k;
  }
  out[n++] = '"';
  return n;
}

#define SL_SERVER_JSON_NAME 130   /* room for a listener's name, quotes included */

static void sl_server_access_log(sl_channel *ch, const sl_server_listener *sl) {
  int fd = atomic_load_explicit(&sl_access_log_fd, memory_order_relaxed);
  if (fd < 0) return;
  int json = atomic_load_explicit(&sl_access_log_json, memory_order_relaxed);
  char line[1024], client[64], up[64];
  sl_addr_format((const struct sockaddr *)&ch->remote.ss, client, sizeof(client));
  int has_up = ch->peer_addr.sa.sa_family != AF_UNSPEC;
  if (has_up) sl_addr_format(&ch->peer_addr.sa, up, sizeof(up));
  else snprintf(up, sizeof(up), "%s", json ? "null" : "-");
  unsigned long long in = (unsigned long long)ch->bytes_in, out = (unsigned long long)ch->bytes_out;
  double ms = (ev_now(ch->w->loop) - ch->started) * 1000.0;
  /* A TLS listener's lines say the version (none: no handshake done). */
  const char *tls = sl->lc->tls ? sl_channel_tls_version(ch) : NULL;
  int has_tls = sl->lc->tls != NULL;
  size_t n;
  if (json) {
    /* Every field but the name and the reason is short and plain; those
     * two are escaped and bounded, so the line always closes. */
    char when[40];
    sl_log_format_time(when, sizeof(when));
    n = (size_t)snprintf(line, sizeof(line), "{\"time\":\"%s\",\"client\":\"%s\",\"listener\":",
                         when, client);
    n += sl_server_json_string(line + n, SL_SERVER_JSON_NAME, sl->lc->name);
    n += (size_t)snprintf(line + n, sizeof(line) - n,
                          ",\"upstream\":%s%s%s,\"worker\":%d,\"bytes_in\":%llu,\"bytes_out\":%llu,"
                          "\"duration_ms\":%.0f,%s%s%s%s\"reason\":",
                          has_up ? "\"" : "", up, has_up ? "\"" : "", ch->w->id, in, out, ms,
                          has_tls ? "\"tls\":" : "", tls ? "\"" : "",
                          has_tls ? (tls ? tls : "null") : "", has_tls ? (tls ? "\"," : ",") : "");
    n += sl_server_json_string(line + n, sizeof(line) - n - 2, ch->reason);
    line[n++] = '}';
  } else {
    n = (size_t)sl_log_format_time(line, sizeof(line));
    n += (size_t)snprintf(line + n, sizeof(line) - n,
                          " client=%s listener=%s upstream=%s worker=%d bytes_in=%llu "
                          "bytes_out=%llu duration_ms=%.0f %s%s%sreason=",
                          client, sl->lc->name, up, ch->w->id, in, out, ms, has_tls ? "tls=" : "",
                          has_tls ? (tls ? tls : "-") : "", has_tls ? " " : "");
    if (n >= sizeof(line) - 4) n = sizeof(line) - 4;
    n += sl_server_quote(line + n, sizeof(line) - n - 1, ch->reason);
  }
  line[n++] = '\n';
  /* One write per line: lines from several workers never mix. */
  ssize_t w = write(fd, line, n);
  SL_UNUSED(w);
}

/* ---- accepting ---- */

static void sl_server_on_client_close(sl_channel *ch) {
  sl_server_listener *sl = ch->ud;
  sl_listen_gate_leave(&sl->set->gate);
  if (ch->limit_key.family != 0) sl_client_limit_leave(&sl->set->clients, &ch->limit_key);
  sl_metrics_client_closed(ch->w, ch->mlistener, ch);
  sl_server_access_log(ch, sl);
}

/* max_connections_per_client: counts ch under its client's address (the
 * socket's peer, before any PROXY protocol header), or closes it at once
 * when that address has the limit open already (SL_ERROR). */
static int sl_server_client_enter(sl_server_listener *sl, sl_channel *ch, const sl_addr *remote) {
  sl_addr_key k;
  sl_addr_key_of((const struct sockaddr *)&remote->ss, &k);
  switch (sl_client_limit_enter(&sl->set->clients, &k)) {
    case SL_CLIENT_COUNTED: ch->limit_key = k; return SL_OK;
    case SL_CLIENT_REFUSED: {
      char why[64];
      snprintf(why, sizeof(why), "max_connections_per_client (%u open)",
               (unsigned)atomic_load(&sl->set->clients.max));
      sl_metrics_client_limited(ch->w, sl->metrics);
      sl_channel_close(ch, why, 0);
      return SL_ERROR;
    }
    default: return SL_OK;   /* not counted: no limit now, or out of memory */
  }
}

static void sl_server_on_rate_pause(sl_listener *l) {
  sl_server_listener *sl = l->ud;
  sl_metrics_rate_paused(l->w, sl->metrics);
}

/* The TLS handshake of a client channel ended (err 0: done). */
static void sl_server_on_handshake(sl_channel *ch, int err) {
  sl_server_listener *sl = ch->ud;
  sl_metrics_tls_handshake(ch->w, sl->metrics, err == 0);
  if (err == 0) sl_channel_activate(ch);
}

static void sl_server_on_accept(sl_listener *l, int fd, const sl_addr *remote) {
  sl_worker *w = l->w;
  sl_server_listener *sl = l->ud;
  const sl_listener_cfg *lc = sl->lc;
  sl_channel_config cc;
  sl_listener_channel_config(lc, &cc);
  sl_channel *ch = sl_channel_accepted(w, fd, remote, &cc, lc->name);
  if (ch == NULL) {
    sl_listen_gate_leave(l->gate);
    sl_log(SL_LOG_ERROR, "listener %s: out of memory accepting a connection", lc->name);
    return;
  }
  ch->ud = sl;
  ch->on_close = sl_server_on_client_close;
  ch->mlistener = sl->metrics;
  ch->mclient = 1;
  sl_metrics_client_opened(w, sl->metrics);
  if (lc->max_per_client > 0 && sl_server_client_enter(sl, ch, remote) != SL_OK) return;
  /* A stage's added callback may close the channel (a deny list, an error):
   * the reference keeps it alive until the build stops. */
  sl_channel_ref(ch);
  for (size_t i = 0; i < lc->nstages && !sl_channel_is_closed(ch); i++) {
    const sl_stage_spec *s = &lc->stages[i];
    sl_ctx *ctx = s->ops ? sl_stage_add(&ch->pipe, s->ops, s->module, s->conf)
                         : sl_lua_host_add_stage(w->lua, &ch->pipe, s);
    if (ctx == NULL) sl_channel_close(ch, "out of memory building the pipeline", 1);
  }
  if (!sl_channel_is_closed(ch) && lc->upstream && sl_bridge_add_client(&ch->pipe, lc) == NULL)
    sl_channel_close(ch, "out of memory building the pipeline", 1);
  if (!sl_channel_is_closed(ch)) {
    sl_channel_set_idle_timeout(ch, lc->idle_timeout);
    sl_channel_set_half_close_timeout(ch, lc->half_close_timeout);
    sl_server_tcp_keepalive(ch, lc);
    if (sl_log_enabled(SL_LOG_DEBUG)) sl_log(SL_LOG_DEBUG, "%s accepted", sl_channel_describe(ch));
    if (lc->tls == NULL) {
      sl_channel_activate(ch);
    } else if (sl_channel_tls_accept(ch, lc->tls, lc->tls_handshake_timeout,
                                     lc->tls_proxy_protocol, sl_server_on_handshake) != SL_OK) {
      sl_channel_close(ch, "out of memory starting TLS", 1);
    }
  }
  sl_channel_unref(ch);
}

void sl_server_tcp_keepalive(sl_channel *ch, const sl_listener_cfg *lc) {
  if (!lc->keepalive) return;
  if (sl_channel_set_keepalive(ch, lc->keepalive_idle, lc->keepalive_interval,
                               lc->keepalive_count) != SL_OK)
    sl_log(SL_LOG_WARN, "%s: tcp_keepalive refused: %s", sl_channel_describe(ch), strerror(errno));
}

const sl_listener_cfg *sl_server_listener_cfg(const sl_channel *ch) {
  if (ch->on_close != sl_server_on_client_close) return NULL;
  return ((const sl_server_listener *)ch->ud)->lc;
}

sl_upstreams *sl_server_upstreams(const sl_channel *ch) {
  return ch->gen ? sl_server_gen_of(ch->gen)->ups : NULL;
}

/* ---- generations ---- */

sl_upstreams *sl_server_gen_upstreams(sl_worker_gen *g) {
  return g ? sl_server_gen_of(g)->ups : NULL;
}

static void sl_server_gen_free(sl_worker *w, sl_server_gen *g) {
  if (g == NULL) return;
  for (size_t i = 0; g->ls && i < g->cfg->nlisteners; i++) sl_listener_stop(&g->ls[i].l);
  free(g->ls);
  sl_upstreams_destroy(g->ups);
  sl_config_unref(g->cfg);
  SL_UNUSED(w);
  free(g);
}

static sl_server_gen *sl_server_gen_new(sl_worker *w, sl_config *cfg, sl_listen_set **sets) {
  sl_server_gen *g = calloc(1, sizeof(*g));
  if (g == NULL) return NULL;
  g->ls = calloc(cfg->nlisteners + 1, sizeof(*g->ls));
  g->ups = sl_upstreams_create(w, cfg);
  if (g->ls == NULL || g->ups == NULL) {
    free(g->ls);
    sl_upstreams_destroy(g->ups);
    free(g);
    return NULL;
  }
  sl_config_ref(cfg);
  g->cfg = cfg;
  for (size_t i = 0; i < cfg->nlisteners; i++) {
    g->ls[i].lc = &cfg->listeners[i];
    g->ls[i].set = sets[i];
    g->ls[i].l.fd = -1;
  }
  return g;
}

static void sl_server_gen_listen(sl_worker *w, sl_server_gen *g) {
  for (size_t i = 0; i < g->cfg->nlisteners; i++) {
    sl_server_listener *sl = &g->ls[i];
    sl->metrics = sl_metrics_listener(w, sl->lc->name);
    atomic_store(&sl->set->gate.max, sl->lc->max_connections);
    atomic_store(&sl->set->clients.max, sl->lc->max_per_client);
    sl_listen_gate_set_rate(&sl->set->gate, sl->lc->max_rate);
    sl_listener_start(&sl->l, w, sl->set->fds[w->id], &sl->set->gate, sl->lc->name,
                      sl_server_on_accept, sl);
    sl->l.on_rate_pause = sl_server_on_rate_pause;
  }
}

static void sl_server_gen_stop(sl_server_gen *g) {
  for (size_t i = 0; i < g->cfg->nlisteners; i++) sl_listener_stop(&g->ls[i].l);
  sl_upstreams_stop_checks(g->ups);
}

/* A configuration no connection of w uses any more. */
static void sl_server_on_gen_done(sl_worker *w, sl_worker_gen *wg) {
  sl_server_gen *g = sl_server_gen_of(wg);
  /* A configuration derived from this one's owner (host names resolved
   * again) runs the same stages: they stay while one of its generations does. */
  int shared = 0;
  for (sl_worker_gen *o = w->gen; o != NULL && !shared; o = o->older)
    shared = o != wg && sl_config_owner(sl_server_gen_of(o)->cfg) == sl_config_owner(g->cfg);
  if (w->lua && g->cfg->nlua_stages > 0 && !shared)
    sl_lua_host_unload(w->lua, g->cfg->lua_key_first, g->cfg->nlua_stages);
  sl_log(SL_LOG_DEBUG, "worker %d: the configuration before a reload has no connection left",
         w->id);
  sl_server_gen_free(w, g);
}

static void sl_server_on_stop(sl_worker *w) {
  if (w->gen == NULL) return;
  sl_server_gen *g = sl_server_gen_of(w->gen);
  sl_server_gen_stop(g);
  /* Closed, not just left alone: new connections are refused at once
   * instead of waiting in the kernel's queue. */
  for (size_t i = 0; i < g->cfg->nlisteners; i++) {
    sl_listen_set *set = g->ls[i].set;
    if (set->fds[w->id] >= 0) {
      close(set->fds[w->id]);
      set->fds[w->id] = -1;
    }
  }
}

static void sl_server_on_wake(sl_worker *w) {
  if (w->gen == NULL) return;
  sl_server_gen *g = sl_server_gen_of(w->gen);
  for (size_t i = 0; i < g->cfg->nlisteners; i++) sl_listener_retry(&g->ls[i].l);
}

/* ---- life cycle ---- */

int sl_server_start(sl_worker *w, sl_config *cfg, sl_listen_set **sets, char *err,
                    size_t errlen) {
  if (cfg->nlua_stages > 0) {
    w->lua = sl_lua_host_create(w, cfg, err, errlen);
    if (w->lua == NULL) return SL_ERROR;
  }
  sl_server_gen *g = sl_server_gen_new(w, cfg, sets);
  if (g == NULL) {
    snprintf(err, errlen, "out of memory");
    return SL_ERROR;
  }
  w->on_stop = sl_server_on_stop;
  w->on_wake = sl_server_on_wake;
  w->on_gen_done = sl_server_on_gen_done;
  w->drain_timeout = cfg->drain_timeout;
  sl_worker_push_gen(w, &g->base);
  sl_server_gen_listen(w, g);
  return SL_OK;
}

int sl_server_prepare(sl_worker *w, const sl_config *cfg, char *err, size_t errlen) {
  if (cfg->nlua_stages == 0) return SL_OK;
  if (w->lua == NULL) {
    w->lua = sl_lua_host_create(w, cfg, err, errlen);
    return w->lua ? SL_OK : SL_ERROR;
  }
  return sl_lua_host_load(w->lua, cfg, err, errlen);
}

void sl_server_abort(sl_worker *w, const sl_config *cfg) {
  if (w->lua && cfg->nlua_stages > 0)
    sl_lua_host_unload(w->lua, cfg->lua_key_first, cfg->nlua_stages);
}

int sl_server_commit(sl_worker *w, sl_config *cfg, sl_listen_set **sets,
                     sl_listen_set **dropped) {
  sl_server_gen *g = sl_server_gen_new(w, cfg, sets);
  if (g == NULL) return SL_ERROR;
  if (w->gen) {
    sl_server_gen *was = sl_server_gen_of(w->gen);
    /* Host names resolved again: servers that stay keep their health. */
    if (sl_config_owner(was->cfg) == sl_config_owner(cfg)) sl_upstreams_inherit(g->ups, was->ups);
    sl_server_gen_stop(was);
  }
  for (; *dropped; dropped++) {
    sl_listen_set *set = *dropped;
    if (set->fds[w->id] >= 0) {
      close(set->fds[w->id]);
      set->fds[w->id] = -1;
    }
  }
  w->drain_timeout = cfg->drain_timeout;
  sl_lua_host_set_memory_limit(w->lua, cfg->lua_memory_limit);
  sl_lua_host_set_timeout(w->lua, cfg->lua_timeout_ms);
  sl_worker_push_gen(w, &g->base);
  sl_server_gen_listen(w, g);
  /* Listeners that stayed may have been paused at their old limit. */
  sl_server_on_wake(w);
  return SL_OK;
}

void sl_server_free(sl_worker *w) {
  sl_worker_gen *g = w->gen;
  w->gen = NULL;
  while (g != NULL) {
    sl_worker_gen *older = g->older;
    SL_ASSERT(g->channels == 0, "configuration freed while channels use it");
    sl_server_gen_free(w, sl_server_gen_of(g));
    g = older;
  }
  sl_lua_host_destroy(w->lua);
  w->lua = NULL;
  w->on_stop = NULL;
  w->on_wake = NULL;
  w->on_gen_done = NULL;
}
