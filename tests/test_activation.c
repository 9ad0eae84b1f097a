/*
 * proxy/activation: systemd's LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES
 * read as sd_listen_fds(3) reads them: sockets for another process are
 * not taken, malformed values are refused with a message naming the
 * variable, and each socket's name is found for the log.
 */
#include "test_util.h"

#include "proxy/activation.h"
#include "util/common.h"

static int parse(const char *pid, const char *fds, const char *names, int *n, char *err) {
  *n = -1;
  err[0] = '\0';
  return sl_activation_parse(pid, fds, names, 4242, n, err, 256);
}

static void test_for_this_process(void **state) {
  (void)state;
  char err[256];
  int n;
  assert_int_equal(SL_OK, parse("4242", "2", NULL, &n, err));
  assert_int_equal(2, n);
  assert_int_equal(SL_OK, parse("4242", "3", "web:admin:extra", &n, err));
  assert_int_equal(3, n);
  assert_int_equal(SL_OK, parse("4242", "0", "", &n, err));
  assert_int_equal(0, n);
}

static void test_not_for_this_process(void **state) {
  (void)state;
  char err[256];
  int n;
  /* Another process's, or no process said: nothing taken, nothing refused
   * (LISTEN_FDS is not looked at). */
  assert_int_equal(SL_OK, parse("4243", "2", NULL, &n, err));
  assert_int_equal(0, n);
  assert_int_equal(SL_OK, parse("4243", "many", "a", &n, err));
  assert_int_equal(0, n);
  assert_int_equal(SL_OK, parse(NULL, "2", NULL, &n, err));
  assert_int_equal(0, n);
  assert_int_equal(SL_OK, parse("", "2", NULL, &n, err));
  assert_int_equal(0, n);
  /* No LISTEN_FDS: nothing, whatever LISTEN_PID says. */
  assert_int_equal(SL_OK, parse("4242", NULL, NULL, &n, err));
  assert_int_equal(0, n);
  assert_int_equal(SL_OK, parse("oops", "", NULL, &n, err));
  assert_int_equal(0, n);
}

static void test_malformed(void **state) {
  (void)state;
  char err[256];
  int n;
  static const char *bad_fds[] = {"two", "-1", "+2", " 2", "2 ", "2x", "", "99999999999999999999",
                                  "2147483647"};
  for (size_t i = 0; i < sizeof(bad_fds) / sizeof(bad_fds[0]); i++) {
    if (bad_fds[i][0] == '\0') continue;   /* empty: unset */
    assert_int_equal(SL_ERROR, parse("4242", bad_fds[i], NULL, &n, err));
    assert_int_equal(0, n);
    assert_non_null(strstr(err, "LISTEN_FDS="));
    assert_non_null(strstr(err, "expected the number of listening sockets"));
  }
  assert_int_equal(SL_ERROR, parse("42x", "2", NULL, &n, err));
  assert_string_equal("LISTEN_PID=42x: expected the process id the sockets of LISTEN_FDS are for",
                      err);
  assert_int_equal(SL_ERROR, parse("0", "2", NULL, &n, err));
  assert_int_equal(SL_ERROR, parse("-4242", "2", NULL, &n, err));
  assert_int_equal(SL_ERROR, parse("4242", "2", "web", &n, err));
  assert_string_equal("LISTEN_FDNAMES=web: 1 name for the 2 sockets of LISTEN_FDS", err);
  assert_int_equal(SL_ERROR, parse("4242", "1", "a:b", &n, err));
  assert_string_equal("LISTEN_FDNAMES=a:b: 2 names for the 1 socket of LISTEN_FDS", err);
  assert_int_equal(SL_ERROR, parse("4242", "1", "", &n, err));
  assert_string_equal("LISTEN_FDNAMES=: 0 names for the 1 socket of LISTEN_FDS", err);
  assert_int_equal(0, n);
}

static void test_names(void **state) {
  (void)state;
  char out[16];
  assert_string_equal("web", sl_activation_name("web:admin:extra", 0, out, sizeof(out)));
  assert_string_equal("admin", sl_activation_name("web:admin:extra", 1, out, sizeof(out)));
  assert_string_equal("extra", sl_activation_name("web:admin:extra", 2, out, sizeof(out)));
  assert_string_equal("", sl_activation_name("web:admin:extra", 3, out, sizeof(out)));
  assert_string_equal("", sl_activation_name("web::extra", 1, out, sizeof(out)));
  assert_string_equal("", sl_activation_name(NULL, 0, out, sizeof(out)));
  /* Cut to the room there is. */
  assert_string_equal("a-very-long-nam",
                      sl_activation_name("x:a-very-long-name-indeed", 1, out, sizeof(out)));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_for_this_process),
      cmocka_unit_test(test_not_for_this_process),
      cmocka_unit_test(test_malformed),
      cmocka_unit_test(test_names),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
