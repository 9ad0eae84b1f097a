#include "proxy/metrics.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "buf/holder.h"
#include "io/channel.h"
#include "lua/host.h"
#include "proxy/balance.h"
#include "proxy/config.h"
#include "proxy/server.h"
#include "proxy/upstream.h"
#include "util/common.h"

const double sl_metrics_buckets[SL_METRICS_NBUCKETS] = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0,
};

const char *const sl_metrics_reasons[SL_METRICS_NREASONS] = {"refused", "timeout", "other",
                                                               "tls"};
const char *const sl_metrics_causes[SL_METRICS_NCAUSES] = {"passive", "health_check"};

struct sl_metrics_server {
  char *upstream, *server;
  size_t uidx;                   /* its upstream's entry in sl_metrics.upstreams */
  int direct;                    /* an address of ctx:connect: no generation lists it */
  uint32_t refs;                 /* generations (upstream sets) that list it */
  uint64_t opened, open;
  uint64_t failures[SL_METRICS_NREASONS];
  uint64_t buckets[SL_METRICS_NBUCKETS];
  double seconds;
  uint64_t bytes_to, bytes_from; /* closed connections' bytes */
  uint64_t downs[SL_METRICS_NCAUSES];
  uint64_t tls_resumed;
  size_t row;                    /* while a snapshot is built: its row */
  uint64_t noted;                /* the snapshot whose row has its state */
};

typedef struct sl_metrics_lis {
  char *name;
  uint64_t opened, closed, bytes_in, bytes_out;   /* closed connections' bytes */
  uint64_t limited;              /* closed at once by max_connections_per_client */
  uint64_t rate_pauses;          /* accepting paused at max_connection_rate */
  uint64_t tls_done, tls_failed; /* TLS handshakes */
} sl_metrics_lis;

typedef struct sl_metrics_named {
  char *name;
  uint64_t n, failures;
  uint64_t buckets[SL_METRICS_NBUCKETS];
  double seconds;
  /* Upstreams only: failures by reason, and what its servers dropped so
   * far (sl_metrics_server_unref) had counted; a snapshot adds the rest. */
  uint64_t reasons[SL_METRICS_NREASONS];
  uint64_t bytes_to, bytes_from, tls_resumed;
} sl_metrics_named;

/* One worker's counters (written by its thread only) and its side of the
 * snapshot hand-off (under lock). */
struct sl_metrics {
  sl_worker *w;
  sl_metrics_lis *listeners;
  size_t nlisteners;
  sl_metrics_named *upstreams;
  size_t nupstreams;
  sl_metrics_named *stages;      /* n: errors */
  size_t nstages;
  sl_metrics_server **servers;   /* in the order they were first listed */
  size_t nservers;
  size_t ndirect;                /* of those, addresses of ctx:connect (other excluded) */
  sl_metrics_server *direct_other; /* the addresses past SL_METRICS_MAX_DIRECT */
  uint64_t builds;               /* snapshots built */
  ev_async snap_watcher;         /* a snapshot was asked for */
  pthread_mutex_t lock;
  pthread_cond_t cond;
  uint64_t asked, answered;      /* request sequence numbers */
  int memory;                    /* the pending request wants the buffer walk */
  sl_metrics_snap *result;       /* the answer to `answered`, until taken */
  _Atomic int gone;              /* the loop has ended */
};

/* ---- name tables ---- */

static char *sl_metrics_strdup(const char *s) {
  size_t n = strlen(s) + 1;
  char *c = malloc(n);
  if (c) memcpy(c, s, n);
  return c;
}

/* The entry named `name` in *tab (added, zeroed, when missing), or NULL. */
static sl_metrics_named *sl_metrics_find(sl_metrics_named **tab, size_t *n, const char *name) {
  for (size_t i = 0; i < *n; i++)
    if (strcmp((*tab)[i].name, name) == 0) return &(*tab)[i];
  sl_metrics_named *t = realloc(*tab, (*n + 1) * sizeof(**tab));
  if (t == NULL) return NULL;
  *tab = t;
  sl_metrics_named *e = &t[*n];
  memset(e, 0, sizeof(*e));
  e->name = sl_metrics_strdup(name);
  if (e->name == NULL) return NULL;
  (*n)++;
  return e;
}

