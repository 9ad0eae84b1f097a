/*
 * A channel's write side on a real worker loop and real sockets: write
 * promises through the worker's promise_done hook (order, split writes,
 * closed channels, close, reset, timeout, outbound_limit), the outbound
 * limit closing both sides of a joined pair, write bursts that yield to
 * other channels (the spin count), writability events on every
 * crossing of the water marks, and kernel splicing between a joined pair
 * (the worker's pipe pool, a pipe the peer does not empty pausing reads,
 * order kept), and the write timeout (a peer that stops reading, a wait
 * that ends, a loop that ran late). Channels wrap one end of an AF_UNIX
 * socketpair; the test holds the other end ("peer").
 */
#include "test_util.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>

#include "alloc/pool.h"
#include "buf/buf.h"
#include "io/channel.h"
#include "io/listener.h"
#include "io/worker.h"
#include "lua/ffi.h"
#include "pipeline/pipeline.h"
#include "pipeline/stages.h"
#include "util/common.h"

/* ---- what the promise hook saw ---- */

typedef struct promise_log {
  int n;
  uint32_t pid[256];
  char err[256][32];        /* "" for success */
  uint32_t queued[256];     /* entries still queued at the report */
  uint32_t close_on;        /* close the channel when this pid completes */
  uint32_t write_on;        /* write (and flush) more when this pid completes */
  size_t write_len, write_offset;
} promise_log;

static promise_log plog;

#define pattern_buf sl_test_pattern_buf

static void on_promise(sl_channel *ch, uint32_t pid, const char *err) {
  assert_true(plog.n < 256);
  plog.pid[plog.n] = pid;
  snprintf(plog.err[plog.n], sizeof(plog.err[0]), "%s", err ? err : "");
  plog.queued[plog.n] = ch->outq.count;
  plog.n++;
  if (pid == plog.close_on) sl_channel_close(ch, "closed by a promise callback", 0);
  if (pid == plog.write_on) {
    sl_pipeline_write(&ch->pipe, pattern_buf(ch->w->pool, plog.write_len, plog.write_offset));
    sl_pipeline_flush(&ch->pipe);
  }
}

/* ---- fixture: a worker and up to four channels ---- */

typedef struct fixture {
  sl_worker *w;
  sl_channel *ch[4];
  int peer[4];
  int n;
} fixture;

static int fixture_setup(void **state) {
  fixture *f = calloc(1, sizeof(*f));
  if (f == NULL) return -1;
  f->w = sl_worker_create(0, NULL);
  if (f->w == NULL) return -1;
  f->w->promise_done = on_promise;
  for (int i = 0; i < 4; i++) f->peer[i] = -1;
  memset(&plog, 0, sizeof(plog));
  *state = f;
  return 0;
}

static int fixture_teardown(void **state) {
  fixture *f = *state;
  if (f->w != NULL) {
    sl_worker_close_channels(f->w, "teardown");
    sl_worker_destroy(f->w);
  }
  for (int i = 0; i < 4; i++)
    if (f->peer[i] >= 0) close(f->peer[i]);
  free(f);
  return 0;
}

/* An active channel on a fresh socketpair; its index in f. */
static int open_channel(fixture *f, const sl_channel_config *cfg) {
  assert_true(f->n < 4);
  int sv[2];
  sl_test_socketpair(sv);
  sl_addr addr;
  memset(&addr, 0, sizeof(addr));
  sl_channel *ch = sl_channel_accepted(f->w, sv[0], &addr, cfg, "test");
  assert_non_null(ch);
  f->ch[f->n] = ch;
  f->peer[f->n] = sv[1];
  return f->n++;
}

/* An active channel without stages; low and high are its water marks. */
static sl_channel *open_active(fixture *f, size_t low, size_t high) {
  sl_channel_config cfg = {.low_water_mark = low, .high_water_mark = high};
  sl_channel *ch = f->ch[open_channel(f, &cfg)];
  sl_channel_activate(ch);
  return ch;
}

/* The same with small socket buffers, so that the peer, not reading, stops
 * the writes soon; stage (may be NULL) goes in first. *peer gets the
 * peer's fd. */
static sl_channel *open_slow(fixture *f, size_t low, size_t high, const sl_stage_ops *stage,
                             int *peer) {
  sl_channel_config cfg = {.low_water_mark = low, .high_water_mark = high};
  int i = open_channel(f, &cfg);
  sl_channel *ch = f->ch[i];
  sl_test_small_buffers(ch->fd, f->peer[i], 4096);
  if (stage) assert_non_null(sl_pipeline_add_last(&ch->pipe, stage, stage->name));
  sl_channel_activate(ch);
  *peer = f->peer[i];
  return ch;
}

static void finish(fixture *f) {
  sl_worker_close_channels(f->w, "test done");
  SL_TEST_ASSERT_POOL_CLEAN(f->w->pool);
  assert_int_equal(f->w->nchannels, 0);
  sl_worker *w = f->w;
  f->w = NULL;
  assert_int_equal(sl_worker_destroy(w), 0);
}

static uint64_t bufs_active(const fixture *f) { return sl_test_stats(f->w->pool).bufs_active; }

/* A write with promise pid, as the Lua host makes it: from the tail. */
static void write_p(sl_channel *ch, sl_buf *b, uint32_t pid) {
  sl_ffi_ctx_write_p(&ch->pipe.tail, b, pid);
}

/* Reads what the peer has and runs the loop once, until cond or a bound. */
#define PUMP_UNTIL(f, peer, sink, cap, received, cond)                           \
  do {                                                                           \
    for (int pump_i_ = 0; pump_i_ < 100000 && !(cond); pump_i_++) {              \
      (received) += sl_test_read_available((peer), (sink) + (received),          \
                                           (cap) - (received));                  \
      ev_run((f)->w->loop, EVRUN_NOWAIT);                                        \
    }                                                                            \
    assert_true(cond);                                                           \
  } while (0)

/* ---- a stage that turns one write into a header and the body ---- */

static void split_write(sl_ctx *ctx, sl_buf *b) {
  uint8_t hdr[4] = {'L', 'E', 'N', ':'};
  sl_buf *h = sl_buf_from(sl_ctx_channel(ctx)->w->pool, hdr, sizeof(hdr));
  assert_non_null(h);
  sl_ctx_write(ctx, h);
  sl_ctx_write(ctx, b);
}

static const sl_stage_ops split_ops = {.name = "split", .write = split_write};

/* Consumes writes (releases them): nothing reaches the head. */
static void swallow_write(sl_ctx *ctx, sl_buf *b) {
  SL_UNUSED(ctx);
  sl_buf_release(b);
}

static const sl_stage_ops swallow_ops = {.name = "swallow", .write = swallow_write};

/* ---- promises ---- */

