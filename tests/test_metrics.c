/*
 * Per-server upstream metrics (src/proxy/metrics.c) and how the admin
 * endpoint shows them (src/proxy/admin_format.c, admin_upstreams.c): the
 * counters a worker keeps per (upstream, server), their life across
 * configurations (upstream sets made from a real configuration file), the
 * snapshot that carries them, and the sums over workers in /metrics and
 * /upstreams; and the pool's bytes by size class, which come down when
 * another thread releases a worker's buffers. The proxy path itself (real
 * connects, real peers) is in spec/integration/upstream_metrics_spec.lua.
 */
#include "test_util.h"

#include <pthread.h>
#include <stdio.h>

#include "alloc/pool.h"
#include "buf/buf.h"
#include "io/channel.h"
#include "io/worker.h"
#include "proxy/admin_format.h"
#include "proxy/balance.h"
#include "proxy/config.h"
#include "proxy/metrics.h"
#include "proxy/upstream.h"
#include "util/common.h"

typedef struct fixture {
  sl_worker *w;
} fixture;

static int fixture_setup(void **state) {
  fixture *f = calloc(1, sizeof(*f));
  if (f == NULL) return -1;
  f->w = sl_worker_create(0, NULL);
  if (f->w == NULL || sl_metrics_attach(f->w, 0) != SL_OK) return -1;
  *state = f;
  return 0;
}

static int fixture_teardown(void **state) {
  fixture *f = *state;
  SL_TEST_ASSERT_POOL_CLEAN(f->w->pool);
  sl_metrics_detach(f->w);
  sl_worker_destroy(f->w);
  free(f);
  return 0;
}

static const sl_metrics_upstream_snap *find_upstream(const sl_metrics_snap *s,
                                                    const char *name) {
  for (size_t i = 0; i < s->nupstreams; i++)
    if (strcmp(s->upstreams[i].name, name) == 0) return &s->upstreams[i];
  return NULL;
}

static const sl_metrics_server_snap *find_row(const sl_metrics_snap *s, const char *upstream,
                                              const char *server) {
  for (size_t i = 0; i < s->nservers; i++)
    if (strcmp(s->servers[i].upstream, upstream) == 0 && strcmp(s->servers[i].server, server) == 0)
      return &s->servers[i];
  return NULL;
}

/* ---- reasons ---- */

static void test_failure_reasons(void **state) {
  SL_UNUSED(state);
  assert_int_equal(sl_metrics_failure_reason(ECONNREFUSED), SL_METRICS_REFUSED);
  assert_int_equal(sl_metrics_failure_reason(ETIMEDOUT), SL_METRICS_TIMEOUT);
  assert_int_equal(sl_metrics_failure_reason(EHOSTUNREACH), SL_METRICS_OTHER);
  assert_int_equal(sl_metrics_failure_reason(ENETUNREACH), SL_METRICS_OTHER);
  assert_int_equal(sl_metrics_failure_reason(EPROTO), SL_METRICS_TLS);
  assert_string_equal(sl_metrics_reasons[SL_METRICS_TLS], "tls");
  assert_string_equal(sl_metrics_reasons[SL_METRICS_TIMEOUT], "timeout");
  assert_string_equal(sl_metrics_causes[SL_METRICS_DOWN_CHECK], "health_check");
}

/* ---- collecting ---- */

/* A worker that does not come back to its loop (stuck in Lua) is waited
 * for once; it is asked again only after it has answered. The fixture's
 * loop runs only when the test runs it. */
