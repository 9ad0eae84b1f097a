#include "proxy/admin_format.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc/arena.h"
#include "alloc/size_class.h"
#include "proxy/metrics.h"
#include "util/common.h"

/* ---- text ---- */

static int sl_text_reserve(sl_text *t, size_t n) {
  if (t->failed) return SL_ERROR;
  if (t->len + n + 1 <= t->cap) return SL_OK;
  size_t cap = t->cap ? t->cap : 4096;
  while (cap < t->len + n + 1) cap *= 2;
  char *p = realloc(t->p, cap);
  if (p == NULL) {
    t->failed = 1;
    return SL_ERROR;
  }
  t->p = p;
  t->cap = cap;
  return SL_OK;
}

void sl_text_append(sl_text *t, const char *s, size_t n) {
  if (sl_text_reserve(t, n) != SL_OK) return;
  memcpy(t->p + t->len, s, n);
  t->len += n;
  t->p[t->len] = '\0';
}

void sl_text_printf(sl_text *t, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char small[512];
  int n = vsnprintf(small, sizeof(small), fmt, ap);
  va_end(ap);
  if (n < 0) {
    t->failed = 1;
    return;
  }
  if ((size_t)n < sizeof(small)) {
    sl_text_append(t, small, (size_t)n);
    return;
  }
  if (sl_text_reserve(t, (size_t)n) != SL_OK) return;
  va_start(ap, fmt);
  vsnprintf(t->p + t->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  t->len += (size_t)n;
}

void sl_text_reset(sl_text *t) {
  free(t->p);
  memset(t, 0, sizeof(*t));
}

/* ---- sums over workers, by name ---- */

#define SL_AGG_VALUES 11

typedef struct sl_agg_row {
  char key[2 * SL_METRICS_NAME];   /* name, or "listener\0stage" */
  uint64_t v[SL_AGG_VALUES];
  uint64_t buckets[SL_METRICS_NBUCKETS];
  double seconds;
} sl_agg_row;

typedef struct sl_agg {
  sl_agg_row *rows;
  size_t n;
  int failed;
} sl_agg;

static sl_agg_row *sl_agg_get(sl_agg *g, const char *a, const char *b) {
  char key[2 * SL_METRICS_NAME];
  memset(key, 0, sizeof(key));
  snprintf(key, SL_METRICS_NAME, "%s", a);
  if (b) snprintf(key + SL_METRICS_NAME, SL_METRICS_NAME, "%s", b);
  for (size_t i = 0; i < g->n; i++)
    if (memcmp(g->rows[i].key, key, sizeof(key)) == 0) return &g->rows[i];
  sl_agg_row *t = realloc(g->rows, (g->n + 1) * sizeof(*t));
  if (t == NULL) {
    g->failed = 1;
    return NULL;
  }
  g->rows = t;
  sl_agg_row *r = &t[g->n++];
  memset(r, 0, sizeof(*r));
  memcpy(r->key, key, sizeof(key));
  return r;
}

static const char *sl_agg_second(const sl_agg_row *r) { return r->key + SL_METRICS_NAME; }

/* ---- Prometheus text ---- */

static void sl_prom_head(sl_text *o, const char *name, const char *type, const char *help) {
  sl_text_printf(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value, escaped as the text format wants (\\, \", \n). */
static void sl_prom_value(sl_text *o, const char *s) {
  for (; *s; s++) {
    if (*s == '\\') sl_text_append(o, "\\\\", 2);
    else if (*s == '"') sl_text_append(o, "\\\"", 2);
    else if (*s == '\n') sl_text_append(o, "\\n", 2);
    else sl_text_append(o, s, 1);
  }
}

static void sl_prom_named(sl_text *o, const char *metric, const char *label, const char *value,
                          uint64_t v) {
  sl_text_printf(o, "%s{%s=\"", metric, label);
  sl_prom_value(o, value);
  sl_text_printf(o, "\"} %llu\n", (unsigned long long)v);
}

static void sl_prom_worker(sl_text *o, const char *metric, int worker, uint64_t v) {
  sl_text_printf(o, "%s{worker=\"%d\"} %llu\n", metric, worker, (unsigned long long)v);
}

#define SL_EACH_SNAP(r, s)                                           \
  for (int sl_i_ = 0; sl_i_ < (r)->nworkers; sl_i_++)                \
    for (const sl_metrics_snap *s = (r)->snaps[sl_i_]; s; s = NULL)

/* A per-worker counter or gauge: one line per answering worker. */
#define SL_PROM_PER_WORKER(o, r, name, type, help, expr)             \
  do {                                                               \
    sl_prom_head(o, name, type, help);                               \
    SL_EACH_SNAP(r, s) sl_prom_worker(o, name, s->worker, (expr));   \
  } while (0)

enum {
  SL_L_OPENED, SL_L_CLOSED, SL_L_IN, SL_L_OUT, SL_L_OUTQ, SL_L_BUFS, SL_L_BYTES, SL_L_LIMITED,
  SL_L_RATE, SL_L_TLS_DONE, SL_L_TLS_FAILED
};
_Static_assert(SL_L_TLS_FAILED < SL_AGG_VALUES, "a listener row holds every listener value");

static void sl_admin_sum_listeners(const sl_admin_report *r, sl_agg *g) {
  SL_EACH_SNAP(r, s) {
    for (size_t i = 0; i < s->nlisteners; i++) {
      const sl_metrics_listener_snap *l = &s->listeners[i];
      sl_agg_row *row = sl_agg_get(g, l->name, NULL);
      if (row == NULL) return;
      row->v[SL_L_OPENED] += l->opened;
      row->v[SL_L_CLOSED] += l->closed;
      row->v[SL_L_IN] += l->bytes_in;
      row->v[SL_L_OUT] += l->bytes_out;
      row->v[SL_L_OUTQ] += l->outq_bytes;
      row->v[SL_L_BUFS] += l->held_bufs;
      row->v[SL_L_BYTES] += l->held_bytes;
      row->v[SL_L_LIMITED] += l->limited;
      row->v[SL_L_RATE] += l->rate_pauses;
      row->v[SL_L_TLS_DONE] += l->tls_done;
      row->v[SL_L_TLS_FAILED] += l->tls_failed;
    }
  }
}

static void sl_admin_metrics_listeners(sl_text *o, const sl_admin_report *r) {
  sl_agg g = {0};
  sl_admin_sum_listeners(r, &g);
  static const struct {
    const char *name, *type, *help;
  } m[] = {
      {"sluice_connections_open", "gauge", "Client connections open now, by listener."},
      {"sluice_connections_total", "counter", "Client connections accepted, by listener."},
      {"sluice_received_bytes_total", "counter", "Bytes read from clients, by listener."},
      {"sluice_sent_bytes_total", "counter", "Bytes written to clients, by listener."},
      {"sluice_outbound_queued_bytes", "gauge",
       "Bytes waiting in the outbound queues of a listener's connections (client and upstream "
       "side), with the per-entry overhead."},
      {"sluice_connections_limited_total", "counter",
       "Client connections closed at once because their address had "
       "max_connections_per_client open, by listener (counted in sluice_connections_total too)."},
      {"sluice_accept_rate_pauses_total", "counter",
       "Times a worker paused accepting at the listener's max_connection_rate, by listener."},
      {"sluice_tls_handshakes_total", "counter",
       "TLS handshakes done with clients, by listener (listeners with tls)."},
      {"sluice_tls_handshake_failures_total", "counter",
       "TLS handshakes with clients that failed, timed out or were cut short by a close, by "
       "listener (listeners with tls)."},
  };
  for (size_t k = 0; k < sizeof(m) / sizeof(m[0]); k++) {
    sl_prom_head(o, m[k].name, m[k].type, m[k].help);
    for (size_t i = 0; i < g.n; i++) {
      const uint64_t *v = g.rows[i].v;
      uint64_t x = k == 0   ? v[SL_L_OPENED] - v[SL_L_CLOSED]
                   : k == 1 ? v[SL_L_OPENED]
                   : k == 2 ? v[SL_L_IN]
                   : k == 3 ? v[SL_L_OUT]
                   : k == 4 ? v[SL_L_OUTQ]
                   : k == 5 ? v[SL_L_LIMITED]
                   : k == 6 ? v[SL_L_RATE]
                   : k == 7 ? v[SL_L_TLS_DONE]
                            : v[SL_L_TLS_FAILED];
      sl_prom_named(o, m[k].name, "listener", g.rows[i].key, x);
    }
  }
  if (g.failed) o->failed = 1;
  free(g.rows);
}

/* The label set {upstream="u"} or {upstream="u",server="s"} (server NULL:
 * the first), then extra (`,le="0.1"`, or "") inside the braces. */
static void sl_prom_labels(sl_text *o, const char *upstream, const char *server,
                           const char *extra) {
  sl_text_printf(o, "{upstream=\"");
  sl_prom_value(o, upstream);
  if (server) {
    sl_text_printf(o, "\",server=\"");
    sl_prom_value(o, server);
  }
  sl_text_printf(o, "\"%s}", extra);
}

/* The samples of one connect time histogram. */
static void sl_prom_histogram(sl_text *o, const char *name, const char *upstream,
                              const char *server, const uint64_t *buckets, uint64_t count,
                              double seconds) {
  uint64_t cum = 0;
  char le[48];
  for (int b = 0; b < SL_METRICS_NBUCKETS; b++) {
    cum += buckets[b];
    snprintf(le, sizeof(le), ",le=\"%g\"", sl_metrics_buckets[b]);
    sl_text_printf(o, "%s_bucket", name);
    sl_prom_labels(o, upstream, server, le);
    sl_text_printf(o, " %llu\n", (unsigned long long)cum);
  }
  sl_text_printf(o, "%s_bucket", name);
  sl_prom_labels(o, upstream, server, ",le=\"+Inf\"");
  sl_text_printf(o, " %llu\n%s_sum", (unsigned long long)count, name);
  sl_prom_labels(o, upstream, server, "");
  sl_text_printf(o, " %.9f\n%s_count", seconds, name);
  sl_prom_labels(o, upstream, server, "");
  sl_text_printf(o, " %llu\n", (unsigned long long)count);
}

/* One sample per upstream: name{upstream} value. */
#define SL_PROM_PER_UPSTREAM(o, rows, n, metric, type, help, expr)               \
  do {                                                                          \
    sl_prom_head(o, metric, type, help);                                        \
    for (size_t k_ = 0; k_ < (n); k_++) {                                       \
      const sl_metrics_upstream_snap *x = &(rows)[k_];                          \
      sl_prom_named(o, metric, "upstream", x->name, (expr));                    \
    }                                                                           \
  } while (0)

static void sl_admin_metrics_upstreams(sl_text *o, const sl_admin_report *r) {
  size_t n = 0;
  sl_metrics_upstream_snap *rows = sl_admin_upstreams_sum(r, &n);
  if (rows == NULL) {
    o->failed = 1;
    return;
  }
  SL_PROM_PER_UPSTREAM(o, rows, n, "sluice_upstream_connects_total", "counter",
                       "Connects to an upstream's servers that completed (connections opened).",
                       x->connects);
  SL_PROM_PER_UPSTREAM(o, rows, n, "sluice_upstream_connect_failures_total", "counter",
                       "Connects to an upstream's servers that failed or timed out.",
                       x->failures);
  sl_prom_head(o, "sluice_upstream_connect_seconds", "histogram",
               "Time from starting a connect to an upstream's server to its completion.");
  for (size_t i = 0; i < n; i++)
    sl_prom_histogram(o, "sluice_upstream_connect_seconds", rows[i].name, NULL, rows[i].buckets,
                      rows[i].connects, rows[i].seconds);
  SL_PROM_PER_UPSTREAM(o, rows, n, "sluice_upstream_connections_open", "gauge",
                       "Connections open to an upstream's servers now.", x->open);
  SL_PROM_PER_UPSTREAM(o, rows, n, "sluice_upstream_sent_bytes_total", "counter",
                       "Bytes written to an upstream's servers (open connections included, and "
                       "servers no longer reported).", x->bytes_to);
  SL_PROM_PER_UPSTREAM(o, rows, n, "sluice_upstream_received_bytes_total", "counter",
                       "Bytes read from an upstream's servers (open connections included, and "
                       "servers no longer reported).", x->bytes_from);
  SL_PROM_PER_UPSTREAM(o, rows, n, "sluice_upstream_tls_resumed_total", "counter",
                       "Connections to an upstream's servers whose TLS handshake resumed a "
                       "session.", x->tls_resumed);
  free(rows);
}

/* One sample per server: name{upstream,server} value. With configured, only
 * for the servers of a configuration (not the addresses of ctx:connect,
 * which have no state, weight or TLS). */
#define SL_PROM_PER_SERVER(o, rows, n, configured, name, type, help, expr)       \
  do {                                                                          \
    sl_prom_head(o, name, type, help);                                          \
    for (size_t k_ = 0; k_ < (n); k_++) {                                       \
      const sl_admin_server *x = &(rows)[k_];                                   \
      if ((configured) && x->sum.direct) continue;                              \
      sl_text_printf(o, "%s", name);                                            \
      sl_prom_labels(o, x->sum.upstream, x->sum.server, "");                    \
      sl_text_printf(o, " %llu\n", (unsigned long long)(expr));                 \
    }                                                                           \
  } while (0)

/* A counter per server and value of label (one of nvalues), read from the
 * array of nvalues counters at offset `at` in each row's sums. */
static void sl_prom_servers_by(sl_text *o, const sl_admin_server *rows, size_t n, int configured,
                               const char *name, const char *help, const char *label,
                               const char *const *values, int nvalues, size_t at) {
  sl_prom_head(o, name, "counter", help);
  for (size_t i = 0; i < n; i++) {
    if (configured && rows[i].sum.direct) continue;
    const uint64_t *v = (const uint64_t *)(const void *)((const char *)&rows[i].sum + at);
    for (int k = 0; k < nvalues; k++) {
      char extra[64];
      snprintf(extra, sizeof(extra), ",%s=\"%s\"", label, values[k]);
      sl_text_printf(o, "%s", name);
      sl_prom_labels(o, rows[i].sum.upstream, rows[i].sum.server, extra);
      sl_text_printf(o, " %llu\n", (unsigned long long)v[k]);
    }
  }
}

static void sl_admin_metrics_servers(sl_text *o, const sl_admin_report *r) {
  size_t n = 0;
  sl_admin_server *rows = sl_admin_servers_sum(r, &n);
  if (rows == NULL) {
    o->failed = 1;
    return;
  }
  SL_PROM_PER_SERVER(o, rows, n, 0, "sluice_upstream_server_connections_total", "counter",
                     "Connections opened to a server (connects that completed).",
                     x->sum.opened);
  SL_PROM_PER_SERVER(o, rows, n, 0, "sluice_upstream_server_connections_open", "gauge",
                     "Connections open to a server now.", x->sum.open);
  sl_prom_servers_by(o, rows, n, 0, "sluice_upstream_server_connect_failures_total",
                     "Connects to a server that failed, by reason: refused, timeout, tls (a "
                     "TLS handshake that failed), other.",
                     "reason", sl_metrics_reasons, SL_METRICS_NREASONS,
                     offsetof(sl_metrics_server_snap, failures));
  SL_PROM_PER_SERVER(o, rows, n, 1, "sluice_upstream_server_tls_resumed_total", "counter",
                     "Connections to a server (of an upstream with tls) whose handshake "
                     "resumed a TLS session.", x->sum.tls_resumed);
  sl_prom_head(o, "sluice_upstream_server_connect_seconds", "histogram",
               "Time from starting a connect to a server to its completion (with tls, "
               "to the end of the TLS handshake).");
  for (size_t i = 0; i < n; i++)
    sl_prom_histogram(o, "sluice_upstream_server_connect_seconds", rows[i].sum.upstream,
                      rows[i].sum.server, rows[i].sum.buckets, rows[i].sum.opened,
                      rows[i].sum.seconds);
  SL_PROM_PER_SERVER(o, rows, n, 0, "sluice_upstream_server_sent_bytes_total", "counter",
                     "Bytes written to a server (open connections included).",
                     x->sum.bytes_to);
  SL_PROM_PER_SERVER(o, rows, n, 0, "sluice_upstream_server_received_bytes_total", "counter",
                     "Bytes read from a server (open connections included).",
                     x->sum.bytes_from);
  SL_PROM_PER_SERVER(o, rows, n, 1, "sluice_upstream_server_backup", "gauge",
                     "1 for a backup server (used only while no primary server of its "
                     "upstream is available), 0 for a primary.", x->sum.backup);
  SL_PROM_PER_SERVER(o, rows, n, 1, "sluice_upstream_server_up", "gauge",
                     "1 when no worker holds a server down, 0 when a passive mark or a health "
                     "check does on at least one worker.", x->ndown == 0);
  sl_prom_servers_by(o, rows, n, 1, "sluice_upstream_server_marked_down_total",
                     "Times a server went down, by cause: passive (failed connects), "
                     "health_check.",
                     "cause", sl_metrics_causes, SL_METRICS_NCAUSES,
                     offsetof(sl_metrics_server_snap, downs));
  free(rows);
}

/* The arenas' counters, read under their locks. */
static int sl_admin_narenas(const sl_admin_report *r) {
  return r->alloc && r->alloc->arenas ? r->alloc->cfg.arenas : 0;
}

static void sl_admin_metrics_arenas(sl_text *o, const sl_admin_report *r) {
  int n = sl_admin_narenas(r);
  sl_arena_stats *st = calloc((size_t)n + 1, sizeof(*st));
  if (st == NULL) {
    o->failed = 1;
    return;
  }
  for (int i = 0; i < n; i++) sl_arena_get_stats(&r->alloc->arenas[i], &st[i]);
  sl_prom_head(o, "sluice_pool_mapped_bytes", "gauge",
               "Bytes every arena has mapped from the operating system.");
  sl_text_printf(o, "sluice_pool_mapped_bytes %llu\n",
                 (unsigned long long)(r->alloc ? atomic_load(&r->alloc->reserved) : 0));
  sl_prom_head(o, "sluice_pool_reserved_bytes", "gauge",
               "Bytes an arena holds from the operating system (chunks and huge blocks).");
  for (int i = 0; i < n; i++)
    sl_text_printf(o, "sluice_pool_reserved_bytes{arena=\"%d\"} %llu\n", i,
                   (unsigned long long)(st[i].chunk_bytes + st[i].huge_bytes));
  sl_prom_head(o, "sluice_pool_used_bytes", "gauge",
               "Bytes of an arena's reservation handed out (pages in use, huge blocks).");
  for (int i = 0; i < n; i++)
    sl_text_printf(o, "sluice_pool_used_bytes{arena=\"%d\"} %llu\n", i,
                   (unsigned long long)(st[i].used_bytes + st[i].huge_bytes));
  sl_prom_head(o, "sluice_pool_class_bytes", "gauge",
               "Bytes of blocks of a size class an arena has handed out (to buffers or to the "
               "workers' caches).");
  for (int i = 0; i < n; i++) {
    for (unsigned c = 0; c < st[i].nclasses && c < SL_SC_MAX_CLASSES; c++) {
      if (st[i].cls[c].allocs == 0) continue;
      /* Blocks a worker takes from its own subpages reach these counts at
       * its next trim, a block freed from another thread at once: for a
       * while frees may exceed allocs. Shown as 0 then, never wrapped. */
      uint64_t a = st[i].cls[c].allocs, f = st[i].cls[c].frees;
      sl_text_printf(o, "sluice_pool_class_bytes{arena=\"%d\",size_class=\"%zu\"} %llu\n", i,
                     sl_sc_size(c), (unsigned long long)(a > f ? (a - f) * sl_sc_size(c) : 0));
    }
  }
  free(st);
}

static void sl_admin_metrics_workers(sl_text *o, const sl_admin_report *r) {
  SL_PROM_PER_WORKER(o, r, "sluice_pool_in_use_bytes", "gauge",
                     "Bytes of the blocks a worker's live buffers hold.", s->pool.bytes_in_use);
  SL_PROM_PER_WORKER(o, r, "sluice_pool_buffers", "gauge", "A worker's live buffers.",
                     s->pool.blocks_in_use);
  sl_prom_head(o, "sluice_pool_buffer_bytes", "gauge",
               "Bytes a worker's live buffers hold, by size class (classes in use only).");
  SL_EACH_SNAP(r, s) {
    for (unsigned c = 0; c < SL_SC_MAX_CLASSES; c++) {
      if (s->class_blocks[c] == 0) continue;
      sl_text_printf(o, "sluice_pool_buffer_bytes{worker=\"%d\",size_class=\"%zu\"} %llu\n",
                     s->worker, sl_sc_size(c),
                     (unsigned long long)(s->class_blocks[c] * sl_sc_size(c)));
    }
  }
  SL_PROM_PER_WORKER(o, r, "sluice_pool_cached_bytes", "gauge",
                     "Bytes of free blocks a worker's cache keeps.", s->pool.cached_bytes);
  SL_PROM_PER_WORKER(o, r, "sluice_pool_cache_hits_total", "counter",
                     "Allocations a worker's cache served.", s->pool.cache_hits);
  SL_PROM_PER_WORKER(o, r, "sluice_pool_cache_misses_total", "counter",
                     "Allocations that went past a worker's cache to its arena.",
                     s->pool.cache_misses);
  sl_prom_head(o, "sluice_pool_trims_total", "counter",
               "Trims of a worker's cache: every trim_interval allocations (count) or after "
               "trim_idle_ms of idleness (idle).");
  SL_EACH_SNAP(r, s) {
    sl_text_printf(o, "sluice_pool_trims_total{worker=\"%d\",reason=\"count\"} %llu\n", s->worker,
                   (unsigned long long)s->pool.trims);
    sl_text_printf(o, "sluice_pool_trims_total{worker=\"%d\",reason=\"idle\"} %llu\n", s->worker,
                   (unsigned long long)s->pool.idle_trims);
  }
  SL_PROM_PER_WORKER(o, r, "sluice_pool_alloc_failures_total", "counter",
                     "Allocations refused (max_memory or the operating system).",
                     s->pool.alloc_failures);
  SL_PROM_PER_WORKER(o, r, "sluice_leaks_total", "counter",
                     "Buffers found leaked (collected or closed with references left) and "
                     "reclaimed.", s->leaks);
  SL_PROM_PER_WORKER(o, r, "sluice_leaked_bytes_total", "counter",
                     "Bytes of the leaked buffers' blocks.", s->leaked_bytes);
  SL_PROM_PER_WORKER(o, r, "sluice_unhandled_inbound_total", "counter",
                     "Inbound messages that reached the tail of a pipeline and were released.",
                     s->stats.unhandled_inbound);
  SL_PROM_PER_WORKER(o, r, "sluice_writability_changes_total", "counter",
                     "Outbound queues crossing a water mark (unwritable above high, writable "
                     "again below low).", s->stats.writability_changes);
  SL_PROM_PER_WORKER(o, r, "sluice_write_timeouts_total", "counter",
                     "Connections (client or upstream side) closed by write_timeout_ms: bytes "
                     "waited that long without the peer taking one.", s->stats.write_timeouts);
  SL_PROM_PER_WORKER(o, r, "sluice_spliced_bytes_total", "counter",
                     "Bytes of pass-through connections moved socket to socket through a "
                     "kernel pipe (splice), never copied into sluice; part of the sent bytes.",
                     s->stats.spliced_bytes);
  SL_PROM_PER_WORKER(o, r, "sluice_splice_pipes", "gauge",
                     "Kernel pipes a worker has open for splicing (in use and idle; two "
                     "descriptors each).", s->stats.splice_pipes);
  SL_PROM_PER_WORKER(o, r, "sluice_splice_refused_total", "counter",
                     "Pass-through connections that wanted a splice pipe and got none "
                     "(max_pipes reached, or the system refused one); they use buffers.",
                     s->stats.splice_refused);
  SL_PROM_PER_WORKER(o, r, "sluice_channels", "gauge",
                     "A worker's connections (client and upstream side), open or closing.",
                     s->channels);
  sl_prom_head(o, "sluice_lua_memory_bytes", "gauge", "The heap of a worker's Lua state.");
  SL_EACH_SNAP(r, s) {
    if (s->has_lua) sl_prom_worker(o, "sluice_lua_memory_bytes", s->worker, s->lua_bytes);
  }
  sl_prom_head(o, "sluice_lua_memory_refusals_total", "counter",
               "Times lua_memory_limit stopped Lua: a stage whose event left the heap above "
               "it after a full collection, or an allocation past twice it; each closed a "
               "connection with \"not enough memory\".");
  SL_EACH_SNAP(r, s) {
    if (s->has_lua)
      sl_prom_worker(o, "sluice_lua_memory_refusals_total", s->worker, s->lua_refusals);
  }
  sl_prom_head(o, "sluice_lua_timeouts_total", "counter",
               "Lua callbacks stopped by lua_timeout_ms; each closed its connection.");
  SL_EACH_SNAP(r, s) {
    if (s->has_lua) sl_prom_worker(o, "sluice_lua_timeouts_total", s->worker, s->lua_timeouts);
  }
}

static void sl_admin_metrics_stages(sl_text *o, const sl_admin_report *r) {
  sl_agg g = {0};
  SL_EACH_SNAP(r, s) {
    for (size_t i = 0; i < s->nstages; i++) {
      sl_agg_row *row = sl_agg_get(&g, s->stages[i].name, NULL);
      if (row) row->v[0] += s->stages[i].errors;
    }
  }
  sl_prom_head(o, "sluice_stage_errors_total", "counter",
               "Errors raised by a Lua stage (each closed its connection), by stage name.");
  for (size_t i = 0; i < g.n; i++)
    sl_prom_named(o, "sluice_stage_errors_total", "stage", g.rows[i].key, g.rows[i].v[0]);
  if (g.failed) o->failed = 1;
  free(g.rows);
}

void sl_admin_format_metrics(sl_text *o, const sl_admin_report *r) {
  int answered = 0;
  SL_EACH_SNAP(r, s) answered++;
  sl_prom_head(o, "sluice_workers", "gauge", "Worker threads.");
  sl_text_printf(o, "sluice_workers %d\n", r->nworkers);
  sl_prom_head(o, "sluice_workers_answering", "gauge",
               "Workers whose counters are in this answer (a worker that did not answer in "
               "time is left out).");
  sl_text_printf(o, "sluice_workers_answering %d\n", answered);
  sl_prom_head(o, "sluice_draining", "gauge", "1 while stopping (after SIGTERM or SIGINT).");
  sl_text_printf(o, "sluice_draining %d\n", r->draining ? 1 : 0);
  sl_prom_head(o, "sluice_workers_stuck", "gauge",
               "Workers stuck in a Lua callback that lua_timeout_ms could not stop (a loop the "
               "JIT compiled, a C call that does not return); they take no new connections.");
  sl_text_printf(o, "sluice_workers_stuck %d\n", r->stuck);
  sl_prom_head(o, "sluice_config_reloads_total", "counter",
               "Reloads (SIGHUP) applied and refused (an invalid configuration, a listen address "
               "taken, a stage that fails to load: the running configuration stays).");
  sl_text_printf(o, "sluice_config_reloads_total{result=\"applied\"} %llu\n",
                 (unsigned long long)r->reloads_applied);
  sl_text_printf(o, "sluice_config_reloads_total{result=\"refused\"} %llu\n",
                 (unsigned long long)r->reloads_refused);
  sl_prom_head(o, "sluice_upstream_dns_changes_total", "counter",
               "Times new connections got other upstream servers because host names among them "
               "answered differently while running (resolve_interval_ms).");
  sl_text_printf(o, "sluice_upstream_dns_changes_total %llu\n",
                 (unsigned long long)r->dns_changes);
  sl_prom_head(o, "sluice_dns_lookups_total", "counter",
               "Host name lookups (upstream servers' names at loads and while running, "
               "ctx:connect's names), by result.");
  for (int i = 0; i < SL_DNS_NRESULTS; i++)
    sl_text_printf(o, "sluice_dns_lookups_total{result=\"%s\"} %llu\n", sl_dns_result_names[i],
                   (unsigned long long)r->dns.lookups[i]);
  sl_prom_head(o, "sluice_dns_lookup_seconds_total", "counter",
               "Time spent waiting for lookups, all of the resolver's threads and the loads.");
  sl_text_printf(o, "sluice_dns_lookup_seconds_total %.6f\n", r->dns.seconds);
  sl_prom_head(o, "sluice_config_last_reload_successful", "gauge",
               "1 when the last reload was applied (or none was asked yet), 0 when it was refused.");
  sl_text_printf(o, "sluice_config_last_reload_successful %d\n", r->last_reload_ok ? 1 : 0);
  sl_prom_head(o, "sluice_config_last_applied_timestamp_seconds", "gauge",
               "Unix time at which the running configuration was applied (the start, or the last "
               "applied reload).");
  sl_text_printf(o, "sluice_config_last_applied_timestamp_seconds %.3f\n", r->last_applied);
  sl_admin_metrics_listeners(o, r);
  sl_admin_metrics_upstreams(o, r);
  sl_admin_metrics_servers(o, r);
  sl_admin_metrics_arenas(o, r);
  sl_admin_metrics_workers(o, r);
  sl_admin_metrics_stages(o, r);
}

/* ---- the memory summary ---- */

static void sl_admin_memory_arenas(sl_text *o, const sl_admin_report *r) {
  int n = sl_admin_narenas(r);
  uint64_t reserved = 0, used = 0;
  sl_text rows = {0};
  for (int i = 0; i < n; i++) {
    sl_arena_stats st;
    sl_arena_get_stats(&r->alloc->arenas[i], &st);
    uint64_t res = st.chunk_bytes + st.huge_bytes, u = st.used_bytes + st.huge_bytes;
    reserved += res;
    used += u;
    sl_text_printf(&rows, "  arena=%d reserved=%llu used=%llu chunks=%llu huge_bytes=%llu\n", i,
                   (unsigned long long)res, (unsigned long long)u,
                   (unsigned long long)st.chunks, (unsigned long long)st.huge_bytes);
  }
  sl_text_printf(o, "Total pool: reserved=%llu used=%llu\n\n", (unsigned long long)reserved,
                 (unsigned long long)used);
  sl_text_printf(o, "Pool by arena (reserved: mapped from the OS; used: handed out):\n");
  if (rows.failed) o->failed = 1;
  else if (rows.len) sl_text_append(o, rows.p, rows.len);
  sl_text_reset(&rows);
}

void sl_admin_format_memory(sl_text *o, const sl_admin_report *r) {
  sl_text_printf(o, "sluice memory summary (%d worker%s%s)\n\n", r->nworkers,
                 r->nworkers == 1 ? "" : "s", r->draining ? ", draining" : "");
  sl_admin_memory_arenas(o, r);

  sl_text_printf(o, "\nPool by worker (buffers: blocks live buffers hold; cached: free blocks "
                    "its cache keeps):\n");
  uint64_t lua_total = 0, outq_total = 0, pipe_total = 0, pipes = 0;
  for (int i = 0; i < r->nworkers; i++) {
    const sl_metrics_snap *s = r->snaps[i];
    if (s == NULL) {
      sl_text_printf(o, "  worker=%d (did not answer)\n", i);
      continue;
    }
    sl_text_printf(o, "  worker=%d buffers=%llu buffer_bytes=%llu cached_blocks=%llu "
                      "cached_bytes=%llu\n",
                   s->worker, (unsigned long long)s->pool.blocks_in_use,
                   (unsigned long long)s->pool.bytes_in_use,
                   (unsigned long long)s->pool.cached_blocks,
                   (unsigned long long)s->pool.cached_bytes);
    lua_total += s->lua_bytes;
    outq_total += s->outq_bytes;
    pipe_total += s->pipe_bytes;
    pipes += s->stats.splice_pipes;
  }

  sl_agg lis = {0};
  sl_admin_sum_listeners(r, &lis);
  sl_text_printf(o, "\nHeld by listener (live buffers of its connections, both sides):\n");
  for (size_t i = 0; i < lis.n; i++) {
    const uint64_t *v = lis.rows[i].v;
    sl_text_printf(o, "  listener=\"");
    sl_prom_value(o, lis.rows[i].key);
    sl_text_printf(o, "\" buffers=%llu bytes=%llu connections=%llu outbound_queued=%llu\n",
                   (unsigned long long)v[SL_L_BUFS], (unsigned long long)v[SL_L_BYTES],
                   (unsigned long long)(v[SL_L_OPENED] - v[SL_L_CLOSED]),
                   (unsigned long long)v[SL_L_OUTQ]);
  }
  if (lis.failed) o->failed = 1;
  free(lis.rows);

  sl_agg held = {0};
  SL_EACH_SNAP(r, s) {
    for (size_t i = 0; i < s->nheld; i++) {
      sl_agg_row *row = sl_agg_get(&held, s->held[i].stage, s->held[i].listener);
      if (row == NULL) break;
      row->v[0] += s->held[i].bufs;
      row->v[1] += s->held[i].bytes;
    }
  }
  sl_text_printf(o, "\nHeld by stage (live buffers, by the stage that last received them; "
                    "\"outbound queue\": written, not yet sent; \"-\": none recorded):\n");
  for (size_t i = 0; i < held.n; i++) {
    sl_text_printf(o, "  stage=\"");
    sl_prom_value(o, held.rows[i].key);
    sl_text_printf(o, "\" listener=\"");
    sl_prom_value(o, sl_agg_second(&held.rows[i]));
    sl_text_printf(o, "\" buffers=%llu bytes=%llu\n", (unsigned long long)held.rows[i].v[0],
                   (unsigned long long)held.rows[i].v[1]);
  }
  if (held.failed) o->failed = 1;
  free(held.rows);

  sl_text_printf(o, "\nOutbound queues: queued=%llu\n", (unsigned long long)outq_total);
  /* Spliced bytes wait in the kernel, not in the pool: shown apart. */
  sl_text_printf(o, "Splice pipes (kernel memory): pipes=%llu waiting=%llu\n",
                 (unsigned long long)pipes, (unsigned long long)pipe_total);
  sl_text_printf(o, "\nLua heaps:\n");
  SL_EACH_SNAP(r, s) {
    if (s->has_lua)
      sl_text_printf(o, "  worker=%d bytes=%llu limit=%llu refused=%llu\n", s->worker,
                     (unsigned long long)s->lua_bytes, (unsigned long long)s->lua_limit,
                     (unsigned long long)s->lua_refusals);
  }
  sl_text_printf(o, "  total=%llu\n", (unsigned long long)lua_total);
}