static void test_promises_complete_in_queue_order_when_written(void **state) {
  fixture *f = *state;
  sl_channel *ch = open_active(f, 1 << 16, 1 << 17);
  size_t off = 0;
  for (uint32_t i = 1; i <= 6; i++) {
    if (i % 2) write_p(ch, pattern_buf(f->w->pool, 1000, off), i);
    else sl_pipeline_write(&ch->pipe, pattern_buf(f->w->pool, 1000, off));
    off += 1000;
  }
  assert_int_equal(plog.n, 0); /* queued, not flushed */
  assert_int_equal(ch->outq.count, 6);
  sl_pipeline_flush(&ch->pipe);
  assert_int_equal(plog.n, 3);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(plog.pid[i], 2 * i + 1);
    assert_string_equal(plog.err[i], "");
  }
  uint8_t got[6000];
  sl_test_read_exact(f->peer[0], got, sizeof(got));
  assert_int_equal(sl_test_pattern_mismatch(got, sizeof(got), 0), sizeof(got));
  finish(f);
}

static void test_promise_of_a_split_write_completes_with_its_last_part(void **state) {
  fixture *f = *state;
  int peer;
  sl_channel *ch = open_slow(f, 1 << 20, 1 << 21, &split_ops, &peer);

  enum { BODY = 256 * 1024 };
  write_p(ch, pattern_buf(f->w->pool, BODY, 0), 42);
  /* Two entries: the header without the promise, the body with it. */
  assert_int_equal(ch->outq.count, 2);
  assert_int_equal(ch->outq.ring[ch->outq.head].pid, 0);
  assert_int_equal(ch->outq.ring[(ch->outq.head + 1) & ch->outq.mask].pid, 42);

  sl_pipeline_flush(&ch->pipe);
  assert_true(ch->bytes_out > 4); /* the header went, the body did not fit */
  assert_int_equal(plog.n, 0);

  static uint8_t got[4 + BODY];
  size_t received = 0;
  PUMP_UNTIL(f, peer, got, sizeof(got), received, plog.n > 0);
  assert_int_equal(plog.n, 1);
  assert_int_equal(plog.pid[0], 42);
  assert_string_equal(plog.err[0], "");
  assert_int_equal(plog.queued[0], 0); /* reported once the last byte went */
  sl_test_read_exact(peer, got + received, sizeof(got) - received);
  assert_memory_equal(got, "LEN:", 4);
  assert_int_equal(sl_test_pattern_mismatch(got + 4, BODY, 0), BODY);
  finish(f);
}

static void test_promise_of_a_swallowed_write_follows_what_was_queued(void **state) {
  fixture *f = *state;
  sl_channel_config cfg = {.low_water_mark = 1 << 16, .high_water_mark = 1 << 17};
  sl_channel *ch = f->ch[open_channel(f, &cfg)];
  sl_ctx *sw = sl_pipeline_add_last(&ch->pipe, &swallow_ops, "swallow");
  assert_non_null(sw);
  sl_channel_activate(ch);
  /* Written below the swallowing stage: queued, promise 1. */
  sl_ffi_ctx_write_p(sw, pattern_buf(f->w->pool, 500, 0), 1);
  /* Swallowed: a marker after entry 1 carries promise 2. */
  write_p(ch, pattern_buf(f->w->pool, 500, 500), 2);
  assert_int_equal(ch->outq.count, 2);
  assert_null(ch->outq.ring[(ch->outq.head + 1) & ch->outq.mask].buf);
  assert_int_equal(bufs_active(f), 1);
  sl_pipeline_flush(&ch->pipe);
  assert_int_equal(plog.n, 2);
  assert_int_equal(plog.pid[0], 1);
  assert_int_equal(plog.pid[1], 2);
  assert_string_equal(plog.err[1], "");
  uint8_t got[500];
  sl_test_read_exact(f->peer[0], got, sizeof(got));
  assert_int_equal(sl_test_pattern_mismatch(got, sizeof(got), 0), sizeof(got));
  sl_test_assert_nothing_to_read(f->peer[0]);
  finish(f);
}

static void test_write_to_a_closed_channel_fails_at_once(void **state) {
  fixture *f = *state;
  sl_channel *ch = open_active(f, 1 << 16, 1 << 17);
  sl_channel_ref(ch); /* readable after the close */
  sl_channel_close(ch, "closed by the test", 0);
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 7);
  assert_int_equal(plog.n, 1);
  assert_int_equal(plog.pid[0], 7);
  assert_string_equal(plog.err[0], "closed");
  assert_int_equal(bufs_active(f), 0); /* released at once */
  /* Without an id nothing is reported. */
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 0);
  assert_int_equal(plog.n, 1);
  assert_int_equal(bufs_active(f), 0);
  sl_channel_unref(ch);
  finish(f);
}

static void test_write_after_output_shutdown_fails_while_earlier_ones_complete(void **state) {
  fixture *f = *state;
  int peer;
  sl_channel *ch = open_slow(f, 1 << 20, 1 << 21, NULL, &peer);
  enum { LEN = 128 * 1024 };
  write_p(ch, pattern_buf(f->w->pool, LEN, 0), 1);
  sl_channel_shutdown_output(ch); /* flushes; the FIN waits for the queue */
  write_p(ch, pattern_buf(f->w->pool, 10, 0), 2);
  assert_int_equal(plog.n, 1);
  assert_int_equal(plog.pid[0], 2);
  assert_string_equal(plog.err[0], "closed");
  static uint8_t got[LEN];
  size_t received = 0;
  PUMP_UNTIL(f, peer, got, sizeof(got), received, plog.n == 2);
  assert_int_equal(plog.pid[1], 1);
  assert_string_equal(plog.err[1], "");
  sl_test_read_exact(peer, got + received, sizeof(got) - received);
  assert_int_equal(sl_test_pattern_mismatch(got, LEN, 0), LEN);
  finish(f);
}

static void test_close_fails_every_queued_promise_and_releases(void **state) {
  fixture *f = *state;
  int peer;
  sl_channel *ch = open_slow(f, 1 << 20, 1 << 21, NULL, &peer);
  write_p(ch, pattern_buf(f->w->pool, 200000, 0), 1); /* partly written */
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 2);
  sl_pipeline_flush(&ch->pipe);
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 3); /* not flushed */
  assert_int_equal(plog.n, 0);
  assert_int_equal(bufs_active(f), 3);
  sl_channel_close(ch, "closed by the test", 0);
  assert_int_equal(plog.n, 3);
  for (int k = 0; k < 3; k++) {
    assert_int_equal(plog.pid[k], k + 1);
    assert_string_equal(plog.err[k], "closed");
  }
  assert_int_equal(bufs_active(f), 0);
  finish(f);
}