static void test_a_worker_that_does_not_answer_is_waited_for_once(void **state) {
  fixture *f = *state;
  uint64_t t = sl_metrics_ask(f->w, 0);
  assert_true(t != 0);
  struct timespec until;
  sl_metrics_deadline(0.01, &until);
  assert_null(sl_metrics_wait(f->w, t, &until));
  assert_int_equal(sl_metrics_ask(f->w, 0), 0);
  assert_null(sl_metrics_wait(f->w, 0, &until));
  ev_run(f->w->loop, EVRUN_NOWAIT);   /* back: it answers the open question */
  uint64_t t2 = sl_metrics_ask(f->w, 1);
  assert_true(t2 > t);
  ev_run(f->w->loop, EVRUN_NOWAIT);
  sl_metrics_deadline(10, &until);
  sl_metrics_snap *s = sl_metrics_wait(f->w, t2, &until);
  assert_non_null(s);
  sl_metrics_snap_free(s);
}

/* ---- counters ---- */

static void test_server_counts_reach_the_snapshot(void **state) {
  fixture *f = *state;
  sl_worker *w = f->w;
  sl_metrics_server *a = sl_metrics_server_ref(w, "back", "127.0.0.1:7001");
  sl_metrics_server *b = sl_metrics_server_ref(w, "back", "127.0.0.1:7002");
  assert_non_null(a);
  assert_non_null(b);
  assert_ptr_equal(sl_metrics_server_ref(w, "back", "127.0.0.1:7001"), a); /* a second generation */
  assert_ptr_not_equal(sl_metrics_server_ref(w, "other", "127.0.0.1:7001"), a);

  sl_metrics_connect_done(w, "back", a, 0, ECONNREFUSED);
  sl_metrics_connect_done(w, "back", a, 0, ETIMEDOUT);
  sl_metrics_connect_done(w, "back", a, 0, EHOSTUNREACH);
  sl_metrics_connect_done(w, "back", a, 0.0003, 0);
  sl_metrics_connect_done(w, "back", b, 0.02, 0);
  sl_metrics_connect_done(w, "back", b, 0.02, 0);
  sl_metrics_server_down(a, SL_METRICS_DOWN_PASSIVE);
  sl_metrics_server_down(a, SL_METRICS_DOWN_CHECK);
  sl_metrics_server_down(a, SL_METRICS_DOWN_CHECK);
  /* One of b's connections closes after 10 bytes out, 25 in. */
  sl_channel_config cc = {0};
  sl_channel *ch = sl_channel_embedded(w, &cc, "test");
  assert_non_null(ch);
  ch->bytes_out = 10;
  ch->bytes_in = 25;
  sl_metrics_server_closed(b, ch);
  sl_channel_close(ch, "done", 0);

  sl_metrics_snap *s = sl_metrics_snapshot(w, 0);
  assert_non_null(s);
  assert_int_equal(s->nservers, 3);
  const sl_metrics_server_snap *ra = find_row(s, "back", "127.0.0.1:7001");
  const sl_metrics_server_snap *rb = find_row(s, "back", "127.0.0.1:7002");
  assert_non_null(ra);
  assert_non_null(rb);
  assert_int_equal(ra->failures[SL_METRICS_REFUSED], 1);
  assert_int_equal(ra->failures[SL_METRICS_TIMEOUT], 1);
  assert_int_equal(ra->failures[SL_METRICS_OTHER], 1);
  assert_int_equal(ra->opened, 1);
  assert_int_equal(ra->open, 1);
  assert_int_equal(ra->buckets[2], 1); /* 0.3 ms: at most 0.5 ms */
  assert_int_equal(ra->downs[SL_METRICS_DOWN_PASSIVE], 1);
  assert_int_equal(ra->downs[SL_METRICS_DOWN_CHECK], 2);
  assert_int_equal(rb->opened, 2);
  assert_int_equal(rb->open, 1);
  assert_int_equal(rb->buckets[7], 2); /* 20 ms: at most 25 ms */
  assert_int_equal(rb->bytes_to, 10);
  assert_int_equal(rb->bytes_from, 25);
  /* No configuration lists them: nothing new connections use. */
  assert_int_equal(ra->retired, 1);
  /* The upstream's own series: the sum over its servers (every upstream
   * named by a server is listed, "other" with nothing counted yet). */
  assert_int_equal(s->nupstreams, 2);
  const sl_metrics_upstream_snap *u = find_upstream(s, "back");
  assert_non_null(u);
  assert_int_equal(u->connects, 3);
  assert_int_equal(u->failures, 3);
  assert_int_equal(u->reasons[SL_METRICS_REFUSED], 1);
  assert_int_equal(u->reasons[SL_METRICS_TIMEOUT], 1);
  assert_int_equal(u->reasons[SL_METRICS_OTHER], 1);
  assert_int_equal(u->open, ra->open + rb->open);
  assert_int_equal(u->open, 2);
  assert_int_equal(u->bytes_to, ra->bytes_to + rb->bytes_to);
  assert_int_equal(u->bytes_from, 25);
  assert_int_equal(find_upstream(s, "other")->connects, 0);
  sl_metrics_snap_free(s);

  /* a's two references, then the rest: each goes with its last one. */
  sl_metrics_connect_done(w, "back", a, 0, ECONNREFUSED);
  sl_channel *cha = sl_channel_embedded(w, &cc, "a");
  sl_channel *chb = sl_channel_embedded(w, &cc, "b");
  cha->bytes_out = 7;
  cha->bytes_in = 3;
  sl_metrics_server_tls_resumed(a);
  sl_metrics_server_closed(a, cha);
  sl_metrics_server_closed(b, chb);
  sl_channel_close(cha, "done", 0);
  sl_channel_close(chb, "done", 0);
  sl_metrics_server_unref(w, a);
  s = sl_metrics_snapshot(w, 0);
  assert_non_null(find_row(s, "back", "127.0.0.1:7001"));
  assert_int_equal(find_row(s, "back", "127.0.0.1:7001")->failures[SL_METRICS_REFUSED], 2);
  sl_metrics_snap_free(s);
  sl_metrics_server_unref(w, a);
  sl_metrics_server_unref(w, b);
  s = sl_metrics_snapshot(w, 0);
  assert_int_equal(s->nservers, 1);
  assert_non_null(find_row(s, "other", "127.0.0.1:7001"));
  /* The dropped servers' counts stay in their upstream's: nothing goes down. */
  u = find_upstream(s, "back");
  assert_int_equal(u->failures, 4);
  assert_int_equal(u->connects, 3);
  assert_int_equal(u->open, 0);
  assert_int_equal(u->bytes_to, 17);
  assert_int_equal(u->bytes_from, 28);
  assert_int_equal(u->tls_resumed, 1);
  sl_metrics_snap_free(s);
  sl_metrics_server *o = sl_metrics_server_ref(w, "other", "127.0.0.1:7001");
  sl_metrics_server_unref(w, o);
  sl_metrics_server_unref(w, NULL);
  sl_metrics_server_unref(w, o);        /* its last reference */
  s = sl_metrics_snapshot(w, 0);
  assert_int_equal(s->nservers, 0);
  sl_metrics_snap_free(s);
}

