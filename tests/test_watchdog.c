/*
 * The Lua watchdog's rule (src/proxy/watchdog.c, sl_watchdog_judge): when a
 * worker's callback is interrupted, when its worker is declared stuck, when
 * it is no longer, and what starts the clock again. The signal, the hook
 * and the stuck worker's effects (its sockets leaving their groups and
 * coming back) run through the real binary in
 * spec/integration/lua_timeout_spec.lua.
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
#define R SL_WATCHDOG_RECOVERED

/* Judges the looks in order on e, with lua_timeout_ms 200. */
static void judge_on(sl_watchdog_entry *e, const look *looks, size_t n) {
  for (size_t i = 0; i < n; i++) {
    const look *l = &looks[i];
    int got = sl_watchdog_judge(e, l->busy, l->step, l->acked, l->now, 200);
    if (got != l->verdict)
      fail_msg("look %zu (at %.2f): %d, expected %d", i, l->now, got, l->verdict);
  }
}

/* The same on one fresh entry. */
static void judge_all(const look *looks, size_t n) {
  sl_watchdog_entry e = {0};
  judge_on(&e, looks, n);
}

#define JUDGE_ON(e, ...)                                              \
  do {                                                                \
    const look looks[] = {__VA_ARGS__};                               \
    judge_on((e), looks, sizeof(looks) / sizeof(looks[0]));           \
  } while (0)

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
 * declared stuck at twice that, and then waits for as long as that step is
 * seen busy. */
static void test_interrupt_then_stuck(void **state) {
  (void)state;
  sl_watchdog_entry e = {0};
  JUDGE_ON(&e, {1, 7, 1, 10.0, W}, {1, 7, 1, 10.15, W}, {1, 7, 1, 10.21, I}, {1, 7, 1, 10.25, W},
           {1, 7, 1, 10.39, W}, {1, 7, 1, 10.41, S});
  assert_true(e.stuck);
  assert_true(e.stuck_at == 10.41);
  JUDGE_ON(&e, {1, 7, 1, 11.0, W}, {1, 7, 0, 60.0, W}, {1, 7, 1, 3600.0, W});
  assert_true(e.stuck);
}

/* A stuck worker seen out of Lua (its C call returned, nothing else to
 * do), or in Lua at another step (it went on to the next event, or the
 * interrupt it had missed was raised once its code ran again): no longer
 * stuck, once; began and stuck_at tell how long it was out; the step seen
 * then has a clock of its own. */
static void test_stuck_then_recovered(void **state) {
  (void)state;
  sl_watchdog_entry e = {0};
  JUDGE_ON(&e, {1, 7, 1, 10.0, W}, {1, 7, 1, 10.21, I}, {1, 7, 1, 10.41, S}, {1, 7, 1, 12.0, W},
           {0, 7, 1, 12.05, R});
  assert_false(e.stuck);
  assert_true(e.began == 10.0);
  assert_true(e.stuck_at == 10.41);
  JUDGE_ON(&e, {0, 7, 1, 12.1, W}, {1, 8, 1, 13.0, W}, {1, 8, 1, 13.21, I}, {1, 8, 1, 13.41, S},
           {1, 8, 1, 15.0, W}, {1, 9, 1, 15.05, R});
  assert_true(e.began == 13.0);
  assert_true(e.stuck_at == 13.41);
  /* The step seen when it came back is judged from then on: busy still
   * 200 ms later, it is interrupted, and stuck again at 400 ms. */
  JUDGE_ON(&e, {1, 9, 1, 15.2, W}, {1, 9, 1, 15.26, I}, {1, 9, 1, 15.46, S});
  /* Stuck without its thread having taken the interrupt: the same. */
  sl_watchdog_entry u = {0};
  JUDGE_ON(&u, {1, 2, 0, 1.0, W}, {1, 2, 0, 1.21, I}, {1, 2, 0, 11.41, S}, {1, 2, 0, 20.0, W},
           {1, 3, 0, 20.1, R}, {1, 3, 0, 20.2, W});
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

/* /health shows the report of the worker stuck first among those still
 * stuck: when it comes back, the next one's. */
static void test_reported_is_the_first_still_stuck(void **state) {
  (void)state;
  sl_watchdog_entry e[3];
  memset(e, 0, sizeof(e));
  sl_watchdog wd = {.e = e, .n = 3};
  assert_int_equal(sl_watchdog_reported(&wd), -1);
  JUDGE_ON(&e[2], {1, 1, 1, 1.0, W}, {1, 1, 1, 1.21, I}, {1, 1, 1, 1.41, S});
  assert_int_equal(sl_watchdog_reported(&wd), 2);
  JUDGE_ON(&e[0], {1, 5, 1, 1.1, W}, {1, 5, 1, 1.31, I}, {1, 5, 1, 1.51, S});
  JUDGE_ON(&e[1], {1, 9, 1, 1.2, W}, {1, 9, 1, 1.41, I}, {1, 9, 1, 1.61, S});
  assert_int_equal(sl_watchdog_reported(&wd), 2);
  JUDGE_ON(&e[2], {0, 2, 1, 2.0, R});
  assert_int_equal(sl_watchdog_reported(&wd), 0);
  JUDGE_ON(&e[0], {1, 6, 1, 2.0, R});
  assert_int_equal(sl_watchdog_reported(&wd), 1);
  /* Worker 2 stuck again: after worker 1, which stays first. */
  JUDGE_ON(&e[2], {1, 3, 1, 3.0, W}, {1, 3, 1, 3.21, I}, {1, 3, 1, 3.41, S});
  assert_int_equal(sl_watchdog_reported(&wd), 1);
  JUDGE_ON(&e[1], {0, 9, 1, 4.0, R});
  assert_int_equal(sl_watchdog_reported(&wd), 2);
  JUDGE_ON(&e[2], {0, 3, 1, 4.0, R});
  assert_int_equal(sl_watchdog_reported(&wd), -1);
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
      cmocka_unit_test(test_stuck_then_recovered),
      cmocka_unit_test(test_progress_resets),
      cmocka_unit_test(test_unacked),
      cmocka_unit_test(test_reported_is_the_first_still_stuck),
      cmocka_unit_test(test_off),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
