/*
 * sl_buf and the pool: allocation, reference counts, generations, views,
 * checked retain/release, growth, injected allocation failures and
 * type-stable headers. Each test gets a fresh pool and ends with it clean.
 */
#include "test_util.h"

#include "alloc/pool.h"
#include "buf/buf.h"
#include "buf/leak.h"
#include "util/common.h"
#include "util/log.h"

static int pool_setup(void **state) {
  sl_pool *p = sl_pool_create(NULL, 0);
  if (p == NULL) return -1;
  *state = p;
  return 0;
}

static int pool_teardown(void **state) {
  sl_pool_destroy(*state);
  return 0;
}

/* A root of cap bytes (may grow to max_cap) holding the pattern in full. */
static sl_buf *patterned(sl_pool *pool, size_t cap, size_t max_cap) {
  sl_buf *b = sl_buf_alloc(pool, cap, max_cap);
  assert_non_null(b);
  sl_test_fill_pattern(b->data, cap, 0);
  b->wr = (uint32_t)cap;
  return b;
}

/* ---- allocation ---- */

static void test_alloc_returns_fresh_root(void **state) {
  sl_pool *pool = *state;
  sl_buf *b = sl_buf_alloc(pool, 100, 0);
  assert_non_null(b);
  assert_int_equal(sl_buf_refcnt(b), 1);
  assert_true(sl_buf_is_live(b));
  assert_int_equal(b->rd, 0);
  assert_int_equal(b->wr, 0);
  assert_true(b->cap >= 100);
  assert_int_equal(b->max_cap, b->cap); /* max_cap 0 means "cap" */
  assert_ptr_equal(b->root, b);
  SL_TEST_ASSERT_NO_VIEWS(b);
  assert_int_equal(b->flags & SL_BUF_VIEW, 0);
  assert_int_equal(sl_buf_writable(b), b->cap);

  sl_pool_stats st = sl_test_stats(pool);
  assert_int_equal(st.bufs_active, 1);
  assert_int_equal(st.blocks_in_use, 1);
  assert_int_equal(st.bufs_active_bytes, b->block_size);

  sl_buf *g = sl_buf_alloc(pool, 10, 5000);
  assert_non_null(g);
  assert_true(g->cap >= 10);
  assert_int_equal(g->max_cap, 5000);
  assert_int_equal(sl_test_stats(pool).bufs_active, 2);

  assert_int_equal(sl_buf_release(g), 1);
  assert_int_equal(sl_buf_release(b), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_alloc_refuses_capacity_beyond_limit(void **state) {
  sl_pool *pool = *state;
  assert_null(sl_buf_alloc(pool, 16, (size_t)SL_BUF_MAX_CAPACITY + 1));
  assert_null(sl_buf_alloc(pool, (size_t)SL_BUF_MAX_CAPACITY + 1, 0));
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_from_copies_bytes(void **state) {
  sl_pool *pool = *state;
  uint8_t src[300];
  sl_test_fill_pattern(src, sizeof(src), 0);
  sl_buf *b = sl_buf_from(pool, src, sizeof(src));
  assert_non_null(b);
  assert_int_equal(sl_buf_refcnt(b), 1);
  assert_int_equal(b->rd, 0);
  assert_int_equal(sl_buf_readable(b), sizeof(src));
  assert_ptr_not_equal(b->data, src);
  assert_memory_equal(sl_buf_rptr(b), src, sizeof(src));

  /* A copy: changing the source afterwards does not show through. */
  memset(src, 0, sizeof(src));
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(b), 300, 0), 300);

  assert_int_equal(sl_buf_release(b), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* ---- reference counts ---- */

static void test_release_returns_memory_on_last_reference(void **state) {
  sl_pool *pool = *state;
  sl_buf *b = sl_buf_alloc(pool, 64, 0);
  assert_non_null(b);
  sl_buf_retain(b);
  sl_buf_retain(b);
  assert_int_equal(sl_buf_refcnt(b), 3);

  assert_int_equal(sl_buf_release(b), 0);
  assert_int_equal(sl_buf_release(b), 0);
  assert_int_equal(sl_buf_refcnt(b), 1);
  assert_true(sl_buf_is_live(b));
  sl_pool_stats st = sl_test_stats(pool);
  assert_int_equal(st.bufs_active, 1);
  assert_int_equal(st.blocks_in_use, 1);

  assert_int_equal(sl_buf_release(b), 1);
  st = sl_test_stats(pool);
  assert_int_equal(st.bufs_active, 0);
  assert_int_equal(st.blocks_in_use, 0);
  assert_int_equal(st.frees, 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_checked_retain_and_release_count(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *b = sl_buf_alloc(pool, 64, 0);
  assert_non_null(b);

  assert_int_equal(sl_buf_retain_n(b, 2, &err), 0);
  assert_int_equal(sl_buf_refcnt(b), 3);
  assert_int_equal(sl_buf_release_n(b, 2, &err), 0);
  assert_int_equal(sl_buf_refcnt(b), 1);
  assert_int_equal(sl_test_stats(pool).bufs_active, 1);
  assert_int_equal(sl_buf_release_n(b, 1, &err), 1);
  assert_null(err);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* ---- generations ---- */

static void test_generation_changes_on_final_release(void **state) {
  sl_pool *pool = *state;
  sl_buf *b = sl_buf_alloc(pool, 32, 0);
  assert_non_null(b);
  sl_lbuf handle = {.b = b, .gen = b->gen, .refs = 1};
  sl_buf_retain(b);

  assert_int_equal(sl_buf_release(b), 0);
  assert_int_equal(b->gen, handle.gen); /* still live: same generation */

  assert_int_equal(sl_buf_release(b), 1);
  /* Headers are type-stable: a stale handle may read the generation. */
  assert_int_not_equal(handle.b->gen, handle.gen);
  assert_false(sl_buf_is_live(handle.b));
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_reused_header_keeps_newer_generation(void **state) {
  sl_pool *pool = *state;
  enum { ROUNDS = 200 };
  sl_lbuf stale[ROUNDS];
  int reuses = 0;
  for (int i = 0; i < ROUNDS; i++) {
    sl_buf *b = sl_buf_alloc(pool, 16 + (size_t)i, 0);
    assert_non_null(b);
    assert_int_equal(sl_buf_refcnt(b), 1);
    for (int j = 0; j < i; j++) {
      if (stale[j].b != b) continue;
      reuses++;
      assert_int_not_equal(b->gen, stale[j].gen);
    }
    stale[i] = (sl_lbuf){.b = b, .gen = b->gen, .refs = 1};
    assert_int_equal(sl_buf_release(b), 1);
  }
  /* Fewer headers than rounds exist, so headers were reused. */
  assert_true((uint64_t)ROUNDS > sl_test_stats(pool).headers_total);
  assert_true(reuses > 0);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* ---- views ---- */

static void test_slice_shares_memory_and_refcount(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *root = sl_buf_from(pool, "hello world", 11);
  assert_non_null(root);
  sl_buf *v = sl_buf_slice(root, 6, 5, &err);
  assert_non_null(v);
  assert_ptr_equal(v->root, root);
  assert_true(v->flags & SL_BUF_VIEW);
  assert_int_equal(v->rd, 0);
  assert_int_equal(sl_buf_readable(v), 5);
  assert_int_equal(v->cap, 5);
  assert_memory_equal(sl_buf_rptr(v), "world", 5);

  /* Same memory: a write through the view is read through the parent. */
  v->data[0] = 'W';
  assert_memory_equal(sl_buf_rptr(root), "hello World", 11);

  /* Same refcount; a view is not a buffer of its own in the pool. */
  assert_int_equal(sl_buf_refcnt(v), sl_buf_refcnt(root));
  sl_buf_retain(v);
  assert_int_equal(sl_buf_refcnt(root), 2);
  assert_int_equal(sl_buf_refcnt(v), 2);
  sl_pool_stats st = sl_test_stats(pool);
  assert_int_equal(st.bufs_active, 1);
  assert_int_equal(st.blocks_in_use, 1);

  assert_int_equal(sl_buf_release(v), 0);
  assert_int_equal(sl_buf_refcnt(root), 1);
  assert_int_equal(sl_buf_release(root), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_duplicate_shares_memory_with_own_indexes(void **state) {
  sl_pool *pool = *state;
  sl_buf *root = sl_buf_alloc(pool, 32, 0);
  assert_non_null(root);
  memcpy(root->data, "abcdef", 6);
  root->wr = 6;
  root->rd = 2;

  sl_buf *d = sl_buf_duplicate(root);
  assert_non_null(d);
  assert_ptr_equal(d->root, root);
  assert_ptr_equal(d->data, root->data);
  assert_int_equal(d->cap, root->cap);
  assert_int_equal(d->rd, 2);
  assert_int_equal(d->wr, 6);

  /* Its own indexes: reading through the duplicate leaves the parent's. */
  d->rd = 5;
  assert_int_equal(root->rd, 2);
  /* Shared memory: bytes written through the duplicate show in the parent. */
  memcpy(sl_buf_wptr(d), "XY", 2);
  d->wr += 2;
  assert_memory_equal(root->data + 6, "XY", 2);
  assert_int_equal(root->wr, 6);

  assert_int_equal(sl_buf_refcnt(d), sl_buf_refcnt(root));
  sl_buf_retain(d);
  assert_int_equal(sl_buf_refcnt(root), 2);
  assert_int_equal(sl_buf_release(root), 0);
  assert_int_equal(sl_buf_release(d), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_view_keeps_memory_after_parent_release(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *root = patterned(pool, 4096, 0);
  sl_buf *v = sl_buf_slice(root, 1000, 2000, &err);
  assert_non_null(v);
  sl_buf *d = sl_buf_duplicate(root);
  assert_non_null(d);
  sl_buf_retain(v); /* the view's holder takes a reference */
  uint32_t root_gen = root->gen, v_gen = v->gen, d_gen = d->gen;

  /* The parent's holder lets go: the memory stays, nothing is bumped. */
  assert_int_equal(sl_buf_release(root), 0);
  assert_true(sl_buf_is_live(v));
  assert_int_equal(root->gen, root_gen);
  assert_int_equal(v->gen, v_gen);
  assert_int_equal(sl_test_stats(pool).blocks_in_use, 1);
  /* Reading it is valid (ASan would report a use after free). */
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(v), 2000, 1000), 2000);

  /* The final release goes through the view: memory back, every header of
   * the family gets a new generation. */
  assert_int_equal(sl_buf_release(v), 1);
  assert_int_not_equal(root->gen, root_gen);
  assert_int_not_equal(v->gen, v_gen);
  assert_int_not_equal(d->gen, d_gen);
  assert_false(sl_buf_is_live(v));
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_slice_of_view_shares_root(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *root = patterned(pool, 100, 0);
  sl_buf *v = sl_buf_slice(root, 10, 50, &err);
  assert_non_null(v);
  sl_buf *vv = sl_buf_slice(v, 5, 20, &err);
  assert_non_null(vv);
  assert_ptr_equal(vv->root, root);
  assert_ptr_equal(vv->data, root->data + 15);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(vv), 20, 15), 20);
  sl_buf_retain(vv);
  assert_int_equal(sl_buf_refcnt(root), 2);
  /* A slice of a view is bounded by the view, not by the root. */
  assert_null(sl_buf_slice(v, 40, 11, &err));
  assert_string_equal(err, "slice out of range");

  uint32_t vv_gen = vv->gen;
  assert_int_equal(sl_buf_release(root), 0);
  assert_int_equal(sl_buf_release(vv), 1);
  assert_int_not_equal(vv->gen, vv_gen);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_slice_out_of_range_is_refused(void **state) {
  sl_pool *pool = *state;
  sl_buf *root = patterned(pool, 64, 0);
  uint64_t headers_free = sl_test_stats(pool).headers_free;
  const size_t cap = root->cap;
  const struct { size_t index, len; } bad[] = {
      {cap + 1, 0}, {0, cap + 1}, {1, cap}, {cap, 1}, {SIZE_MAX, 2}, {2, SIZE_MAX},
  };
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    const char *err = NULL;
    assert_null(sl_buf_slice(root, bad[i].index, bad[i].len, &err));
    assert_non_null(err);
    assert_string_equal(err, "slice out of range");
  }
  /* Nothing was taken or linked by the refusals. */
  SL_TEST_ASSERT_NO_VIEWS(root);
  assert_int_equal(sl_test_stats(pool).headers_free, headers_free);

  /* The edges are in range. */
  const char *err = NULL;
  sl_buf *whole = sl_buf_slice(root, 0, cap, &err);
  assert_non_null(whole);
  assert_int_equal(sl_buf_readable(whole), cap);
  sl_buf *empty = sl_buf_slice(root, cap, 0, &err);
  assert_non_null(empty);
  assert_int_equal(sl_buf_readable(empty), 0);

  assert_int_equal(sl_buf_release(root), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* ---- checked retain/release refuse instead of aborting ---- */


/* ---- derived buffers (retained slices and duplicates) ---- */

static void test_retained_slice_has_own_refcount(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *root = patterned(pool, 100, 0);
  sl_buf *d = sl_buf_retained_slice(root, 10, 20, &err);
  assert_non_null(d);
  assert_ptr_equal(d->root, d);
  assert_ptr_equal(sl_buf_parent(d), root);
  assert_ptr_equal(sl_buf_memory_root(d), root);
  assert_int_equal(d->flags & (SL_BUF_VIEW | SL_BUF_DERIVED), SL_BUF_VIEW | SL_BUF_DERIVED);
  assert_ptr_equal(d->data, root->data + 10);
  assert_int_equal(d->rd, 0);
  assert_int_equal(d->wr, 20);
  assert_int_equal(sl_buf_refcnt(d), 1);
  assert_int_equal(sl_buf_refcnt(root), 2); /* one held by the derived buffer */
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(d), 20, 10), 20);
  assert_int_equal(sl_test_stats(pool).blocks_in_use, 1); /* no copy */

  /* Its own count: retain and release it without touching the root's. */
  sl_buf_retain(d);
  assert_int_equal(sl_buf_refcnt(d), 2);
  assert_int_equal(sl_buf_refcnt(root), 2);
  assert_int_equal(sl_buf_release(d), 0);

  /* The root's holder lets go first: the derived buffer keeps the memory. */
  uint32_t dgen = d->gen;
  assert_int_equal(sl_buf_release(root), 0);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(d), 20, 10), 20);
  assert_int_equal(sl_buf_release(d), 1);
  assert_int_not_equal(d->gen, dgen);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* The point of derived buffers: released ones give their header back at
 * once, so a long-lived buffer sliced into many frames does not pile up
 * headers (plain views live as long as their buffer). */
static void test_derived_header_goes_back_on_release(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *root = patterned(pool, 4096, 0);
  sl_pool_stats st = sl_test_stats(pool);
  uint64_t live_before = st.headers_total - st.headers_free;
  for (size_t i = 0; i < 4096; i++) {
    sl_buf *d = sl_buf_retained_slice(root, i, 1, &err);
    assert_non_null(d);
    st = sl_test_stats(pool);
    assert_int_equal(st.headers_total - st.headers_free, live_before + 1);
    assert_int_equal(*sl_buf_rptr(d), sl_test_pattern_byte(i));
    assert_int_equal(sl_buf_release(d), 1); /* d is gone; the root stays */
    st = sl_test_stats(pool);
    assert_int_equal(st.headers_total - st.headers_free, live_before);
  }
  assert_int_equal(st.headers_total, live_before + 1); /* one slot reused throughout */
  assert_int_equal(sl_buf_refcnt(root), 1);
  assert_int_equal(sl_buf_release(root), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_read_retained_slice_advances(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *root = patterned(pool, 64, 0);
  root->rd = 4;
  sl_buf *d = sl_buf_read_retained_slice(root, 10, &err);
  assert_non_null(d);
  assert_int_equal(root->rd, 14);
  assert_ptr_equal(d->data, root->data + 4);
  assert_null(sl_buf_read_retained_slice(root, 51, &err));
  assert_string_equal(err, "slice out of range");
  assert_int_equal(root->rd, 14);
  assert_int_equal(sl_buf_refcnt(root), 2);
  assert_int_equal(sl_buf_release(root), 0);
  assert_int_equal(sl_buf_release(d), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_retained_duplicate_keeps_indexes(void **state) {
  sl_pool *pool = *state;
  sl_buf *root = patterned(pool, 64, 0);
  root->rd = 3;
  root->wr = 40;
  sl_buf *d = sl_buf_retained_duplicate(root);
  assert_non_null(d);
  assert_int_equal(d->rd, 3);
  assert_int_equal(d->wr, 40);
  assert_int_equal(d->cap, root->cap);
  d->rd = 10; /* its own indexes */
  assert_int_equal(root->rd, 3);
  assert_int_equal(sl_buf_release(d), 1);
  assert_int_equal(sl_buf_release(root), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* Views of a derived buffer share its refcount and die with it (not with
 * the root); derived buffers of derived buffers hold their parent. */
static void test_views_and_derived_of_derived(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *root = patterned(pool, 256, 0);
  sl_buf *d = sl_buf_retained_slice(root, 100, 100, &err);
  assert_non_null(d);
  sl_buf *v = sl_buf_slice(d, 10, 10, &err);
  assert_non_null(v);
  assert_ptr_equal(v->root, d);
  assert_ptr_equal(sl_buf_memory_root(v), root);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(v), 10, 110), 10);
  sl_buf *dd = sl_buf_retained_slice(d, 50, 50, &err);
  assert_non_null(dd);
  assert_ptr_equal(sl_buf_parent(dd), d);
  assert_ptr_equal(sl_buf_memory_root(dd), root);
  assert_int_equal(sl_buf_refcnt(d), 2);
  assert_int_equal(sl_buf_refcnt(root), 2);
  /* Bounded by the derived buffer. */
  assert_null(sl_buf_retained_slice(d, 90, 11, &err));
  assert_string_equal(err, "slice out of range");

  uint32_t vgen = v->gen;
  assert_int_equal(sl_buf_release(d), 0);   /* dd still holds d */
  assert_int_equal(v->gen, vgen);
  assert_int_equal(sl_buf_release(root), 0);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(dd), 50, 150), 50);
  assert_int_equal(sl_buf_release(dd), 1);  /* dd, then d, then the root */
  assert_int_not_equal(v->gen, vgen);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_buffer_with_derived_does_not_grow(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *root = patterned(pool, 64, 1 << 20);
  sl_buf *d = sl_buf_retained_slice(root, 0, 8, &err);
  assert_non_null(d);
  uint8_t *data = root->data;
  assert_int_equal(sl_buf_ensure_writable(root, 4096, &err), SL_ERROR);
  assert_string_equal(err, "cannot grow a buffer that has views");
  assert_ptr_equal(root->data, data);
  assert_int_equal(sl_buf_may_grow(d, &err), 0);
  assert_string_equal(err, "a view cannot grow");
  assert_int_equal(sl_buf_release(d), 1);
  /* Refcount 1: no derived buffer is left, it grows again. */
  assert_int_equal(sl_buf_ensure_writable(root, 4096, &err), SL_OK);
  assert_int_equal(sl_test_pattern_mismatch(root->data, 64, 0), 64);
  assert_int_equal(sl_buf_release(root), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_dead_derived_says_who_released_it(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *root = patterned(pool, 64, 0);
  sl_buf *d = sl_buf_retained_slice(root, 0, 8, &err);
  sl_buf *v = sl_buf_slice(d, 0, 4, &err);
  uint32_t dgen = d->gen, vgen = v->gen;
  sl_buf_release_site(pool, "the frame's reader");
  assert_int_equal(sl_buf_release(d), 1);
  sl_buf_release_site(pool, NULL);
  assert_string_equal(sl_buf_released_by(d, dgen), "the frame's reader");
  assert_string_equal(sl_buf_released_by(v, vgen), "the frame's reader");
  assert_int_equal(sl_buf_release(root), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* Leak tracking: a derived buffer answers to its parent's owner, moves to
 * another owner on its own, and a channel's teardown reclaims only what
 * was leaked: references held by derived buffers of another owner stay. */
static void test_reclaim_leaves_references_held_by_derived(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf_owner a = {0}, b = {0};
  sl_buf *root = patterned(pool, 128, 0);
  sl_buf_set_owner(root, &a);
  sl_buf *d1 = sl_buf_retained_slice(root, 0, 10, &err);
  sl_buf *d2 = sl_buf_retained_slice(root, 10, 10, &err);
  assert_ptr_equal(d1->owner, &a);
  assert_int_equal(a.count, 3);
  assert_int_equal(a.bytes, root->block_size); /* the block, counted once */
  sl_buf_set_owner(d2, &b);                    /* queued elsewhere */
  assert_int_equal(a.count, 2);
  assert_int_equal(b.count, 1);
  assert_int_equal(b.bytes, 0);

  /* a's holder releases the root as it should; d1 is leaked on a. */
  assert_int_equal(sl_buf_release(root), 0);
  assert_int_equal(sl_leak_reclaim_owner(pool, &a, "a test"), 1);
  assert_int_equal(a.count, 0);
  /* d2 and the memory under it are intact and answer to b. */
  assert_true(sl_buf_is_live(d2));
  assert_int_equal(sl_buf_refcnt(root), 1);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(d2), 10, 10), 10);
  assert_int_equal(sl_buf_release(d2), 1);
  assert_int_equal(b.count, 0);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_reclaim_of_leaked_root_with_derived(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf_owner a = {0}, b = {0};
  sl_buf *root = patterned(pool, 128, 0);
  sl_buf_set_owner(root, &a);
  sl_buf *d = sl_buf_retained_slice(root, 0, 10, &err);
  sl_buf_set_owner(d, &b);
  sl_buf_retain(root); /* a leaks two references of its own */
  assert_int_equal(sl_leak_reclaim_owner(pool, &a, "a test"), 1);
  assert_int_equal(sl_buf_refcnt(root), 1); /* d's reference stays */
  assert_int_equal(sl_leak_reclaim_owner(pool, &b, "a test"), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_release_n_refuses_over_release(void **state) {
  sl_pool *pool = *state;
  sl_buf *b = sl_buf_alloc(pool, 64, 0);
  assert_non_null(b);
  uint32_t gen = b->gen;
  const char *err = NULL;

  assert_int_equal(sl_buf_release_n(b, 2, &err), SL_ERROR);
  assert_non_null(err);
  assert_string_equal(err, "refcnt 1, decrement 2");
  /* Nothing changed. */
  assert_int_equal(sl_buf_refcnt(b), 1);
  assert_int_equal(b->gen, gen);
  sl_pool_stats st = sl_test_stats(pool);
  assert_int_equal(st.bufs_active, 1);
  assert_int_equal(st.blocks_in_use, 1);
  assert_int_equal(st.frees, 0);

  err = NULL;
  assert_int_equal(sl_buf_release_n(b, 0, &err), SL_ERROR);
  assert_non_null(err);
  assert_int_equal(sl_buf_refcnt(b), 1);

  err = NULL;
  assert_int_equal(sl_buf_release_n(b, 1, &err), 1);
  assert_null(err);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_checked_calls_refuse_a_released_buffer(void **state) {
  sl_pool *pool = *state;
  sl_buf *b = sl_buf_alloc(pool, 64, 0);
  assert_non_null(b);
  assert_int_equal(sl_buf_release(b), 1);
  uint32_t gen = b->gen;
  sl_pool_stats before = sl_test_stats(pool);
  const char *err = NULL;

  assert_int_equal(sl_buf_release_n(b, 1, &err), SL_ERROR);
  assert_non_null(err);
  assert_string_equal(err, "refcnt 0, decrement 1");

  err = NULL;
  assert_int_equal(sl_buf_retain_n(b, 1, &err), SL_ERROR);
  assert_non_null(err);

  /* No resurrection, no second free, no second trip to the free list. */
  assert_int_equal(sl_buf_refcnt(b), 0);
  assert_int_equal(b->gen, gen);
  sl_pool_stats after = sl_test_stats(pool);
  assert_int_equal(after.frees, before.frees);
  assert_int_equal(after.headers_free, before.headers_free);
  SL_TEST_ASSERT_POOL_CLEAN(pool);

  /* The free list is intact: two allocations get two distinct headers. */
  sl_buf *x = sl_buf_alloc(pool, 8, 0);
  sl_buf *y = sl_buf_alloc(pool, 8, 0);
  assert_non_null(x);
  assert_non_null(y);
  assert_ptr_not_equal(x, y);
  assert_int_equal(sl_buf_release(x), 1);
  assert_int_equal(sl_buf_release(y), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_retain_n_refuses_overflow_and_zero(void **state) {
  sl_pool *pool = *state;
  sl_buf *b = sl_buf_alloc(pool, 8, 0);
  assert_non_null(b);
  const char *err = NULL;
  assert_int_equal(sl_buf_retain_n(b, 0x7fffffffu, &err), SL_ERROR);
  assert_non_null(err);
  assert_int_equal(sl_buf_refcnt(b), 1);
  err = NULL;
  assert_int_equal(sl_buf_retain_n(b, UINT32_MAX, &err), SL_ERROR);
  assert_non_null(err);
  assert_int_equal(sl_buf_refcnt(b), 1);
  err = NULL;
  assert_int_equal(sl_buf_retain_n(b, 0, &err), SL_ERROR);
  assert_non_null(err);
  assert_int_equal(sl_buf_refcnt(b), 1);
  assert_int_equal(sl_buf_release(b), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* ---- growth ---- */

static void test_ensure_writable_grows_within_max_cap(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *b = patterned(pool, 16, 1024);
  assert_int_equal(sl_buf_writable(b), 0);

  assert_int_equal(sl_buf_ensure_writable(b, 100, &err), SL_OK);
  assert_true(sl_buf_writable(b) >= 100);
  assert_true(b->cap <= b->max_cap);
  assert_int_equal(sl_buf_readable(b), 16);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(b), 16, 0), 16);
  /* The old block went back; the counters follow the new one. */
  sl_pool_stats st = sl_test_stats(pool);
  assert_int_equal(st.blocks_in_use, 1);
  assert_int_equal(st.bufs_active, 1);
  assert_int_equal(st.bufs_active_bytes, b->block_size);
  assert_int_equal(st.bytes_in_use, b->block_size);

  /* Up to max_cap exactly is allowed. */
  assert_int_equal(sl_buf_ensure_writable(b, 1024 - 16, &err), SL_OK);
  assert_int_equal(b->cap, 1024);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(b), 16, 0), 16);

  assert_int_equal(sl_buf_release(b), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_ensure_writable_refuses_beyond_max_cap(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *b = patterned(pool, 16, 1024);
  uint8_t *data = b->data;
  uint32_t cap = b->cap;

  assert_int_equal(sl_buf_ensure_writable(b, 1024 - 16 + 1, &err), SL_ERROR);
  assert_non_null(err);
  assert_string_equal(err, "exceeds max capacity");
  assert_ptr_equal(b->data, data);
  assert_int_equal(b->cap, cap);

  /* sl_buf_write refuses the same way and appends nothing. */
  uint8_t big[1100] = {0};
  err = NULL;
  assert_int_equal(sl_buf_write(b, big, sizeof(big), &err), SL_ERROR);
  assert_non_null(err);
  assert_int_equal(b->wr, 16);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(b), 16, 0), 16);

  assert_int_equal(sl_buf_release(b), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_ensure_writable_refuses_buffer_with_views(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *root = patterned(pool, 16, 1024);
  sl_buf *d = sl_buf_duplicate(root);
  assert_non_null(d);
  uint8_t *data = root->data;

  assert_int_equal(sl_buf_ensure_writable(root, 1, &err), SL_ERROR);
  assert_non_null(err);
  assert_string_equal(err, "cannot grow a buffer that has views");
  assert_ptr_equal(root->data, data);
  assert_ptr_equal(d->data, data);

  err = NULL;
  assert_int_equal(sl_buf_ensure_writable(d, 1, &err), SL_ERROR);
  assert_non_null(err);
  assert_int_equal(sl_buf_ensure_writable(root, 0, &err), SL_OK); /* fits */

  assert_int_equal(sl_buf_release(root), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_ensure_writable_out_of_memory_keeps_contents(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *b = patterned(pool, 16, 1024);
  uint8_t *data = b->data;
  sl_pool_fail_next(pool, 1);
  assert_int_equal(sl_buf_ensure_writable(b, 100, &err), SL_ERROR);
  assert_non_null(err);
  assert_ptr_equal(b->data, data);
  assert_int_equal(b->cap, 16);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(b), 16, 0), 16);
  assert_int_equal(sl_test_stats(pool).blocks_in_use, 1);
  assert_int_equal(sl_buf_release(b), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_write_appends(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  sl_buf *b = sl_buf_alloc(pool, 4, 4096);
  assert_non_null(b);
  assert_int_equal(sl_buf_write(b, "abc", 3, &err), SL_OK);
  assert_int_equal(sl_buf_write(b, "defgh", 5, &err), SL_OK); /* grows */
  assert_int_equal(sl_buf_readable(b), 8);
  assert_memory_equal(sl_buf_rptr(b), "abcdefgh", 8);

  /* Many appends across several growths keep every byte in place. */
  uint8_t chunk[97];
  size_t total = 8;
  b->rd = 8; /* check only the patterned part below */
  while (total + sizeof(chunk) <= 4096) {
    sl_test_fill_pattern(chunk, sizeof(chunk), total - 8);
    assert_int_equal(sl_buf_write(b, chunk, sizeof(chunk), &err), SL_OK);
    total += sizeof(chunk);
  }
  assert_int_equal(b->wr, total);
  assert_memory_equal(b->data, "abcdefgh", 8);
  assert_int_equal(sl_test_pattern_mismatch(sl_buf_rptr(b), total - 8, 0), total - 8);

  assert_int_equal(sl_buf_release(b), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* ---- injected allocation failures ---- */

static void test_fail_next_fails_one_alloc_cleanly(void **state) {
  sl_pool *pool = *state;
  sl_pool_stats before = sl_test_stats(pool);
  sl_pool_fail_next(pool, 1);

  assert_null(sl_buf_alloc(pool, 128, 0));
  sl_pool_stats st = sl_test_stats(pool);
  assert_int_equal(st.alloc_failures, before.alloc_failures + 1);
  assert_int_equal(st.bufs_active, 0);
  assert_int_equal(st.blocks_in_use, 0);
  assert_int_equal(st.headers_free, st.headers_total); /* header went back */
  SL_TEST_ASSERT_POOL_CLEAN(pool);

  sl_buf *b = sl_buf_alloc(pool, 128, 0);
  assert_non_null(b);
  assert_int_equal(sl_buf_refcnt(b), 1);
  assert_int_equal(sl_buf_release(b), 1);

  /* sl_buf_from goes through the same path. */
  sl_pool_fail_next(pool, 1);
  assert_null(sl_buf_from(pool, "xyz", 3));
  SL_TEST_ASSERT_POOL_CLEAN(pool);
  b = sl_buf_from(pool, "xyz", 3);
  assert_non_null(b);
  assert_int_equal(sl_buf_release(b), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_fail_next_counts_several(void **state) {
  sl_pool *pool = *state;
  sl_pool_fail_next(pool, 3);
  for (int i = 0; i < 3; i++) assert_null(sl_buf_alloc(pool, 8, 0));
  sl_buf *b = sl_buf_alloc(pool, 8, 0);
  assert_non_null(b);
  assert_int_equal(sl_test_stats(pool).alloc_failures, 3);
  assert_int_equal(sl_buf_release(b), 1);

  /* 0 turns it off. */
  sl_pool_fail_next(pool, 5);
  sl_pool_fail_next(pool, 0);
  b = sl_buf_alloc(pool, 8, 0);
  assert_non_null(b);
  assert_int_equal(sl_buf_release(b), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* ---- type-stable headers ---- */

static void test_headers_are_reused_not_grown(void **state) {
  sl_pool *pool = *state;
  const char *err = NULL;
  /* Warm up with the largest shape used below: a buffer and two views. */
  sl_buf *b = sl_buf_alloc(pool, 64, 0);
  assert_non_null(b);
  assert_non_null(sl_buf_slice(b, 1, 10, &err));
  assert_non_null(sl_buf_duplicate(b));
  assert_int_equal(sl_buf_release(b), 1);
  uint64_t total = sl_test_stats(pool).headers_total;
  assert_int_equal(total, 3);

  for (int i = 0; i < 10000; i++) {
    b = sl_buf_alloc(pool, 64 + (size_t)(i % 7), 0);
    assert_non_null(b);
    if (i % 3 == 0) assert_non_null(sl_buf_slice(b, 1, 10, &err));
    if (i % 5 == 0) assert_non_null(sl_buf_duplicate(b));
    assert_int_equal(sl_buf_release(b), 1);
  }
  sl_pool_stats st = sl_test_stats(pool);
  assert_int_equal(st.headers_total, total);
  assert_int_equal(st.allocs, 10001);
  assert_int_equal(st.frees, 10001);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* An empty buffer still gets a block from the pool (of the size the pool
 * reports), and gives back exactly that: block_size is the pool's usable
 * size, only cap is limited by max_cap. */
static void test_empty_buffer_returns_its_bytes(void **state) {
  sl_pool *pool = *state;
  sl_buf *b = sl_buf_from(pool, "", 0);
  assert_non_null(b);
  assert_int_equal(sl_buf_readable(b), 0);
  assert_int_equal(sl_buf_release(b), 1);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* ---- leak records ---- */

/* The records of sampled buffers are kept for reuse, so that a sample
 * costs no malloc and no free: a record taken again starts with no
 * touches and no site, the pool keeps at most SL_LEAK_SPARE, and an idle
 * pool frees them. */
static void test_leak_records_are_reused_clean_and_freed_when_idle(void **state) {
  (void)state;
  sl_alloc_config cfg;
  const char *err = NULL;
  sl_alloc_config_defaults(&cfg);
  cfg.leak_level = SL_LEAK_ADVANCED;   /* touches are recorded */
  cfg.leak_sample = 1;                 /* every buffer */
  cfg.trim_idle_ms = 50;
  sl_alloc *a = sl_alloc_create(&cfg, &err);
  assert_non_null(a);
  sl_pool *p = sl_pool_create(a, 0);
  assert_non_null(p);

  sl_buf *b = sl_buf_alloc(p, 100, 0);
  assert_non_null(b);
  assert_true(b->flags & SL_BUF_RECORDED);
  sl_leak_set_site(b, "the first site");
  for (int i = 0; i < 6; i++) sl_leak_touch(b, i % 2 ? "a static hint" : "a copied hint", i % 2);
  void *rec = p->leak_rec[sl_leak_slot(p, b)];
  assert_non_null(rec);
  sl_buf_release(b);
  assert_int_equal(p->leak_spare_n, 1);
  assert_ptr_equal(p->leak_spare, rec);

  sl_buf *c = sl_buf_alloc(p, 100, 0);
  assert_non_null(c);
  assert_true(c->flags & SL_BUF_RECORDED);
  assert_ptr_equal(p->leak_rec[sl_leak_slot(p, c)], rec);   /* the same record */
  assert_int_equal(p->leak_spare_n, 0);
  sl_leak_touch(c, "the second buffer's hop", 1);
  char text[4096];
  sl_log_capture(text, sizeof(text));
  sl_leak_report(p, c, "a test");
  sl_log_capture(NULL, 0);
  assert_non_null(strstr(text, "LEAK: buffer of 112 bytes was not released before a test"));
  assert_non_null(strstr(text, "#1 touched by the second buffer's hop"));
  assert_null(strstr(text, "hint"));
  assert_null(strstr(text, "older touches"));
  assert_non_null(strstr(text, "created at: (site not recorded)"));
  sl_buf_release(c);

  static sl_buf *many[SL_LEAK_SPARE + 8];
  for (int i = 0; i < SL_LEAK_SPARE + 8; i++) {
    assert_non_null(many[i] = sl_buf_alloc(p, 100, 0));
    assert_true(many[i]->flags & SL_BUF_RECORDED);
  }
  assert_int_equal(p->leak_spare_n, 0);
  for (int i = 0; i < SL_LEAK_SPARE + 8; i++) sl_buf_release(many[i]);
  assert_int_equal(p->leak_spare_n, SL_LEAK_SPARE);
  assert_int_equal(p->leak_recorded, 0);

  sl_pool_trim_report r;
  int64_t t = sl_alloc_now_ms() + 1000000;
  sl_pool_tick(p, t, &r);
  sl_pool_tick(p, t + cfg.trim_idle_ms + 1, &r);
  assert_int_equal(p->leak_spare_n, 0);
  assert_null(p->leak_spare);
  SL_TEST_ASSERT_POOL_CLEAN(p);
  sl_pool_destroy(p);
  sl_alloc_destroy(a);
}

#define POOL_TEST(fn) cmocka_unit_test_setup_teardown(fn, pool_setup, pool_teardown)

int main(void) {
  const struct CMUnitTest tests[] = {
      POOL_TEST(test_alloc_returns_fresh_root),
      cmocka_unit_test(test_leak_records_are_reused_clean_and_freed_when_idle),
      POOL_TEST(test_alloc_refuses_capacity_beyond_limit),
      POOL_TEST(test_from_copies_bytes),
      POOL_TEST(test_release_returns_memory_on_last_reference),
      POOL_TEST(test_checked_retain_and_release_count),
      POOL_TEST(test_generation_changes_on_final_release),
      POOL_TEST(test_reused_header_keeps_newer_generation),
      POOL_TEST(test_slice_shares_memory_and_refcount),
      POOL_TEST(test_duplicate_shares_memory_with_own_indexes),
      POOL_TEST(test_view_keeps_memory_after_parent_release),
      POOL_TEST(test_slice_of_view_shares_root),
      POOL_TEST(test_slice_out_of_range_is_refused),
      POOL_TEST(test_retained_slice_has_own_refcount),
      POOL_TEST(test_derived_header_goes_back_on_release),
      POOL_TEST(test_read_retained_slice_advances),
      POOL_TEST(test_retained_duplicate_keeps_indexes),
      POOL_TEST(test_views_and_derived_of_derived),
      POOL_TEST(test_buffer_with_derived_does_not_grow),
      POOL_TEST(test_dead_derived_says_who_released_it),
      POOL_TEST(test_reclaim_leaves_references_held_by_derived),
      POOL_TEST(test_reclaim_of_leaked_root_with_derived),
      POOL_TEST(test_release_n_refuses_over_release),
      POOL_TEST(test_checked_calls_refuse_a_released_buffer),
      POOL_TEST(test_retain_n_refuses_overflow_and_zero),
      POOL_TEST(test_ensure_writable_grows_within_max_cap),
      POOL_TEST(test_ensure_writable_refuses_beyond_max_cap),
      POOL_TEST(test_ensure_writable_refuses_buffer_with_views),
      POOL_TEST(test_ensure_writable_out_of_memory_keeps_contents),
      POOL_TEST(test_write_appends),
      POOL_TEST(test_fail_next_fails_one_alloc_cleanly),
      POOL_TEST(test_fail_next_counts_several),
      POOL_TEST(test_headers_are_reused_not_grown),
      POOL_TEST(test_empty_buffer_returns_its_bytes),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
