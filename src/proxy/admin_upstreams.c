/*
 * The upstreams and their servers as the admin endpoint shows them: the
 * workers' per-upstream and per-server rows summed by name, and the
 * /upstreams JSON document. docs/operations.md describes them.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "proxy/admin_format.h"
#include "proxy/balance.h"
#include "proxy/metrics.h"
#include "util/common.h"

/* ---- sums ---- */

static sl_admin_server *sl_admin_server_find(sl_admin_server *rows, size_t n,
                                             const sl_metrics_server_snap *x) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(rows[i].sum.upstream, x->upstream) == 0 &&
        strcmp(rows[i].sum.server, x->server) == 0)
      return &rows[i];
  return NULL;
}

static void sl_admin_server_add(sl_admin_server *row, const sl_metrics_server_snap *x) {
  sl_metrics_server_snap *s = &row->sum;
  s->opened += x->opened;
  s->open += x->open;
  for (int k = 0; k < SL_METRICS_NREASONS; k++) s->failures[k] += x->failures[k];
  for (int b = 0; b < SL_METRICS_NBUCKETS; b++) s->buckets[b] += x->buckets[b];
  s->seconds += x->seconds;
  s->bytes_to += x->bytes_to;
  s->bytes_from += x->bytes_from;
  for (int k = 0; k < SL_METRICS_NCAUSES; k++) s->downs[k] += x->downs[k];
  s->tls_resumed += x->tls_resumed;
  /* Current on one worker is current (workers switch one after the other). */
  if (!x->retired && s->retired) {
    s->retired = 0;
    s->balance = x->balance;
    s->weight = x->weight;
    s->backup = x->backup;
    s->uindex = x->uindex;
    s->index = x->index;
  }
  if (x->down) row->ndown++;
}

/* Orders the rows as the configuration does: an upstream's servers
 * together, upstreams by their index in it (those only old connections
 * still use last), servers by theirs (retired ones last). */
static int sl_admin_server_cmp(const void *pa, const void *pb) {
  const sl_admin_server *a = pa, *b = pb;
  if (a->rank != b->rank) return a->rank < b->rank ? -1 : 1;
  if (a->sum.retired != b->sum.retired) return a->sum.retired - b->sum.retired;
  if (a->sum.index != b->sum.index) return a->sum.index < b->sum.index ? -1 : 1;
  return strcmp(a->sum.server, b->sum.server);
}

sl_admin_server *sl_admin_servers_sum(const sl_admin_report *r, size_t *n) {
  size_t cap = 1;
  for (int i = 0; i < r->nworkers; i++)
    if (r->snaps[i]) cap += r->snaps[i]->nservers;
  sl_admin_server *rows = calloc(cap, sizeof(*rows));
  *n = 0;
  if (rows == NULL) return NULL;
  for (int i = 0; i < r->nworkers; i++) {
    const sl_metrics_snap *s = r->snaps[i];
    for (size_t j = 0; s && j < s->nservers; j++) {
      const sl_metrics_server_snap *x = &s->servers[j];
      sl_admin_server *row = sl_admin_server_find(rows, *n, x);
      if (row == NULL) {
        row = &rows[(*n)++];
        row->sum = *x;
        memset(row->sum.failures, 0, sizeof(row->sum.failures));
        memset(row->sum.buckets, 0, sizeof(row->sum.buckets));
        memset(row->sum.downs, 0, sizeof(row->sum.downs));
        row->sum.opened = row->sum.open = row->sum.bytes_to = row->sum.bytes_from = 0;
        row->sum.tls_resumed = 0;
        row->sum.seconds = 0;
        row->sum.retired = 1;
        row->sum.down = 0;
      }
      sl_admin_server_add(row, x);
    }
  }
  /* An upstream's rank: its index in the configuration, or after every
   * current upstream when no server of it is current; the addresses of
   * ctx:connect after all. */
  for (size_t i = 0; i < *n; i++) {
    sl_admin_server *row = &rows[i];
    row->rank = (uint64_t)1 << 32 | i;
    if (row->sum.direct) {
      row->rank = (uint64_t)1 << 33;
      continue;
    }
    for (size_t j = 0; j < *n; j++) {
      if (strcmp(rows[j].sum.upstream, row->sum.upstream) != 0) continue;
      if (!rows[j].sum.retired) {
        row->rank = rows[j].sum.uindex;
        break;
      }
      if (((uint64_t)1 << 32 | j) < row->rank) row->rank = (uint64_t)1 << 32 | j;
    }
  }
  qsort(rows, *n, sizeof(*rows), sl_admin_server_cmp);
  return rows;
}

