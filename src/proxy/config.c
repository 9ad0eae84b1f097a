#include "proxy/config.h"

#include <lauxlib.h>
#include <limits.h>
#include <lua.h>
#include <lualib.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "buf/leak.h"
#include "io/addr.h"
#include "io/channel.h"
#include "lua/host.h"
#include "pipeline/stages.h"
#include "util/common.h"
#include "util/log.h"

#ifndef SLUICE_ROOT_DIR
#define SLUICE_ROOT_DIR "."
#endif

static char sl_installed_root[PATH_MAX + 32];
static pthread_once_t sl_installed_once = PTHREAD_ONCE_INIT;

/* An installed binary is PREFIX/bin/sluice, its library in
 * PREFIX/share/sluice/lua (CMake's install rules): found from
 * /proc/self/exe, so that an installed tree can be moved as a whole. */
static void sl_find_installed_root(void) {
  char exe[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) return;
  exe[n] = '\0';
  for (int up = 0; up < 2; up++) {   /* PREFIX/bin/sluice -> PREFIX */
    char *slash = strrchr(exe, '/');
    if (slash == NULL) return;
    *slash = '\0';
  }
  char probe[PATH_MAX + 64];
  snprintf(probe, sizeof(probe), "%s/share/sluice/lua/sluice/config.lua", exe);
  if (access(probe, R_OK) == 0)
    snprintf(sl_installed_root, sizeof(sl_installed_root), "%s/share/sluice", exe);
}

const char *sl_config_root(void) {
  const char *r = getenv("SLUICE_ROOT");
  if (r && *r) return r;
  pthread_once(&sl_installed_once, sl_find_installed_root);
  return sl_installed_root[0] ? sl_installed_root : SLUICE_ROOT_DIR;
}

static char *sl_strdup_field(lua_State *L, int idx, const char *key) {
  lua_getfield(L, idx, key);
  const char *s = lua_tostring(L, -1);
  char *copy = s ? strdup(s) : NULL;
  lua_pop(L, 1);
  return copy;
}

/* A string field that may hold any bytes: a copy and its length, or NULL. */
static char *sl_bytes_field(lua_State *L, int idx, const char *key, size_t *len) {
  lua_getfield(L, idx, key);
  size_t n = 0;
  const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tolstring(L, -1, &n) : NULL;
  char *copy = s ? malloc(n + 1) : NULL;
  if (copy) {
    memcpy(copy, s, n);
    copy[n] = '\0';
  }
  *len = copy ? n : 0;
  lua_pop(L, 1);
  return copy;
}

static lua_Number sl_num_field(lua_State *L, int idx, const char *key) {
  lua_getfield(L, idx, key);
  lua_Number n = lua_tonumber(L, -1);
  lua_pop(L, 1);
  return n;
}

/* Reads a normalized address table { host, port, text } at idx. */
static int sl_read_addr(lua_State *L, int idx, sl_addr *a, char **text) {
  char *host = sl_strdup_field(L, idx, "host");
  int port = (int)sl_num_field(L, idx, "port");
  int rc = host ? sl_addr_parse(a, host, port) : SL_ERROR;
  free(host);
  if (text) *text = sl_strdup_field(L, idx, "text");
  return rc;
}

static void sl_read_allocator(sl_config *c, lua_State *L, int cfg) {
  sl_alloc_config *a = &c->alloc;
  sl_alloc_config_defaults(a);
  lua_getfield(L, cfg, "allocator");
  int t = lua_gettop(L);
  char *type = sl_strdup_field(L, t, "type");
  a->type = type && strcmp(type, "unpooled") == 0 ? SL_ALLOC_UNPOOLED : SL_ALLOC_POOLED;
  free(type);
  a->arenas = (int)sl_num_field(L, t, "arenas");
  a->page_size = (size_t)sl_num_field(L, t, "page_size");
  a->chunk_size = (size_t)sl_num_field(L, t, "chunk_size");
  a->small_cache = (int)sl_num_field(L, t, "small_cache");
  a->normal_cache = (int)sl_num_field(L, t, "normal_cache");
  a->max_cached = (size_t)sl_num_field(L, t, "max_cached");
  a->trim_interval = (int)sl_num_field(L, t, "trim_interval");
  a->trim_idle_ms = (int)sl_num_field(L, t, "trim_idle_ms");
  a->max_memory = (size_t)sl_num_field(L, t, "max_memory");
  lua_pop(L, 1);
  lua_getfield(L, cfg, "leak_detection");
  t = lua_gettop(L);
  char *level = sl_strdup_field(L, t, "level");
  if (level == NULL || sl_leak_parse_level(level, &a->leak_level) != SL_OK) a->leak_level = 1;
  free(level);
  a->leak_sample = (uint32_t)sl_num_field(L, t, "sample_rate");
  lua_pop(L, 1);
}

/* The wire format of ALPN (a length byte before each name) of the array at
 * the top of L's stack into o (NULL: none). SL_ERROR when out of memory. */