uint16_t sl_metrics_listener(sl_worker *w, const char *name) {
  sl_metrics *m = w->metrics;
  if (m == NULL) return 0;
  for (size_t i = 0; i < m->nlisteners; i++)
    if (strcmp(m->listeners[i].name, name) == 0) return (uint16_t)(i + 1);
  if (m->nlisteners >= UINT16_MAX) return 0;
  sl_metrics_lis *t = realloc(m->listeners, (m->nlisteners + 1) * sizeof(*t));
  if (t == NULL) return 0;
  m->listeners = t;
  sl_metrics_lis *l = &t[m->nlisteners];
  memset(l, 0, sizeof(*l));
  l->name = sl_metrics_strdup(name);
  if (l->name == NULL) return 0;
  return (uint16_t)++m->nlisteners;
}

void sl_metrics_client_opened(sl_worker *w, uint16_t li) {
  sl_metrics *m = w->metrics;
  if (m && li > 0) m->listeners[li - 1].opened++;
}

void sl_metrics_client_limited(sl_worker *w, uint16_t li) {
  sl_metrics *m = w->metrics;
  if (m && li > 0) m->listeners[li - 1].limited++;
}

void sl_metrics_tls_handshake(sl_worker *w, uint16_t li, int ok) {
  sl_metrics *m = w->metrics;
  if (m == NULL || li == 0) return;
  if (ok) m->listeners[li - 1].tls_done++;
  else m->listeners[li - 1].tls_failed++;
}

void sl_metrics_rate_paused(sl_worker *w, uint16_t li) {
  sl_metrics *m = w->metrics;
  if (m && li > 0) m->listeners[li - 1].rate_pauses++;
}

void sl_metrics_client_closed(sl_worker *w, uint16_t li, sl_channel *ch) {
  sl_metrics *m = w->metrics;
  ch->mclient = 0; /* counted: snapshots no longer add its bytes */
  if (m == NULL || li == 0) return;
  sl_metrics_lis *l = &m->listeners[li - 1];
  l->closed++;
  l->bytes_in += ch->bytes_in;
  l->bytes_out += ch->bytes_out;
}

static void sl_metrics_observe(uint64_t *buckets, double seconds) {
  for (int i = 0; i < SL_METRICS_NBUCKETS; i++) {
    if (seconds <= sl_metrics_buckets[i]) {
      buckets[i]++;
      return;
    }
  }
}

int sl_metrics_failure_reason(int err) {
  if (err == ECONNREFUSED) return SL_METRICS_REFUSED;
  if (err == ETIMEDOUT) return SL_METRICS_TIMEOUT;
  if (err == EPROTO) return SL_METRICS_TLS;
  return SL_METRICS_OTHER;
}

void sl_metrics_connect_done(sl_worker *w, const char *upstream, sl_metrics_server *e,
                             double seconds, int err) {
  sl_metrics *m = w->metrics;
  if (m == NULL) return;
  if (e != NULL) {
    if (err) {
      e->failures[sl_metrics_failure_reason(err)]++;
    } else {
      e->opened++;
      e->open++;
      e->seconds += seconds;
      sl_metrics_observe(e->buckets, seconds);
    }
  }
  sl_metrics_named *u = sl_metrics_find(&m->upstreams, &m->nupstreams, upstream);
  if (u == NULL) return;
  if (err) {
    u->failures++;
    u->reasons[sl_metrics_failure_reason(err)]++;
    return;
  }
  u->n++;
  u->seconds += seconds;
  sl_metrics_observe(u->buckets, seconds);
}

/* ---- servers ---- */

static void sl_metrics_server_free(sl_metrics_server *e) {
  free(e->upstream);
  free(e->server);
  free(e);
}

/* A new server of upstream (whose entry it gets, added when missing),
 * appended to m's list with zero counts and no reference; NULL on ENOMEM. */
static sl_metrics_server *sl_metrics_server_add(sl_metrics *m, const char *upstream,
                                                const char *server) {
  sl_metrics_named *u = sl_metrics_find(&m->upstreams, &m->nupstreams, upstream);
  if (u == NULL) return NULL;
  sl_metrics_server **t = realloc(m->servers, (m->nservers + 1) * sizeof(*t));
  if (t == NULL) return NULL;
  m->servers = t;
  sl_metrics_server *e = calloc(1, sizeof(*e));
  if (e == NULL) return NULL;
  e->upstream = sl_metrics_strdup(upstream);
  e->server = sl_metrics_strdup(server);
  if (e->upstream == NULL || e->server == NULL) {
    sl_metrics_server_free(e);
    return NULL;
  }
  e->uidx = (size_t)(u - m->upstreams);
  m->servers[m->nservers++] = e;
  return e;
}