sl_metrics_upstream_snap *sl_admin_upstreams_sum(const sl_admin_report *r, size_t *n) {
  size_t cap = 1;
  for (int i = 0; i < r->nworkers; i++)
    if (r->snaps[i]) cap += r->snaps[i]->nupstreams;
  sl_metrics_upstream_snap *rows = calloc(cap, sizeof(*rows));
  *n = 0;
  if (rows == NULL) return NULL;
  for (int i = 0; i < r->nworkers; i++) {
    const sl_metrics_snap *s = r->snaps[i];
    for (size_t j = 0; s && j < s->nupstreams; j++) {
      const sl_metrics_upstream_snap *x = &s->upstreams[j];
      sl_metrics_upstream_snap *u = NULL;
      for (size_t k = 0; k < *n && u == NULL; k++)
        if (strcmp(rows[k].name, x->name) == 0) u = &rows[k];
      if (u == NULL) {
        u = &rows[(*n)++];
        memcpy(u->name, x->name, sizeof(u->name));
      }
      u->connects += x->connects;
      u->failures += x->failures;
      for (int k = 0; k < SL_METRICS_NREASONS; k++) u->reasons[k] += x->reasons[k];
      for (int b = 0; b < SL_METRICS_NBUCKETS; b++) u->buckets[b] += x->buckets[b];
      u->seconds += x->seconds;
      u->open += x->open;
      u->bytes_to += x->bytes_to;
      u->bytes_from += x->bytes_from;
      u->tls_resumed += x->tls_resumed;
    }
  }
  return rows;
}

/* ---- /upstreams ---- */

static void sl_json_string(sl_text *o, const char *s) {
  sl_text_append(o, "\"", 1);
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') {
      char e[2] = {'\\', (char)c};
      sl_text_append(o, e, 2);
    } else if (c < 0x20) {
      sl_text_printf(o, "\\u%04x", c);
    } else {
      sl_text_append(o, s, 1);
    }
  }
  sl_text_append(o, "\"", 1);
}