static int sl_read_alpn(lua_State *L, sl_tls_opts *o) {
  if (!lua_istable(L, -1)) return SL_OK;
  size_t n = lua_objlen(L, -1), total = 0;
  for (size_t j = 1; j <= n; j++) {
    lua_rawgeti(L, -1, (int)j);
    total += 1 + lua_objlen(L, -1);
    lua_pop(L, 1);
  }
  unsigned char *w = malloc(total ? total : 1);
  size_t at = 0;
  for (size_t j = 1; w && j <= n; j++) {
    lua_rawgeti(L, -1, (int)j);
    size_t len = 0;
    const char *p = lua_tolstring(L, -1, &len);
    w[at++] = (unsigned char)len;
    memcpy(w + at, p, len);
    at += len;
    lua_pop(L, 1);
  }
  o->alpn = w;
  o->alpn_len = w ? total : 0;
  return w ? SL_OK : SL_ERROR;
}

/* The options of a normalized tls table at tt that listeners and upstreams
 * share. */
static void sl_read_tls_common(lua_State *L, int tt, sl_tls_opts *o) {
  o->certificate = sl_strdup_field(L, tt, "certificate");
  o->key = sl_strdup_field(L, tt, "key");
  o->ciphers = sl_strdup_field(L, tt, "ciphers");
  o->ciphersuites = sl_strdup_field(L, tt, "ciphersuites");
  char *v = sl_strdup_field(L, tt, "min_version");
  o->min_version = v && strcmp(v, "TLSv1.3") == 0 ? SL_TLS_1_3 : SL_TLS_1_2;
  free(v);
}

static void sl_tls_opts_free(sl_tls_opts *o) {
  free((char *)o->certificate);
  free((char *)o->key);
  free((char *)o->ciphers);
  free((char *)o->ciphersuites);
  free((unsigned char *)o->alpn);
  free((char *)o->ca);
  free((char *)o->client_ca);
  free((char *)o->crl);
  free((char *)o->ocsp_response);
  for (size_t i = 0; o->ticket_keys && i < o->nticket_keys; i++) free((char *)o->ticket_keys[i]);
  free((char **)o->ticket_keys);
  for (size_t i = 0; o->sni && i < o->nsni; i++) {
    free((char *)o->sni[i].certificate);
    free((char *)o->sni[i].key);
    free((char *)o->sni[i].ocsp_response);
  }
  free((sl_tls_cert *)o->sni);
  memset(o, 0, sizeof(*o));
}

/* An upstream's normalized tls table (at tt) into u: its client context,
 * built (share NULL) or shared with share, the same upstream of the
 * configuration a derived one comes from. A failure names the key
 * (upstreams.NAME.tls.ca). */
static int sl_read_upstream_tls(lua_State *L, int tt, sl_upstream_cfg *u,
                                const sl_upstream_cfg *share, char *err, size_t errlen) {
  u->tls_server_name = sl_strdup_field(L, tt, "server_name");
  if (share != NULL) {
    u->tls = sl_tls_ctx_ref(share->tls);
    return SL_OK;
  }
  sl_tls_opts o = {0};
  sl_read_tls_common(L, tt, &o);
  o.ca = sl_strdup_field(L, tt, "ca");
  o.crl = sl_strdup_field(L, tt, "crl");
  lua_getfield(L, tt, "verify");
  o.verify = lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, tt, "session_reuse");
  o.session_reuse = lua_toboolean(L, -1);
  lua_getfield(L, tt, "alpn");
  int rc = sl_read_alpn(L, &o);
  lua_pop(L, 2);
  char why[1024];
  if (rc == SL_OK) u->tls = sl_tls_client_ctx_new(&o, why, sizeof(why));
  else snprintf(why, sizeof(why), "alpn: out of memory");
  sl_tls_opts_free(&o);   /* the context has its own copies */
  if (u->tls == NULL) {
    snprintf(err, errlen, "config error: upstreams.%s.tls.%s", u->name, why);
    return SL_ERROR;
  }
  return SL_OK;
}

/* Step i of u's health check from the table at st: `send`, `expect` or
 * `expect_regex` (validated: exactly one, a non-empty string). A regex
 * that does not compile fails, naming the key and regerror's text. */
static int sl_read_health_step(lua_State *L, int st, sl_upstream_cfg *u, size_t i, char *err,
                               size_t errlen) {
  static const char *const keys[] = {"send", "expect", "expect_regex"};
  sl_health_step *s = &u->health.steps[i];
  for (int k = 0; k < 3 && s->bytes == NULL; k++) {
    s->bytes = sl_bytes_field(L, st, keys[k], &s->len);
    s->kind = (sl_health_step_kind)k;
  }
  if (s->bytes == NULL) {
    snprintf(err, errlen, "config error: out of memory");
    return SL_ERROR;
  }
  if (s->kind != SL_HEALTH_STEP_SEND) u->health.expects = 1;
  if (s->kind != SL_HEALTH_STEP_EXPECT_REGEX) return SL_OK;
  regex_t *re = malloc(sizeof(*re));
  int rc = re ? regcomp(re, s->bytes, REG_EXTENDED | REG_NEWLINE) : REG_ESPACE;
  if (rc != 0) {
    char why[256] = "out of memory";
    if (re) regerror(rc, re, why, sizeof(why));
    free(re);
    snprintf(err, errlen,
             "config error: upstreams.%s.health_check.steps[%zu].expect_regex: expected a POSIX "
             "extended regular expression, got an invalid one (%s)",
             u->name, i + 1, why);
    return SL_ERROR;
  }
  s->re = re;
  return SL_OK;
}

