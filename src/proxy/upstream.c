#include "proxy/upstream.h"

#include <errno.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "buf/buf.h"
#include "buf/leak.h"
#include "io/channel.h"
#include "io/tls.h"
#include "io/worker.h"
#include "pipeline/codec/proxy_protocol.h"
#include "proxy/balance.h"
#include "proxy/config.h"
#include "proxy/health.h"
#include "proxy/metrics.h"
#include "proxy/server.h"
#include "util/common.h"
#include "util/log.h"

/* One upstream on one worker. */
typedef struct sl_upstream_rt {
  const sl_upstream_cfg *cfg;
  sl_balancer bal;
  sl_health *health;          /* NULL without health_check */
  SSL_SESSION **sessions;     /* with tls: per server, the last TLS session it issued (or NULL) */
} sl_upstream_rt;

struct sl_upstreams {
  struct sl_worker *w;
  const sl_config *cfg;
  uint32_t refs;              /* the creator's, plus one per connection trying or open */
  size_t n;
  sl_upstream_rt ups[];       /* one per cfg->upstreams */
};

/*
 * A client's way to its upstream, while it tries servers: ch is the
 * connecting channel of the current try, joined to client (between tries,
 * ch is NULL only inside this file's functions). Once connected, the
 * attempt hands its reference on the set to the channel's lease and is
 * freed; so is an attempt whose channel closed while connecting (the
 * client went away, or sluice is stopping).
 */
typedef struct sl_attempt {
  sl_upstreams *set;          /* referenced */
  sl_upstream_rt *up;         /* NULL: a plain address */
  sl_addr addr;               /* the plain address */
  struct sl_channel *client;
  struct sl_channel *ch;      /* the channel of the current try */
  sl_ctx *lease;              /* ch's lease stage */
  sl_upstream_ready_fn ready;
  int server;                 /* index of the current try's server, -1 for an address */
  struct sl_metrics_server *direct; /* an address's counters (borrowed; NULL without metrics) */
  int ntried;
  uint64_t key;               /* hash of the client's address */
  sl_channel_config cc;       /* for the upstream channel */
  char for_name[64];
  char tried[320];            /* "127.0.0.1:7001 (Connection refused), ..." */
  uint8_t skip[];             /* servers tried already */
} sl_attempt;

/* The state of the lease stage, a C stage with no event callbacks that the
 * upstream channel carries so that its close is noticed (on_removed). */
typedef struct sl_lease {
  sl_attempt *attempt;        /* while connecting */
  sl_upstreams *set;          /* once connected: referenced */
  sl_peer *peer;              /* once connected: its server's state (NULL: an address) */
  struct sl_metrics_server *m; /* once connected: its server's counters (or the address's) */
} sl_lease;

/* ---- the set ---- */

static uint64_t sl_upstream_addr_hash(const sl_addr *a) {
  if (a->ss.ss_family == AF_INET) {
    const struct sockaddr_in *in4 = (const struct sockaddr_in *)(const void *)&a->ss;
    return sl_balance_hash(&in4->sin_addr, sizeof(in4->sin_addr));
  }
  if (a->ss.ss_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)&a->ss;
    return sl_balance_hash(&in6->sin6_addr, sizeof(in6->sin6_addr));
  }
  return 0;
}

static void sl_upstreams_unref(sl_upstreams *s) {
  SL_ASSERT(s->refs > 0, "upstream set reference count underflow");
  if (--s->refs > 0) return;
  for (size_t i = 0; i < s->n; i++) {
    for (size_t j = 0; s->ups[i].bal.peers && j < s->ups[i].bal.n; j++)
      sl_metrics_server_unref(s->w, s->ups[i].bal.peers[j].m);
    free(s->ups[i].bal.peers);
    for (size_t j = 0; s->ups[i].sessions && j < s->ups[i].bal.n; j++)
      sl_tls_session_free(&s->ups[i].sessions[j]);
    free(s->ups[i].sessions);
  }
  free(s);
}

