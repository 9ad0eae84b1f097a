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

typedef struct look {
  int busy;
  uint64_t step;
  int acked;
  double now;
  int verdict;
} look;

#define W SL_WATCHDOG_WAIT
#define I SL_WATCHDOG_INTERRUPT
#define S SL_WATCHDOG_STUCK

/* Judges the looks in order on one fresh entry, with lua_timeout_ms 200. */
static void judge_all(const look *looks, size_t n) {
  sl_watchdog_entry e = {0};
  for (size_t i = 0; i < n; i++) {
    const look *l = &looks[i];
    int got = sl_watchdog_judge(&e, l->busy, l->step, l->acked, l->now, 200);
    if (got != l->verdict)
      fail_msg("look %zu (at %.2f): %d, expected %d", i, l->now, got, l->verdict);
  }
}

#define JUDGE_ALL(...)                                                \
  do {                                                                \
    const look looks[] = {__VA_ARGS__};                               \
    judge_all(looks, sizeof(looks) / sizeof(looks[0]));               \
  } while (0)

/* The first look only starts the clock, whatever the step. */
static void test_first_look(void **state) {
  (void)state;
  JUDGE_ALL({1, 0, 1, 100.0, W}, {1, 0, 1, 100.1, W}, {1, 0, 1, 100.21, I});
}

/* A step seen busy is interrupted once timeout_ms after it was first seen,
 * declared stuck at twice that, and never judged again, even once the
 * callback has returned. */
static void test_interrupt_then_stuck(void **state) {
  (void)state;
  JUDGE_ALL({1, 7, 1, 10.0, W}, {1, 7, 1, 10.15, W}, {1, 7, 1, 10.21, I}, {1, 7, 1, 10.25, W},
            {1, 7, 1, 10.39, W}, {1, 7, 1, 10.41, S}, {1, 7, 1, 11.0, W}, {0, 9, 1, 12.0, W},
            {1, 10, 1, 20.0, W});
}

/* A new step, or a worker out of Lua, starts the clock again: a busy
 * worker whose callbacks are each short is never interrupted, and a new
 * callback after an interrupted one has its own clock. */
static void test_progress_resets(void **state) {
  (void)state;
  look many[100];
  for (int i = 0; i < 100; i++) many[i] = (look){1, (uint64_t)i, 1, 1.0 + i * 0.15, W};
  judge_all(many, 100);
  JUDGE_ALL({1, 3, 1, 1.0, W}, {0, 3, 1, 1.3, W}, {1, 3, 1, 1.4, W}, {1, 3, 1, 1.61, I},
            {1, 4, 1, 1.7, W}, {1, 4, 1, 1.85, W}, {1, 4, 1, 1.91, I});
}

/* An interrupt its thread has not handled yet: stuck only
 * SL_WATCHDOG_UNACKED_S later, unless it is handled meanwhile. */
static void test_unacked(void **state) {
  (void)state;
  JUDGE_ALL({1, 2, 0, 1.0, W}, {1, 2, 0, 1.21, I}, {1, 2, 0, 1.41, W}, {1, 2, 0, 11.3, W},
            {1, 2, 0, 11.41, S});
  JUDGE_ALL({1, 2, 0, 1.0, W}, {1, 2, 0, 1.21, I}, {1, 2, 0, 1.5, W}, {1, 2, 1, 4.0, S});
}

/* lua_timeout_ms = 0: nothing is ever stopped. */
static void test_off(void **state) {
  (void)state;
  sl_watchdog_entry e = {0};
  for (int i = 0; i < 10; i++)
    assert_int_equal(sl_watchdog_judge(&e, 1, 5, 1, 1.0 + i * 100.0, 0), W);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_period),
      cmocka_unit_test(test_first_look),
      cmocka_unit_test(test_interrupt_then_stuck),
      cmocka_unit_test(test_progress_resets),
      cmocka_unit_test(test_unacked),
      cmocka_unit_test(test_off),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