sl_metrics_server *sl_metrics_server_ref(sl_worker *w, const char *upstream, const char *server) {
  sl_metrics *m = w->metrics;
  if (m == NULL) return NULL;
  for (size_t i = 0; i < m->nservers; i++) {
    sl_metrics_server *e = m->servers[i];
    if (!e->direct && strcmp(e->upstream, upstream) == 0 && strcmp(e->server, server) == 0) {
      e->refs++;
      return e;
    }
  }
  sl_metrics_server *e = sl_metrics_server_add(m, upstream, server);
  if (e) e->refs = 1;
  return e;
}

sl_metrics_server *sl_metrics_direct(sl_worker *w, const char *address) {
  sl_metrics *m = w->metrics;
  if (m == NULL) return NULL;
  for (size_t i = 0; i < m->nservers; i++) {
    sl_metrics_server *e = m->servers[i];
    if (e->direct && e != m->direct_other && strcmp(e->server, address) == 0) return e;
  }
  int over = m->ndirect >= SL_METRICS_MAX_DIRECT;
  if (over && m->direct_other != NULL) return m->direct_other;
  sl_metrics_server *e =
      sl_metrics_server_add(m, SL_METRICS_DIRECT, over ? SL_METRICS_DIRECT_OTHER : address);
  if (e == NULL) return NULL;
  e->direct = 1;
  if (over) m->direct_other = e;
  else m->ndirect++;
  return e;
}

void sl_metrics_server_unref(sl_worker *w, sl_metrics_server *e) {
  sl_metrics *m = w->metrics;
  if (e == NULL || m == NULL) return;
  SL_ASSERT(e->refs > 0, "server metrics reference count underflow");
  if (--e->refs > 0) return;
  SL_ASSERT(e->open == 0, "server metrics dropped while a connection of it is open");
  SL_ASSERT(!e->direct, "a plain address's server metrics dropped");
  /* Its upstream's totals keep what it counted. */
  sl_metrics_named *u = &m->upstreams[e->uidx];
  u->bytes_to += e->bytes_to;
  u->bytes_from += e->bytes_from;
  u->tls_resumed += e->tls_resumed;
  for (size_t i = 0; i < m->nservers; i++) {
    if (m->servers[i] != e) continue;
    memmove(&m->servers[i], &m->servers[i + 1], (m->nservers - i - 1) * sizeof(*m->servers));
    m->nservers--;
    break;
  }
  sl_metrics_server_free(e);
}

void sl_metrics_server_closed(sl_metrics_server *e, const sl_channel *ch) {
  if (e == NULL) return;
  SL_ASSERT(e->open > 0, "server metrics: more connections closed than opened");
  e->open--;
  e->bytes_to += ch->bytes_out;
  e->bytes_from += ch->bytes_in;
}

void sl_metrics_server_tls_resumed(sl_metrics_server *e) {
  if (e) e->tls_resumed++;
}

void sl_metrics_server_down(sl_metrics_server *e, int cause) {
  if (e) e->downs[cause]++;
}

void sl_metrics_stage_error(sl_worker *w, const char *name) {
  sl_metrics *m = w->metrics;
  if (m == NULL) return;
  sl_metrics_named *s = sl_metrics_find(&m->stages, &m->nstages, name);
  if (s) s->n++;
}

/* ---- the memory walk (worker thread) ---- */

typedef struct sl_metrics_ref {
  const void *ptr;               /* a live context, or a channel's owner record */
  const sl_ctx *ctx;             /* NULL for owner records */
  const sl_channel *ch;
} sl_metrics_ref;

typedef struct sl_metrics_walk {
  sl_metrics_ref *ctxs, *owners;
  size_t nctxs, nowners;
  sl_metrics_snap *s;
  int failed;                    /* out of memory: rows are missing */
} sl_metrics_walk;

static int sl_metrics_ref_cmp(const void *a, const void *b) {
  uintptr_t x = (uintptr_t)((const sl_metrics_ref *)a)->ptr;
  uintptr_t y = (uintptr_t)((const sl_metrics_ref *)b)->ptr;
  return x < y ? -1 : x > y;
}