/* u's health check steps from its normalized health_check table at ht:
 * `steps`, or the shorthand `send` then `expect`. */
static int sl_read_health_steps(lua_State *L, int ht, sl_upstream_cfg *u, char *err,
                                size_t errlen) {
  sl_health_cfg *hc = &u->health;
  lua_getfield(L, ht, "steps");
  int given = lua_istable(L, -1);
  size_t n = given ? lua_objlen(L, -1) : 0;
  if (!given) {
    lua_getfield(L, ht, "send");
    n += !lua_isnil(L, -1);
    lua_getfield(L, ht, "expect");
    n += !lua_isnil(L, -1);
    lua_pop(L, 2);
  }
  hc->nsteps = 0;
  if (n == 0) {
    lua_pop(L, 1);
    return SL_OK;
  }
  hc->steps = calloc(n, sizeof(*hc->steps));
  if (hc->steps == NULL) {
    lua_pop(L, 1);
    snprintf(err, errlen, "config error: out of memory");
    return SL_ERROR;
  }
  hc->nsteps = n;   /* sl_free_upstreams frees what was read of them */
  int rc = SL_OK;
  if (given) {
    for (size_t i = 0; i < n && rc == SL_OK; i++) {
      lua_rawgeti(L, -1, (int)i + 1);
      rc = sl_read_health_step(L, lua_gettop(L), u, i, err, errlen);
      lua_pop(L, 1);
    }
  } else {
    /* The shorthand: { send }, then { expect }, each when given. */
    size_t len = 0;
    char *send = sl_bytes_field(L, ht, "send", &len);
    if (send != NULL) *hc->steps = (sl_health_step){SL_HEALTH_STEP_SEND, send, len, NULL};
    char *expect = sl_bytes_field(L, ht, "expect", &len);
    if (expect != NULL) {
      hc->steps[n - 1] = (sl_health_step){SL_HEALTH_STEP_EXPECT, expect, len, NULL};
      hc->expects = 1;
    }
  }
  lua_pop(L, 1);
  return rc;
}

/* c's upstreams from the normalized table ups (at the top of L's stack)
 * in the order of the array of names below it (both popped). share: the
 * configuration c derives from (its upstreams' TLS contexts are shared,
 * not built again), or NULL. */
static int sl_read_upstreams(sl_config *c, lua_State *L, const sl_config *share, char *err,
                             size_t errlen) {
  c->nupstreams = lua_objlen(L, -2);
  c->upstreams = calloc(c->nupstreams + 1, sizeof(*c->upstreams));
  if (c->upstreams == NULL) {
    c->nupstreams = 0;
    lua_pop(L, 2);
    snprintf(err, errlen, "config error: out of memory");
    return SL_ERROR;
  }
  for (size_t i = 0; i < c->nupstreams; i++) {
    sl_upstream_cfg *u = &c->upstreams[i];
    lua_rawgeti(L, -2, (int)i + 1);
    lua_gettable(L, -2);
    int ut = lua_gettop(L);
    u->name = sl_strdup_field(L, ut, "name");
    u->connect_timeout = sl_num_field(L, ut, "connect_timeout_ms") / 1000.0;
    u->tries = (int)sl_num_field(L, ut, "tries");
    u->max_fails = (int)sl_num_field(L, ut, "max_fails");
    u->fail_timeout = sl_num_field(L, ut, "fail_timeout_ms") / 1000.0;
    u->send_proxy = (int)sl_num_field(L, ut, "send_proxy");
    u->resolve_interval_ms = (int)sl_num_field(L, ut, "resolve_interval_ms");
    lua_getfield(L, ut, "hosts");
    u->nhosts = lua_objlen(L, -1);
    u->hosts = calloc(u->nhosts + 1, sizeof(char *));
    for (size_t j = 0; u->hosts && j < u->nhosts; j++) {
      lua_rawgeti(L, -1, (int)j + 1);
      u->hosts[j] = strdup(lua_tostring(L, -1));
      lua_pop(L, 1);
    }
    if (u->hosts == NULL) u->nhosts = 0;
    lua_pop(L, 1);
    lua_getfield(L, ut, "tls");
    const sl_upstream_cfg *same = share && i < share->nupstreams && share->upstreams[i].tls &&
                                          strcmp(share->upstreams[i].name, u->name) == 0
                                      ? &share->upstreams[i]
                                      : NULL;
    if (lua_istable(L, -1) &&
        sl_read_upstream_tls(L, lua_gettop(L), u, same, err, errlen) != SL_OK)
      return SL_ERROR;
    lua_pop(L, 1);
    char *balance = sl_strdup_field(L, ut, "balance");
    int bad_balance = balance == NULL || sl_balance_parse(balance, &u->balance) != SL_OK;
    free(balance);
    SL_ASSERT(!bad_balance, "validated balance name not known");
    lua_getfield(L, ut, "health_check");
    if (lua_istable(L, -1)) {
      int ht = lua_gettop(L);
      u->has_health_check = 1;
      u->health.interval = sl_num_field(L, ht, "interval_ms") / 1000.0;
      u->health.timeout = sl_num_field(L, ht, "timeout_ms") / 1000.0;
      u->health.fails = (int)sl_num_field(L, ht, "fails");
      u->health.passes = (int)sl_num_field(L, ht, "passes");
      if (sl_read_health_steps(L, ht, u, err, errlen) != SL_OK) return SL_ERROR;
    }
    lua_pop(L, 1);
    lua_getfield(L, ut, "servers");
    u->nservers = lua_objlen(L, -1);
    u->servers = calloc(u->nservers, sizeof(*u->servers));
    u->server_text = calloc(u->nservers, sizeof(char *));
    u->server_name = calloc(u->nservers, sizeof(char *));
    u->weights = calloc(u->nservers, sizeof(int));
    u->backups = calloc(u->nservers, sizeof(int));
    if (!u->servers || !u->server_text || !u->server_name || !u->weights || !u->backups) {
      snprintf(err, errlen, "config error: out of memory");
      return SL_ERROR;
    }
    for (size_t j = 0; j < u->nservers; j++) {
      lua_rawgeti(L, -1, (int)j + 1);
      u->weights[j] = (int)sl_num_field(L, lua_gettop(L), "weight");
      lua_getfield(L, -1, "backup");
      u->backups[j] = lua_toboolean(L, -1);
      lua_pop(L, 1);
      u->server_name[j] = sl_strdup_field(L, lua_gettop(L), "name");   /* NULL: an address */
      if (sl_read_addr(L, lua_gettop(L), &u->servers[j], &u->server_text[j]) != SL_OK) {
        snprintf(err, errlen, "config error: upstreams.%s.servers[%zu]: unusable address", u->name,
                 j + 1);
        return SL_ERROR;
      }
      lua_pop(L, 1);
    }
    lua_pop(L, 2);
  }
  lua_pop(L, 2);
  return SL_OK;
}

