/*
 * sl_outq, the outbound queue, against real AF_UNIX stream sockets: write
 * versus flush, gathering, partial writes, water marks, release on close,
 * write errors, the write budget, the spin count, adaptive gathering and
 * promises. The queue writes to fds[0]
 * (non-blocking); the test reads what arrived from fds[1].
 */
#include "test_util.h"

#include "alloc/pool.h"
#include "buf/buf.h"
#include "io/outq.h"
#include "util/common.h"

typedef struct fixture {
  sl_pool *pool;
  int fds[2];
} fixture;

static int fixture_setup(void **state) {
  fixture *f = calloc(1, sizeof(*f));
  if (f == NULL) return -1;
  f->pool = sl_pool_create(NULL, 0);
  if (f->pool == NULL || socketpair(AF_UNIX, SOCK_STREAM, 0, f->fds) != 0) return -1;
  int fl = fcntl(f->fds[0], F_GETFL);
  if (fl < 0 || fcntl(f->fds[0], F_SETFL, fl | O_NONBLOCK) != 0) return -1;
  *state = f;
  return 0;
}

static int fixture_teardown(void **state) {
  fixture *f = *state;
  if (f->fds[0] >= 0) close(f->fds[0]);
  if (f->fds[1] >= 0) close(f->fds[1]);
  sl_pool_destroy(f->pool);
  free(f);
  return 0;
}

#define pattern_buf sl_test_pattern_buf

/* Queues one pattern buffer per size, continuing the stream at *offset. */
static void add_pattern(sl_outq *q, sl_pool *pool, const size_t *sizes, size_t n,
                        size_t *offset) {
  for (size_t i = 0; i < n; i++) {
    assert_int_equal(sl_outq_add(q, pattern_buf(pool, sizes[i], *offset), 0), SL_OK);
    *offset += sizes[i];
  }
}

/* Reads exactly n bytes from fd and checks they continue the pattern. */
static void expect_pattern(int fd, size_t n, size_t offset) {
  uint8_t *got = malloc(n ? n : 1);
  assert_non_null(got);
  sl_test_read_exact(fd, got, n);
  size_t bad = sl_test_pattern_mismatch(got, n, offset);
  free(got);
  if (bad != n) fail_msg("byte %zu of the stream differs", offset + bad);
}

static uint64_t bufs_active(const sl_pool *pool) { return sl_test_stats(pool).bufs_active; }

/* Records every writability change with the pending value it saw. */
typedef struct wm_log {
  const sl_outq *q;
  int n;
  int writable[64];
  size_t pending[64];
} wm_log;

static void wm_record(void *ud, int writable) {
  wm_log *l = ud;
  assert_true(l->n < 64);
  l->writable[l->n] = writable;
  l->pending[l->n] = l->q->pending;
  l->n++;
}

/* ---- write versus flush ---- */

static void test_write_sends_only_flushed_entries(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1 << 20, 2 << 20, NULL, NULL);
  size_t n = 99, off = 0;
  const size_t first[] = {100, 200};
  add_pattern(&q, f->pool, first, 2, &off);
  assert_int_equal(q.count, 2);
  assert_int_equal(q.pending, 300 + 2 * SL_OUTQ_ENTRY_OVERHEAD);
  assert_false(sl_outq_has_flushed(&q));

  /* Written but not flushed: nothing goes out. */
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(n, 0);
  sl_test_assert_nothing_to_read(f->fds[1]);
  assert_int_equal(q.count, 2);
  assert_int_equal(bufs_active(f->pool), 2);

  /* Flushed: out in order. An entry added after the flush stays. */
  sl_outq_flush(&q);
  assert_true(sl_outq_has_flushed(&q));
  const size_t later[] = {50};
  add_pattern(&q, f->pool, later, 1, &off);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(n, 300);
  expect_pattern(f->fds[1], 300, 0);
  sl_test_assert_nothing_to_read(f->fds[1]);
  assert_int_equal(q.count, 1);
  assert_int_equal(q.nflushed, 0);
  assert_int_equal(q.pending, 50 + SL_OUTQ_ENTRY_OVERHEAD);
  assert_int_equal(bufs_active(f->pool), 1);

  sl_outq_flush(&q);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(n, 50);
  expect_pattern(f->fds[1], 50, 300);
  assert_true(sl_outq_is_empty(&q));
  assert_int_equal(q.pending, 0);

  sl_outq_destroy(&q);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
}

/* ---- gathering ---- */

static void test_many_small_buffers_arrive_in_order(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1 << 20, 2 << 20, NULL, NULL);
  /* More entries than one sendmsg gathers, with empty ones in between. */
  enum { N = 3000 };
  size_t off = 0, expected_pending = 0;
  for (size_t i = 0; i < N; i++) {
    sl_buf *b;
    if (i % 100 == 7) {
      b = sl_buf_alloc(f->pool, 16, 0); /* nothing readable */
      assert_non_null(b);
    } else {
      size_t len = 1 + (i * 13) % 16;
      b = pattern_buf(f->pool, len, off);
      off += len;
    }
    expected_pending += sl_buf_readable(b) + SL_OUTQ_ENTRY_OVERHEAD;
    assert_int_equal(sl_outq_add(&q, b, 0), SL_OK);
  }
  assert_true(N > SL_OUTQ_MAX_IOV);
  assert_int_equal(q.count, N);
  assert_int_equal(q.pending, expected_pending);
  sl_outq_flush(&q);

  size_t n = 0;
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(n, off);
  assert_true(sl_outq_is_empty(&q));
  assert_int_equal(q.pending, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  expect_pattern(f->fds[1], off, 0);
  sl_test_assert_nothing_to_read(f->fds[1]);
  sl_outq_destroy(&q);
}