/* The addresses of ctx:connect: one server each under SL_METRICS_DIRECT,
 * up to SL_METRICS_MAX_DIRECT of them, the rest counted together. */
static void test_direct_addresses_are_capped(void **state) {
  fixture *f = *state;
  sl_worker *w = f->w;
  sl_metrics_server *conf = sl_metrics_server_ref(w, "back", "127.0.0.1:10000");
  sl_metrics_server *first = NULL;
  char addr[64];
  for (int i = 0; i < SL_METRICS_MAX_DIRECT; i++) {
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", 10000 + i);
    sl_metrics_server *d = sl_metrics_direct(w, addr);
    assert_non_null(d);
    assert_ptr_not_equal(d, conf);     /* the same address in an upstream is another server */
    if (i == 0) first = d;
  }
  assert_ptr_equal(sl_metrics_direct(w, "127.0.0.1:10000"), first);
  sl_metrics_server *other = sl_metrics_direct(w, "127.0.0.1:9999");
  assert_non_null(other);
  assert_ptr_equal(sl_metrics_direct(w, "[::1]:80"), other);
  assert_ptr_equal(sl_metrics_direct(w, "127.0.0.1:10000"), first);
  sl_metrics_connect_done(w, SL_METRICS_DIRECT, first, 0.002, 0);
  sl_metrics_connect_done(w, SL_METRICS_DIRECT, other, 0.002, 0);
  sl_metrics_connect_done(w, SL_METRICS_DIRECT, other, 0, ECONNREFUSED);
  sl_channel_config cc = {0};
  sl_channel *ch = sl_channel_embedded(w, &cc, "test");
  ch->bytes_out = 40;
  ch->bytes_in = 2;
  sl_metrics_server_closed(other, ch);
  sl_channel_close(ch, "done", 0);

  sl_metrics_snap *s = sl_metrics_snapshot(w, 0);
  assert_int_equal(s->nservers, 1 + SL_METRICS_MAX_DIRECT + 1);
  const sl_metrics_server_snap *o = find_row(s, SL_METRICS_DIRECT, SL_METRICS_DIRECT_OTHER);
  assert_non_null(o);
  assert_int_equal(o->direct, 1);
  assert_int_equal(o->opened, 1);
  assert_int_equal(o->failures[SL_METRICS_REFUSED], 1);
  assert_int_equal(o->bytes_to, 40);
  assert_null(find_row(s, SL_METRICS_DIRECT, "127.0.0.1:9999"));
  const sl_metrics_server_snap *d = find_row(s, SL_METRICS_DIRECT, "127.0.0.1:10000");
  assert_non_null(d);
  assert_int_equal(d->direct, 1);
  assert_int_equal(d->open, 1);
  assert_int_equal(find_row(s, "back", "127.0.0.1:10000")->direct, 0);
  const sl_metrics_upstream_snap *u = find_upstream(s, SL_METRICS_DIRECT);
  assert_non_null(u);
  assert_int_equal(u->connects, 2);
  assert_int_equal(u->failures, 1);
  assert_int_equal(u->open, 1);
  assert_int_equal(u->bytes_to, 40);
  assert_int_equal(u->bytes_from, 2);
  sl_metrics_snap_free(s);
  /* Closed, as the worker's connections are before its metrics go. */
  ch = sl_channel_embedded(w, &cc, "test");
  sl_metrics_server_closed(first, ch);
  sl_channel_close(ch, "done", 0);
  sl_metrics_server_unref(w, conf);
}