/* Unix time t as "2026-11-22T07:40:01.250Z". */
static void sl_json_time(sl_text *o, double t) {
  time_t secs = (time_t)floor(t);
  int ms = (int)((t - (double)secs) * 1000.0);
  if (ms > 999) ms = 999;
  struct tm tm;
  gmtime_r(&secs, &tm);
  sl_text_printf(o, "\"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ\"", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
}

/* The workers that hold the server of row down, with why and until when. */
static void sl_admin_json_down(sl_text *o, const sl_admin_report *r, const sl_admin_server *row) {
  sl_text_printf(o, "\"down\": [");
  int first = 1;
  for (int i = 0; i < r->nworkers; i++) {
    const sl_metrics_snap *s = r->snaps[i];
    for (size_t j = 0; s && j < s->nservers; j++) {
      const sl_metrics_server_snap *x = &s->servers[j];
      if (!x->down || strcmp(x->upstream, row->sum.upstream) != 0 ||
          strcmp(x->server, row->sum.server) != 0)
        continue;
      sl_text_printf(o, "%s{\"worker\": %d, \"cause\": \"%s\"", first ? "" : ", ", s->worker,
                     sl_metrics_causes[x->down - 1]);
      if (x->down - 1 == SL_METRICS_DOWN_PASSIVE) {
        sl_text_printf(o, ", \"until\": ");
        sl_json_time(o, x->down_until);
        sl_text_printf(o, ", \"remaining_ms\": %.0f", (x->down_until - x->now) * 1000.0);
      }
      sl_text_printf(o, "}");
      first = 0;
    }
  }
  sl_text_printf(o, "]");
}

/* The counters of a server or an upstream: "active", "connections",
 * "failures", "sent_bytes", "received_bytes". */
static void sl_admin_json_counts(sl_text *o, uint64_t open, uint64_t opened,
                                 const uint64_t *failures, uint64_t to, uint64_t from) {
  sl_text_printf(o,
                 "\"active\": %llu, \"connections\": %llu, "
                 "\"failures\": {\"refused\": %llu, \"timeout\": %llu, \"other\": %llu, "
                 "\"tls\": %llu},\n"
                 "         \"sent_bytes\": %llu, \"received_bytes\": %llu",
                 (unsigned long long)open, (unsigned long long)opened,
                 (unsigned long long)failures[SL_METRICS_REFUSED],
                 (unsigned long long)failures[SL_METRICS_TIMEOUT],
                 (unsigned long long)failures[SL_METRICS_OTHER],
                 (unsigned long long)failures[SL_METRICS_TLS], (unsigned long long)to,
                 (unsigned long long)from);
}

static void sl_admin_json_server(sl_text *o, const sl_admin_report *r, const sl_admin_server *row) {
  const sl_metrics_server_snap *s = &row->sum;
  sl_text_printf(o, "        {\"address\": ");
  sl_json_string(o, s->server);
  if (s->direct) {
    /* An address of ctx:connect: counters only. */
    sl_text_printf(o, ",\n         ");
    sl_admin_json_counts(o, s->open, s->opened, s->failures, s->bytes_to, s->bytes_from);
    sl_text_printf(o, "}");
    return;
  }
  sl_text_printf(o, ", \"weight\": %d, \"backup\": %s, \"state\": \"%s\", ", s->weight,
                 s->backup ? "true" : "false", row->ndown ? "down" : "up");
  sl_admin_json_down(o, r, row);
  sl_text_printf(o, ", \"retired\": %s,\n         ", s->retired ? "true" : "false");
  sl_admin_json_counts(o, s->open, s->opened, s->failures, s->bytes_to, s->bytes_from);
  sl_text_printf(o, ", \"marked_down\": {\"passive\": %llu, \"health_check\": %llu}}",
                 (unsigned long long)s->downs[SL_METRICS_DOWN_PASSIVE],
                 (unsigned long long)s->downs[SL_METRICS_DOWN_CHECK]);
}

/* The head of an upstream's object, up to its servers: its name, balance
 * and state (for one of the configuration), and its totals (u, NULL when
 * no worker counted it). */
static void sl_admin_json_upstream(sl_text *o, const sl_admin_server *first,
                                   const sl_metrics_upstream_snap *u) {
  static const uint64_t none[SL_METRICS_NREASONS];
  sl_text_printf(o, "\n    {\"name\": ");
  sl_json_string(o, first->sum.upstream);
  /* The first row of an upstream is current when any of its servers is. */
  if (!first->sum.direct)
    sl_text_printf(o, ", \"balance\": \"%s\", \"retired\": %s",
                   sl_balance_name((sl_balance)first->sum.balance),
                   first->sum.retired ? "true" : "false");
  sl_text_printf(o, ",\n      ");
  sl_admin_json_counts(o, u ? u->open : 0, u ? u->connects : 0, u ? u->reasons : none,
                       u ? u->bytes_to : 0, u ? u->bytes_from : 0);
  sl_text_printf(o, ",\n      \"servers\": [\n");
}

void sl_admin_format_upstreams(sl_text *o, const sl_admin_report *r) {
  size_t n = 0, nups = 0;
  sl_admin_server *rows = sl_admin_servers_sum(r, &n);
  sl_metrics_upstream_snap *ups = sl_admin_upstreams_sum(r, &nups);
  if (rows == NULL || ups == NULL) {
    free(rows);
    free(ups);
    o->failed = 1;
    return;
  }
  int answered = 0;
  for (int i = 0; i < r->nworkers; i++) answered += r->snaps[i] != NULL;
  sl_text_printf(o, "{\"workers\": %d, \"workers_answering\": %d, \"upstreams\": [", r->nworkers,
                 answered);
  for (size_t i = 0; i < n; i++) {
    const sl_admin_server *row = &rows[i];
    int starts = i == 0 || strcmp(rows[i - 1].sum.upstream, row->sum.upstream) != 0;
    int ends = i + 1 == n || strcmp(rows[i + 1].sum.upstream, row->sum.upstream) != 0;
    if (starts) {
      const sl_metrics_upstream_snap *u = NULL;
      for (size_t k = 0; k < nups && u == NULL; k++)
        if (strcmp(ups[k].name, row->sum.upstream) == 0) u = &ups[k];
      sl_text_printf(o, "%s", i ? "," : "");
      sl_admin_json_upstream(o, row, u);
    }
    sl_admin_json_server(o, r, row);
    sl_text_printf(o, "%s", ends ? "\n      ]}" : ",\n");
  }
  sl_text_printf(o, "%s]}\n", n ? "\n  " : "");
  free(rows);
  free(ups);
}