static void test_only_empty_entries_are_released(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1000, 2000, NULL, NULL);
  for (int i = 0; i < 3; i++) {
    sl_buf *b = sl_buf_alloc(f->pool, 8, 0);
    assert_non_null(b);
    assert_int_equal(sl_outq_add(&q, b, 0), SL_OK);
  }
  sl_outq_flush(&q);
  size_t n = 99;
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(n, 0);
  assert_true(sl_outq_is_empty(&q));
  assert_int_equal(q.pending, 0);
  sl_test_assert_nothing_to_read(f->fds[1]);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_slices_of_one_buffer_release_it_when_all_written(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1 << 20, 2 << 20, NULL, NULL);
  const char *err = NULL;
  sl_buf *root = pattern_buf(f->pool, 4096, 0);
  const size_t cuts[][2] = {{0, 1000}, {1000, 2000}, {3000, 1096}};
  for (size_t i = 0; i < 3; i++) {
    sl_buf *v = sl_buf_slice(root, cuts[i][0], cuts[i][1], &err);
    assert_non_null(v);
    sl_buf_retain(v); /* the queue's reference */
    assert_int_equal(sl_outq_add(&q, v, 0), SL_OK);
  }
  assert_int_equal(sl_buf_release(root), 0); /* ours */
  assert_int_equal(sl_buf_refcnt(root), 3);
  sl_outq_flush(&q);

  size_t n = 0;
  assert_int_equal(sl_outq_write(&q, f->fds[0], 1000, &n), SL_DONE);
  assert_int_equal(n, 1000);
  assert_int_equal(sl_buf_refcnt(root), 2); /* the first slice went */
  assert_int_equal(sl_test_stats(f->pool).blocks_in_use, 1);

  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(n, 3096);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  expect_pattern(f->fds[1], 4096, 0);
  sl_outq_destroy(&q);
}

