/*
 * The running configuration: what lua/sluice/config.lua validated and
 * normalized, read into C structs. The config's own lua_State stays open
 * because Lua stage options live there until each worker copies them into
 * its state.
 */
#ifndef SL_CONFIG_H
#define SL_CONFIG_H

#include <regex.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "alloc/arena.h"
#include "io/addr.h"
#include "io/dns.h"
#include "io/tls.h"
#include "pipeline/pipeline.h"
#include "proxy/balance.h"
#include "util/log.h"

typedef struct lua_State lua_State;
typedef int (*sl_lua_cfunction)(lua_State *L);   /* lua_CFunction */
struct sl_channel_config;

typedef struct sl_stage_spec {
  char *module;                /* module name, also the stage's name in logs */
  const sl_stage_ops *ops;     /* C stages; NULL for Lua stages */
  void *conf;                  /* C stages: parsed options (sl_stage_configure) */
  char *file;                  /* Lua stages: the file that was found */
  int options_ref;             /* Lua stages: options table in the config state */
  int lua_key;                 /* Lua stages: key in each worker's Lua state; unique
                                  across the configurations of one run (a reload's
                                  keys follow its predecessor's, see sl_config_rebase) */
} sl_stage_spec;

/* What one step of a health check does (health_check.steps). */
typedef enum sl_health_step_kind {
  SL_HEALTH_STEP_SEND,         /* write `bytes` */
  SL_HEALTH_STEP_EXPECT,       /* read until the bytes since the last match contain `bytes` */
  SL_HEALTH_STEP_EXPECT_REGEX  /* read until they match `re` */
} sl_health_step_kind;

typedef struct sl_health_step {
  sl_health_step_kind kind;
  char *bytes;                 /* what is written or expected, or the regex's source */
  size_t len;
  regex_t *re;                 /* SL_HEALTH_STEP_EXPECT_REGEX: compiled with REG_EXTENDED |
                                  REG_NEWLINE; NULL otherwise */
} sl_health_step;

/* Active TCP health checks of an upstream's servers (health_check). The
 * shorthand send/expect is read as the steps { send }, { expect }. */
typedef struct sl_health_cfg {
  double interval;             /* seconds between checks of a server */
  double timeout;              /* seconds a check's connect may take */
  int fails;                   /* failed checks in a row that mark a server down */
  int passes;                  /* passed checks in a row that mark it up again */
  sl_health_step *steps;       /* in order, once connected (and shaken hands); NULL: none */
  size_t nsteps;
  int expects;                 /* 1 when a step reads (the checks get an answer buffer) */
} sl_health_cfg;

typedef struct sl_upstream_cfg {
  char *name;
  sl_addr *servers;
  char **server_text;
  char **server_name;          /* per server: the "host:port" it was resolved from, or NULL */
  int *weights;                /* per server, >= 1 */
  int *backups;                /* per server: 1 a backup (balance.h), 0 a primary; never
                                  all 1 */
  size_t nservers;
  double connect_timeout;      /* seconds */
  sl_balance balance;
  int tries;                   /* servers a connection tries, 1..nservers */
  int max_fails;               /* failed connects in a row to skip a server; 0: never */
  double fail_timeout;         /* seconds such a server is skipped */
  int send_proxy;              /* PROXY protocol version sent first (1, 2), or 0 */
  int has_health_check;        /* 1: health below runs */
  sl_health_cfg health;
  int resolve_interval_ms;     /* host names among servers resolved again this often; 0: never */
  char **hosts;                /* those host names, each once */
  size_t nhosts;
  struct ssl_ctx_st *tls;      /* tls: a client context (io/tls.h), shared by the
                                  configurations derived from this one; NULL: plain TCP */
  char *tls_server_name;       /* tls.server_name, or NULL (each server's own name) */
} sl_upstream_cfg;

/* A listener's splice setting. AUTO: a connection splices its reads into
 * a peer that is not on the loopback interface (on loopback the receiving
 * process pays more for spliced bytes than sluice saves; see
 * docs/operations.md#tuning). */
typedef enum { SL_SPLICE_OFF = 0, SL_SPLICE_ON = 1, SL_SPLICE_AUTO = 2 } sl_splice_mode;

