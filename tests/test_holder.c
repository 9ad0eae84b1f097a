/*
 * Buffer holders (buf/holder.h): the holder recorded at a hop is what the
 * walk reports, for the root of a view too; a slot reused by a new buffer
 * reports no holder until one is recorded for it; released buffers and
 * views are not walked; a pool without the table records nothing.
 */
#include "test_util.h"

#include "alloc/pool.h"
#include "buf/buf.h"
#include "buf/holder.h"
#include "util/common.h"

typedef struct seen {
  const sl_buf *b[8];
  const void *who[8];
  int n;
} seen;

static void note(void *ud, const sl_buf *b, const void *who) {
  seen *s = ud;
  assert_true(s->n < 8);
  s->b[s->n] = b;
  s->who[s->n] = who;
  s->n++;
}

static const void *who_of(const seen *s, const sl_buf *b) {
  for (int i = 0; i < s->n; i++)
    if (s->b[i] == b) return s->who[i];
  fail_msg("buffer not walked");
  return NULL;
}

static int pool_setup(void **state) {
  sl_pool *p = sl_pool_create(NULL, 0);
  if (p == NULL || sl_holder_enable(p) != SL_OK) return -1;
  *state = p;
  return 0;
}

static int pool_teardown(void **state) {
  sl_holder_disable(*state);
  sl_pool_destroy(*state);
  return 0;
}

static void test_walk_reports_the_last_holder(void **state) {
  sl_pool *pool = *state;
  int stage_a, stage_b, queue;
  sl_buf *x = sl_buf_alloc(pool, 100, 0);
  sl_buf *y = sl_buf_alloc(pool, 3000, 0);
  sl_buf *z = sl_buf_alloc(pool, 10, 0);
  sl_buf_hold(x, &stage_a);
  sl_buf_hold(x, &stage_b);
  const char *err = NULL;
  sl_buf *v = sl_buf_slice(y, 0, 5, &err);
  assert_non_null(v);
  sl_buf_hold(v, &queue); /* a view marks its root */
  seen s = {0};
  sl_holder_walk(pool, note, &s);
  assert_int_equal(s.n, 3); /* roots only: the view is not walked */
  assert_ptr_equal(who_of(&s, x), &stage_b);
  assert_ptr_equal(who_of(&s, y), &queue);
  assert_null(who_of(&s, z));
  sl_buf_release(x);
  sl_buf_release(y);
  sl_buf_release(z);
  s.n = 0;
  sl_holder_walk(pool, note, &s);
  assert_int_equal(s.n, 0);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_a_reused_slot_has_no_holder(void **state) {
  sl_pool *pool = *state;
  int stage;
  sl_buf *x = sl_buf_alloc(pool, 100, 0);
  sl_buf_hold(x, &stage);
  sl_buf_release(x);
  sl_buf *y = sl_buf_alloc(pool, 100, 0);
  assert_ptr_equal(y, x); /* the recycler hands the same header back */
  seen s = {0};
  sl_holder_walk(pool, note, &s);
  assert_int_equal(s.n, 1);
  assert_null(who_of(&s, y));
  sl_buf_hold(y, &stage);
  s.n = 0;
  sl_holder_walk(pool, note, &s);
  assert_ptr_equal(who_of(&s, y), &stage);
  sl_buf_release(y);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

static void test_without_the_table_nothing_is_recorded(void **state) {
  SL_UNUSED(state);
  sl_pool *pool = sl_pool_create(NULL, 0);
  assert_non_null(pool);
  int stage;
  sl_buf *x = sl_buf_alloc(pool, 100, 0);
  sl_buf_hold(x, &stage);
  seen s = {0};
  sl_holder_walk(pool, note, &s);
  assert_int_equal(s.n, 1);
  assert_null(who_of(&s, x));
  sl_buf_release(x);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
  sl_pool_destroy(pool);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_walk_reports_the_last_holder, pool_setup, pool_teardown),
      cmocka_unit_test_setup_teardown(test_a_reused_slot_has_no_holder, pool_setup, pool_teardown),
      cmocka_unit_test(test_without_the_table_nothing_is_recorded),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