sl_upstreams *sl_upstreams_create(struct sl_worker *w, const sl_config *cfg) {
  sl_upstreams *s = calloc(1, sizeof(*s) + cfg->nupstreams * sizeof(sl_upstream_rt));
  if (s == NULL) return NULL;
  s->w = w;
  s->cfg = cfg;
  s->refs = 1;
  s->n = cfg->nupstreams;
  uint64_t seed = sl_balance_hash(&w, sizeof(w)) ^ (uint64_t)(ev_time() * 1e6) ^ (uint64_t)w->id;
  for (size_t i = 0; i < s->n; i++) {
    const sl_upstream_cfg *u = &cfg->upstreams[i];
    sl_upstream_rt *rt = &s->ups[i];
    rt->cfg = u;
    rt->bal.kind = u->balance;
    rt->bal.n = u->nservers;
    rt->bal.max_fails = u->max_fails;
    rt->bal.fail_timeout = u->fail_timeout;
    rt->bal.rng = seed + 0x9e3779b97f4a7c15ULL * (i + 1);
    rt->bal.peers = calloc(u->nservers, sizeof(sl_peer));
    if (u->tls) rt->sessions = calloc(u->nservers, sizeof(SSL_SESSION *));
    if (rt->bal.peers == NULL || (u->tls && rt->sessions == NULL)) {
      sl_upstreams_destroy(s);
      return NULL;
    }
    for (size_t j = 0; j < u->nservers; j++) {
      rt->bal.peers[j].weight = u->weights ? u->weights[j] : 1;
      rt->bal.peers[j].backup = u->backups ? u->backups[j] : 0;
      rt->bal.peers[j].id = sl_balance_hash(u->server_text[j], strlen(u->server_text[j]));
      rt->bal.peers[j].m = sl_metrics_server_ref(w, u->name, u->server_text[j]);
    }
    if (u->has_health_check && (rt->health = sl_health_start(w, u, &rt->bal)) == NULL) {
      sl_upstreams_destroy(s);
      return NULL;
    }
  }
  return s;
}

void sl_upstreams_inherit(sl_upstreams *s, const sl_upstreams *from) {
  for (size_t i = 0; s && from && i < s->n; i++) {
    sl_upstream_rt *rt = &s->ups[i];
    const sl_upstream_rt *was = NULL;
    for (size_t k = 0; k < from->n && was == NULL; k++)
      if (strcmp(from->ups[k].cfg->name, rt->cfg->name) == 0) was = &from->ups[k];
    /* Host names resolved again: the switch to the backups holds on (a
     * primary's first successful connect ends it). A reload starts afresh. */
    if (was) rt->bal.on_backups = was->bal.on_backups;
    for (size_t j = 0; was && j < rt->bal.n; j++) {
      for (size_t k = 0; k < was->bal.n; k++) {
        if (strcmp(was->cfg->server_text[k], rt->cfg->server_text[j]) != 0) continue;
        rt->bal.peers[j].fails = was->bal.peers[k].fails;
        rt->bal.peers[j].down_until = was->bal.peers[k].down_until;
        rt->bal.peers[j].check_down = was->bal.peers[k].check_down;
        /* The same TLS context (shared by the derived configuration): its
         * sessions resume as before. */
        if (rt->sessions && was->sessions && rt->cfg->tls == was->cfg->tls &&
            was->sessions[k] != NULL && SSL_SESSION_up_ref(was->sessions[k]) == 1)
          rt->sessions[j] = was->sessions[k];
        break;
      }
    }
  }
}

void sl_upstreams_stop_checks(sl_upstreams *s) {
  if (s == NULL) return;
  for (size_t i = 0; i < s->n; i++) {
    if (s->ups[i].health == NULL) continue;
    sl_health_stop(s->ups[i].health);
    s->ups[i].health = NULL;
    /* Without checks, only passive health decides. */
    for (size_t j = 0; j < s->ups[i].bal.n; j++) s->ups[i].bal.peers[j].check_down = 0;
  }
}

void sl_upstreams_destroy(sl_upstreams *s) {
  if (s == NULL) return;
  sl_upstreams_stop_checks(s);
  sl_upstreams_unref(s);
}

