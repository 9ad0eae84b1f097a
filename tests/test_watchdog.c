/*
 * The Lua watchdog's rule (src/proxy/watchdog.c, sl_watchdog_judge): when a
 * worker's callback is interrupted, when its worker is declared stuck, and
 * what starts the clock again. The signal, the hook and the stuck worker's
 * effects run through the real binary in spec/integration/lua_timeout_spec.lua.
 */
#include "test_util.h"

#include "proxy/watchdog.h"

static void test_period(void **state) {
  (void)state;
  assert_true(sl_watchdog_period(0) == 0);
  assert_true(sl_watchdog_period(200) == 0.05);
  assert_true(sl_watchdog_period(5000) == 0.25);
  assert_true(sl_watchdog_period(1) == 0.01);
}

/* A step seen busy is interrupted once timeout_ms after it was first seen,
 * declared stuck at twice that, and never judged again. */
static void test_interrupt_then_stuck(void **state) {
  (void)state;
  sl_watchdog_entry e = {0};
  assert_int_equal(sl_watchdog_judge(&e, 1, 7, 10.0, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&e, 1, 7, 10.15, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&e, 1, 7, 10.21, 200), SL_WATCHDOG_INTERRUPT);
  assert_int_equal(sl_watchdog_judge(&e, 1, 7, 10.25, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&e, 1, 7, 10.39, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&e, 1, 7, 10.41, 200), SL_WATCHDOG_STUCK);
  assert_int_equal(sl_watchdog_judge(&e, 1, 7, 11.0, 200), SL_WATCHDOG_WAIT);
  /* Stuck for good, even once the callback has returned. */
  assert_int_equal(sl_watchdog_judge(&e, 0, 9, 12.0, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&e, 1, 10, 20.0, 200), SL_WATCHDOG_WAIT);
}

/* The first look only starts the clock, whatever the step. */
static void test_first_look(void **state) {
  (void)state;
  sl_watchdog_entry e = {0};
  assert_int_equal(sl_watchdog_judge(&e, 1, 0, 100.0, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&e, 1, 0, 100.1, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&e, 1, 0, 100.21, 200), SL_WATCHDOG_INTERRUPT);
}

/* A new step, or a worker out of Lua, starts the clock again: a busy
 * worker whose callbacks are each short is never interrupted. */
static void test_progress_resets(void **state) {
  (void)state;
  sl_watchdog_entry e = {0};
  for (int i = 0; i < 100; i++)
    assert_int_equal(sl_watchdog_judge(&e, 1, (uint64_t)i, 1.0 + i * 0.15, 200),
                     SL_WATCHDOG_WAIT);
  /* Out of Lua with the same step (between two entries): not running. */
  sl_watchdog_entry f = {0};
  assert_int_equal(sl_watchdog_judge(&f, 1, 3, 1.0, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&f, 0, 3, 1.3, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&f, 1, 3, 1.4, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&f, 1, 3, 1.61, 200), SL_WATCHDOG_INTERRUPT);
  /* Interrupted, and the next callback is a new one: its own clock. */
  assert_int_equal(sl_watchdog_judge(&f, 1, 4, 1.7, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&f, 1, 4, 1.85, 200), SL_WATCHDOG_WAIT);
  assert_int_equal(sl_watchdog_judge(&f, 1, 4, 1.91, 200), SL_WATCHDOG_INTERRUPT);
}

/* lua_timeout_ms = 0: nothing is ever stopped. */
static void test_off(void **state) {
  (void)state;
  sl_watchdog_entry e = {0};
  for (int i = 0; i < 10; i++)
    assert_int_equal(sl_watchdog_judge(&e, 1, 5, 1.0 + i * 100.0, 0), SL_WATCHDOG_WAIT);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_period),
      cmocka_unit_test(test_first_look),
      cmocka_unit_test(test_interrupt_then_stuck),
      cmocka_unit_test(test_progress_resets),
      cmocka_unit_test(test_off),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