typedef struct sl_listener_cfg {
  char *name;
  char *listen_text;
  sl_addr addr;
  sl_upstream_cfg *upstream;   /* NULL: the pipeline answers */
  sl_stage_spec *stages;
  size_t nstages;
  size_t low_water_mark, high_water_mark;
  size_t outbound_limit;       /* bytes a connection's outbound queue may hold */
  size_t max_bytes_per_gathering_write; /* 0: adaptive */
  uint32_t write_spin_count;   /* sendmsg calls per wake-up */
  uint32_t max_connections;    /* open client connections, all workers; 0: no limit */
  uint32_t max_per_client;     /* max_connections_per_client, all workers; 0: no limit */
  uint32_t max_rate;           /* max_connection_rate: accepts per second, all workers; 0: none */
  double idle_timeout;         /* seconds; 0: none */
  double write_timeout;        /* seconds bytes may wait for a socket, client or upstream
                                  side; 0: none */
  double connect_timeout;      /* seconds; 0: the upstream's */
  int defer_accept;            /* 1: TCP_DEFER_ACCEPT on its sockets */
  int splice;                  /* SL_SPLICE_*: may pass-through connections splice (io/splice.h) */
  int half_close;              /* 1: a FIN is passed on; 0: the first FIN ends both sides */
  double half_close_timeout;   /* seconds once one direction has ended; 0: idle_timeout */
  int backlog;                 /* listen(2) queue length */
  int keepalive;               /* 1: TCP keepalive on client and upstream sockets */
  int keepalive_idle, keepalive_interval, keepalive_count;   /* seconds, probes; 0: the
                                                                system's */
  struct ssl_ctx_st *tls;      /* TLS on its client side (built at load), or NULL: plain */
  sl_tls_opts tls_opts;        /* what tls was built from (strings and alpn owned here) */
  double tls_handshake_timeout; /* seconds */
  int tls_proxy_protocol;      /* 1: a PROXY protocol header before the TLS bytes */
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
  int lua_key_first;           /* Lua stage keys are lua_key_first..+nlua_stages-1 */
  int workers;                 /* 0: one per core */
  double drain_timeout;        /* seconds a stop waits for open connections */
  size_t lua_memory_limit;     /* bytes a worker's Lua heap may hold; 0: no limit */
  int lua_timeout_ms;          /* a Lua callback running longer is stopped; 0: never */
  int resolve_cache_ms;        /* ctx:connect host names: answers kept this long; 0: none */
  sl_dns dns;                  /* the DNS servers names are looked up on (resolver);
                                  servers "": the system's resolver */
  int max_pipes;               /* splice pipes open at once, all workers; -1: from the
                                  open-files limit (sl_runtime) */
  char *error_log;             /* "stderr" or a path */
  char *access_log;            /* "off", "stderr" or a path */
  int access_log_json;         /* access_log_format: 1 "json", 0 "logfmt" */
  char *admin_text;            /* the admin endpoint's "host:port", NULL: no endpoint */
  sl_addr admin_addr;
  _Atomic uint32_t refs;       /* the running process and each worker still using it */
  lua_State *L;                /* the loader's state (stage options, the normalized table) */
  int norm_ref;                /* the normalized table in L's registry */
  /* A configuration sl_config_derive made: its own upstreams and listener
   * array; everything else (strings, stages, L) belongs to base, which it
   * holds a reference on. NULL for a loaded configuration. */
  struct sl_config *base;
} sl_config;

/* sluice's own folder, whose lua/ holds its Lua library: $SLUICE_ROOT;
 * else PREFIX/share/sluice for a binary installed as PREFIX/bin/sluice;
 * else the source folder it was built from. */
const char *sl_config_root(void);

/* Loads and validates path. Returns the config, or NULL with the message
 * ("config error: listeners[1].listen: expected ...") in err. */
sl_config *sl_config_load(const char *path, char *err, size_t errlen);

void sl_config_free(sl_config *c);

/* The configuration whose stages and Lua state c uses: c->base, or c. Two
 * configurations with the same owner have the same Lua stages (keys). */
static inline const sl_config *sl_config_owner(const sl_config *c) {
  return c->base ? c->base : c;
}

/* Main thread only (it uses the owner's Lua state). A copy of cur whose
 * upstreams with host names have the servers resolve gives for them now:
 * resolve is called as opts.resolve is at load (name -> array of { host,
 * family } or nil, why), with ud as its only upvalue (lua_upvalueindex(1),
 * a light userdata). Listeners, stages and every other setting are cur's.
 * Returns it (one reference), or NULL with the message in err ("config
 * error: upstreams.NAME.servers[1]: cannot resolve ...", or out of memory). */
sl_config *sl_config_derive(sl_config *cur, sl_lua_cfunction resolve, void *ud, char *err,
                            size_t errlen);

/* Pushes the answer of a resolver as opts.resolve gives it: { { host =
 * text[i], family = "inet" or "inet6" }, ... } for i < n. */
void sl_config_push_addresses(lua_State *L, char text[][46], const int *family, int n);

/* The names TLS uses with server i of u (an upstream with tls): *sni, sent
 * in the ClientHello (tls.server_name, else the host name the server was
 * resolved from, else NULL: an address gets none), and *verify, the name
 * or address its certificate must be for (*sni, else the server's
 * address). host (256 bytes) and addr (64) hold what they point into. */
void sl_upstream_tls_names(const sl_upstream_cfg *u, size_t i, char *host, char *addr,
                           const char **sni, const char **verify);

/* 1 when upstreams x and y have the same name, servers, weights, backup
 * flags and tries. */
int sl_upstream_same_servers(const sl_upstream_cfg *x, const sl_upstream_cfg *y);

/* 1 when a and b have the same upstreams with the same servers, weights,
 * backup flags and tries (a derived configuration that changes nothing). */
int sl_config_same_servers(const sl_config *a, const sl_config *b);

/* Gives c's Lua stages the keys after those of prev (a reload: the workers'
 * Lua states keep prev's stages for the connections still using them). */
void sl_config_rebase(sl_config *c, const sl_config *prev);

/* Reference counting for configurations shared by threads: a new config
 * has one reference (its loader's); sl_config_unref frees it at zero. */
void sl_config_ref(sl_config *c);
void sl_config_unref(sl_config *c);

/* The channel settings of a connection accepted by l (or made for it to
 * its upstream): water marks, outbound limit, write limits. */
/* Logs, at info, what each upstream server given as a host name resolved
 * to ("upstream db: db.internal:6379 is 10.0.0.5:6379, 10.0.0.6:6379"). */
void sl_config_log_resolved(const sl_config *c);

void sl_listener_channel_config(const sl_listener_cfg *l, struct sl_channel_config *out);

#endif
