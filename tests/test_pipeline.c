/*
 * The pipeline with C stages on a real channel: a worker, a socketpair, and
 * the channel wrapped around one end (the test holds the other, "peer").
 * Stages record what they see in one event log ("A.read C.read ..."), so a
 * test asserts the order in which events travelled.
 */
#include "test_util.h"

#include <stdio.h>

#include "alloc/pool.h"
#include "buf/buf.h"
#include "io/channel.h"
#include "io/worker.h"
#include "pipeline/pipeline.h"
#include "util/common.h"
#include "util/log.h"

/* ---- the event log ---- */

static char rec_log[4096];

static void rec_reset(void) { rec_log[0] = '\0'; }

static void rec(const sl_ctx *ctx, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void rec(const sl_ctx *ctx, const char *fmt, ...) {
  size_t len = strlen(rec_log);
  int n = snprintf(rec_log + len, sizeof(rec_log) - len, "%s%s.", len ? " " : "", ctx->name);
  assert_true(n > 0 && (size_t)n < sizeof(rec_log) - len);
  len += (size_t)n;
  va_list ap;
  va_start(ap, fmt);
  n = vsnprintf(rec_log + len, sizeof(rec_log) - len, fmt, ap);
  va_end(ap);
  assert_true(n > 0 && (size_t)n < sizeof(rec_log) - len);
}

/* ---- stages ---- */

/* Records every event and passes it on. */
static void recorder_active(sl_ctx *ctx) { rec(ctx, "active"); sl_ctx_fire_active(ctx); }
static void recorder_inactive(sl_ctx *ctx) { rec(ctx, "inactive"); sl_ctx_fire_inactive(ctx); }
static void recorder_read(sl_ctx *ctx, sl_buf *b) { rec(ctx, "read"); sl_ctx_fire_read(ctx, b); }
static void recorder_read_complete(sl_ctx *ctx) {
  rec(ctx, "read_complete");
  sl_ctx_fire_read_complete(ctx);
}
static void recorder_writability(sl_ctx *ctx, int writable) {
  rec(ctx, "writable=%d", writable);
  sl_ctx_fire_writability(ctx, writable);
}
static void recorder_write(sl_ctx *ctx, sl_buf *b) { rec(ctx, "write"); sl_ctx_write(ctx, b); }
static void recorder_flush(sl_ctx *ctx) { rec(ctx, "flush"); sl_ctx_flush(ctx); }
static void recorder_close(sl_ctx *ctx, const char *reason) {
  rec(ctx, "close(%s)", reason);
  sl_ctx_close(ctx, reason);
}
static void recorder_removed(sl_ctx *ctx) { rec(ctx, "removed"); }
static void recorder_destroy(sl_ctx *ctx) { rec(ctx, "destroy"); }

static const sl_stage_ops recorder_ops = {
    .name = "recorder",
    .destroy = recorder_destroy,
    .on_active = recorder_active,
    .on_inactive = recorder_inactive,
    .on_read = recorder_read,
    .on_read_complete = recorder_read_complete,
    .on_writability = recorder_writability,
    .write = recorder_write,
    .flush = recorder_flush,
    .close = recorder_close,
    .on_removed = recorder_removed,
};

/* Handles nothing: every event passes it by. */
static const sl_stage_ops skip_ops = {.name = "skip"};

/* Records writability changes only. */
static const sl_stage_ops writability_ops = {
    .name = "writability",
    .on_writability = recorder_writability,
};

/* Consumes inbound buffers: keeps them in captured[] for the test. */
static sl_buf *captured[64];
static int ncaptured;

static void sink_read(sl_ctx *ctx, sl_buf *b) {
  rec(ctx, "read");
  assert_true(ncaptured < (int)(sizeof(captured) / sizeof(captured[0])));
  captured[ncaptured++] = b;
}

static const sl_stage_ops sink_ops = {.name = "sink", .on_read = sink_read};

static void release_captured(void) {
  for (int i = 0; i < ncaptured; i++) sl_buf_release(captured[i]);
  ncaptured = 0;
}

/* ---- fixture: a worker, a channel on fds[0], the peer on fds[1] ---- */

typedef struct fixture {
  sl_worker *w;
  sl_channel *ch;  /* NULL once the test closed it */
  int peer;
} fixture;

static int fixture_setup(void **state) {
  fixture *f = calloc(1, sizeof(*f));
  if (f == NULL) return -1;
  f->w = sl_worker_create(0, NULL);
  if (f->w == NULL) return -1;
  f->peer = -1;
  rec_reset();
  ncaptured = 0;
  *state = f;
  return 0;
}

/* Cleans up after a test that failed half way (a passing test has already
 * called finish). */
static int fixture_teardown(void **state) {
  fixture *f = *state;
  release_captured();
  if (f->w != NULL) {
    sl_worker_close_channels(f->w, "teardown");
    sl_worker_destroy(f->w);
  }
  if (f->peer >= 0) close(f->peer);
  free(f);
  return 0;
}

static void open_channel(fixture *f, size_t low, size_t high) {
  int sv[2];
  sl_test_socketpair(sv); /* sv[0] is non-blocking: the channel's end */
  sl_addr addr;
  memset(&addr, 0, sizeof(addr));
  sl_channel_config cfg = {.low_water_mark = low, .high_water_mark = high};
  f->ch = sl_channel_accepted(f->w, sv[0], &addr, &cfg, "test");
  assert_non_null(f->ch);
  f->peer = sv[1];
}

static sl_ctx *add_stage(fixture *f, const sl_stage_ops *ops, const char *name) {
  sl_ctx *ctx = sl_pipeline_add_last(&f->ch->pipe, ops, name);
  assert_non_null(ctx);
  return ctx;
}

/* Closes the channel if the test has not, then checks nothing leaked. */
static void finish(fixture *f) {
  if (f->ch != NULL) {
    sl_channel_close(f->ch, "test done", 0);
    f->ch = NULL;
  }
  SL_TEST_ASSERT_POOL_CLEAN(f->w->pool);
  assert_int_equal(f->w->nchannels, 0);
  sl_worker *w = f->w;
  f->w = NULL;
  assert_int_equal(sl_worker_destroy(w), 0);
}

static sl_buf *buf_of(fixture *f, const char *s) {
  sl_buf *b = sl_buf_from(f->w->pool, s, strlen(s));
  assert_non_null(b);
  return b;
}

static uint64_t bufs_active(const fixture *f) { return sl_test_stats(f->w->pool).bufs_active; }

/* ---- event order ---- */

static void test_inbound_events_travel_head_to_tail(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  add_stage(f, &recorder_ops, "A");
  add_stage(f, &skip_ops, "B");
  add_stage(f, &recorder_ops, "C");
  add_stage(f, &sink_ops, "D");
  assert_int_equal(f->ch->pipe.nstages, 4);

  sl_channel_activate(f->ch);
  assert_string_equal(rec_log, "A.active C.active");

  rec_reset();
  sl_buf *b = buf_of(f, "ping");
  sl_pipeline_fire_read(&f->ch->pipe, b);
  assert_string_equal(rec_log, "A.read C.read D.read");
  assert_int_equal(ncaptured, 1);
  assert_ptr_equal(captured[0], b); /* the same buffer, ownership passed on */
  assert_memory_equal(sl_buf_rptr(captured[0]), "ping", 4);
  assert_int_equal(f->w->stats.unhandled_inbound, 0);

  rec_reset();
  sl_pipeline_fire_read_complete(&f->ch->pipe);
  assert_string_equal(rec_log, "A.read_complete C.read_complete");

  release_captured();
  finish(f);
}

static void test_outbound_operations_travel_tail_to_head(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  add_stage(f, &recorder_ops, "A");
  add_stage(f, &skip_ops, "B");
  sl_ctx *c = add_stage(f, &recorder_ops, "C");
  sl_channel_activate(f->ch);

  rec_reset();
  sl_pipeline_write(&f->ch->pipe, buf_of(f, "pong"));
  assert_string_equal(rec_log, "C.write A.write");
  /* From a context, the write starts at the stage before it. */
  rec_reset();
  sl_ctx_write(c, buf_of(f, "!"));
  assert_string_equal(rec_log, "A.write");

  rec_reset();
  sl_pipeline_flush(&f->ch->pipe);
  assert_string_equal(rec_log, "C.flush A.flush");
  uint8_t got[5];
  sl_test_read_exact(f->peer, got, sizeof(got));
  assert_memory_equal(got, "pong!", 5);
  finish(f);
}

/* ---- the tail and the head ---- */

static void test_tail_releases_unhandled_inbound(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  add_stage(f, &recorder_ops, "A");
  sl_channel_activate(f->ch);
  rec_reset();

  for (int i = 0; i < 3; i++) sl_pipeline_fire_read(&f->ch->pipe, buf_of(f, "unwanted"));
  assert_string_equal(rec_log, "A.read A.read A.read");
  assert_int_equal(f->w->stats.unhandled_inbound, 3);
  assert_int_equal(bufs_active(f), 0); /* released at the tail, at once */
  finish(f);
}

static void test_write_is_queued_and_sent_after_flush(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  add_stage(f, &recorder_ops, "A");
  sl_channel_activate(f->ch);

  enum { N = 8, LEN = 4000 };
  for (size_t i = 0; i < N; i++) {
    sl_buf *b = sl_buf_alloc(f->w->pool, LEN, 0);
    assert_non_null(b);
    sl_test_fill_pattern(b->data, LEN, i * LEN);
    b->wr = LEN;
    sl_pipeline_write(&f->ch->pipe, b);
  }
  /* Queued at the head, not yet on the wire. */
  assert_int_equal(f->ch->outq.count, N);
  assert_int_equal(f->ch->outq.pending, N * (LEN + SL_OUTQ_ENTRY_OVERHEAD));
  assert_int_equal(bufs_active(f), N);
  sl_test_assert_nothing_to_read(f->peer);

  sl_pipeline_flush(&f->ch->pipe);
  static uint8_t got[N * LEN];
  sl_test_read_exact(f->peer, got, sizeof(got));
  assert_int_equal(sl_test_pattern_mismatch(got, sizeof(got), 0), sizeof(got));
  assert_true(sl_outq_is_empty(&f->ch->outq));
  assert_int_equal(f->ch->bytes_out, N * LEN);
  assert_int_equal(f->w->stats.bytes_out, N * LEN);
  assert_int_equal(bufs_active(f), 0);
  finish(f);
}

static void test_write_to_closed_channel_releases_at_once(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  add_stage(f, &recorder_ops, "A");
  sl_channel_activate(f->ch);
  sl_channel *ch = f->ch;
  sl_channel_ref(ch); /* keep the struct readable across the close */
  sl_channel_close(ch, "closed by the test", 0);
  f->ch = NULL;
  assert_true(sl_channel_is_closed(ch));

  rec_reset();
  sl_pipeline_write(&ch->pipe, buf_of(f, "too late"));
  assert_string_equal(rec_log, "A.write");
  assert_int_equal(bufs_active(f), 0);
  assert_true(sl_outq_is_empty(&ch->outq));

  assert_int_equal(sl_channel_write(ch, buf_of(f, "too late")), SL_ERROR);
  assert_int_equal(bufs_active(f), 0);

  sl_channel_unref(ch);
  finish(f);
}

/* ---- close ---- */

static void test_close_releases_queue_and_fires_inactive_then_removed(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  add_stage(f, &recorder_ops, "A");
  add_stage(f, &recorder_ops, "B");
  sl_channel_activate(f->ch);
  for (int i = 0; i < 3; i++) sl_pipeline_write(&f->ch->pipe, buf_of(f, "unsent"));
  assert_int_equal(bufs_active(f), 3);

  rec_reset();
  sl_channel_close(f->ch, "bye", 0);
  f->ch = NULL;
  assert_string_equal(rec_log,
                      "A.inactive B.inactive A.removed B.removed A.destroy B.destroy");
  assert_int_equal(bufs_active(f), 0);
  assert_int_equal(f->w->nchannels, 0);
  assert_int_equal(f->w->stats.channels_closed, 1);

  /* The peer sees the end of the stream and none of the unsent bytes. */
  uint8_t c;
  assert_int_equal(recv(f->peer, &c, 1, MSG_DONTWAIT), 0);
  finish(f);
}

static void test_close_twice_fires_inactive_once(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  add_stage(f, &recorder_ops, "A");
  sl_channel_activate(f->ch);
  sl_channel *ch = f->ch;
  sl_channel_ref(ch); /* keep the struct readable across the close */
  f->ch = NULL;
  sl_pipeline_write(&ch->pipe, buf_of(f, "sent"));
  sl_pipeline_flush(&ch->pipe);
  sl_pipeline_write(&ch->pipe, buf_of(f, "unflushed"));
  sl_pipeline_write(&ch->pipe, buf_of(f, "unflushed"));
  assert_int_equal(bufs_active(f), 2);

  rec_reset();
  sl_channel_close(ch, "first", 0);
  /* The queue is released by the close itself, not when the struct goes. */
  assert_int_equal(bufs_active(f), 0);
  assert_true(sl_outq_is_empty(&ch->outq));
  sl_channel_close(ch, "second", 1);
  assert_string_equal(rec_log, "A.inactive A.removed");
  assert_string_equal(ch->reason, "first");
  assert_int_equal(f->w->stats.channels_closed, 1);
  sl_channel_unref(ch);
  assert_string_equal(rec_log, "A.inactive A.removed A.destroy");

  /* What was flushed went out; the rest was dropped. */
  uint8_t got[16];
  sl_test_read_exact(f->peer, got, 4);
  assert_memory_equal(got, "sent", 4);
  assert_int_equal(recv(f->peer, got, sizeof(got), MSG_DONTWAIT), 0);
  finish(f);
}

static void test_pipeline_close_travels_tail_to_head(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  add_stage(f, &recorder_ops, "A");
  add_stage(f, &recorder_ops, "B");
  sl_channel_activate(f->ch);
  sl_pipeline_write(&f->ch->pipe, buf_of(f, "unsent"));

  rec_reset();
  sl_pipeline_close(&f->ch->pipe, "done");
  f->ch = NULL;
  assert_string_equal(rec_log,
                      "B.close(done) A.close(done) A.inactive B.inactive "
                      "A.removed B.removed A.destroy B.destroy");
  assert_int_equal(bufs_active(f), 0);
  finish(f);
}

/* ---- writability ---- */

static void test_writability_reaches_stages_both_ways(void **state) {
  fixture *f = *state;
  enum { N = 64, LEN = 4096 };
  const size_t low = 8192, high = 32768;
  open_channel(f, low, high);
  sl_test_small_buffers(f->ch->fd, f->peer, 4096);
  add_stage(f, &writability_ops, "W");
  sl_channel_activate(f->ch);
  rec_reset();

  /* The peer does not read: the queue grows past high. */
  for (size_t i = 0; i < N; i++) {
    sl_buf *b = sl_buf_alloc(f->w->pool, LEN, 0);
    assert_non_null(b);
    sl_test_fill_pattern(b->data, LEN, i * LEN);
    b->wr = LEN;
    sl_pipeline_write(&f->ch->pipe, b);
  }
  sl_pipeline_flush(&f->ch->pipe);
  assert_string_equal(rec_log, "W.writable=0");
  assert_false(sl_channel_is_writable(f->ch));
  assert_false(sl_outq_is_empty(&f->ch->outq)); /* the socket is full */

  /* Drain from the peer and let the loop write the rest. */
  static uint8_t got[N * LEN];
  size_t received = 0;
  for (int i = 0; i < 100000 && received < sizeof(got); i++) {
    received += sl_test_read_available(f->peer, got + received, sizeof(got) - received);
    ev_run(f->w->loop, EVRUN_NOWAIT);
  }
  assert_int_equal(received, sizeof(got));
  assert_int_equal(sl_test_pattern_mismatch(got, sizeof(got), 0), sizeof(got));
  assert_string_equal(rec_log, "W.writable=0 W.writable=1");
  assert_true(sl_channel_is_writable(f->ch));
  assert_true(sl_outq_is_empty(&f->ch->outq));
  assert_int_equal(bufs_active(f), 0);
  finish(f);
}

/* ---- adaptive receive sizes ---- */

/* The sizes a shrinking channel steps through, from the initial size down
 * to the minimum (Netty's table: powers of two, then steps of 16). */
static size_t shrink_steps(size_t *out, size_t room) {
  size_t n = 0;
  out[n++] = 2048;
  out[n++] = 1024;
  out[n++] = 512;
  for (size_t s = 496; s >= SL_RECV_MIN; s -= 16) {
    assert_true(n < room);
    out[n++] = s;
  }
  return n;
}

static void test_recv_size_starts_at_initial(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  assert_int_equal(SL_RECV_INITIAL, 2048);
  assert_int_equal(sl_channel_recv_size(f->ch), SL_RECV_INITIAL);
  finish(f);
}

static void test_recv_size_grows_fast_up_to_max(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  sl_channel_recv_record(f->ch, 2048); /* a full read: four steps up */
  assert_int_equal(sl_channel_recv_size(f->ch), 32768);
  sl_channel_recv_record(f->ch, 32768);
  assert_int_equal(sl_channel_recv_size(f->ch), SL_RECV_MAX);
  for (int i = 0; i < 10; i++) {
    sl_channel_recv_record(f->ch, sl_channel_recv_size(f->ch));
    assert_int_equal(sl_channel_recv_size(f->ch), SL_RECV_MAX);
  }
  sl_channel_recv_reset(f->ch);
  assert_int_equal(sl_channel_recv_size(f->ch), SL_RECV_INITIAL);
  finish(f);
}

static void test_recv_size_shrinks_one_step_per_two_small_reads(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  size_t steps[64];
  size_t nsteps = shrink_steps(steps, 64);
  assert_int_equal(steps[nsteps - 1], SL_RECV_MIN);

  for (size_t i = 0; i + 1 < nsteps; i++) {
    size_t small = steps[i + 1]; /* as small as the next step: small */
    sl_channel_recv_record(f->ch, small);
    assert_int_equal(sl_channel_recv_size(f->ch), steps[i]); /* one is not enough */
    sl_channel_recv_record(f->ch, small);
    assert_int_equal(sl_channel_recv_size(f->ch), steps[i + 1]); /* one step */
  }
  /* Never below the minimum. */
  for (int i = 0; i < 10; i++) {
    sl_channel_recv_record(f->ch, 0);
    assert_int_equal(sl_channel_recv_size(f->ch), SL_RECV_MIN);
  }
  finish(f);
}

static void test_recv_size_medium_reads_keep_size(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  /* Above the next step down and below a full read: no change. */
  for (int i = 0; i < 5; i++) {
    sl_channel_recv_record(f->ch, 1025);
    assert_int_equal(sl_channel_recv_size(f->ch), 2048);
    sl_channel_recv_record(f->ch, 2047);
    assert_int_equal(sl_channel_recv_size(f->ch), 2048);
  }
  finish(f);
}

static void test_recv_size_growth_and_reset_disarm_shrinking(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  sl_channel_recv_record(f->ch, 10);   /* small: armed */
  sl_channel_recv_record(f->ch, 2048); /* full: grows, disarms */
  assert_int_equal(sl_channel_recv_size(f->ch), 32768);
  sl_channel_recv_record(f->ch, 10);
  assert_int_equal(sl_channel_recv_size(f->ch), 32768);
  sl_channel_recv_record(f->ch, 10);
  assert_int_equal(sl_channel_recv_size(f->ch), 16384);

  sl_channel_recv_record(f->ch, 10); /* armed again */
  sl_channel_recv_reset(f->ch);
  assert_int_equal(sl_channel_recv_size(f->ch), 2048);
  sl_channel_recv_record(f->ch, 10); /* the first small read after reset */
  assert_int_equal(sl_channel_recv_size(f->ch), 2048);
  finish(f);
}

static void test_socket_reads_use_adaptive_sizes(void **state) {
  fixture *f = *state;
  open_channel(f, 1 << 16, 1 << 17);
  add_stage(f, &recorder_ops, "A");
  add_stage(f, &sink_ops, "S");
  sl_channel_activate(f->ch);
  rec_reset();

  /* 5000 bytes: a full 2048-byte read, then a larger buffer for the rest. */
  uint8_t data[5000];
  sl_test_fill_pattern(data, sizeof(data), 0);
  assert_int_equal(send(f->peer, data, sizeof(data), 0), (ssize_t)sizeof(data));
  for (int i = 0; i < 1000 && ncaptured < 2; i++) ev_run(f->w->loop, EVRUN_NOWAIT);
  assert_string_equal(rec_log, "A.read S.read A.read S.read A.read_complete");
  assert_int_equal(ncaptured, 2);
  assert_int_equal(sl_buf_readable(captured[0]), 2048);
  assert_int_equal(sl_buf_readable(captured[1]), 5000 - 2048);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(captured[0]), 2048, 0), 2048);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(captured[1]), 2952, 2048), 2952);
  assert_ptr_equal(captured[0]->owner, &f->ch->owned); /* the channel answers for it */
  assert_int_equal(f->ch->owned.count, 2);
  assert_int_equal(f->ch->bytes_in, 5000);
  assert_int_equal(sl_channel_recv_size(f->ch), 32768);
  release_captured();

  /* Small reads: the second shrinks one step. */
  for (int k = 0; k < 2; k++) {
    assert_int_equal(send(f->peer, "x", 1, 0), 1);
    int before = ncaptured;
    for (int i = 0; i < 1000 && ncaptured == before; i++) ev_run(f->w->loop, EVRUN_NOWAIT);
    assert_int_equal(ncaptured, before + 1);
  }
  assert_int_equal(sl_channel_recv_size(f->ch), 16384);
  release_captured();
  finish(f);
}