int sl_upstream_resolve(const struct sl_channel *client, const char *target,
                        const sl_upstream_cfg **u, sl_addr *addr, char *host_name, int *port_out,
                        const char **err) {
  sl_upstreams *s = sl_server_upstreams(client);
  *u = NULL;
  for (size_t i = 0; s && i < s->n; i++) {
    if (strcmp(s->ups[i].cfg->name, target) == 0) {
      *u = s->ups[i].cfg;
      return SL_OK;
    }
  }
  /* "host:port", "[v6]:port", "localhost:port" or "name:port". */
  char host[256];
  const char *colon = strrchr(target, ':');
  size_t hlen = colon ? (size_t)(colon - target) : 0;
  char *end = NULL;
  long port = colon ? strtol(colon + 1, &end, 10) : -1;
  if (colon == NULL || hlen == 0 || hlen >= sizeof(host) || end == colon + 1 || *end != '\0' ||
      port < 1 || port > 65535) {
    *err = "expected the name of an upstream or \"host:port\"";
    return SL_ERROR;
  }
  memcpy(host, target, hlen);
  host[hlen] = '\0';
  const char *h = host;
  if (host[0] == '[' && host[hlen - 1] == ']') {
    host[hlen - 1] = '\0';
    h = host + 1;
  } else if (strchr(host, ':') != NULL) {
    *err = "expected an IPv6 host in brackets, as \"[::1]:80\"";
    return SL_ERROR;
  } else if (strcmp(host, "localhost") == 0) {
    h = "127.0.0.1";
  }
  if (sl_addr_parse(addr, h, (int)port) == SL_OK) return SL_OK;
  if (h == host && sl_addr_is_host_name(host)) {
    memcpy(host_name, host, hlen + 1);
    *port_out = (int)port;
    return SL_UPSTREAM_HOST_NAME;
  }
  *err = "expected the name of an upstream or \"host:port\" (a numeric IPv4 host, an IPv6 host "
         "in brackets or a host name)";
  return SL_ERROR;
}

/* A connection to the server of p closed, or a try of it ended. */
static void sl_upstream_peer_done(sl_peer *p) {
  SL_ASSERT(p->active > 0, "upstream server active count underflow");
  p->active--;
}

/* ---- the lease stage: notices when the upstream channel is gone ---- */

/* A connected upstream channel closed (ud: its lease): its bytes go to its
 * server's counters. */
static void sl_upstream_on_close(struct sl_channel *ch) {
  sl_lease *l = ch->ud;
  ch->ud = NULL;   /* counted: snapshots no longer add its bytes */
  if (l) sl_metrics_server_closed(l->m, ch);
}

sl_metrics_server *sl_upstream_metrics_of(const struct sl_channel *ch) {
  if (ch->on_close != sl_upstream_on_close || ch->ud == NULL) return NULL;
  const sl_lease *l = ch->ud;
  return l->m;
}

void sl_upstreams_each(const sl_upstreams *s, sl_upstreams_peer_fn fn, void *ud) {
  for (size_t i = 0; s && i < s->n; i++)
    for (size_t j = 0; j < s->ups[i].bal.n; j++) fn(ud, s->ups[i].cfg, i, j, &s->ups[i].bal.peers[j]);
}

static void sl_attempt_gone(sl_attempt *a);

static void sl_lease_removed(sl_ctx *ctx) {
  sl_lease *l = ctx->state;
  if (l->attempt != NULL) {
    sl_attempt *a = l->attempt;
    l->attempt = NULL;
    sl_attempt_gone(a);
  } else if (l->set != NULL) {
    if (l->peer) sl_upstream_peer_done(l->peer);
    sl_upstreams_unref(l->set);
    l->set = NULL;
  }
}

static const sl_stage_ops sl_lease_ops = {
    .name = "upstream",
    .state_size = sizeof(sl_lease),
    .on_removed = sl_lease_removed,
};

/* ---- attempts ---- */

static const char *sl_attempt_server_text(const sl_attempt *a, char *buf, size_t len) {
  if (a->up) return a->up->cfg->server_text[a->server];
  return sl_addr_format((const struct sockaddr *)&a->addr.ss, buf, len);
}

static void sl_attempt_free(sl_attempt *a) {
  sl_upstreams_unref(a->set);
  free(a);
}

/* The current try's channel leaves the attempt: its server has one active
 * connection less. The lease forgets the attempt. */