static const sl_metrics_ref *sl_metrics_ref_find(const sl_metrics_ref *tab, size_t n,
                                                 const void *ptr) {
  if (ptr == NULL || n == 0) return NULL;
  sl_metrics_ref key = {ptr, NULL, NULL};
  return bsearch(&key, tab, n, sizeof(*tab), sl_metrics_ref_cmp);
}

static void sl_metrics_copy_name(char *dst, const char *src) {
  snprintf(dst, SL_METRICS_NAME, "%s", src);
}

static const char *sl_metrics_listener_name(const sl_metrics *m, const sl_channel *ch) {
  if (ch == NULL || ch->mlistener == 0 || ch->mlistener > m->nlisteners) return "-";
  return m->listeners[ch->mlistener - 1].name;
}

static void sl_metrics_add_held(sl_metrics_walk *wk, const char *listener, const char *stage,
                                uint64_t bytes) {
  sl_metrics_snap *s = wk->s;
  for (size_t i = 0; i < s->nheld; i++) {
    sl_metrics_held_snap *h = &s->held[i];
    if (strncmp(h->listener, listener, SL_METRICS_NAME - 1) == 0 &&
        strncmp(h->stage, stage, SL_METRICS_NAME - 1) == 0) {
      h->bufs++;
      h->bytes += bytes;
      return;
    }
  }
  sl_metrics_held_snap *t = realloc(s->held, (s->nheld + 1) * sizeof(*t));
  if (t == NULL) {
    wk->failed = 1;
    return;
  }
  s->held = t;
  sl_metrics_held_snap *h = &t[s->nheld++];
  sl_metrics_copy_name(h->listener, listener);
  sl_metrics_copy_name(h->stage, stage);
  h->bufs = 1;
  h->bytes = bytes;
}

static void sl_metrics_on_buf(void *ud, const sl_buf *b, const void *who) {
  sl_metrics_walk *wk = ud;
  const sl_metrics_ref *h = sl_metrics_ref_find(wk->ctxs, wk->nctxs, who);
  const sl_metrics_ref *o = sl_metrics_ref_find(wk->owners, wk->nowners, b->owner);
  const sl_channel *ch = o ? o->ch : h ? h->ch : NULL;
  const char *stage = "-";
  if (h != NULL) {
    if (h->ctx == &h->ctx->pipe->head) stage = "outbound queue";
    else stage = h->ctx->name;
  }
  uint64_t bytes = b->block_size;
  wk->s->held_bufs++;
  wk->s->held_bytes += bytes;
  const char *lname = "-";
  if (ch != NULL) {
    lname = sl_metrics_listener_name(ch->w->metrics, ch);
    if (ch->mlistener > 0 && ch->mlistener <= wk->s->nlisteners) {
      wk->s->listeners[ch->mlistener - 1].held_bufs++;
      wk->s->listeners[ch->mlistener - 1].held_bytes += bytes;
    }
  }
  sl_metrics_add_held(wk, lname, stage, bytes);
}

static int sl_metrics_push_ref(sl_metrics_ref **tab, size_t *n, size_t *cap, const void *ptr,
                               const sl_ctx *ctx, const sl_channel *ch) {
  if (*n == *cap) {
    size_t nc = *cap ? *cap * 2 : 64;
    sl_metrics_ref *t = realloc(*tab, nc * sizeof(*t));
    if (t == NULL) return SL_ERROR;
    *tab = t;
    *cap = nc;
  }
  (*tab)[(*n)++] = (sl_metrics_ref){ptr, ctx, ch};
  return SL_OK;
}

static void sl_metrics_walk_buffers(sl_worker *w, sl_metrics_snap *s) {
  sl_metrics_walk wk = {0};
  wk.s = s;
  size_t cctx = 0, cown = 0;
  int rc = SL_OK;
  for (sl_channel *ch = w->channels; ch != NULL && rc == SL_OK; ch = ch->next) {
    rc = sl_metrics_push_ref(&wk.owners, &wk.nowners, &cown, &ch->owned, NULL, ch);
    for (sl_ctx *c = &ch->pipe.head; rc == SL_OK; c = c->next) {
      rc = sl_metrics_push_ref(&wk.ctxs, &wk.nctxs, &cctx, c, c, ch);
      if (c == &ch->pipe.tail) break;
    }
    for (sl_ctx *c = ch->pipe.removed; c != NULL && rc == SL_OK; c = c->gone)
      rc = sl_metrics_push_ref(&wk.ctxs, &wk.nctxs, &cctx, c, c, ch);
  }
  if (rc == SL_OK) {
    if (wk.nctxs > 0) qsort(wk.ctxs, wk.nctxs, sizeof(*wk.ctxs), sl_metrics_ref_cmp);
    if (wk.nowners > 0) qsort(wk.owners, wk.nowners, sizeof(*wk.owners), sl_metrics_ref_cmp);
    sl_holder_walk(w->pool, sl_metrics_on_buf, &wk);
  }
  free(wk.ctxs);
  free(wk.owners);
}