static sl_upstream_cfg *sl_find_upstream(sl_config *c, const char *name) {
  for (size_t i = 0; i < c->nupstreams; i++)
    if (strcmp(c->upstreams[i].name, name) == 0) return &c->upstreams[i];
  return NULL;
}

/* Parses the options of C stage s (the entry's table at st) into s->conf. */
static int sl_read_c_options(lua_State *L, int st, sl_stage_spec *s, size_t li, size_t si,
                             char *err, size_t errlen) {
  char why[400];
  lua_getfield(L, st, "options");
  sl_opts *o = sl_opts_from_lua(L, lua_gettop(L), why, sizeof(why));
  lua_pop(L, 1);
  int rc = o ? sl_stage_configure(s->ops, o, &s->conf, why, sizeof(why)) : SL_ERROR;
  sl_opts_free(o);
  if (rc != SL_OK)
    snprintf(err, errlen, "config error: listeners[%zu].pipeline[%zu].%s", li, si, why);
  return rc;
}

static int sl_read_pipeline(sl_config *c, lua_State *L, int lt, sl_listener_cfg *l, size_t li,
                            char *err, size_t errlen) {
  lua_getfield(L, lt, "pipeline");
  l->nstages = lua_objlen(L, -1);
  l->stages = calloc(l->nstages + 1, sizeof(*l->stages));
  for (size_t j = 0; j < l->nstages; j++) {
    sl_stage_spec *s = &l->stages[j];
    lua_rawgeti(L, -1, (int)j + 1);
    int st = lua_gettop(L);
    s->module = sl_strdup_field(L, st, "module");
    s->options_ref = LUA_NOREF;
    lua_getfield(L, st, "kind");
    int is_c = strcmp(lua_tostring(L, -1), "c") == 0;
    lua_pop(L, 1);
    if (is_c) {
      s->ops = sl_stage_builtin(s->module);
      SL_ASSERT(s->ops != NULL, "config named a C stage that is not registered");
      if (sl_read_c_options(L, st, s, li, j + 1, err, errlen) != SL_OK) return SL_ERROR;
    } else {
      s->file = sl_strdup_field(L, st, "file");
      lua_getfield(L, st, "options");
      s->options_ref = luaL_ref(L, LUA_REGISTRYINDEX);
      s->lua_key = ++c->nlua_stages;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return SL_OK;
}

/* A listener's normalized tls table (at tt) into l, and its context built;
 * a failure names the key (listeners[li].tls.certificate). */
static int sl_read_tls(lua_State *L, int tt, sl_listener_cfg *l, size_t li, char *err,
                       size_t errlen) {
  sl_tls_opts *o = &l->tls_opts;
  sl_read_tls_common(L, tt, o);
  l->tls_handshake_timeout = sl_num_field(L, tt, "handshake_timeout_ms") / 1000.0;
  lua_getfield(L, tt, "proxy_protocol");
  l->tls_proxy_protocol = lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, tt, "alpn");
  if (sl_read_alpn(L, o) != SL_OK) o->alpn_len = 1;   /* reported below */
  lua_pop(L, 1);
  o->client_ca = sl_strdup_field(L, tt, "client_ca");
  char *cc = sl_strdup_field(L, tt, "client_certificate");
  o->client_optional = cc && strcmp(cc, "optional") == 0;
  free(cc);
  o->crl = sl_strdup_field(L, tt, "crl");
  o->ocsp_response = sl_strdup_field(L, tt, "ocsp_response");
  int short_of_memory = 0;
  lua_getfield(L, tt, "ticket_keys");
  if (lua_istable(L, -1)) {
    size_t n = lua_objlen(L, -1);
    char **keys = calloc(n, sizeof(*keys));
    for (size_t j = 0; keys && j < n; j++) {
      lua_rawgeti(L, -1, (int)j + 1);
      keys[j] = strdup(lua_tostring(L, -1));
      short_of_memory |= keys[j] == NULL;
      lua_pop(L, 1);
    }
    o->ticket_keys = (const char *const *)keys;
    o->nticket_keys = keys ? n : 0;
    short_of_memory |= keys == NULL;
  }
  lua_pop(L, 1);
  lua_getfield(L, tt, "certificates");
  if (lua_istable(L, -1)) {
    size_t n = lua_objlen(L, -1);
    sl_tls_cert *more = calloc(n, sizeof(*more));
    for (size_t j = 0; more && j < n; j++) {
      lua_rawgeti(L, -1, (int)j + 1);
      more[j].certificate = sl_strdup_field(L, lua_gettop(L), "certificate");
      more[j].key = sl_strdup_field(L, lua_gettop(L), "key");
      more[j].ocsp_response = sl_strdup_field(L, lua_gettop(L), "ocsp_response");
      short_of_memory |= more[j].certificate == NULL || more[j].key == NULL;
      lua_pop(L, 1);
    }
    o->sni = more;
    o->nsni = more ? n : 0;
    short_of_memory |= more == NULL;
  }
  lua_pop(L, 1);
  if (o->certificate == NULL || o->key == NULL || (o->alpn == NULL && o->alpn_len != 0) ||
      short_of_memory) {
    snprintf(err, errlen, "config error: out of memory");
    return SL_ERROR;
  }
  char why[1024];
  l->tls = sl_tls_ctx_new(o, why, sizeof(why));
  if (l->tls == NULL) {
    snprintf(err, errlen, "config error: listeners[%zu].tls.%s", li, why);
    return SL_ERROR;
  }
  return SL_OK;
}

static int sl_read_listeners(sl_config *c, lua_State *L, int cfg, char *err, size_t errlen) {
  lua_getfield(L, cfg, "listeners");
  c->nlisteners = lua_objlen(L, -1);
  c->listeners = calloc(c->nlisteners + 1, sizeof(*c->listeners));
  for (size_t i = 0; i < c->nlisteners; i++) {
    sl_listener_cfg *l = &c->listeners[i];
    lua_rawgeti(L, -1, (int)i + 1);
    int lt = lua_gettop(L);
    l->name = sl_strdup_field(L, lt, "name");
    l->low_water_mark = (size_t)sl_num_field(L, lt, "low_water_mark");
    l->high_water_mark = (size_t)sl_num_field(L, lt, "high_water_mark");
    l->outbound_limit = (size_t)sl_num_field(L, lt, "outbound_limit");
    l->write_spin_count = (uint32_t)sl_num_field(L, lt, "write_spin_count");
    l->max_bytes_per_gathering_write =
        (size_t)sl_num_field(L, lt, "max_bytes_per_gathering_write"); /* nil: 0 */
    l->max_connections = (uint32_t)sl_num_field(L, lt, "max_connections");
    l->max_per_client = (uint32_t)sl_num_field(L, lt, "max_connections_per_client");
    l->max_rate = (uint32_t)sl_num_field(L, lt, "max_connection_rate");
    l->idle_timeout = sl_num_field(L, lt, "idle_timeout_ms") / 1000.0;
    l->write_timeout = sl_num_field(L, lt, "write_timeout_ms") / 1000.0;
    l->connect_timeout = sl_num_field(L, lt, "connect_timeout_ms") / 1000.0;
    lua_getfield(L, lt, "defer_accept");
    l->defer_accept = lua_toboolean(L, -1);
    lua_pop(L, 1);
    lua_getfield(L, lt, "splice");
    if (lua_type(L, -1) == LUA_TSTRING) l->splice = SL_SPLICE_AUTO;   /* "auto" (checked) */
    else l->splice = lua_toboolean(L, -1) ? SL_SPLICE_ON : SL_SPLICE_OFF;
    lua_pop(L, 1);
    lua_getfield(L, lt, "half_close");
    l->half_close = lua_toboolean(L, -1);
    lua_pop(L, 1);
    l->half_close_timeout = sl_num_field(L, lt, "half_close_timeout_ms") / 1000.0;
    l->backlog = (int)sl_num_field(L, lt, "backlog");
    lua_getfield(L, lt, "tcp_keepalive");
    if (lua_istable(L, -1)) {   /* milliseconds, rounded up to the seconds TCP takes */
      int kt = lua_gettop(L);
      l->keepalive = 1;
      l->keepalive_idle = (int)((sl_num_field(L, kt, "idle_ms") + 999) / 1000);
      l->keepalive_interval = (int)((sl_num_field(L, kt, "interval_ms") + 999) / 1000);
      l->keepalive_count = (int)sl_num_field(L, kt, "count");
    }
    lua_pop(L, 1);
    lua_getfield(L, lt, "tls");
    if (lua_istable(L, -1) && sl_read_tls(L, lua_gettop(L), l, i + 1, err, errlen) != SL_OK)
      return SL_ERROR;
    lua_pop(L, 1);
    lua_getfield(L, lt, "listen");
    if (sl_read_addr(L, lua_gettop(L), &l->addr, &l->listen_text) != SL_OK) {
      snprintf(err, errlen, "config error: listeners[%zu].listen: unusable address", i + 1);
      return SL_ERROR;
    }
    lua_pop(L, 1);
    char *up = sl_strdup_field(L, lt, "upstream");
    if (up) {
      l->upstream = sl_find_upstream(c, up);
      free(up);
      SL_ASSERT(l->upstream != NULL, "validated upstream name not found");
    }
    if (sl_read_pipeline(c, L, lt, l, i + 1, err, errlen) != SL_OK) return SL_ERROR;
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  return SL_OK;
}

/* The normalized `resolver` table at idx (sluice.config.resolver), or
 * nil: the system's resolver. */
static void sl_read_resolver(lua_State *L, int idx, sl_dns *d) {
  memset(d, 0, sizeof(*d));
  if (!lua_istable(L, idx)) return;
  lua_getfield(L, idx, "servers");
  const char *servers = lua_tostring(L, -1);
  if (servers != NULL) snprintf(d->servers, sizeof(d->servers), "%s", servers);
  lua_pop(L, 1);
  d->timeout_ms = (int)sl_num_field(L, idx, "timeout_ms");
  d->tries = (int)sl_num_field(L, idx, "tries");
  d->valid_ms = (int)sl_num_field(L, idx, "valid_ms");
}

/* opts.resolve for sluice.config (lua/sluice/config.lua): the addresses of
 * a host name given as an upstream server, as an array of { host, family =
 * "inet" or "inet6" }, or nil and the resolver's message. */
static int sl_config_resolve(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  sl_dns dns;
  sl_read_resolver(L, 2, &dns);
  char text[SL_ADDR_RESOLVE_MAX][46];
  int family[SL_ADDR_RESOLVE_MAX], n = 0, ttl_ms;
  const char *why = NULL;
  if (sl_dns_resolve(&dns, name, text, family, &n, &ttl_ms, &why) != SL_OK) {
    lua_pushnil(L);
    lua_pushstring(L, why);
    return 2;
  }
  sl_config_push_addresses(L, text, family, n);
  return 1;
}

void sl_config_push_addresses(lua_State *L, char text[][46], const int *family, int n) {
  lua_createtable(L, n, 0);
  for (int i = 0; i < n; i++) {
    lua_createtable(L, 0, 2);
    lua_pushstring(L, text[i]);
    lua_setfield(L, -2, "host");
    lua_pushstring(L, family[i] == AF_INET6 ? "inet6" : "inet");
    lua_setfield(L, -2, "family");
    lua_rawseti(L, -2, i + 1);
  }
}

sl_config *sl_config_load(const char *path, char *err, size_t errlen) {
  sl_config *c = calloc(1, sizeof(*c));
  lua_State *L = luaL_newstate();
  if (c == NULL || L == NULL) {
    snprintf(err, errlen, "config error: out of memory");
    free(c);
    if (L) lua_close(L);
    return NULL;
  }
  c->L = L;
  c->path = strdup(path);
  c->root = strdup(sl_config_root());
  luaL_openlibs(L);
  sl_lua_refuse_exit(L);

  /* package.path: sluice's own library first. */
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "path");
  lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua;%s", c->root, c->root, lua_tostring(L, -1));
  lua_setfield(L, -3, "path");
  lua_pop(L, 2);

  lua_getglobal(L, "require");
  lua_pushstring(L, "sluice.config");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    /* One line: require lists every place it looked on the lines after. */
    const char *why = lua_tostring(L, -1);
    if (why == NULL) why = "(no message)";
    size_t n = strcspn(why, "\n");
    if (n > 0 && why[n - 1] == ':') n--;
    snprintf(err, errlen, "config error: cannot load sluice.config from %s/lua (SLUICE_ROOT, or "
             "the source folder sluice was built from): %.*s", c->root, (int)n, why);
    sl_config_free(c);
    return NULL;
  }
  lua_getfield(L, -1, "load");
  lua_pushstring(L, path);
  lua_newtable(L); /* opts */
  lua_pushstring(L, c->root);
  lua_setfield(L, -2, "root");
  lua_newtable(L);
  for (const char *const *n = sl_stage_builtin_names(); *n; n++) {
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, *n);
  }
  lua_setfield(L, -2, "builtin");
  lua_pushcfunction(L, sl_config_resolve);
  lua_setfield(L, -2, "resolve");
  if (lua_pcall(L, 2, 2, 0) != 0 || lua_isnil(L, -2)) {
    snprintf(err, errlen, "%s", lua_tostring(L, -1));
    sl_config_free(c);
    return NULL;
  }
  lua_pop(L, 1);
  int cfg = lua_gettop(L);

  char *level = sl_strdup_field(L, cfg, "log_level");
  if (level == NULL || sl_log_parse_level(level, &c->log_level) != SL_OK) c->log_level = SL_LOG_INFO;
  free(level);
  c->search_path = sl_strdup_field(L, cfg, "search_path");
  c->workers = (int)sl_num_field(L, cfg, "workers");
  c->drain_timeout = sl_num_field(L, cfg, "drain_timeout_ms") / 1000.0;
  c->lua_memory_limit = (size_t)sl_num_field(L, cfg, "lua_memory_limit");
  c->lua_timeout_ms = (int)sl_num_field(L, cfg, "lua_timeout_ms");
  c->resolve_cache_ms = (int)sl_num_field(L, cfg, "resolve_cache_ms");
  lua_getfield(L, cfg, "resolver");
  sl_read_resolver(L, lua_gettop(L), &c->dns);
  lua_pop(L, 1);
  lua_getfield(L, cfg, "max_pipes");
  c->max_pipes = lua_isnil(L, -1) ? -1 : (int)lua_tonumber(L, -1);
  lua_pop(L, 1);
  c->error_log = sl_strdup_field(L, cfg, "error_log");
  c->access_log = sl_strdup_field(L, cfg, "access_log");
  lua_getfield(L, cfg, "access_log_format");
  c->access_log_json = lua_isstring(L, -1) && strcmp(lua_tostring(L, -1), "json") == 0;
  lua_pop(L, 1);
  c->lua_key_first = 1;
  atomic_init(&c->refs, 1);
  sl_read_allocator(c, L, cfg);
  lua_getfield(L, cfg, "admin");
  if (lua_istable(L, -1)) {
    lua_getfield(L, -1, "listen");
    if (sl_read_addr(L, lua_gettop(L), &c->admin_addr, &c->admin_text) != SL_OK) {
      snprintf(err, errlen, "config error: admin.listen: unusable address");
      sl_config_free(c);
      return NULL;
    }
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
  lua_getfield(L, cfg, "upstream_names");
  lua_getfield(L, cfg, "upstreams");
  if (sl_read_upstreams(c, L, NULL, err, errlen) != SL_OK ||
      sl_read_listeners(c, L, cfg, err, errlen) != SL_OK) {
    sl_config_free(c);
    return NULL;
  }
  lua_pushvalue(L, cfg);
  c->norm_ref = luaL_ref(L, LUA_REGISTRYINDEX);   /* for sl_config_derive */
  lua_settop(L, 0);
  return c;
}