static void sl_attempt_detach(sl_attempt *a) {
  if (a->up && a->server >= 0) sl_upstream_peer_done(&a->up->bal.peers[a->server]);
  if (a->lease) ((sl_lease *)a->lease->state)->attempt = NULL;
  a->lease = NULL;
  a->ch = NULL;
}

/* The channel closed while connecting: the client went away (or sluice
 * is stopping). */
static void sl_attempt_gone(sl_attempt *a) {
  a->lease = NULL;
  sl_attempt_detach(a);
  sl_attempt_free(a);
}

static void sl_attempt_note(sl_attempt *a, const char *server, const char *why) {
  size_t used = strlen(a->tried);
  snprintf(a->tried + used, sizeof(a->tried) - used, "%s%s (%s)", used ? ", " : "", server, why);
}

/* Every try failed (or no server was available): the client goes. */
static void sl_attempt_give_up(sl_attempt *a, const char *none_left) {
  struct sl_channel *client = a->client;
  char what[96] = "upstream";
  if (a->up) snprintf(what, sizeof(what), "upstream %s", a->up->cfg->name);
  if (a->ntried == 0)
    sl_log(SL_LOG_WARN, "%s: %s unavailable: %s", sl_channel_describe(client), what, none_left);
  else
    sl_log(SL_LOG_WARN, "%s: %s unavailable after %d tr%s: %s", sl_channel_describe(client), what,
           a->ntried, a->ntried == 1 ? "y" : "ies", a->tried);
  a->client = NULL;
  sl_attempt_free(a);
  sl_channel_close(client, "upstream_unavailable", 1);
}

/* A try failed: note it, count it against the server, and drop its
 * channel (when it had one) without touching the client. With keep, the
 * channel is unjoined but left open, its close reason set, and returned:
 * the caller hands its queued bytes to the next try, then closes it. */
static struct sl_channel *sl_attempt_failed_keep(sl_attempt *a, const char *why, int keep) {
  char buf[64];
  const char *server = sl_attempt_server_text(a, buf, sizeof(buf));
  sl_attempt_note(a, server, why);
  struct sl_channel *ch = a->ch;
  if (a->up && a->server >= 0) {
    sl_worker *w = a->set->w;
    sl_peer *p = &a->up->bal.peers[a->server];
    int was_up = sl_balance_available(&a->up->bal, (size_t)a->server, ev_now(w->loop));
    if (sl_balance_report(&a->up->bal, (size_t)a->server, 0, ev_now(w->loop))) {
      if (was_up) sl_metrics_server_down(p->m, SL_METRICS_DOWN_PASSIVE);
      sl_log(SL_LOG_WARN,
             "worker %d: upstream %s: server %s skipped for %.0f ms after %u failed connect%s in a row",
             w->id, a->up->cfg->name, server, a->up->cfg->fail_timeout * 1000.0, p->fails,
             p->fails == 1 ? "" : "s");
    }
  }
  sl_attempt_detach(a);
  if (ch != NULL) {
    ch->peer = NULL;
    if (a->client) {
      a->client->peer = NULL;
      a->client->peer_addr.sa.sa_family = AF_UNSPEC;   /* no upstream, for the access log */
    }
    snprintf(ch->reason, sizeof(ch->reason), "connect failed: %s", why);
    if (keep) return ch;
    sl_channel_close(ch, ch->reason, 1);
  } else {
    sl_log(SL_LOG_WARN, "upstream %s for %s: connect failed: %s", server, a->for_name, why);
  }
  return NULL;
}

static void sl_attempt_failed(sl_attempt *a, const char *why) { sl_attempt_failed_keep(a, why, 0); }

static void sl_attempt_on_connect(struct sl_channel *ch, int err);

/* The PROXY protocol header for a's client: its address and the address
 * it connected to. Its length. */
static size_t sl_upstream_proxy_header(const sl_attempt *a, uint8_t *hdr) {
  sl_addr local;
  local.len = sizeof(local.ss);
  const sl_addr *dst = getsockname(a->client->fd, (struct sockaddr *)&local.ss, &local.len) == 0
                           ? &local
                           : NULL;
  return sl_proxy_header(a->up->cfg->send_proxy, &a->client->remote, dst, hdr);
}

/* Queues the PROXY protocol header first on the upstream channel. A try
 * that fails hands it on with the client's bytes (sl_channel_move_queue). */