/* ---- pool by size class ---- */

#define XT_BUFS 1500   /* more than the return queue takes (1024) */

static void *release_all_thread(void *arg) {
  sl_buf **b = arg;
  for (int i = 0; i < XT_BUFS; i++) sl_buf_release(b[i]);
  return NULL;
}

/* Buffers released on another thread come back through the return queue
 * or, with it full, straight to the arena: either way the bytes by size
 * class come down with the worker's total, to nothing. */
static void test_class_bytes_come_down_after_foreign_releases(void **state) {
  fixture *f = *state;
  sl_worker *w = f->w;
  sl_buf **b = calloc(XT_BUFS, sizeof(*b));
  assert_non_null(b);
  for (int i = 0; i < XT_BUFS; i++) assert_non_null(b[i] = sl_buf_alloc(w->pool, 1000, 0));
  unsigned k = b[1]->sclass;
  sl_metrics_snap *s = sl_metrics_snapshot(w, 0);
  assert_int_equal(s->class_blocks[k], XT_BUFS);
  sl_metrics_snap_free(s);
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, release_all_thread, b), 0);
  assert_int_equal(pthread_join(th, NULL), 0);
  sl_buf_drain(w->pool);
  sl_pool_stats st;
  sl_pool_get_stats(w->pool, &st);
  assert_true(st.remote_direct > 0);
  s = sl_metrics_snapshot(w, 0);
  assert_int_equal(s->pool.blocks_in_use, 0);
  for (unsigned c = 0; c < SL_SC_MAX_CLASSES; c++) assert_int_equal(s->class_blocks[c], 0);
  sl_metrics_snap_free(s);
  free(b);
  /* The headers the other thread gave back wait for the worker's idle
   * timer, which this does. */
  sl_pool_trim_report tr;
  int64_t t = sl_alloc_now_ms() + 10000000;
  sl_pool_tick(w->pool, t, &tr);
  sl_pool_tick(w->pool, t + w->pool->alloc->cfg.trim_idle_ms + 1, &tr);
}