/* ---- configurations derived from another (host names resolved again) ---- */

static void sl_free_upstreams(sl_upstream_cfg *ups, size_t n) {
  for (size_t i = 0; ups && i < n; i++) {
    sl_upstream_cfg *u = &ups[i];
    for (size_t j = 0; u->server_text && j < u->nservers; j++) free(u->server_text[j]);
    for (size_t j = 0; u->server_name && j < u->nservers; j++) free(u->server_name[j]);
    for (size_t j = 0; u->hosts && j < u->nhosts; j++) free(u->hosts[j]);
    free(u->hosts);
    free(u->server_text);
    free(u->server_name);
    free(u->servers);
    free(u->weights);
    free(u->backups);
    for (size_t j = 0; u->health.steps && j < u->health.nsteps; j++) {
      sl_health_step *st = &u->health.steps[j];
      if (st->re) regfree(st->re);
      free(st->re);
      free(st->bytes);
    }
    free(u->health.steps);
    free(u->name);
    free(u->tls_server_name);
    sl_tls_ctx_free(u->tls);
  }
  free(ups);
}

sl_config *sl_config_derive(sl_config *cur, sl_lua_cfunction resolve, void *ud, char *err,
                            size_t errlen) {
  sl_config *owner = (sl_config *)sl_config_owner(cur);
  lua_State *L = owner->L;
  int top = lua_gettop(L);
  lua_getglobal(L, "require");
  lua_pushstring(L, "sluice.config");
  if (lua_pcall(L, 1, 1, 0) != 0) {
    snprintf(err, errlen, "config error: %s", lua_tostring(L, -1));
    lua_settop(L, top);
    return NULL;
  }
  lua_getfield(L, -1, "reexpand");
  lua_rawgeti(L, LUA_REGISTRYINDEX, owner->norm_ref);
  lua_pushlightuserdata(L, ud);
  lua_pushcclosure(L, resolve, 1);
  if (lua_pcall(L, 2, 2, 0) != 0 || lua_isnil(L, -2)) {
    snprintf(err, errlen, "%s", lua_tostring(L, -1));
    lua_settop(L, top);
    return NULL;
  }
  lua_pop(L, 1);                                  /* the new upstreams on top */
  sl_config *d = calloc(1, sizeof(*d));
  sl_listener_cfg *ls = calloc(cur->nlisteners + 1, sizeof(*ls));
  if (d == NULL || ls == NULL) {
    free(d);
    free(ls);
    lua_settop(L, top);
    snprintf(err, errlen, "config error: out of memory");
    return NULL;
  }
  memcpy(d, cur, sizeof(*d));
  atomic_init(&d->refs, 1);
  d->base = owner;
  sl_config_ref(owner);
  d->listeners = ls;
  d->upstreams = NULL;
  d->nupstreams = 0;
  lua_rawgeti(L, LUA_REGISTRYINDEX, owner->norm_ref);
  lua_getfield(L, -1, "upstream_names");
  lua_pushvalue(L, -3);
  int rc = sl_read_upstreams(d, L, cur, err, errlen);
  lua_settop(L, top);
  if (rc != SL_OK || d->nupstreams != cur->nupstreams) {
    if (rc == SL_OK) snprintf(err, errlen, "config error: the upstreams changed");
    sl_config_unref(d);
    return NULL;
  }
  for (size_t i = 0; i < cur->nlisteners; i++) {
    ls[i] = cur->listeners[i];   /* strings and stages stay the owner's */
    if (ls[i].upstream) ls[i].upstream = &d->upstreams[ls[i].upstream - cur->upstreams];
  }
  return d;
}