/* ---- snapshots ---- */

typedef struct sl_metrics_noting {
  sl_metrics_snap *s;
  uint64_t stamp;
  int current;                   /* the generation new connections use */
  double now;
} sl_metrics_noting;

/* A server of a generation: its row gets the state of the newest
 * generation that lists it (generations are walked newest first). */
static void sl_metrics_note_peer(void *ud, const sl_upstream_cfg *u, size_t ui, size_t index,
                                 const sl_peer *p) {
  sl_metrics_noting *n = ud;
  sl_metrics_server *e = p->m;
  if (e == NULL || e->noted == n->stamp) return;
  e->noted = n->stamp;
  sl_metrics_server_snap *o = &n->s->servers[e->row];
  o->balance = (int)u->balance;
  o->retired = !n->current;
  o->weight = p->weight;
  o->backup = p->backup;
  o->uindex = (unsigned)ui;
  o->index = (unsigned)index;
  o->down_until = p->down_until;
  o->now = n->now;
  if (p->check_down) o->down = SL_METRICS_DOWN_CHECK + 1;
  else if (n->now < p->down_until) o->down = SL_METRICS_DOWN_PASSIVE + 1;
}

static void sl_metrics_build_servers(sl_worker *w, sl_metrics_snap *s) {
  sl_metrics *m = w->metrics;
  s->nservers = m->nservers;
  for (size_t i = 0; i < m->nservers; i++) {
    sl_metrics_server *e = m->servers[i];
    sl_metrics_server_snap *o = &s->servers[i];
    e->row = i;
    sl_metrics_copy_name(o->upstream, e->upstream);
    sl_metrics_copy_name(o->server, e->server);
    o->direct = e->direct;
    o->retired = 1;
    o->opened = e->opened;
    o->open = e->open;
    memcpy(o->failures, e->failures, sizeof(o->failures));
    memcpy(o->buckets, e->buckets, sizeof(o->buckets));
    o->seconds = e->seconds;
    o->bytes_to = e->bytes_to;
    o->bytes_from = e->bytes_from;
    memcpy(o->downs, e->downs, sizeof(o->downs));
    o->tls_resumed = e->tls_resumed;
  }
  /* Open connections: their bytes so far. */
  for (sl_channel *ch = w->channels; ch != NULL; ch = ch->next) {
    sl_metrics_server *e = sl_upstream_metrics_of(ch);
    if (e == NULL) continue;
    s->servers[e->row].bytes_to += ch->bytes_out;
    s->servers[e->row].bytes_from += ch->bytes_in;
  }
  /* Each upstream's totals: what its dropped servers counted (there
   * already), and its servers' rows. */
  for (size_t i = 0; i < m->nservers; i++) {
    const sl_metrics_server_snap *o = &s->servers[i];
    sl_metrics_upstream_snap *u = &s->upstreams[m->servers[i]->uidx];
    u->open += o->open;
    u->bytes_to += o->bytes_to;
    u->bytes_from += o->bytes_from;
    u->tls_resumed += o->tls_resumed;
  }
  sl_metrics_noting n = {s, ++m->builds, 0, ev_now(w->loop)};
  for (sl_worker_gen *g = w->gen; g != NULL; g = g->older) {
    n.current = g == w->gen;
    sl_upstreams_each(sl_server_gen_upstreams(g), sl_metrics_note_peer, &n);
  }
}