/* ---- life across configurations ---- */

static sl_config *load_config(const char *text) {
  char path[] = "/tmp/sluice-test-metrics-XXXXXX";
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  assert_int_equal(write(fd, text, strlen(text)), (ssize_t)strlen(text));
  close(fd);
  char err[512] = "";
  sl_config *c = sl_config_load(path, err, sizeof(err));
  unlink(path);
  if (c == NULL) fail_msg("%s", err);
  return c;
}

typedef struct seen {
  int n;
  int with_metrics;
  char text[8][64];
} seen;

static void count_peer(void *ud, const sl_upstream_cfg *u, size_t ui, size_t index,
                       const sl_peer *p) {
  seen *s = ud;
  if (s->n < 8)
    snprintf(s->text[s->n], sizeof(s->text[0]), "%s/%zu/%s/%zu", u->name, ui,
             u->server_text[index], index);
  s->n++;
  s->with_metrics += p->m != NULL;
}

static void test_servers_live_while_a_configuration_lists_them(void **state) {
  fixture *f = *state;
  sl_worker *w = f->w;
  sl_config *one = load_config(
      "return { listeners = { { name = 'f', listen = '127.0.0.1:1', upstream = 'back' } },\n"
      "  upstreams = { back = { servers = { '127.0.0.1:7001', '127.0.0.1:7002' } } } }\n");
  sl_config *two = load_config(
      "return { listeners = { { name = 'f', listen = '127.0.0.1:1', upstream = 'back' } },\n"
      "  upstreams = { back = { servers = { '127.0.0.1:7002', '127.0.0.1:7003' } } } }\n");
  sl_upstreams *old = sl_upstreams_create(w, one);
  sl_upstreams *cur = sl_upstreams_create(w, two);
  assert_non_null(old);
  assert_non_null(cur);
  seen s = {0};
  sl_upstreams_each(cur, count_peer, &s);
  assert_int_equal(s.n, 2);
  assert_int_equal(s.with_metrics, 2);
  assert_string_equal(s.text[0], "back/0/127.0.0.1:7002/0");
  assert_string_equal(s.text[1], "back/0/127.0.0.1:7003/1");
  sl_upstreams_each(NULL, count_peer, &s);
  assert_int_equal(s.n, 2);

  sl_metrics_snap *snap = sl_metrics_snapshot(w, 0);
  assert_int_equal(snap->nservers, 3); /* 7002 once, for both */
  sl_metrics_snap_free(snap);
  sl_upstreams_destroy(old);          /* the old configuration's last user is gone */
  snap = sl_metrics_snapshot(w, 0);
  assert_int_equal(snap->nservers, 2);
  assert_null(find_row(snap, "back", "127.0.0.1:7001"));
  assert_non_null(find_row(snap, "back", "127.0.0.1:7002"));
  assert_non_null(find_row(snap, "back", "127.0.0.1:7003"));
  sl_metrics_snap_free(snap);
  sl_upstreams_destroy(cur);
  snap = sl_metrics_snapshot(w, 0);
  assert_int_equal(snap->nservers, 0);
  sl_metrics_snap_free(snap);
  sl_config_unref(one);
  sl_config_unref(two);
}

/* ---- sums over workers ---- */