/* The host of "host:port" or "[v6]:port" in buf. */
static const char *sl_host_of(const char *text, char *buf, size_t len) {
  const char *colon = strrchr(text, ':');
  size_t n = colon ? (size_t)(colon - text) : strlen(text);
  if (n >= 2 && text[0] == '[' && text[n - 1] == ']') {
    text++;
    n -= 2;
  }
  if (n >= len) n = len - 1;
  memcpy(buf, text, n);
  buf[n] = '\0';
  return buf;
}

void sl_upstream_tls_names(const sl_upstream_cfg *u, size_t i, char *host, char *addr,
                           const char **sni, const char **verify) {
  const char *name = u->tls_server_name;
  if (name == NULL && u->server_name[i] != NULL) name = sl_host_of(u->server_name[i], host, 256);
  *sni = name;
  *verify = name ? name : sl_host_of(u->server_text[i], addr, 64);
}

int sl_upstream_same_servers(const sl_upstream_cfg *x, const sl_upstream_cfg *y) {
  if (x->nservers != y->nservers || x->tries != y->tries || strcmp(x->name, y->name) != 0)
    return 0;
  for (size_t j = 0; j < x->nservers; j++)
    if (x->weights[j] != y->weights[j] || x->backups[j] != y->backups[j] ||
        strcmp(x->server_text[j], y->server_text[j]) != 0)
      return 0;
  return 1;
}