static sl_metrics_snap *sl_metrics_build(sl_worker *w, int memory) {
  sl_metrics *m = w->metrics;
  sl_metrics_snap *s = calloc(1, sizeof(*s));
  if (s == NULL) return NULL;
  s->worker = w->id;
  s->draining = w->stopping != 0;
  s->stats = w->stats;
  sl_pool *p = w->pool;
  sl_pool_get_stats(p, &s->pool);
  s->leaks = p->leaks;
  s->leaked_bytes = p->leaked_bytes;
  for (unsigned i = 0; i < SL_SC_MAX_CLASSES; i++)
    s->class_blocks[i] = sl_pool_class_allocs(p, i) - sl_pool_class_frees(p, i) -
                         sl_pool_class_frees_direct(p, i);
  if (w->lua) {
    s->has_lua = 1;
    s->lua_bytes = sl_lua_host_memory(w->lua);
    s->lua_refusals = sl_lua_host_memory_refusals(w->lua);
    s->lua_limit = sl_lua_host_memory_limit(w->lua);
    s->lua_timeouts = sl_lua_host_timeouts(w->lua);
  }
  s->channels = w->nchannels;
  s->listeners = calloc(m->nlisteners + 1, sizeof(*s->listeners));
  s->upstreams = calloc(m->nupstreams + 1, sizeof(*s->upstreams));
  s->stages = calloc(m->nstages + 1, sizeof(*s->stages));
  s->servers = calloc(m->nservers + 1, sizeof(*s->servers));
  if (s->listeners == NULL || s->upstreams == NULL || s->stages == NULL || s->servers == NULL) {
    sl_metrics_snap_free(s);
    return NULL;
  }
  s->nlisteners = m->nlisteners;
  for (size_t i = 0; i < m->nlisteners; i++) {
    const sl_metrics_lis *l = &m->listeners[i];
    sl_metrics_listener_snap *o = &s->listeners[i];
    sl_metrics_copy_name(o->name, l->name);
    o->opened = l->opened;
    o->closed = l->closed;
    o->limited = l->limited;
    o->rate_pauses = l->rate_pauses;
    o->tls_done = l->tls_done;
    o->tls_failed = l->tls_failed;
    o->bytes_in = l->bytes_in;
    o->bytes_out = l->bytes_out;
  }
  for (sl_channel *ch = w->channels; ch != NULL; ch = ch->next) {
    s->outq_bytes += ch->outq.pending;
    s->pipe_bytes += ch->spl_len;
    if (ch->mlistener == 0 || ch->mlistener > m->nlisteners) continue;
    sl_metrics_listener_snap *o = &s->listeners[ch->mlistener - 1];
    o->outq_bytes += ch->outq.pending;
    /* Open client connections: their bytes so far (closed ones are in the
     * listener's totals already). */
    if (ch->mclient) {
      o->bytes_in += ch->bytes_in;
      o->bytes_out += ch->bytes_out;
    }
  }
  s->nupstreams = m->nupstreams;
  for (size_t i = 0; i < m->nupstreams; i++) {
    const sl_metrics_named *u = &m->upstreams[i];
    sl_metrics_upstream_snap *o = &s->upstreams[i];
    sl_metrics_copy_name(o->name, u->name);
    o->connects = u->n;
    o->failures = u->failures;
    memcpy(o->reasons, u->reasons, sizeof(o->reasons));
    memcpy(o->buckets, u->buckets, sizeof(o->buckets));
    o->seconds = u->seconds;
    o->bytes_to = u->bytes_to;
    o->bytes_from = u->bytes_from;
    o->tls_resumed = u->tls_resumed;
  }
  sl_metrics_build_servers(w, s);
  s->nstages = m->nstages;
  for (size_t i = 0; i < m->nstages; i++) {
    sl_metrics_copy_name(s->stages[i].name, m->stages[i].name);
    s->stages[i].errors = m->stages[i].n;
  }
  if (memory) sl_metrics_walk_buffers(w, s);
  return s;
}

sl_metrics_snap *sl_metrics_snapshot(sl_worker *w, int memory) {
  return w->metrics ? sl_metrics_build(w, memory) : NULL;
}

void sl_metrics_snap_free(sl_metrics_snap *s) {
  if (s == NULL) return;
  free(s->listeners);
  free(s->upstreams);
  free(s->servers);
  free(s->stages);
  free(s->held);
  free(s);
}