static void test_peer_gone_fails_promises_with_reset(void **state) {
  fixture *f = *state;
  sl_channel_config cfg = {.low_water_mark = 1 << 16, .high_water_mark = 1 << 17};
  int i = open_channel(f, &cfg);
  sl_channel *ch = f->ch[i];
  sl_channel_activate(ch);
  close(f->peer[i]);
  f->peer[i] = -1;
  sl_channel_ref(ch);
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 1);
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 2);
  sl_pipeline_flush(&ch->pipe); /* EPIPE */
  assert_true(sl_channel_is_closed(ch));
  assert_true(strncmp(ch->reason, "reset (", 7) == 0);
  assert_int_equal(plog.n, 2);
  assert_string_equal(plog.err[0], "reset");
  assert_string_equal(plog.err[1], "reset");
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 3);
  assert_string_equal(plog.err[2], "closed");
  assert_int_equal(bufs_active(f), 0);
  sl_channel_unref(ch);
  finish(f);
}

/* Writes and flushes at once (as a stage doing write_and_flush). */
static void flushing_write(sl_ctx *ctx, sl_buf *b) {
  sl_ctx_write(ctx, b);
  sl_ctx_flush(ctx);
}

static const sl_stage_ops flushing_ops = {.name = "flushing", .write = flushing_write};

static void test_reset_seen_while_flushing_a_write_fails_it_with_reset(void **state) {
  fixture *f = *state;
  sl_channel *ch = open_active(f, 1 << 16, 1 << 17);
  sl_ctx *fl = sl_pipeline_add_last(&ch->pipe, &flushing_ops, "flushing");
  assert_non_null(fl);
  close(f->peer[0]);
  f->peer[0] = -1;
  sl_channel_ref(ch);
  /* The stage queues it, flushes, meets EPIPE: this write closed it. */
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 1);
  assert_true(sl_channel_is_closed(ch));
  assert_int_equal(plog.n, 1);
  assert_string_equal(plog.err[0], "reset");
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 2);
  assert_string_equal(plog.err[1], "closed");
  assert_int_equal(bufs_active(f), 0);
  sl_channel_unref(ch);
  finish(f);
}