int sl_config_same_servers(const sl_config *a, const sl_config *b) {
  if (a->nupstreams != b->nupstreams) return 0;
  for (size_t i = 0; i < a->nupstreams; i++)
    if (!sl_upstream_same_servers(&a->upstreams[i], &b->upstreams[i])) return 0;
  return 1;
}

void sl_config_free(sl_config *c) {
  if (c == NULL) return;
  sl_free_upstreams(c->upstreams, c->nupstreams);
  if (c->base) {   /* only the listener array is its own */
    free(c->listeners);
    sl_config_unref(c->base);
    free(c);
    return;
  }
  for (size_t i = 0; c->listeners && i < c->nlisteners; i++) {
    sl_listener_cfg *l = &c->listeners[i];
    for (size_t j = 0; l->stages && j < l->nstages; j++) {
      if (l->stages[j].ops) sl_stage_unconfigure(l->stages[j].ops, l->stages[j].conf);
      free(l->stages[j].module);
      free(l->stages[j].file);
    }
    free(l->stages);
    free(l->name);
    free(l->listen_text);
    sl_tls_ctx_free(l->tls);
    sl_tls_opts_free(&l->tls_opts);
  }
  free(c->listeners);
  free(c->search_path);
  free(c->error_log);
  free(c->access_log);
  free(c->admin_text);
  free(c->root);
  free(c->path);
  if (c->L) lua_close(c->L);
  free(c);
}