static void sl_upstream_send_proxy(sl_attempt *a, struct sl_channel *ch) {
  uint8_t hdr[SL_PROXY_HEADER_MAX];
  size_t n = sl_upstream_proxy_header(a, hdr);
  sl_buf *b = sl_buf_from(ch->w->pool, hdr, n);
  if (b == NULL) {
    sl_channel_close(ch, "out of buffer memory for the PROXY header", 1);
    return;
  }
  sl_buf_set_owner(b, &ch->owned);
  /* Flushed at once: a server that speaks first must not wait for the
   * client's first bytes to get its header. */
  if (sl_channel_write(ch, b) == SL_OK) sl_channel_flush(ch);
}

/* The primary servers of up as "a, b" in buf. */
static void sl_upstream_primaries(const sl_upstream_rt *up, char *buf, size_t len) {
  size_t used = 0;
  buf[0] = '\0';
  for (size_t j = 0; j < up->bal.n && used < len; j++) {
    if (up->bal.peers[j].backup) continue;
    int n = snprintf(buf + used, len - used, "%s%s", used ? ", " : "", up->cfg->server_text[j]);
    if (n > 0) used += (size_t)n;
  }
}

/* Upstream up switched to its backups (a pick found no primary available)
 * or back to its primaries (server i, a primary, took a connection): said
 * once per switch, on the worker that saw it. */
static void sl_upstream_log_switch(const sl_worker *w, const sl_upstream_rt *up, size_t i) {
  if (up->bal.on_backups) {
    char list[240];
    sl_upstream_primaries(up, list, sizeof(list));   /* none is available */
    sl_log(SL_LOG_WARN, "worker %d: upstream %s: no primary server available (down: %s); new "
           "connections go to its backup servers", w->id, up->cfg->name, list);
  } else {
    sl_log(SL_LOG_INFO, "worker %d: upstream %s: primary server %s is available again; new "
           "connections go to its primary servers", w->id, up->cfg->name,
           up->cfg->server_text[i]);
  }
}

/* The counters of a's current try: its server's, or its address's. */
static struct sl_metrics_server *sl_attempt_metrics(const sl_attempt *a) {
  return a->up ? a->up->bal.peers[a->server].m : a->direct;
}

/* The upstream label of a's counters. */
static const char *sl_attempt_upstream_name(const sl_attempt *a) {
  return a->up ? a->up->cfg->name : SL_METRICS_DIRECT;
}

/* The connect timeout of a's tries (and of their TLS handshakes): the
 * listener's when it sets one, else the upstream's. */
static double sl_attempt_timeout(const sl_attempt *a) {
  const sl_listener_cfg *lc = sl_server_listener_cfg(a->client);
  if (lc && lc->connect_timeout > 0) return lc->connect_timeout;
  return a->up ? a->up->cfg->connect_timeout : SL_UPSTREAM_ADDRESS_TIMEOUT;
}

/* Makes ch, the channel of a's current try, a TLS client of its server
 * (names: sl_upstream_tls_names). */
static int sl_attempt_tls(sl_attempt *a, struct sl_channel *ch) {
  const sl_upstream_cfg *u = a->up->cfg;
  char host[256], addr[64];
  const char *sni, *verify;
  sl_upstream_tls_names(u, (size_t)a->server, host, addr, &sni, &verify);
  return sl_channel_tls_client(ch, u->tls, sni, verify, &a->up->sessions[a->server]);
}

/* Starts the next try, or gives up. SL_OK while a try is under way. What
 * carry (a failed try's channel, or NULL) has queued goes to the new try. */