static sl_metrics_server_snap row(const char *up, const char *server, unsigned ui, unsigned index,
                                  int retired) {
  sl_metrics_server_snap r;
  memset(&r, 0, sizeof(r));
  snprintf(r.upstream, sizeof(r.upstream), "%s", up);
  snprintf(r.server, sizeof(r.server), "%s", server);
  r.uindex = ui;
  r.index = index;
  r.retired = retired;
  r.weight = 1;
  r.balance = SL_BALANCE_LEAST_CONN;
  return r;
}

static void assert_contains_all(const char *text, const char *const *want, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (strstr(text, want[i]) == NULL) fail_msg("missing: %s\nin:\n%s", want[i], text);
}

static void test_admin_sums_servers_over_workers(void **state) {
  SL_UNUSED(state);
  sl_metrics_snap w0, w1;
  memset(&w0, 0, sizeof(w0));
  memset(&w1, 0, sizeof(w1));
  w1.worker = 1;
  /* Worker 0 lists them in another order than the configuration. */
  sl_metrics_server_snap r0[3] = {row("back", "b:2", 0, 1, 0), row("back", "old:9", 0, 5, 1),
                                  row("back", "a:1", 0, 0, 0)};
  sl_metrics_server_snap r1[4] = {row("back", "a:1", 0, 0, 0), row("back", "b:2", 0, 1, 0),
                                  row(SL_METRICS_DIRECT, "127.0.0.1:7", 0, 0, 1),
                                  row("gone", "g:1", 3, 0, 1)};
  r1[2].direct = 1;
  r1[2].opened = 4;
  r1[2].bytes_to = 11;
  r1[2].failures[SL_METRICS_REFUSED] = 2;
  r0[2].opened = 3;
  r0[2].bytes_to = 100;
  r0[2].bytes_from = 7;
  r1[0].opened = 2;
  r1[0].open = 1;
  r1[0].bytes_to = 50;
  r1[0].bytes_from = 3;
  r1[0].failures[SL_METRICS_REFUSED] = 1;
  r0[2].failures[SL_METRICS_TLS] = 2;
  r0[2].tls_resumed = 2;
  r1[0].tls_resumed = 1;
  r1[0].downs[SL_METRICS_DOWN_PASSIVE] = 1;
  r1[0].down = SL_METRICS_DOWN_PASSIVE + 1;
  r1[0].down_until = 1795000000.5;
  r1[0].now = 1795000000.0;
  r0[1].open = 1;                         /* an old connection keeps old:9 */
  r0[0].backup = r1[1].backup = 1;        /* b:2 is a backup server */
  w0.servers = r0;
  w0.nservers = 3;
  w1.servers = r1;
  w1.nservers = 4;
  /* The upstreams' totals: worker 0 dropped a server of back that had
   * sent 1000 bytes (in its row, not in a server's). */
  sl_metrics_upstream_snap u0[1], u1[2];
  memset(u0, 0, sizeof(u0));
  memset(u1, 0, sizeof(u1));
  snprintf(u0[0].name, sizeof(u0[0].name), "back");
  u0[0].connects = 3;
  u0[0].open = 1;
  u0[0].bytes_to = 1100;
  u0[0].bytes_from = 7;
  u0[0].reasons[SL_METRICS_TLS] = 2;
  snprintf(u1[0].name, sizeof(u1[0].name), SL_METRICS_DIRECT);
  u1[0].connects = 4;
  u1[0].bytes_to = 11;
  u1[0].reasons[SL_METRICS_REFUSED] = 2;
  snprintf(u1[1].name, sizeof(u1[1].name), "back");
  u1[1].connects = 2;
  u1[1].open = 1;
  u1[1].bytes_to = 50;
  u1[1].bytes_from = 3;
  u1[1].reasons[SL_METRICS_REFUSED] = 1;
  u1[1].tls_resumed = 1;
  w0.upstreams = u0;
  w0.nupstreams = 1;
  w1.upstreams = u1;
  w1.nupstreams = 2;
  sl_metrics_snap *snaps[3] = {&w0, &w1, NULL};
  sl_admin_report r = {.snaps = snaps, .nworkers = 3};

  size_t n = 0;
  sl_admin_server *rows = sl_admin_servers_sum(&r, &n);
  assert_non_null(rows);
  assert_int_equal(n, 5);
  const char *order[] = {"a:1", "b:2", "old:9", "g:1", "127.0.0.1:7"};
  for (size_t i = 0; i < n; i++) assert_string_equal(rows[i].sum.server, order[i]);
  assert_int_equal(rows[0].sum.opened, 5);
  assert_int_equal(rows[0].sum.open, 1);
  assert_int_equal(rows[0].sum.bytes_to, 150);
  assert_int_equal(rows[0].sum.bytes_from, 10);
  assert_int_equal(rows[0].sum.tls_resumed, 3);
  assert_int_equal(rows[0].sum.failures[SL_METRICS_TLS], 2);
  assert_int_equal(rows[0].ndown, 1);
  assert_int_equal(rows[1].ndown, 0);
  assert_int_equal(rows[4].sum.direct, 1);
  free(rows);
  sl_metrics_upstream_snap *ups = sl_admin_upstreams_sum(&r, &n);
  assert_non_null(ups);
  assert_int_equal(n, 2);
  assert_string_equal(ups[0].name, "back");
  assert_int_equal(ups[0].bytes_to, 1150);
  assert_string_equal(ups[1].name, SL_METRICS_DIRECT);
  free(ups);

  sl_text t = {0};
  sl_admin_format_upstreams(&t, &r);
  assert_false(t.failed);
  static const char *const json[] = {
      "{\"workers\": 3, \"workers_answering\": 2, \"upstreams\": [",
      "{\"name\": \"back\", \"balance\": \"least_conn\", \"retired\": false,\n"
       "      \"active\": 2, \"connections\": 5, \"failures\": {\"refused\": 1, "
       "\"timeout\": 0, \"other\": 0, \"tls\": 2},\n"
       "         \"sent_bytes\": 1150, \"received_bytes\": 10,\n      \"servers\": [",
      "{\"name\": \"(direct)\",\n      \"active\": 0, \"connections\": 4, ",
      "{\"address\": \"127.0.0.1:7\",\n         \"active\": 0, \"connections\": 4, "
       "\"failures\": {\"refused\": 2, \"timeout\": 0, \"other\": 0, \"tls\": 0},\n"
       "         \"sent_bytes\": 11, \"received_bytes\": 0}",
      "{\"name\": \"gone\", \"balance\": \"least_conn\", \"retired\": true,",
      "{\"address\": \"a:1\", \"weight\": 1, \"backup\": false, \"state\": \"down\", \"down\": "
       "[{\"worker\": 1, \"cause\": \"passive\", \"until\": "
       "\"2026-11-18T11:06:40.500Z\", \"remaining_ms\": 500}], "
       "\"retired\": false,",
      "\"active\": 1, \"connections\": 5, \"failures\": {\"refused\": 1, "
       "\"timeout\": 0, \"other\": 0, \"tls\": 2},",
      "\"sent_bytes\": 150, \"received_bytes\": 10, \"marked_down\": "
       "{\"passive\": 1, \"health_check\": 0}}",
      "{\"address\": \"b:2\", \"weight\": 1, \"backup\": true, \"state\": \"up\", \"down\": [], "
       "\"retired\": false,",
      "{\"address\": \"old:9\", \"weight\": 1, \"backup\": false, \"state\": \"up\", "
       "\"down\": [], "
       "\"retired\": true,",
  };
  assert_contains_all(t.p, json, sizeof(json) / sizeof(json[0]));
  assert_true(strstr(t.p, "\"back\"") < strstr(t.p, "\"gone\""));
  assert_true(strstr(t.p, "\"b:2\"") < strstr(t.p, "\"old:9\""));
  assert_true(strstr(t.p, "\"gone\"") < strstr(t.p, "\"(direct)\""));
  sl_text_reset(&t);

  sl_admin_format_metrics(&t, &r);
  assert_false(t.failed);
  static const char *const prom[] = {
      "sluice_upstream_server_connections_total{upstream=\"back\",server=\"a:1\"} 5\n",
      "sluice_upstream_server_connections_open{upstream=\"back\",server=\"old:9\"} 1\n",
      "sluice_upstream_server_sent_bytes_total{upstream=\"back\",server=\"a:1\"} 150\n",
      "sluice_upstream_server_received_bytes_total{upstream=\"back\",server=\"a:1\"} 10\n",
      "sluice_upstream_server_up{upstream=\"back\",server=\"a:1\"} 0\n",
      "sluice_upstream_server_up{upstream=\"back\",server=\"b:2\"} 1\n",
      "sluice_upstream_server_backup{upstream=\"back\",server=\"a:1\"} 0\n",
      "sluice_upstream_server_backup{upstream=\"back\",server=\"b:2\"} 1\n",
      "sluice_upstream_server_connect_failures_total{upstream=\"back\","
       "server=\"a:1\",reason=\"refused\"} 1\n",
      "sluice_upstream_server_connect_failures_total{upstream=\"back\","
       "server=\"a:1\",reason=\"tls\"} 2\n",
      "sluice_upstream_server_tls_resumed_total{upstream=\"back\",server=\"a:1\"} 3\n",
      "sluice_upstream_server_marked_down_total{upstream=\"back\","
       "server=\"a:1\",cause=\"passive\"} 1\n",
      "sluice_upstream_server_connect_seconds_count{upstream=\"back\","
       "server=\"a:1\"} 5\n",
      "sluice_upstream_server_sent_bytes_total{upstream=\"(direct)\",server=\"127.0.0.1:7\"} 11\n",
      "sluice_upstream_server_connect_failures_total{upstream=\"(direct)\","
       "server=\"127.0.0.1:7\",reason=\"refused\"} 2\n",
      "sluice_upstream_connects_total{upstream=\"back\"} 5\n",
      "sluice_upstream_connects_total{upstream=\"(direct)\"} 4\n",
      "sluice_upstream_connections_open{upstream=\"back\"} 2\n",
      "sluice_upstream_sent_bytes_total{upstream=\"back\"} 1150\n",
      "sluice_upstream_received_bytes_total{upstream=\"back\"} 10\n",
      "sluice_upstream_sent_bytes_total{upstream=\"(direct)\"} 11\n",
      "sluice_upstream_tls_resumed_total{upstream=\"back\"} 1\n",
  };
  assert_contains_all(t.p, prom, sizeof(prom) / sizeof(prom[0]));
  /* An address of ctx:connect has no state, role or TLS. */
  assert_null(strstr(t.p, "sluice_upstream_server_up{upstream=\"(direct)\""));
  assert_null(strstr(t.p, "sluice_upstream_server_backup{upstream=\"(direct)\""));
  assert_null(strstr(t.p, "sluice_upstream_server_marked_down_total{upstream=\"(direct)\""));
  assert_null(strstr(t.p, "sluice_upstream_server_tls_resumed_total{upstream=\"(direct)\""));
  sl_text_reset(&t);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_failure_reasons),
      cmocka_unit_test_setup_teardown(test_a_worker_that_does_not_answer_is_waited_for_once,
                                      fixture_setup, fixture_teardown),
      cmocka_unit_test_setup_teardown(test_server_counts_reach_the_snapshot, fixture_setup,
                                      fixture_teardown),
      cmocka_unit_test_setup_teardown(test_servers_live_while_a_configuration_lists_them,
                                      fixture_setup, fixture_teardown),
      cmocka_unit_test_setup_teardown(test_direct_addresses_are_capped, fixture_setup,
                                      fixture_teardown),
      cmocka_unit_test(test_admin_sums_servers_over_workers),
      cmocka_unit_test_setup_teardown(test_class_bytes_come_down_after_foreign_releases,
                                      fixture_setup, fixture_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