void sl_config_rebase(sl_config *c, const sl_config *prev) {
  int shift = prev->lua_key_first + prev->nlua_stages - c->lua_key_first;
  for (size_t i = 0; i < c->nlisteners; i++) {
    sl_listener_cfg *l = &c->listeners[i];
    for (size_t j = 0; j < l->nstages; j++)
      if (l->stages[j].ops == NULL) l->stages[j].lua_key += shift;
  }
  c->lua_key_first += shift;
}

void sl_config_ref(sl_config *c) { atomic_fetch_add(&c->refs, 1); }

void sl_config_unref(sl_config *c) {
  if (c != NULL && atomic_fetch_sub(&c->refs, 1) == 1) sl_config_free(c);
}

void sl_listener_channel_config(const sl_listener_cfg *l, sl_channel_config *out) {
  out->low_water_mark = l->low_water_mark;
  out->high_water_mark = l->high_water_mark;
  out->outbound_limit = l->outbound_limit;
  out->max_bytes_per_gathering_write = l->max_bytes_per_gathering_write;
  out->write_spin_count = l->write_spin_count;
  out->no_half_close = !l->half_close;
  out->write_timeout = l->write_timeout;
}

void sl_config_log_resolved(const sl_config *c) {
  for (size_t i = 0; i < c->nupstreams; i++) {
    const sl_upstream_cfg *u = &c->upstreams[i];
    for (size_t j = 0; j < u->nservers; j++) {
      const char *name = u->server_name[j];
      if (name == NULL || (j > 0 && u->server_name[j - 1] != NULL &&
                           strcmp(u->server_name[j - 1], name) == 0))
        continue;   /* an address, or a name already said */
      char all[4096];
      size_t used = 0, n = 0, shown = 0;
      for (size_t k = j; k < u->nservers && u->server_name[k] != NULL &&
                         strcmp(u->server_name[k], name) == 0;
           k++, n++) {
        if (shown < n) continue;   /* full already: counted only */
        int w = snprintf(all + used, sizeof(all) - used, "%s%s", n ? ", " : "", u->server_text[k]);
        if (w < 0 || (size_t)w >= sizeof(all) - used) {
          all[used] = '\0';   /* whole addresses only */
          continue;
        }
        used += (size_t)w;
        shown++;
      }
      sl_log(SL_LOG_INFO, "upstream %s: %s is %s%s", u->name, name, all,
             shown < n ? " (and more)" : "");
    }
  }
}