static void test_ring_growth_with_wrapped_head_keeps_order(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1 << 20, 2 << 20, NULL, NULL);
  size_t off = 0, n = 0;
  const size_t six[] = {10, 20, 30, 40, 50, 60};
  add_pattern(&q, f->pool, six, 6, &off);
  sl_outq_flush(&q);
  /* Write the first four entries (100 bytes): the head moves to slot 4. */
  assert_int_equal(sl_outq_write(&q, f->fds[0], 100, &n), SL_DONE);
  assert_int_equal(n, 100);
  assert_int_equal(q.count, 2);
  assert_int_equal(q.nflushed, 2);

  /* Twenty more: the ring wraps, then grows twice. */
  size_t more[20];
  for (size_t i = 0; i < 20; i++) more[i] = 5 + i;
  add_pattern(&q, f->pool, more, 20, &off);
  assert_int_equal(q.count, 22);
  assert_int_equal(q.nflushed, 2);
  assert_true(q.mask + 1 >= 22);
  sl_outq_flush(&q);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(n, off - 100);
  expect_pattern(f->fds[1], off, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

/* ---- partial writes ---- */

/* Checks the queue against the stream after `written` bytes went out:
 * which entry is first, how far it was read, pending, live buffers.
 * Returns the first entry's reader index. */
static uint32_t check_after_written(const sl_outq *q, const sl_pool *pool, const size_t *sizes,
                                    size_t nsizes, size_t total, size_t written) {
  size_t first = 0, skipped = 0;
  while (first < nsizes && skipped + sizes[first] <= written) skipped += sizes[first++];
  size_t left = nsizes - first;
  assert_int_equal(q->count, left);
  assert_int_equal(q->nflushed, left);
  assert_int_equal(q->pending, (total - written) + left * SL_OUTQ_ENTRY_OVERHEAD);
  assert_int_equal(bufs_active(pool), left); /* each buffer went as it was written */
  if (left == 0) return 0;
  const sl_buf *b = q->ring[q->head].buf;
  assert_int_equal(b->rd, written - skipped);
  assert_int_equal(sl_buf_readable(b), sizes[first] - (written - skipped));
  return b->rd;
}

static void test_partial_writes_resume_where_the_socket_stopped(void **state) {
  fixture *f = *state;
  sl_test_small_buffers(f->fds[0], f->fds[1], 4096);
  sl_outq q;
  sl_outq_init(&q, 1 << 30, 2u << 30, NULL, NULL);

  /* 1 MiB in buffers of varying sizes, small ones first. */
  const size_t total = 1 << 20;
  size_t sizes[1024], nsizes = 0, off = 0;
  while (off < total) {
    size_t len = 1 + (nsizes * 7919) % (nsizes < 40 ? 1500 : 40000);
    if (len > total - off) len = total - off;
    sizes[nsizes++] = len;
    add_pattern(&q, f->pool, &sizes[nsizes - 1], 1, &off);
  }
  assert_int_equal(off, total);
  sl_outq_flush(&q);

  size_t written = 0, n = 0;
  int rc = sl_outq_write(&q, f->fds[0], SIZE_MAX, &n);
  assert_int_equal(rc, SL_AGAIN); /* 1 MiB cannot fit in the socket */
  written += n;
  assert_true(written > 0 && written < total);
  check_after_written(&q, f->pool, sizes, nsizes, total, written);
  assert_true(bufs_active(f->pool) < nsizes);

  uint8_t *got = malloc(total);
  assert_non_null(got);
  size_t received = 0;
  int partial_entries = 0, rounds = 0;
  while (rc != SL_OK) {
    assert_true(++rounds < 1000000);
    received += sl_test_read_available(f->fds[1], got + received, total - received);
    rc = sl_outq_write(&q, f->fds[0], SIZE_MAX, &n);
    assert_true(rc == SL_OK || rc == SL_AGAIN || rc == SL_DONE);
    written += n;
    if (check_after_written(&q, f->pool, sizes, nsizes, total, written) > 0) partial_entries++;
  }
  assert_int_equal(written, total);
  /* The socket stopped inside an entry at least once. */
  assert_true(partial_entries > 0);
  sl_test_read_exact(f->fds[1], got + received, total - received);
  assert_int_equal(sl_test_pattern_mismatch(got, total, 0), total);
  free(got);
  sl_test_assert_nothing_to_read(f->fds[1]);
  assert_true(sl_outq_is_empty(&q));
  assert_int_equal(q.pending, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

/* ---- water marks ---- */

static void test_water_marks_fire_once_each_way(void **state) {
  fixture *f = *state;
  sl_outq q;
  wm_log log = {.q = &q};
  sl_outq_init(&q, 1000, 2000, wm_record, &log);
  const size_t e = 500 + SL_OUTQ_ENTRY_OVERHEAD; /* 596 per entry */
  size_t off = 0, n = 0;
  const size_t one[] = {500};

  for (int i = 0; i < 3; i++) add_pattern(&q, f->pool, one, 1, &off);
  assert_int_equal(q.pending, 3 * e); /* 1788: not above 2000 */
  assert_int_equal(log.n, 0);
  assert_int_equal(q.writable, 1);

  add_pattern(&q, f->pool, one, 1, &off); /* 2384 > 2000 */
  assert_int_equal(log.n, 1);
  assert_int_equal(log.writable[0], 0);
  assert_int_equal(log.pending[0], 4 * e);
  assert_int_equal(q.writable, 0);

  /* Still above: no further calls. */
  for (int i = 0; i < 3; i++) add_pattern(&q, f->pool, one, 1, &off);
  assert_int_equal(q.pending, 7 * e);
  assert_int_equal(log.n, 1);

  /* Written down to between the marks (1192): still unwritable, no call. */
  sl_outq_flush(&q);
  assert_int_equal(sl_outq_write(&q, f->fds[0], 5 * 500, &n), SL_DONE);
  assert_int_equal(q.pending, 2 * e);
  assert_int_equal(log.n, 1);
  assert_int_equal(q.writable, 0);

  /* Below low: exactly one writable=1, when the next entry goes (596). */
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(log.n, 2);
  assert_int_equal(log.writable[1], 1);
  assert_int_equal(log.pending[1], e);
  assert_int_equal(q.writable, 1);
  assert_int_equal(q.pending, 0);

  expect_pattern(f->fds[1], 7 * 500, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_water_marks_are_strict(void **state) {
  fixture *f = *state;
  sl_outq q;
  wm_log log = {.q = &q};
  sl_outq_init(&q, 1000, 2000, wm_record, &log);
  size_t off = 0, n = 0;

  /* Exactly at high is not above it. */
  const size_t at_high[] = {2000 - SL_OUTQ_ENTRY_OVERHEAD};
  add_pattern(&q, f->pool, at_high, 1, &off);
  assert_int_equal(q.pending, 2000);
  assert_int_equal(log.n, 0);
  const size_t one_byte[] = {1};
  add_pattern(&q, f->pool, one_byte, 1, &off);
  assert_int_equal(log.n, 1);
  assert_int_equal(log.pending[0], 2000 + 1 + SL_OUTQ_ENTRY_OVERHEAD);

  /* Exactly at low is not below it; one byte more is. */
  sl_outq_flush(&q);
  size_t to_low = q.pending - 1000;
  assert_int_equal(sl_outq_write(&q, f->fds[0], to_low, &n), SL_DONE);
  assert_int_equal(n, to_low);
  assert_int_equal(q.pending, 1000);
  assert_int_equal(log.n, 1);
  assert_int_equal(sl_outq_write(&q, f->fds[0], 1, &n), SL_DONE);
  assert_int_equal(q.pending, 999);
  assert_int_equal(log.n, 2);
  assert_int_equal(log.writable[1], 1);
  assert_int_equal(log.pending[1], 999);

  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(log.n, 2);
  expect_pattern(f->fds[1], off, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

/* ---- release on close ---- */

static void test_release_all_releases_flushed_and_unflushed(void **state) {
  fixture *f = *state;
  sl_outq q;
  wm_log log = {.q = &q};
  sl_outq_init(&q, 1000, 2000, wm_record, &log);
  size_t off = 0;
  const size_t sizes[] = {700, 800, 900, 1000, 1100};
  add_pattern(&q, f->pool, sizes, 3, &off);
  sl_outq_flush(&q);
  add_pattern(&q, f->pool, sizes + 3, 2, &off);
  assert_int_equal(bufs_active(f->pool), 5);
  assert_int_equal(log.n, 1); /* went unwritable on the way */

  assert_int_equal(sl_outq_release_all(&q, "closed"), 5);
  assert_int_equal(q.count, 0);
  assert_int_equal(q.nflushed, 0);
  assert_int_equal(q.pending, 0);
  assert_int_equal(q.writable, 1);
  assert_int_equal(log.n, 1); /* no writability event on close */
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  assert_int_equal(sl_outq_release_all(&q, "closed"), 0);

  /* The queue is still usable afterwards. */
  add_pattern(&q, f->pool, sizes, 1, &off);
  sl_outq_flush(&q);
  size_t n = 0;
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  expect_pattern(f->fds[1], 700, off - 700);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_destroy_releases_entries(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1000, 2000, NULL, NULL);
  size_t off = 0;
  const size_t sizes[] = {10, 20, 30, 40, 50, 60, 70, 80, 90};
  add_pattern(&q, f->pool, sizes, 4, &off);
  sl_outq_flush(&q);
  add_pattern(&q, f->pool, sizes + 4, 5, &off);
  assert_int_equal(bufs_active(f->pool), 9);
  sl_outq_destroy(&q);
  assert_null(q.ring);
  assert_int_equal(q.count, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
}

/* ---- write errors ---- */

static void test_write_to_closed_peer_fails_with_epipe(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1000, 2000, NULL, NULL);
  close(f->fds[1]);
  f->fds[1] = -1;
  size_t off = 0, n = 99;
  const size_t sizes[] = {100, 200};
  add_pattern(&q, f->pool, sizes, 2, &off);
  sl_outq_flush(&q);
  size_t pending = q.pending;

  /* MSG_NOSIGNAL: an error code, not a SIGPIPE that kills the test. */
  errno = 0;
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_ERROR);
  assert_int_equal(errno, EPIPE);
  assert_int_equal(n, 0);
  assert_int_equal(q.count, 2);
  assert_int_equal(q.nflushed, 2);
  assert_int_equal(q.pending, pending);
  assert_int_equal(q.ring[q.head].buf->rd, 0);
  assert_int_equal(bufs_active(f->pool), 2);

  assert_int_equal(sl_outq_release_all(&q, "closed"), 2);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

/* ---- budget ---- */

static void test_budget_limits_bytes_per_call(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1 << 20, 2 << 20, NULL, NULL);
  size_t off = 0, n = 99;
  const size_t sizes[] = {1000, 1000, 1000};
  add_pattern(&q, f->pool, sizes, 3, &off);
  sl_outq_flush(&q);

  /* A zero budget writes nothing (SL_DONE: spent, the socket not full). */
  assert_int_equal(sl_outq_write(&q, f->fds[0], 0, &n), SL_DONE);
  assert_int_equal(n, 0);
  sl_test_assert_nothing_to_read(f->fds[1]);

  /* The budget is exact: the last piece is cut inside an entry. */
  assert_int_equal(sl_outq_write(&q, f->fds[0], 1500, &n), SL_DONE);
  assert_int_equal(n, 1500);
  assert_int_equal(q.count, 2);
  assert_int_equal(q.ring[q.head].buf->rd, 500);
  assert_int_equal(q.pending, 1500 + 2 * SL_OUTQ_ENTRY_OVERHEAD);
  assert_int_equal(bufs_active(f->pool), 2);
  expect_pattern(f->fds[1], 1500, 0);
  sl_test_assert_nothing_to_read(f->fds[1]);

  /* A budget equal to what is left finishes the queue: SL_OK. */
  assert_int_equal(sl_outq_write(&q, f->fds[0], 1500, &n), SL_OK);
  assert_int_equal(n, 1500);
  expect_pattern(f->fds[1], 1500, 1500);
  assert_true(sl_outq_is_empty(&q));
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

/* ---- entry overhead ---- */

static void test_entry_overhead_is_the_size_of_an_entry(void **state) {
  (void)state;
  /* Ring slot, buffer header, owner links: what one more entry costs. */
  assert_int_equal(sizeof(sl_outq_entry), 16);
  assert_int_equal(sizeof(sl_buf), 64);
  assert_int_equal(SL_OUTQ_ENTRY_OVERHEAD, 88);
}

/* ---- every crossing of the water marks ---- */

static void test_water_marks_fire_on_every_crossing(void **state) {
  fixture *f = *state;
  sl_outq q;
  wm_log log = {.q = &q};
  sl_outq_init(&q, 1000, 2000, wm_record, &log);
  const size_t one[] = {300};
  const size_t e = 300 + SL_OUTQ_ENTRY_OVERHEAD; /* 388 */
  size_t off = 0, n = 0, sent = 0;
  enum { CYCLES = 10 };
  for (int c = 0; c < CYCLES; c++) {
    /* Up: 6 entries (2328) cross high once, on the 6th; 2 more add nothing. */
    for (int i = 0; i < 8; i++) {
      add_pattern(&q, f->pool, one, 1, &off);
      assert_int_equal(log.n, 2 * c + (i >= 5 ? 1 : 0));
    }
    assert_int_equal(log.writable[2 * c], 0);
    assert_int_equal(log.pending[2 * c], 6 * e);
    /* Down, one entry at a time: below 1000 once, when 2 are left (776). */
    sl_outq_flush(&q);
    for (int i = 0; i < 8; i++) {
      assert_int_equal(sl_outq_write(&q, f->fds[0], 300, &n), i < 7 ? SL_DONE : SL_OK);
      sent += n;
      assert_int_equal(log.n, 2 * c + 1 + (i >= 5 ? 1 : 0));
    }
    assert_int_equal(log.writable[2 * c + 1], 1);
    assert_int_equal(log.pending[2 * c + 1], 2 * e);
    expect_pattern(f->fds[1], 8 * 300, sent - 8 * 300);
  }
  assert_int_equal(log.n, 2 * CYCLES);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

/* ---- gathering bounds and the spin count ---- */

static void test_gather_takes_at_most_iov_max_entries_per_call(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1 << 20, 2 << 20, NULL, NULL);
  enum { N = 2 * SL_OUTQ_MAX_IOV + 5 };
  size_t off = 0, n = 0;
  for (int i = 0; i < N; i++) {
    const size_t len[] = {3};
    add_pattern(&q, f->pool, len, 1, &off);
  }
  sl_outq_flush(&q);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(n, 3 * N);
  assert_int_equal(q.sendmsg_calls, 3); /* 1024 + 1024 + 5 entries */
  expect_pattern(f->fds[1], 3 * N, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_gather_bytes_bound_each_call_and_split_entries(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1 << 20, 2 << 20, NULL, NULL);
  sl_outq_set_write_limits(&q, 100, 1000, 0); /* fixed: 1000 bytes a call */
  assert_false(q.gather_adaptive);
  size_t off = 0, n = 0;
  const size_t sizes[] = {700, 700, 700, 700, 700, 700, 700, 700, 700, 700};
  add_pattern(&q, f->pool, sizes, 10, &off);
  sl_outq_flush(&q);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(n, 7000);
  assert_int_equal(q.sendmsg_calls, 7);
  assert_int_equal(q.gather, 1000); /* fixed: no adapting */
  expect_pattern(f->fds[1], 7000, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_spin_count_ends_a_burst_and_progress_is_kept(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1 << 20, 2 << 20, NULL, NULL);
  sl_outq_set_write_limits(&q, 4, 1000, 0);
  size_t off = 0, n = 0;
  const size_t sizes[] = {2500, 2500, 2500, 2500};
  add_pattern(&q, f->pool, sizes, 4, &off);
  sl_outq_flush(&q);

  /* Four calls of 1000: SL_DONE with the second entry half written. */
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_DONE);
  assert_int_equal(n, 4000);
  assert_int_equal(q.sendmsg_calls, 4);
  assert_int_equal(q.yields, 1);
  assert_int_equal(q.count, 3);
  assert_int_equal(q.ring[q.head].buf->rd, 1500);
  expect_pattern(f->fds[1], 4000, 0);

  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_DONE);
  assert_int_equal(n, 4000);
  assert_int_equal(q.yields, 2);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(n, 2000);
  assert_int_equal(q.sendmsg_calls, 10);
  assert_int_equal(q.yields, 2);
  expect_pattern(f->fds[1], 6000, 4000);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_adaptive_gather_grows_when_taken_whole_and_shrinks_when_not(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1 << 30, 2u << 30, NULL, NULL);
  sl_outq_set_write_limits(&q, 1, 0, 4096);
  assert_true(q.gather_adaptive);
  assert_int_equal(q.gather, 4096);
  size_t off = 0, n = 0;
  const size_t big[] = {1 << 20};
  add_pattern(&q, f->pool, big, 1, &off);
  sl_outq_flush(&q);

  /* The socket takes each attempt whole: 4096, 8192, 16384. */
  size_t expect = 4096, sent = 0;
  for (int i = 0; i < 3; i++) {
    assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_DONE);
    assert_int_equal(n, expect);
    sent += n;
    expect *= 2;
    assert_int_equal(q.gather, expect);
    expect_pattern(f->fds[1], n, sent - n);
  }

  /* Small socket buffers take less than half of 32 KiB: halved. */
  sl_test_small_buffers(f->fds[0], f->fds[1], 4096);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_AGAIN);
  assert_true(n < 32768 / 2);
  assert_int_equal(q.gather, 16384);
  sent += n;

  /* Floors and ceilings. */
  sl_outq_set_write_limits(&q, 1, 0, 1);
  assert_int_equal(q.gather, SL_OUTQ_GATHER_MIN);
  sl_outq_set_write_limits(&q, 1, 0, SIZE_MAX);
  assert_int_equal(q.gather, SL_OUTQ_GATHER_MAX);
  assert_int_equal(sl_outq_release_all(&q, "closed"), 1);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

/* ---- promises ---- */

typedef struct done_log {
  int n;
  uint32_t pid[64];
  const char *err[64];
  sl_outq *q;            /* for callbacks that act on the queue */
  uint32_t release_on;   /* release_all when this pid completes */
  uint32_t add_on;       /* add an entry when this pid completes */
  sl_pool *pool;
} done_log;

static void done_record(void *ud, uint32_t pid, const char *err) {
  done_log *l = ud;
  assert_true(l->n < 64);
  l->pid[l->n] = pid;
  l->err[l->n] = err;
  l->n++;
  if (l->release_on == pid) sl_outq_release_all(l->q, "closed in a callback");
  if (l->add_on == pid) assert_int_equal(sl_outq_add(l->q, pattern_buf(l->pool, 10, 0), 99), SL_OK);
}

static void init_with_promises(sl_outq *q, done_log *log, sl_pool *pool) {
  memset(log, 0, sizeof(*log));
  sl_outq_init(q, 1 << 20, 2 << 20, NULL, NULL);
  q->on_done = done_record;
  q->ud = log;
  log->q = q;
  log->pool = pool;
}

static void add_promised(sl_outq *q, sl_pool *pool, size_t len, size_t *off, uint32_t pid) {
  assert_int_equal(sl_outq_add(q, pattern_buf(pool, len, *off), pid), SL_OK);
  *off += len;
}

static void test_promises_complete_in_order_once_fully_written(void **state) {
  fixture *f = *state;
  sl_outq q;
  done_log log;
  init_with_promises(&q, &log, f->pool);
  size_t off = 0, n = 0;
  add_promised(&q, f->pool, 100, &off, 1);
  add_promised(&q, f->pool, 100, &off, 0);
  add_promised(&q, f->pool, 100, &off, 2);
  add_promised(&q, f->pool, 100, &off, 3);
  sl_outq_flush(&q);

  /* Half of the first entry: nothing completes. */
  assert_int_equal(sl_outq_write(&q, f->fds[0], 50, &n), SL_DONE);
  assert_int_equal(log.n, 0);
  /* The rest of it, and half of the third. */
  assert_int_equal(sl_outq_write(&q, f->fds[0], 200, &n), SL_DONE);
  assert_int_equal(log.n, 1);
  assert_int_equal(log.pid[0], 1);
  assert_null(log.err[0]);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(log.n, 3);
  assert_int_equal(log.pid[1], 2);
  assert_int_equal(log.pid[2], 3);
  assert_null(log.err[2]);
  expect_pattern(f->fds[1], 400, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_marker_completes_after_what_was_queued_before_it(void **state) {
  fixture *f = *state;
  sl_outq q;
  done_log log;
  init_with_promises(&q, &log, f->pool);
  size_t off = 0, n = 0;
  add_promised(&q, f->pool, 100, &off, 0);
  assert_int_equal(sl_outq_add_marker(&q, 7), SL_OK);
  add_promised(&q, f->pool, 100, &off, 8);
  assert_int_equal(q.count, 3);
  assert_int_equal(q.pending, 200 + 3 * SL_OUTQ_ENTRY_OVERHEAD);
  sl_outq_flush(&q);

  assert_int_equal(sl_outq_write(&q, f->fds[0], 99, &n), SL_DONE);
  assert_int_equal(log.n, 0);
  /* The byte that finishes the first entry completes the marker too. */
  assert_int_equal(sl_outq_write(&q, f->fds[0], 1, &n), SL_DONE);
  assert_int_equal(log.n, 1);
  assert_int_equal(log.pid[0], 7);
  assert_int_equal(q.count, 1);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(log.n, 2);
  assert_int_equal(log.pid[1], 8);

  /* A marker alone, flushed, completes without a sendmsg. */
  uint64_t calls = q.sendmsg_calls;
  assert_int_equal(sl_outq_add_marker(&q, 9), SL_OK);
  sl_outq_flush(&q);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(log.n, 3);
  assert_int_equal(log.pid[2], 9);
  assert_int_equal(q.sendmsg_calls, calls);
  assert_int_equal(q.pending, 0);
  expect_pattern(f->fds[1], 200, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_set_promise_by_entry_number(void **state) {
  fixture *f = *state;
  sl_outq q;
  done_log log;
  init_with_promises(&q, &log, f->pool);
  size_t off = 0, n = 0;
  assert_int_equal(sl_outq_next_seq(&q), 0);
  add_promised(&q, f->pool, 10, &off, 0); /* 0 */
  add_promised(&q, f->pool, 10, &off, 0); /* 1 */
  add_promised(&q, f->pool, 10, &off, 5); /* 2 */
  assert_int_equal(sl_outq_next_seq(&q), 3);
  assert_int_equal(sl_outq_set_promise(&q, 1, 4), SL_OK);
  assert_int_equal(sl_outq_set_promise(&q, 2, 6), SL_DECLINED); /* has 5 */
  sl_outq_flush(&q);
  assert_int_equal(sl_outq_write(&q, f->fds[0], 10, &n), SL_DONE);
  assert_int_equal(q.first_seq, 1);
  assert_int_equal(sl_outq_set_promise(&q, 0, 3), SL_DONE); /* written */
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(log.n, 2);
  assert_int_equal(log.pid[0], 4);
  assert_int_equal(log.pid[1], 5);
  assert_int_equal(sl_outq_next_seq(&q), 3);
  expect_pattern(f->fds[1], 30, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_release_all_fails_every_promise_in_order(void **state) {
  fixture *f = *state;
  sl_outq q;
  done_log log;
  init_with_promises(&q, &log, f->pool);
  size_t off = 0, n = 0;
  add_promised(&q, f->pool, 100, &off, 1);
  add_promised(&q, f->pool, 100, &off, 0);
  assert_int_equal(sl_outq_add_marker(&q, 2), SL_OK);
  sl_outq_flush(&q);
  add_promised(&q, f->pool, 100, &off, 3); /* not flushed */
  assert_int_equal(sl_outq_write(&q, f->fds[0], 50, &n), SL_DONE); /* 1 half written */
  assert_int_equal(sl_outq_release_all(&q, "reset"), 4);
  assert_int_equal(log.n, 3);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(log.pid[i], (uint32_t)i + 1);
    assert_string_equal(log.err[i], "reset");
  }
  assert_int_equal(q.pending, 0);
  assert_int_equal(q.first_seq, 4);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_release_inside_a_completion_stops_the_write(void **state) {
  fixture *f = *state;
  sl_outq q;
  done_log log;
  init_with_promises(&q, &log, f->pool);
  log.release_on = 2;
  size_t off = 0, n = 0;
  for (uint32_t pid = 1; pid <= 4; pid++) add_promised(&q, f->pool, 100, &off, pid);
  sl_outq_flush(&q);
  /* One sendmsg takes all 400 bytes; completing 2 closes the queue: 3 and
   * 4 fail although their bytes went out (a close loses what it drops). */
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(n, 400);
  assert_int_equal(log.n, 4);
  assert_null(log.err[0]);
  assert_null(log.err[1]);
  assert_string_equal(log.err[2], "closed in a callback");
  assert_string_equal(log.err[3], "closed in a callback");
  assert_true(sl_outq_is_empty(&q));
  assert_int_equal(q.pending, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_entries_added_inside_a_completion_go_out_in_order(void **state) {
  fixture *f = *state;
  sl_outq q;
  done_log log;
  init_with_promises(&q, &log, f->pool);
  log.add_on = 1;
  size_t off = 0, n = 0;
  add_promised(&q, f->pool, 10, &off, 1);
  add_promised(&q, f->pool, 10, &off, 2);
  sl_outq_flush(&q);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  /* The added entry (pattern from 0, pid 99) is not flushed yet. */
  assert_int_equal(log.n, 2);
  assert_int_equal(q.count, 1);
  assert_int_equal(q.nflushed, 0);
  sl_outq_flush(&q);
  assert_int_equal(sl_outq_write(&q, f->fds[0], SIZE_MAX, &n), SL_OK);
  assert_int_equal(log.n, 3);
  assert_int_equal(log.pid[2], 99);
  expect_pattern(f->fds[1], 20, 0);
  expect_pattern(f->fds[1], 10, 0);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_take_completes_promises_as_if_written(void **state) {
  fixture *f = *state;
  sl_outq q;
  done_log log;
  init_with_promises(&q, &log, f->pool);
  size_t off = 0;
  add_promised(&q, f->pool, 10, &off, 1);
  assert_int_equal(sl_outq_add_marker(&q, 2), SL_OK);
  add_promised(&q, f->pool, 20, &off, 3);
  add_promised(&q, f->pool, 30, &off, 4); /* not flushed */
  assert_null(sl_outq_take(&q));          /* nothing flushed yet */
  sl_outq_flush(&q);
  add_promised(&q, f->pool, 40, &off, 5);
  sl_buf *b = sl_outq_take(&q);
  assert_int_equal(sl_buf_readable(b), 10);
  assert_int_equal(log.n, 1);
  sl_buf_release(b);
  /* The marker goes with the next buffer taken. */
  b = sl_outq_take(&q);
  assert_int_equal(sl_buf_readable(b), 20);
  assert_int_equal(log.n, 3);
  assert_int_equal(log.pid[1], 2);
  assert_int_equal(log.pid[2], 3);
  sl_buf_release(b);
  b = sl_outq_take(&q);
  assert_int_equal(sl_buf_readable(b), 30);
  sl_buf_release(b);
  assert_null(sl_outq_take(&q)); /* 5 was written after the flush */
  assert_int_equal(log.n, 4);
  assert_int_equal(q.count, 1);
  assert_int_equal(q.pending, 40 + SL_OUTQ_ENTRY_OVERHEAD);
  assert_int_equal(sl_outq_release_all(&q, "closed"), 1);
  assert_int_equal(log.n, 5);
  assert_string_equal(log.err[4], "closed");
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
  sl_outq_destroy(&q);
}

static void test_over_limit_counts_bytes_and_overhead(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1000, 2000, NULL, NULL);
  assert_false(sl_outq_over_limit(&q, SIZE_MAX / 2)); /* no limit by default */
  q.limit = 1000;
  assert_false(sl_outq_over_limit(&q, 1000 - SL_OUTQ_ENTRY_OVERHEAD));
  assert_true(sl_outq_over_limit(&q, 1001 - SL_OUTQ_ENTRY_OVERHEAD));
  size_t off = 0;
  const size_t one[] = {500};
  add_pattern(&q, f->pool, one, 1, &off);
  assert_false(sl_outq_over_limit(&q, 1000 - 500 - 2 * SL_OUTQ_ENTRY_OVERHEAD));
  assert_true(sl_outq_over_limit(&q, 1001 - 500 - 2 * SL_OUTQ_ENTRY_OVERHEAD));
  sl_outq_destroy(&q);
  SL_TEST_ASSERT_POOL_CLEAN(f->pool);
}

/* sl_outq_write_via's writer for the test: records what each call offered,
 * refuses (EAGAIN) while refuse > 0, then takes at most take bytes of it,
 * checking they continue the pattern. */
typedef struct via_log {
  size_t offered[16];
  int calls;
  int refuse;
  size_t take;
  size_t offset;               /* of the stream, for the pattern check */
} via_log;

static ssize_t via_writer(void *ud, const struct iovec *iov, int n) {
  via_log *v = ud;
  size_t len = 0;
  for (int i = 0; i < n; i++) len += iov[i].iov_len;
  if (v->calls < 16) v->offered[v->calls] = len;
  v->calls++;
  if (v->refuse > 0) {
    v->refuse--;
    errno = EAGAIN;
    return -1;
  }
  size_t want = SL_MIN(len, v->take), done = 0;
  for (int i = 0; i < n && done < want; i++) {
    size_t k = SL_MIN(iov[i].iov_len, want - done);
    size_t bad = sl_test_pattern_mismatch(iov[i].iov_base, k, v->offset + done);
    if (bad != k) fail_msg("byte %zu offered differs", v->offset + done + bad);
    done += k;
  }
  v->offset += done;
  return (ssize_t)done;
}

/* The TLS writer's contract: at most max bytes offered per call, none
 * adaptive; a call refused is offered again from the same head with at
 * least as many bytes (OpenSSL's rule for repeating SSL_write_ex), even
 * once more entries are queued; bytes taken are consumed in order. */
static void test_write_via_bounds_calls_and_repeats_with_no_fewer_bytes(void **state) {
  fixture *f = *state;
  sl_outq q;
  sl_outq_init(&q, 1 << 20, 1 << 21, NULL, NULL);
  size_t offset = 0;
  const size_t small[] = {100, 200, 300};
  add_pattern(&q, f->pool, small, 3, &offset);
  sl_outq_flush(&q);
  via_log v = {.refuse = 1, .take = SIZE_MAX};
  size_t written = 0;
  assert_int_equal(sl_outq_write_via(&q, via_writer, &v, 16384, SIZE_MAX, &written), SL_AGAIN);
  assert_int_equal(written, 0);
  assert_int_equal(v.offered[0], 600);
  /* More queued meanwhile: the repeat offers the same head, and more. */
  const size_t big[] = {40000};
  add_pattern(&q, f->pool, big, 1, &offset);
  sl_outq_flush(&q);
  v.take = 16384;
  assert_int_equal(sl_outq_write_via(&q, via_writer, &v, 16384, SIZE_MAX, &written), SL_OK);
  assert_int_equal(written, 40600);
  assert_true(v.offered[1] >= v.offered[0]);
  for (int i = 1; i < v.calls; i++) assert_true(v.offered[i] <= 16384);
  assert_int_equal(v.calls, 1 + 3);   /* 16384 + 16384 + 7832 */
  assert_int_equal(v.offset, offset);
  assert_true(sl_outq_is_empty(&q));
  assert_int_equal(q.gather, SL_MAX((size_t)SL_OUTQ_GATHER_INITIAL, (size_t)SL_OUTQ_GATHER_MIN));
  sl_outq_destroy(&q);
  assert_int_equal(sl_test_stats(f->pool).blocks_in_use, 0);
}

#define FIXTURE_TEST(fn) cmocka_unit_test_setup_teardown(fn, fixture_setup, fixture_teardown)

int main(void) {
  const struct CMUnitTest tests[] = {
      FIXTURE_TEST(test_write_sends_only_flushed_entries),
      FIXTURE_TEST(test_many_small_buffers_arrive_in_order),
      FIXTURE_TEST(test_only_empty_entries_are_released),
      FIXTURE_TEST(test_slices_of_one_buffer_release_it_when_all_written),
      FIXTURE_TEST(test_ring_growth_with_wrapped_head_keeps_order),
      FIXTURE_TEST(test_partial_writes_resume_where_the_socket_stopped),
      FIXTURE_TEST(test_water_marks_fire_once_each_way),
      FIXTURE_TEST(test_water_marks_are_strict),
      FIXTURE_TEST(test_release_all_releases_flushed_and_unflushed),
      FIXTURE_TEST(test_destroy_releases_entries),
      FIXTURE_TEST(test_write_to_closed_peer_fails_with_epipe),
      FIXTURE_TEST(test_budget_limits_bytes_per_call),
      cmocka_unit_test(test_entry_overhead_is_the_size_of_an_entry),
      FIXTURE_TEST(test_water_marks_fire_on_every_crossing),
      FIXTURE_TEST(test_gather_takes_at_most_iov_max_entries_per_call),
      FIXTURE_TEST(test_gather_bytes_bound_each_call_and_split_entries),
      FIXTURE_TEST(test_spin_count_ends_a_burst_and_progress_is_kept),
      FIXTURE_TEST(test_adaptive_gather_grows_when_taken_whole_and_shrinks_when_not),
      FIXTURE_TEST(test_promises_complete_in_order_once_fully_written),
      FIXTURE_TEST(test_marker_completes_after_what_was_queued_before_it),
      FIXTURE_TEST(test_set_promise_by_entry_number),
      FIXTURE_TEST(test_release_all_fails_every_promise_in_order),
      FIXTURE_TEST(test_release_inside_a_completion_stops_the_write),
      FIXTURE_TEST(test_entries_added_inside_a_completion_go_out_in_order),
      FIXTURE_TEST(test_take_completes_promises_as_if_written),
      FIXTURE_TEST(test_over_limit_counts_bytes_and_overhead),
      FIXTURE_TEST(test_write_via_bounds_calls_and_repeats_with_no_fewer_bytes),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