/* A TCP listener whose accept queue is full: connects to it hang. */
static int full_listener(sl_addr *addr, int fillers[4]) {
  int l = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(l >= 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  assert_int_equal(bind(l, (struct sockaddr *)&sa, sizeof(sa)), 0);
  assert_int_equal(listen(l, 0), 0);
  socklen_t len = sizeof(sa);
  assert_int_equal(getsockname(l, (struct sockaddr *)&sa, &len), 0);
  for (int i = 0; i < 4; i++) {
    fillers[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    connect(fillers[i], (struct sockaddr *)&sa, sizeof(sa));
  }
  memset(addr, 0, sizeof(*addr));
  memcpy(&addr->ss, &sa, sizeof(sa));
  addr->len = sizeof(sa);
  return l;
}

static int connect_err = -1;
static void on_connect_close(sl_channel *ch, int err) {
  connect_err = err;
  if (err) sl_channel_close(ch, "connect failed", 1);
}

static void test_connect_timeout_fails_queued_promises_with_timeout(void **state) {
  fixture *f = *state;
  int fillers[4];
  sl_addr addr;
  int l = full_listener(&addr, fillers);
  sl_channel_config cfg = {.low_water_mark = 1 << 16, .high_water_mark = 1 << 17};
  connect_err = -1;
  sl_channel *ch = sl_channel_connect(f->w, &addr, 0.05, &cfg, on_connect_close, NULL, "test");
  assert_non_null(ch);
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 1);
  sl_pipeline_flush(&ch->pipe); /* waits for the connect */
  assert_int_equal(plog.n, 0);
  for (int i = 0; i < 1000 && connect_err < 0; i++) ev_run(f->w->loop, EVRUN_ONCE);
  assert_int_equal(connect_err, ETIMEDOUT);
  assert_int_equal(plog.n, 1);
  assert_int_equal(plog.pid[0], 1);
  assert_string_equal(plog.err[0], "timeout");
  for (int i = 0; i < 4; i++) close(fillers[i]);
  close(l);
  finish(f);
}

/* A listener on 127.0.0.1 with room in its backlog; closed: a port that
 * refuses. */
static int open_listener(sl_addr *addr) {
  int l = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(l >= 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  assert_int_equal(bind(l, (struct sockaddr *)&sa, sizeof(sa)), 0);
  assert_int_equal(listen(l, 16), 0);
  socklen_t len = sizeof(sa);
  assert_int_equal(getsockname(l, (struct sockaddr *)&sa, &len), 0);
  memset(addr, 0, sizeof(*addr));
  memcpy(&addr->ss, &sa, sizeof(sa));
  addr->len = sizeof(sa);
  return l;
}

static void test_a_write_flushed_while_connecting_goes_out_with_the_connect(void **state) {
  fixture *f = *state;
  sl_addr addr;
  int l = open_listener(&addr);
  sl_channel_config cfg = {.low_water_mark = 1 << 16, .high_water_mark = 1 << 17};
  connect_err = -1;
  sl_channel *ch = sl_channel_connect(f->w, &addr, 5.0, &cfg, on_connect_close, NULL, "test");
  assert_non_null(ch);
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 1);
  sl_pipeline_flush(&ch->pipe);     /* tried at once: sent, or left to EV_WRITE */
  assert_true(ch->flags & SL_CH_SPECULATED);
  for (int i = 0; i < 1000 && (connect_err < 0 || plog.n == 0); i++) ev_run(f->w->loop, EVRUN_ONCE);
  assert_int_equal(connect_err, 0);
  assert_int_equal(plog.n, 1);
  assert_string_equal(plog.err[0], "");
  assert_int_equal(ch->bytes_out, 100);
  int peer = accept(l, NULL, NULL);
  assert_true(peer >= 0);
  uint8_t got[100];
  sl_test_read_exact(peer, got, sizeof(got));
  assert_int_equal(sl_test_pattern_mismatch(got, sizeof(got), 0), sizeof(got));
  close(peer);
  close(l);
  finish(f);
}

/* A refused connect hands what it never wrote to a second try. */
static sl_addr retry_addr;
static sl_channel *retry_ch;
static size_t refused_queued;
static int refused_err;
static void on_connect_retry(sl_channel *ch, int err) {
  refused_err = err;
  if (!err) return;
  refused_queued = ch->outq.count;
  sl_channel_config cfg = {.low_water_mark = 1 << 16, .high_water_mark = 1 << 17};
  retry_ch = sl_channel_connect(ch->w, &retry_addr, 5.0, &cfg, on_connect_close, NULL, "retry");
  assert_non_null(retry_ch);
  assert_int_equal(sl_channel_move_queue(ch, retry_ch), SL_OK);
  assert_true(sl_outq_is_empty(&ch->outq));
  sl_channel_close(ch, "connect failed", 1);
}

static void test_a_refused_connect_keeps_its_queue_for_the_next_try(void **state) {
  fixture *f = *state;
  sl_addr refused;
  close(open_listener(&refused));
  int l = open_listener(&retry_addr);
  sl_channel_config cfg = {.low_water_mark = 1 << 16, .high_water_mark = 1 << 17};
  connect_err = -1;
  refused_err = -1;
  retry_ch = NULL;
  sl_channel *ch = sl_channel_connect(f->w, &refused, 5.0, &cfg, on_connect_retry, NULL, "test");
  assert_non_null(ch);
  write_p(ch, pattern_buf(f->w->pool, 60, 0), 1);
  write_p(ch, pattern_buf(f->w->pool, 40, 60), 2);
  sl_pipeline_flush(&ch->pipe);
  for (int i = 0; i < 1000 && retry_ch == NULL; i++) ev_run(f->w->loop, EVRUN_ONCE);
  assert_int_equal(refused_err, ECONNREFUSED);
  assert_int_equal(refused_queued, 2);       /* nothing was lost to the refused write */
  /* The promises went along: reported once, by the second try, as written. */
  for (int i = 0; i < 1000 && plog.n < 2; i++) ev_run(f->w->loop, EVRUN_ONCE);
  assert_int_equal(connect_err, 0);
  assert_int_equal(plog.n, 2);
  assert_int_equal(plog.pid[0], 1);
  assert_int_equal(plog.pid[1], 2);
  assert_string_equal(plog.err[0], "");
  assert_string_equal(plog.err[1], "");
  assert_int_equal(retry_ch->bytes_out, 100);
  int peer = accept(l, NULL, NULL);
  assert_true(peer >= 0);
  uint8_t got[100];
  sl_test_read_exact(peer, got, sizeof(got));
  assert_int_equal(sl_test_pattern_mismatch(got, sizeof(got), 0), sizeof(got));
  close(peer);
  close(l);
  finish(f);
}

static void test_addresses_format_for_logs(void **state) {
  SL_UNUSED(state);
  sl_addr a;
  char out[64];
  assert_int_equal(sl_addr_parse(&a, "127.0.0.1", 80), SL_OK);
  assert_string_equal(sl_addr_format((struct sockaddr *)&a.ss, out, sizeof(out)), "127.0.0.1:80");
  assert_int_equal(sl_addr_parse(&a, "255.255.255.255", 65535), SL_OK);
  assert_string_equal(sl_addr_format((struct sockaddr *)&a.ss, out, sizeof(out)),
                      "255.255.255.255:65535");
  assert_int_equal(sl_addr_parse(&a, "10.200.3.45", 8080), SL_OK);
  assert_string_equal(sl_addr_format((struct sockaddr *)&a.ss, out, sizeof(out)),
                      "10.200.3.45:8080");
  static const unsigned ports[] = {9, 10, 99, 100, 999, 1000, 9999, 10000, 65535};
  for (size_t i = 0; i < sizeof(ports) / sizeof(ports[0]); i++) {
    char want[32];
    snprintf(want, sizeof(want), "1.20.255.0:%u", ports[i]);
    assert_int_equal(sl_addr_parse(&a, "1.20.255.0", (int)ports[i]), SL_OK);
    assert_string_equal(sl_addr_format((struct sockaddr *)&a.ss, out, sizeof(out)), want);
  }
  assert_int_equal(sl_addr_parse(&a, "0.0.0.0", 0), SL_OK);
  assert_string_equal(sl_addr_format((struct sockaddr *)&a.ss, out, sizeof(out)), "0.0.0.0:0");
  assert_string_equal(sl_addr_format((struct sockaddr *)&a.ss, out, 4), "0.0");   /* truncated */
  assert_int_equal(sl_addr_parse(&a, "::1", 443), SL_OK);
  assert_string_equal(sl_addr_format((struct sockaddr *)&a.ss, out, sizeof(out)), "[::1]:443");
}

/* ---- what a connection costs: spare channels, TCP_NODELAY ---- */

/* A freed channel is kept for the worker's next one (the same memory, all
 * fields fresh), at most SL_CHANNEL_SPARES of them, and they go when the
 * worker lets them go. */
static void test_freed_channels_are_reused_up_to_the_bound(void **state) {
  fixture *f = *state;
  sl_channel *a = f->ch[open_channel(f, &(sl_channel_config){0})];
  sl_channel_close(a, "first", 0);
  f->n = 0;
  close(f->peer[0]);
  f->peer[0] = -1;
  assert_int_equal(f->w->nspare_channels, 1);
  sl_channel *b = f->ch[open_channel(f, &(sl_channel_config){0})];
  assert_ptr_equal(a, b);
  assert_int_equal(f->w->nspare_channels, 0);
  assert_int_equal(b->flags & SL_CH_CLOSED, 0);
  assert_int_equal(b->reason[0], '\0');
  assert_int_equal(b->bytes_in, 0);
  assert_int_equal(b->refs, 1);
  sl_channel_close(b, "second", 0);
  f->n = 0;
  close(f->peer[0]);
  f->peer[0] = -1;

  /* More channels freed than are kept: the rest go back to malloc. */
  enum { N = SL_CHANNEL_SPARES + 8 };
  static sl_channel *chs[N];
  sl_addr addr;
  memset(&addr, 0, sizeof(addr));
  for (int i = 0; i < N; i++) {
    int sv[2];
    sl_test_socketpair(sv);
    close(sv[1]);
    chs[i] = sl_channel_accepted(f->w, sv[0], &addr, &(sl_channel_config){0}, "test");
    assert_non_null(chs[i]);
  }
  assert_int_equal(f->w->nspare_channels, 0);
  for (int i = 0; i < N; i++) sl_channel_close(chs[i], "done", 0);
  assert_int_equal(f->w->nspare_channels, SL_CHANNEL_SPARES);
  sl_channel_spares_free(f->w);
  assert_int_equal(f->w->nspare_channels, 0);
  assert_null(f->w->spare_channels);
  finish(f);
}

/* Accepted sockets get TCP_NODELAY from their listener, with no call of
 * their own. */
static void test_accepted_sockets_inherit_nodelay_from_the_listener(void **state) {
  SL_UNUSED(state);
  sl_addr a;
  assert_int_equal(sl_addr_parse(&a, "127.0.0.1", 0), SL_OK);
  int l = sl_listener_bind(&a, 0, 511);
  assert_true(l >= 0);
  struct sockaddr_in at;
  socklen_t len = sizeof(at);
  assert_int_equal(getsockname(l, (struct sockaddr *)&at, &len), 0);
  int c = socket(AF_INET, SOCK_STREAM, 0);
  assert_int_equal(connect(c, (struct sockaddr *)&at, sizeof(at)), 0);
  int s = -1;
  for (int i = 0; i < 1000 && s < 0; i++) {   /* the listener is non-blocking */
    s = accept(l, NULL, NULL);
    if (s < 0) usleep(1000);
  }
  assert_true(s >= 0);
  int v = 0;
  len = sizeof(v);
  assert_int_equal(getsockopt(s, IPPROTO_TCP, TCP_NODELAY, &v, &len), 0);
  assert_int_equal(v, 1);
  close(s);
  close(c);
  close(l);
}

static void test_close_with_names_the_promise_failure(void **state) {
  fixture *f = *state;
  sl_channel *ch = open_active(f, 1 << 16, 1 << 17);
  write_p(ch, pattern_buf(f->w->pool, 100, 0), 1);
  sl_channel_close_with(ch, SL_PROMISE_TIMEOUT, "idle for 30 s", 1);
  assert_int_equal(plog.n, 1);
  assert_string_equal(plog.err[0], "timeout");
  finish(f);
}

/* ---- promise callbacks inside a write burst ---- */

static void test_a_completion_may_write_and_flush_inside_a_burst(void **state) {
  fixture *f = *state;
  sl_channel *ch = open_active(f, 1 << 16, 1 << 17);
  /* One sendmsg takes all three; completing 1 writes and flushes a fourth
   * while 2 and 3 are still in the queue (sent, not yet accounted). */
  plog.write_on = 1;
  plog.write_len = 300;
  plog.write_offset = 900;
  for (uint32_t p = 1; p <= 3; p++) write_p(ch, pattern_buf(f->w->pool, 300, 300 * (p - 1)), p);
  sl_pipeline_flush(&ch->pipe);
  assert_int_equal(plog.n, 3);
  uint8_t got[1200];
  sl_test_read_exact(f->peer[0], got, sizeof(got));
  assert_int_equal(sl_test_pattern_mismatch(got, sizeof(got), 0), sizeof(got));
  sl_test_assert_nothing_to_read(f->peer[0]);
  assert_true(sl_outq_is_empty(&ch->outq));
  finish(f);
}

static void test_a_completion_may_close_the_channel_inside_a_burst(void **state) {
  fixture *f = *state;
  sl_channel *ch = open_active(f, 1 << 16, 1 << 17);
  plog.close_on = 1;
  for (uint32_t p = 1; p <= 3; p++) write_p(ch, pattern_buf(f->w->pool, 300, 0), p);
  sl_pipeline_flush(&ch->pipe); /* the channel is gone after this */
  assert_int_equal(plog.n, 3);
  assert_string_equal(plog.err[0], "");
  assert_string_equal(plog.err[1], "closed");
  assert_string_equal(plog.err[2], "closed");
  assert_int_equal(f->w->nchannels, 0);
  finish(f);
}

/* ---- the outbound limit ---- */

static void test_outbound_limit_closes_both_sides_and_fails_promises(void **state) {
  fixture *f = *state;
  sl_channel_config cfg = {.low_water_mark = 4000, .high_water_mark = 8000,
                           .outbound_limit = 20000};
  sl_channel *a = f->ch[open_channel(f, &cfg)];
  sl_channel *b = f->ch[open_channel(f, &cfg)];
  sl_channel_join(a, b);
  sl_channel_activate(a);
  sl_channel_activate(b);
  sl_channel_ref(a);
  sl_channel_ref(b);
  /* Four entries of 4000 + overhead fit (16352); the fifth does not. */
  for (uint32_t p = 1; p <= 4; p++) write_p(a, pattern_buf(f->w->pool, 4000, 0), p);
  write_p(b, pattern_buf(f->w->pool, 10, 0), 100); /* queued on the peer */
  assert_false(sl_channel_is_closed(a));
  assert_int_equal(a->outq.pending, 4 * (4000 + SL_OUTQ_ENTRY_OVERHEAD));
  assert_int_equal(plog.n, 0);
  write_p(a, pattern_buf(f->w->pool, 4000, 0), 5);

  assert_true(sl_channel_is_closed(a));
  assert_string_equal(a->reason,
                      "outbound_limit (16352 B queued, a write of 4000 B, limit 20000 B)");
  assert_int_equal(plog.n, 6);
  for (uint32_t k = 0; k < 4; k++) {
    assert_int_equal(plog.pid[k], k + 1);
    assert_string_equal(plog.err[k], "outbound_limit");
  }
  /* The peer closed at once (an error close), failing what it held. */
  assert_true(sl_channel_is_closed(b));
  assert_string_equal(b->reason, "peer closed: outbound_limit (16352 B queued, a write of "
                                 "4000 B, limit 20000 B)");
  assert_int_equal(plog.pid[4], 100);
  assert_string_equal(plog.err[4], "closed");
  assert_int_equal(plog.pid[5], 5);
  assert_string_equal(plog.err[5], "outbound_limit");
  /* A later write finds the channel closed: just "closed". */
  write_p(a, pattern_buf(f->w->pool, 10, 0), 6);
  assert_int_equal(plog.n, 7);
  assert_string_equal(plog.err[6], "closed");
  assert_int_equal(bufs_active(f), 0);
  sl_channel_unref(a);
  sl_channel_unref(b);
  finish(f);
}

static void test_default_outbound_limit_is_16_mib(void **state) {
  fixture *f = *state;
  sl_channel_config cfg = {.low_water_mark = 1 << 16, .high_water_mark = 1 << 17};
  sl_channel *ch = f->ch[open_channel(f, &cfg)];
  assert_int_equal(ch->outq.limit, 16u << 20);
  assert_int_equal(ch->outq.spin, 16);
  assert_true(ch->outq.gather_adaptive);
  finish(f);
}

/* ---- write bursts yield to other channels ---- */

static void test_a_busy_channel_yields_after_its_spin_count(void **state) {
  fixture *f = *state;
  sl_channel_config busy_cfg = {.low_water_mark = 32 << 20, .high_water_mark = 64 << 20,
                                .outbound_limit = 64 << 20, .write_spin_count = 16,
                                .max_bytes_per_gathering_write = 1024};
  sl_channel_config echo_cfg = {.low_water_mark = 1 << 16, .high_water_mark = 1 << 17};
  sl_channel *a = f->ch[open_channel(f, &busy_cfg)];
  sl_channel *b = f->ch[open_channel(f, &echo_cfg)];
  assert_non_null(sl_pipeline_add_last(&b->pipe, &sl_stage_echo, "echo"));
  sl_channel_activate(a);
  sl_channel_activate(b);

  enum { TOTAL = 1 << 20, BURST = 16 * 1024 };
  for (size_t off = 0; off < TOTAL; off += 65536)
    sl_pipeline_write(&a->pipe, pattern_buf(f->w->pool, 65536, off));
  sl_pipeline_flush(&a->pipe);
  /* One burst: 16 sendmsg calls of 1024 bytes, then a yield. */
  assert_int_equal(a->bytes_out, BURST);
  assert_int_equal(a->outq.sendmsg_calls, 16);
  assert_int_equal(a->outq.yields, 1);
  assert_true(ev_is_active(&a->wio));

  static uint8_t got[TOTAL];
  size_t received = sl_test_read_available(f->peer[0], got, TOTAL);
  assert_int_equal(received, BURST);
  /* Each loop iteration serves the echo channel and one more burst of A. */
  for (int iter = 1; iter <= 8; iter++) {
    char ping[16];
    int len = snprintf(ping, sizeof(ping), "ping %d", iter);
    assert_int_equal(send(f->peer[1], ping, (size_t)len, 0), len);
    ev_run(f->w->loop, EVRUN_NOWAIT);
    char back[16];
    assert_int_equal(sl_test_read_available(f->peer[1], (uint8_t *)back, sizeof(back)), len);
    assert_memory_equal(back, ping, (size_t)len);
    assert_int_equal(a->bytes_out, (size_t)(iter + 1) * BURST);
    assert_int_equal(a->outq.yields, (uint64_t)iter + 1);
    received += sl_test_read_available(f->peer[0], got + received, TOTAL - received);
    assert_int_equal(received, (size_t)(iter + 1) * BURST);
  }
  /* A finishes alone: TOTAL / BURST bursts in all, the last without a yield. */
  for (int i = 0; i < 1000 && received < TOTAL; i++) {
    ev_run(f->w->loop, EVRUN_NOWAIT);
    received += sl_test_read_available(f->peer[0], got + received, TOTAL - received);
  }
  assert_int_equal(received, TOTAL);
  assert_int_equal(a->outq.sendmsg_calls, TOTAL / 1024);
  assert_int_equal(a->outq.yields, TOTAL / BURST - 1);
  assert_false(ev_is_active(&a->wio));
  assert_int_equal(sl_test_pattern_mismatch(got, TOTAL, 0), TOTAL);
  finish(f);
}

/* ---- writability on every crossing ---- */

static char wlog[256];

static void wrec_writability(sl_ctx *ctx, int writable) {
  size_t len = strlen(wlog);
  assert_true(len + 2 < sizeof(wlog));
  wlog[len] = writable ? '1' : '0';
  wlog[len + 1] = '\0';
  sl_ctx_fire_writability(ctx, writable);
}

static const sl_stage_ops wrec_ops = {.name = "wrec", .on_writability = wrec_writability};

static void test_writability_reaches_stages_on_every_crossing(void **state) {
  fixture *f = *state;
  int peer;
  sl_channel *ch = open_slow(f, 8192, 32768, &wrec_ops, &peer);
  wlog[0] = '\0';
  enum { CYCLES = 6, N = 24, LEN = 4096 };
  static uint8_t got[CYCLES * N * LEN];
  size_t received = 0, off = 0;
  for (int c = 0; c < CYCLES; c++) {
    for (int k = 0; k < N; k++) {
      sl_pipeline_write(&ch->pipe, pattern_buf(f->w->pool, LEN, off));
      off += LEN;
    }
    sl_pipeline_flush(&ch->pipe);
    assert_int_equal(strlen(wlog), 2 * c + 1);
    assert_int_equal(wlog[2 * c], '0');
    PUMP_UNTIL(f, peer, got, sizeof(got), received, sl_outq_is_empty(&ch->outq));
    assert_int_equal(strlen(wlog), 2 * c + 2);
    assert_int_equal(wlog[2 * c + 1], '1');
  }
  assert_string_equal(wlog, "010101010101");
  sl_test_read_exact(peer, got + received, sizeof(got) - received);
  assert_int_equal(sl_test_pattern_mismatch(got, sizeof(got), 0), sizeof(got));
  finish(f);
}

/* ---- kernel splicing ---- */

static void test_pipe_pool_reuses_empty_pipes_and_keeps_its_bounds(void **state) {
  SL_UNUSED(state);
  sl_pipe_pool pp;
  sl_pipe_pool_init(&pp);
  pp.max_open = 2;
  sl_pipe a, b, c;
  assert_int_equal(sl_pipe_get(&pp, 1 << 20, &a), SL_OK);
  assert_true(a.cap >= SL_PIPE_SIZE_MIN);
  assert_int_equal(sl_pipe_get(&pp, 0, &b), SL_OK);
  assert_int_equal(pp.open, 2);
  assert_int_equal(sl_pipe_get(&pp, 0, &c), SL_ERROR);   /* at max_open */
  assert_int_equal(pp.refused, 1);
  sl_pipe_put(&pp, &a, 1);                              /* empty: kept */
  assert_int_equal(pp.nidle, 1);
  assert_int_equal(pp.open, 2);
  assert_int_equal(sl_pipe_get(&pp, 0, &c), SL_OK);
  assert_int_equal(c.rd, a.rd);                         /* the same pipe again */
  sl_pipe_put(&pp, &b, 0);                              /* not empty: closed */
  assert_int_equal(pp.open, 1);
  assert_int_equal(pp.nidle, 0);
  sl_pipe_put(&pp, &c, 1);
  /* Idle pipes close once none has been taken for the idle time. */
  assert_int_equal(sl_pipe_pool_tick(&pp, 1000, 500), 0);   /* starts watching */
  assert_int_equal(sl_pipe_pool_tick(&pp, 1400, 500), 0);
  assert_int_equal(sl_pipe_get(&pp, 0, &c), SL_OK);         /* taken: quiet again from now */
  sl_pipe_put(&pp, &c, 1);
  assert_int_equal(sl_pipe_pool_tick(&pp, 1600, 500), 0);
  assert_int_equal(sl_pipe_pool_tick(&pp, 2000, 500), 0);
  assert_int_equal(sl_pipe_pool_tick(&pp, 2100, 500), 1);
  assert_int_equal(pp.open, 0);
  assert_int_equal(pp.created, 2);
}

/* A splicing pair with a's pipe full (b's peer reads nothing); returns what
 * a has read. src must hold total bytes. */
static uint64_t fill_pipe(fixture *f, sl_channel *a, const uint8_t *src, size_t total,
                          size_t *sent);

/* Writes what the socket takes of src[*sent..total) without blocking. */
static void send_some(int fd, const uint8_t *src, size_t total, size_t *sent) {
  if (*sent == total) return;
  ssize_t n = send(fd, src + *sent, total - *sent, MSG_DONTWAIT);
  if (n > 0) *sent += (size_t)n;
}

/* A joined pair a -> b that splices (as reads grown to the largest size
 * make it); b's peer (*pb) has small buffers, so it fills soon. */
static sl_channel *open_splicing_pair(fixture *f, sl_channel **b, int *pb) {
  sl_channel *a = open_active(f, 1 << 16, 1 << 17);
  *b = open_slow(f, 1 << 16, 1 << 17, NULL, pb);
  sl_channel_join(a, *b);
  sl_channel_allow_splice(a);
  a->flags |= SL_CH_SPLICING;
  return a;
}

static uint64_t fill_pipe(fixture *f, sl_channel *a, const uint8_t *src, size_t total,
                          size_t *sent) {
  for (int i = 0; i < 100000 && !(a->flags & SL_CH_SPLICE_FULL); i++) {
    send_some(f->peer[0], src, total, sent);
    ev_run(f->w->loop, EVRUN_NOWAIT);
  }
  assert_true(a->flags & SL_CH_SPLICE_FULL);
  assert_true(a->spl_len > 0);
  return a->bytes_in;
}

static void test_a_splicing_pair_pauses_for_a_full_peer_and_keeps_order(void **state) {
  fixture *f = *state;
  int pb;
  sl_channel *b;
  sl_channel *a = open_splicing_pair(f, &b, &pb);
  sl_channel_ref(a);            /* its end of input closes it: read its flags after */
  enum { TOTAL = 2 << 20 };
  static uint8_t src[TOTAL], got[TOTAL];
  sl_test_fill_pattern(src, TOTAL, 0);
  size_t sent = 0, received = 0;
  /* The peer reads nothing: the pipe fills, a stops reading and waits for
   * b's socket to take more. */
  fill_pipe(f, a, src, TOTAL, &sent);
  assert_false(ev_is_active(&a->rio));
  assert_true(ev_is_active(&b->wio));
  /* The peer reads: everything arrives, in order, and a reads again. */
  for (int i = 0; i < 1000000 && received < TOTAL; i++) {
    send_some(f->peer[0], src, TOTAL, &sent);
    received += sl_test_read_available(pb, got + received, TOTAL - received);
    ev_run(f->w->loop, EVRUN_NOWAIT);
  }
  assert_int_equal(received, TOTAL);
  assert_int_equal(sl_test_pattern_mismatch(got, TOTAL, 0), TOTAL);
  assert_int_equal(a->bytes_in, TOTAL);
  assert_int_equal(b->bytes_out, TOTAL);
  /* Small last reads may go through buffers; the bulk went through pipes. */
  assert_true(f->w->stats.spliced_bytes >= TOTAL / 2);
  assert_int_equal(a->spl_len, 0);
  assert_false(a->flags & SL_CH_SPLICE_FULL);
  /* Its pipe went back to the pool once empty; it still splices. */
  assert_false(a->flags & SL_CH_HAS_PIPE);
  assert_true(a->flags & SL_CH_SPLICING);
  assert_true(f->w->pipes.nidle >= 1);
  /* The end of input is seen after the last byte went on. */
  assert_int_equal(shutdown(f->peer[0], SHUT_WR), 0);
  for (int i = 0; i < 100000 && !(a->flags & SL_CH_INPUT_CLOSED); i++)
    ev_run(f->w->loop, EVRUN_NOWAIT);
  assert_true(a->flags & SL_CH_INPUT_CLOSED);
  sl_channel_unref(a);
  finish(f);
}

/* Closed without an error (an idle timeout) while its pipe holds bytes: the
 * bytes it read still reach its peer, before the peer's FIN. */
static void test_a_clean_close_hands_its_pipe_on_before_the_fin(void **state) {
  fixture *f = *state;
  int pb;
  sl_channel *b;
  sl_channel *a = open_splicing_pair(f, &b, &pb);
  enum { TOTAL = 2 << 20 };
  static uint8_t src[TOTAL], got[TOTAL];
  sl_test_fill_pattern(src, TOTAL, 0);
  size_t sent = 0, received = 0;
  uint64_t read_in = fill_pipe(f, a, src, TOTAL, &sent);
  sl_channel_close_with(a, SL_PROMISE_TIMEOUT, "idle_timeout", 0);   /* as the idle timer does */
  int eof = 0;
  for (int i = 0; i < 1000000 && !eof; i++) {
    ssize_t n = recv(pb, got + received, TOTAL - received, MSG_DONTWAIT);
    if (n > 0) received += (size_t)n;
    else if (n == 0) eof = 1;
    ev_run(f->w->loop, EVRUN_NOWAIT);
  }
  assert_true(eof);
  assert_int_equal(received, read_in);
  assert_int_equal(sl_test_pattern_mismatch(got, received, 0), received);
  assert_int_equal(f->w->nchannels, 0);
  finish(f);
}

/* ---- write timeout ---- */

/* A pair whose channel a has small socket buffers and the write timeout
 * given; the test holds a's peer socket (*peer) and reads it, or not. */
static sl_channel *open_timed_pair(fixture *f, double timeout, sl_channel **b, int *peer) {
  sl_channel_config cfg = {.low_water_mark = 1 << 20, .high_water_mark = 1 << 21,
                           .write_timeout = timeout};
  int i = open_channel(f, &cfg);
  sl_channel *a = f->ch[i];
  *b = f->ch[open_channel(f, &cfg)];
  sl_test_small_buffers(a->fd, f->peer[i], 4096);
  *peer = f->peer[i];
  sl_channel_join(a, *b);
  sl_channel_activate(a);
  sl_channel_activate(*b);
  return a;
}

static void test_write_timeout_closes_a_pair_whose_peer_stops_reading(void **state) {
  fixture *f = *state;
  sl_channel *b;
  int peer;
  sl_channel *a = open_timed_pair(f, 0.02, &b, &peer);
  sl_channel_ref(a);
  sl_channel_ref(b);
  write_p(a, pattern_buf(f->w->pool, 200000, 0), 1);
  write_p(b, pattern_buf(f->w->pool, 10, 0), 2);   /* b's socket takes it: written */
  sl_pipeline_flush(&a->pipe);
  sl_pipeline_flush(&b->pipe);
  assert_true(ev_is_active(&a->wtimer));   /* a waits for its socket */
  assert_false(ev_is_active(&b->wtimer));  /* b wrote everything: no timer */
  for (int k = 0; k < 1000 && !sl_channel_is_closed(a); k++) ev_run(f->w->loop, EVRUN_ONCE);
  assert_true(sl_channel_is_closed(a));
  assert_string_equal(a->reason, "write_timeout");
  assert_true(a->flags & SL_CH_ERROR);
  assert_true(sl_channel_is_closed(b));
  assert_string_equal(b->reason, "peer closed: write_timeout");
  assert_int_equal(plog.n, 2);
  assert_int_equal(plog.pid[0], 2);
  assert_string_equal(plog.err[0], "");
  assert_int_equal(plog.pid[1], 1);
  assert_string_equal(plog.err[1], "timeout");
  assert_int_equal(f->w->stats.write_timeouts, 1);
  assert_int_equal(bufs_active(f), 0);
  sl_channel_unref(a);
  sl_channel_unref(b);
  finish(f);
}

static void test_write_timeout_stops_with_the_wait(void **state) {
  fixture *f = *state;
  sl_channel *b;
  int peer;
  sl_channel *a = open_timed_pair(f, 0.02, &b, &peer);
  /* Taken at once: nothing waits, no timer runs. */
  write_p(a, pattern_buf(f->w->pool, 100, 0), 1);
  sl_pipeline_flush(&a->pipe);
  assert_false(ev_is_active(&a->wio));
  assert_false(ev_is_active(&a->wtimer));
  /* More than the socket takes: the timer runs; the peer reads it all
   * before the timeout, and the queue empties. */
  static uint8_t sink[200200];
  size_t got = 0;
  write_p(a, pattern_buf(f->w->pool, 200000, 100), 2);
  sl_pipeline_flush(&a->pipe);
  assert_true(ev_is_active(&a->wtimer));
  PUMP_UNTIL(f, peer, sink, sizeof(sink), got, got == 200100);
  assert_true(sl_outq_is_empty(&a->outq));
  assert_false(ev_is_active(&a->wio));
  /* The timer, left running (no stop on the hot path), finds no wait when
   * it fires and stops without a close. */
  for (int k = 0; k < 1000 && ev_is_active(&a->wtimer); k++) ev_run(f->w->loop, EVRUN_ONCE);
  assert_false(ev_is_active(&a->wtimer));
  assert_false(sl_channel_is_closed(a));
  assert_int_equal(plog.n, 2);
  assert_string_equal(plog.err[1], "");
  assert_int_equal(f->w->stats.write_timeouts, 0);
  assert_int_equal(sl_test_pattern_mismatch(sink, 100, 0), 100);
  assert_int_equal(sl_test_pattern_mismatch(sink + 100, 200000, 100), 200000);
  finish(f);
}

static void test_write_timeout_takes_a_late_loop_for_no_stalled_peer(void **state) {
  fixture *f = *state;
  sl_channel *b;
  int peer;
  sl_channel *a = open_timed_pair(f, 0.02, &b, &peer);
  sl_channel_ref(a);
  write_p(a, pattern_buf(f->w->pool, 200000, 0), 1);
  sl_pipeline_flush(&a->pipe);
  assert_true(ev_is_active(&a->wtimer));
  uint64_t out = a->bytes_out;
  /* The peer reads while the loop is busy elsewhere for longer than the
   * timeout: when the loop runs again, the expired timer comes before the
   * EV_WRITE that shows the peer's progress. */
  static uint8_t sink[200000];
  size_t got = sl_test_read_available(peer, sink, sizeof(sink));
  assert_true(got > 0);
  usleep(100000);
  ev_run(f->w->loop, EVRUN_NOWAIT);
  assert_false(sl_channel_is_closed(a));
  assert_true(a->bytes_out > out);
  assert_int_equal(f->w->stats.write_timeouts, 0);
  /* A peer that then stops reading is closed after all. */
  for (int k = 0; k < 1000 && !sl_channel_is_closed(a); k++) ev_run(f->w->loop, EVRUN_ONCE);
  assert_string_equal(a->reason, "write_timeout");
  assert_int_equal(f->w->stats.write_timeouts, 1);
  assert_int_equal(bufs_active(f), 0);
  sl_channel_unref(a);
  finish(f);
}

/* A wait that starts late in a loop iteration (a long callback ran
 * before the write) gets its whole timeout: it counts from the write, not
 * from when the iteration began. */
static void test_write_timeout_counts_from_the_write(void **state) {
  fixture *f = *state;
  sl_channel *b;
  int peer;
  sl_channel *a = open_timed_pair(f, 1.0, &b, &peer);
  sl_channel_ref(a);
  ev_run(f->w->loop, EVRUN_NOWAIT);   /* the loop's time is fresh here */
  usleep(1200000);                    /* a callback that takes longer than the timeout */
  write_p(a, pattern_buf(f->w->pool, 200000, 0), 1);
  sl_pipeline_flush(&a->pipe);
  assert_true(ev_is_active(&a->wtimer));
  ev_run(f->w->loop, EVRUN_NOWAIT);   /* the timer, armed from the old time, fires */
  assert_false(sl_channel_is_closed(a));
  assert_true(ev_is_active(&a->wtimer));   /* again, for the time left */
  assert_int_equal(f->w->stats.write_timeouts, 0);
  sl_channel_unref(a);
  finish(f);
}

#define FIXTURE_TEST(fn) cmocka_unit_test_setup_teardown(fn, fixture_setup, fixture_teardown)

int main(void) {
  const struct CMUnitTest tests[] = {
      FIXTURE_TEST(test_promises_complete_in_queue_order_when_written),
      FIXTURE_TEST(test_promise_of_a_split_write_completes_with_its_last_part),
      FIXTURE_TEST(test_promise_of_a_swallowed_write_follows_what_was_queued),
      FIXTURE_TEST(test_write_to_a_closed_channel_fails_at_once),
      FIXTURE_TEST(test_write_after_output_shutdown_fails_while_earlier_ones_complete),
      FIXTURE_TEST(test_close_fails_every_queued_promise_and_releases),
      FIXTURE_TEST(test_peer_gone_fails_promises_with_reset),
      FIXTURE_TEST(test_reset_seen_while_flushing_a_write_fails_it_with_reset),
      FIXTURE_TEST(test_connect_timeout_fails_queued_promises_with_timeout),
      FIXTURE_TEST(test_a_write_flushed_while_connecting_goes_out_with_the_connect),
      FIXTURE_TEST(test_a_refused_connect_keeps_its_queue_for_the_next_try),
      cmocka_unit_test(test_addresses_format_for_logs),
      FIXTURE_TEST(test_freed_channels_are_reused_up_to_the_bound),
      cmocka_unit_test(test_accepted_sockets_inherit_nodelay_from_the_listener),
      FIXTURE_TEST(test_close_with_names_the_promise_failure),
      FIXTURE_TEST(test_a_completion_may_write_and_flush_inside_a_burst),
      FIXTURE_TEST(test_a_completion_may_close_the_channel_inside_a_burst),
      FIXTURE_TEST(test_outbound_limit_closes_both_sides_and_fails_promises),
      FIXTURE_TEST(test_default_outbound_limit_is_16_mib),
      FIXTURE_TEST(test_a_busy_channel_yields_after_its_spin_count),
      FIXTURE_TEST(test_writability_reaches_stages_on_every_crossing),
      cmocka_unit_test(test_pipe_pool_reuses_empty_pipes_and_keeps_its_bounds),
      FIXTURE_TEST(test_a_splicing_pair_pauses_for_a_full_peer_and_keeps_order),
      FIXTURE_TEST(test_a_clean_close_hands_its_pipe_on_before_the_fin),
      FIXTURE_TEST(test_write_timeout_closes_a_pair_whose_peer_stops_reading),
      FIXTURE_TEST(test_write_timeout_stops_with_the_wait),
      FIXTURE_TEST(test_write_timeout_takes_a_late_loop_for_no_stalled_peer),
      FIXTURE_TEST(test_write_timeout_counts_from_the_write),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