static int sl_attempt_next(sl_attempt *a, struct sl_channel *carry) {
  sl_worker *w = a->set->w;
  for (;;) {
    const sl_addr *addr = &a->addr;
    double timeout = sl_attempt_timeout(a);
    if (a->up) {
      const sl_upstream_cfg *u = a->up->cfg;
      if (a->ntried >= u->tries) break;
      int on_backups = a->up->bal.on_backups;
      int i = sl_balance_pick(&a->up->bal, a->key, a->skip, ev_now(w->loop));
      if (a->up->bal.on_backups != on_backups) sl_upstream_log_switch(w, a->up, (size_t)i);
      if (i < 0) {
        if (a->ntried > 0) break;
        /* Nothing available at all: this client fails at once, and the
         * passive marks are cleared so that the next one tries again. */
        sl_balance_reset_passive(&a->up->bal);
        char all[240] = "";
        for (size_t j = 0; j < u->nservers; j++) {
          size_t used = strlen(all);
          snprintf(all + used, sizeof(all) - used, "%s%s", j ? ", " : "", u->server_text[j]);
        }
        char why[300];
        snprintf(why, sizeof(why), "no server available (down: %s)", all);
        sl_attempt_give_up(a, why);
        return SL_ERROR;
      }
      a->server = i;
      a->skip[i] = 1;
      a->up->bal.peers[i].active++;
      addr = &u->servers[i];
    } else if (a->ntried >= 1) {
      break;
    } else {
      char text[64];
      a->direct = sl_metrics_direct(w, sl_addr_format((const struct sockaddr *)&addr->ss, text,
                                                      sizeof(text)));
    }
    a->ntried++;
    struct sl_channel *ch =
        sl_channel_connect(w, addr, timeout, &a->cc, sl_attempt_on_connect, a, a->for_name);
    if (ch == NULL && (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)) {
      /* sluice's own shortage (descriptors, memory), not the server's: it
       * is not counted against the server, and no other server is tried
       * (each would fail alike). */
      char why[160];
      snprintf(why, sizeof(why), "sluice is short of resources (%s), not counted against %s",
               strerror(errno), a->up ? "the server" : "the address");
      a->ntried = 0;
      sl_attempt_detach(a);
      sl_attempt_give_up(a, why);
      return SL_ERROR;
    }
    if (ch == NULL) {
      sl_metrics_connect_done(w, sl_attempt_upstream_name(a), sl_attempt_metrics(a), 0, errno);
      sl_attempt_failed(a, strerror(errno));
      continue;
    }
    ch->mlistener = a->client->mlistener;
    a->ch = ch;
    a->lease = sl_pipeline_add_last(&ch->pipe, &sl_lease_ops, "upstream");
    if (a->lease == NULL) {
      sl_attempt_failed(a, "out of memory");   /* closes ch */
      continue;
    }
    ((sl_lease *)a->lease->state)->attempt = a;
    if (a->up && a->up->cfg->tls && sl_attempt_tls(a, ch) != SL_OK) {
      sl_attempt_failed(a, "out of memory");   /* closes ch */
      continue;
    }
    sl_channel_join(a->client, ch);
    /* The client's bytes a failed try took (read while it connected) are
     * this try's to write, after the PROXY header it queued first (with
     * tls, the header goes before the handshake: sl_attempt_on_connect). */
    if (carry) {
      sl_channel_move_queue(carry, ch);
      /* So does the client's FIN, passed on while that try was under way. */
      if (carry->flags & SL_CH_SHUTDOWN_PENDING) sl_channel_shutdown_output(ch);
    } else if (a->up && a->up->cfg->send_proxy && !a->up->cfg->tls) sl_upstream_send_proxy(a, ch);
    return SL_OK;
  }
  sl_attempt_give_up(a, "");
  return SL_ERROR;
}

/* A try ended: connected (err 0: the connect completed, and with tls the
 * handshake too) or failed (why: what failed, NULL for the errno value's
 * text). */
static void sl_attempt_done(struct sl_channel *ch, int err, const char *why) {
  sl_attempt *a = ch->ud;
  SL_ASSERT(a != NULL && a->ch == ch, "connect completion for a channel its attempt left");
  sl_metrics_connect_done(ch->w, sl_attempt_upstream_name(a), sl_attempt_metrics(a),
                          ev_now(ch->w->loop) - ch->started, err);
  if (err) {
    if (why == NULL) why = err == ETIMEDOUT ? "timed out" : strerror(err);
    struct sl_channel *failed = sl_attempt_failed_keep(a, why, 1);
    sl_attempt_next(a, failed);
    /* Closed after the next try took its bytes (or with them, when none
     * could); a is gone if that try gave up. */
    if (failed) sl_channel_close(failed, failed->reason, 1);
    return;
  }
  if (a->up) {
    int on_backups = a->up->bal.on_backups;
    sl_balance_report(&a->up->bal, (size_t)a->server, 1, ev_now(a->set->w->loop));
    if (a->up->bal.on_backups != on_backups)
      sl_upstream_log_switch(a->set->w, a->up, (size_t)a->server);
  }
  /* The lease keeps the set and the server's active count from now on. */
  sl_lease *l = a->lease->state;
  l->attempt = NULL;
  l->set = a->set;
  l->peer = a->up ? &a->up->bal.peers[a->server] : NULL;
  l->m = sl_attempt_metrics(a);
  if (ch->ssl != NULL && SSL_session_reused(ch->ssl)) sl_metrics_server_tls_resumed(l->m);
  ch->ud = l;
  ch->on_close = sl_upstream_on_close;
  sl_upstream_ready_fn ready = a->ready;
  free(a);
  ready(ch);
}