/* Worker thread: answers the newest request. */
static void sl_metrics_on_snap(struct ev_loop *loop, ev_async *a, int revents) {
  SL_UNUSED(loop);
  SL_UNUSED(revents);
  sl_metrics *m = SL_CONTAINER_OF(a, sl_metrics, snap_watcher);
  pthread_mutex_lock(&m->lock);
  uint64_t asked = m->asked;
  int memory = m->memory;
  pthread_mutex_unlock(&m->lock);
  if (asked == m->answered) return;
  sl_metrics_snap *s = sl_metrics_build(m->w, memory);
  pthread_mutex_lock(&m->lock);
  sl_metrics_snap_free(m->result);   /* an answer nobody waited for */
  m->result = s;
  m->answered = asked;
  pthread_cond_broadcast(&m->cond);
  pthread_mutex_unlock(&m->lock);
}

uint64_t sl_metrics_ask(sl_worker *w, int memory) {
  sl_metrics *m = w->metrics;
  if (m == NULL || atomic_load(&m->gone)) return 0;
  pthread_mutex_lock(&m->lock);
  /* A question still open: the worker has not been back to its loop since
   * (stuck in Lua). It answers the newest one when it is. */
  uint64_t seq = m->asked != m->answered ? 0 : ++m->asked;
  if (seq != 0) m->memory = memory;
  pthread_mutex_unlock(&m->lock);
  if (seq != 0) ev_async_send(w->loop, &m->snap_watcher);
  return seq;
}

sl_metrics_snap *sl_metrics_wait(sl_worker *w, uint64_t ticket, const struct timespec *until) {
  sl_metrics *m = w->metrics;
  if (m == NULL || ticket == 0) return NULL;
  sl_metrics_snap *s = NULL;
  pthread_mutex_lock(&m->lock);
  while (m->answered != ticket && !atomic_load(&m->gone)) {
    if (pthread_cond_timedwait(&m->cond, &m->lock, until) == ETIMEDOUT) break;
  }
  if (m->answered == ticket) {
    s = m->result;
    m->result = NULL;
  }
  pthread_mutex_unlock(&m->lock);
  return s;
}

void sl_metrics_deadline(double timeout, struct timespec *until) {
  clock_gettime(CLOCK_MONOTONIC, until);
  long ns = (long)((timeout - (double)(long)timeout) * 1e9);
  until->tv_sec += (time_t)timeout + (until->tv_nsec + ns) / 1000000000L;
  until->tv_nsec = (until->tv_nsec + ns) % 1000000000L;
}

/* ---- life cycle ---- */

int sl_metrics_attach(sl_worker *w, int holders) {
  sl_metrics *m = calloc(1, sizeof(*m));
  if (m == NULL) return SL_ERROR;
  m->w = w;
  pthread_mutex_init(&m->lock, NULL);
  pthread_condattr_t ca;   /* deadlines on the monotonic clock: a clock step stretches none */
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&m->cond, &ca);
  pthread_condattr_destroy(&ca);
  ev_async_init(&m->snap_watcher, sl_metrics_on_snap);
  ev_async_start(w->loop, &m->snap_watcher);
  ev_unref(w->loop); /* answering snapshots keeps no loop running */
  w->metrics = m;
  w->stage_error = sl_metrics_stage_error;
  /* Without the table, the memory summary shows no stage ("-"). */
  if (holders) sl_holder_enable(w->pool);
  return SL_OK;
}

void sl_metrics_gone(sl_worker *w) {
  sl_metrics *m = w->metrics;
  if (m == NULL) return;
  pthread_mutex_lock(&m->lock);
  atomic_store(&m->gone, 1);
  pthread_cond_broadcast(&m->cond);
  pthread_mutex_unlock(&m->lock);
}

void sl_metrics_detach(sl_worker *w) {
  sl_metrics *m = w->metrics;
  if (m == NULL) return;
  ev_ref(w->loop);
  ev_async_stop(w->loop, &m->snap_watcher);
  sl_holder_disable(w->pool);
  for (size_t i = 0; i < m->nlisteners; i++) free(m->listeners[i].name);
  for (size_t i = 0; i < m->nupstreams; i++) free(m->upstreams[i].name);
  for (size_t i = 0; i < m->nstages; i++) free(m->stages[i].name);
  for (size_t i = 0; i < m->nservers; i++) sl_metrics_server_free(m->servers[i]);
  free(m->servers);
  free(m->listeners);
  free(m->upstreams);
  free(m->stages);
  sl_metrics_snap_free(m->result);
  pthread_mutex_destroy(&m->lock);
  pthread_cond_destroy(&m->cond);
  free(m);
  w->metrics = NULL;
  w->stage_error = NULL;
}