#define FIXTURE_TEST(fn) cmocka_unit_test_setup_teardown(fn, fixture_setup, fixture_teardown)

int main(void) {
  sl_log_set_level(SL_LOG_WARN);
  const struct CMUnitTest tests[] = {
      FIXTURE_TEST(test_inbound_events_travel_head_to_tail),
      FIXTURE_TEST(test_outbound_operations_travel_tail_to_head),
      FIXTURE_TEST(test_tail_releases_unhandled_inbound),
      FIXTURE_TEST(test_write_is_queued_and_sent_after_flush),
      FIXTURE_TEST(test_write_to_closed_channel_releases_at_once),
      FIXTURE_TEST(test_close_releases_queue_and_fires_inactive_then_removed),
      FIXTURE_TEST(test_close_twice_fires_inactive_once),
      FIXTURE_TEST(test_pipeline_close_travels_tail_to_head),
      FIXTURE_TEST(test_writability_reaches_stages_both_ways),
      FIXTURE_TEST(test_recv_size_starts_at_initial),
      FIXTURE_TEST(test_recv_size_grows_fast_up_to_max),
      FIXTURE_TEST(test_recv_size_shrinks_one_step_per_two_small_reads),
      FIXTURE_TEST(test_recv_size_medium_reads_keep_size),
      FIXTURE_TEST(test_recv_size_growth_and_reset_disarm_shrinking),
      FIXTURE_TEST(test_socket_reads_use_adaptive_sizes),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