/* The TLS handshake of a try ended. */
static void sl_attempt_on_handshake(struct sl_channel *ch, int err) {
  sl_attempt *a = ch->ud;
  /* Closed meanwhile (its client went away, sluice stops): the lease's
   * removal ends the attempt. */
  if (sl_channel_is_closed(ch)) return;
  char why[sizeof(ch->reason)];
  if (err) {
    /* A session the server refused or a certificate it changed: the next
     * connection starts afresh. */
    sl_tls_session_free(&a->up->sessions[a->server]);
    snprintf(why, sizeof(why), "%s", err == ETIMEDOUT ? "TLS handshake timed out" : ch->reason);
  }
  sl_attempt_done(ch, err, err ? why : NULL);
}

static void sl_attempt_on_connect(struct sl_channel *ch, int err) {
  sl_attempt *a = ch->ud;
  if (!err && ch->ssl != NULL) {
    /* TLS: the try goes on with the handshake, a PROXY header before it. */
    uint8_t hdr[SL_PROXY_HEADER_MAX];
    size_t n = a->up->cfg->send_proxy ? sl_upstream_proxy_header(a, hdr) : 0;
    err = sl_channel_tls_start(ch, sl_attempt_timeout(a), n ? hdr : NULL, n,
                               sl_attempt_on_handshake);
    if (!err) return;
  }
  sl_attempt_done(ch, err, NULL);
}

int sl_upstream_connect(struct sl_channel *client, const sl_upstream_cfg *u, const sl_addr *addr,
                        const sl_channel_config *cc, const char *for_name,
                        sl_upstream_ready_fn ready) {
  if (sl_channel_is_closed(client)) return SL_ERROR;
  sl_upstreams *s = sl_server_upstreams(client);
  SL_ASSERT(s != NULL, "a connection outside a server connects to an upstream");
  sl_upstream_rt *rt = NULL;
  if (u != NULL) {
    /* u belongs to the configuration the client started with (found by
     * name too, should a caller hold another configuration's). */
    for (size_t i = 0; i < s->n && rt == NULL; i++)
      if (s->ups[i].cfg == u || strcmp(s->ups[i].cfg->name, u->name) == 0) rt = &s->ups[i];
    if (rt == NULL) {
      sl_log(SL_LOG_WARN, "%s: upstream %s unavailable: it is no longer in the configuration",
             sl_channel_describe(client), u->name);
      sl_channel_close(client, "upstream_unavailable", 1);
      return SL_ERROR;
    }
    u = rt->cfg;
  }
  size_t nskip = u ? u->nservers : 0;
  sl_attempt *a = sl_zalloc(sizeof(*a) + nskip);
  if (a == NULL) {
    sl_channel_close(client, "out of memory connecting to the upstream", 1);
    return SL_ERROR;
  }
  s->refs++;
  a->set = s;
  a->up = rt;
  if (addr) a->addr = *addr;
  a->client = client;
  a->ready = ready;
  a->server = -1;
  /* Only hash balancing uses the client's key. */
  a->key = rt && rt->bal.kind == SL_BALANCE_HASH ? sl_upstream_addr_hash(&client->remote) : 0;
  a->cc = *cc;
  sl_str_append(a->for_name, sizeof(a->for_name), 0, for_name);
  /* Nothing is read from the client until the upstream is there. */
  sl_channel_set_autoread(client, 0);
  return sl_attempt_next(a, NULL);
}
