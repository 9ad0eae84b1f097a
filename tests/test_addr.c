/*
 * io/addr: numeric hosts parse (IPv4 and IPv6, ports checked), format back
 * for logs, and the loopback and same-address tests that splice = "auto"
 * decides by.
 */
#include "test_util.h"

#include <netinet/in.h>

#include "io/addr.h"
#include "util/common.h"

static int loopback(const char *host) {
  sl_addr a;
  assert_int_equal(SL_OK, sl_addr_parse(&a, host, 80));
  return sl_addr_is_loopback((const struct sockaddr *)&a.ss);
}

static void test_parse_and_format(void **state) {
  (void)state;
  sl_addr a;
  char out[64];
  assert_int_equal(SL_OK, sl_addr_parse(&a, "127.0.0.1", 8080));
  assert_string_equal("127.0.0.1:8080", sl_addr_format((struct sockaddr *)&a.ss, out, sizeof(out)));
  assert_int_equal(SL_OK, sl_addr_parse(&a, "::1", 443));
  assert_string_equal("[::1]:443", sl_addr_format((struct sockaddr *)&a.ss, out, sizeof(out)));
  assert_int_equal(SL_ERROR, sl_addr_parse(&a, "localhost", 80));
  assert_int_equal(SL_ERROR, sl_addr_parse(&a, "[::1]", 80));
  assert_int_equal(SL_ERROR, sl_addr_parse(&a, "127.0.0.1", 65536));
  assert_int_equal(SL_ERROR, sl_addr_parse(&a, "127.0.0.1", -1));
}

static void test_loopback(void **state) {
  (void)state;
  assert_true(loopback("127.0.0.1"));
  assert_true(loopback("127.255.0.9"));
  assert_true(loopback("::1"));
  assert_true(loopback("::ffff:127.0.0.1"));
  assert_false(loopback("128.0.0.1"));
  assert_false(loopback("10.0.0.1"));
  assert_false(loopback("0.0.0.0"));
  assert_false(loopback("::"));
  assert_false(loopback("::2"));
  assert_false(loopback("::ffff:10.0.0.1"));
  assert_false(loopback("2001:db8::1"));
  struct sockaddr_storage un = {.ss_family = AF_UNIX};
  assert_false(sl_addr_is_loopback((const struct sockaddr *)&un));
}

static int same(const char *x, int xp, const char *y, int yp) {
  sl_addr a, b;
  assert_int_equal(SL_OK, sl_addr_parse(&a, x, xp));
  assert_int_equal(SL_OK, sl_addr_parse(&b, y, yp));
  return sl_addr_same_host((const struct sockaddr *)&a.ss, (const struct sockaddr *)&b.ss);
}

static void test_same_host(void **state) {
  (void)state;
  assert_true(same("192.0.2.2", 80, "192.0.2.2", 45000));
  assert_false(same("192.0.2.2", 80, "192.0.2.3", 80));
  assert_true(same("fd00::2", 80, "fd00::2", 1));
  assert_false(same("fd00::2", 80, "fd00::3", 80));
  assert_false(same("192.0.2.2", 80, "::ffff:192.0.2.2", 80));
  struct sockaddr_storage un = {.ss_family = AF_UNIX};
  assert_false(sl_addr_same_host((const struct sockaddr *)&un, (const struct sockaddr *)&un));
}

/* With ports: an inherited listening socket is matched to a listener by
 * its bound address (proxy/upgrade.h). */
static void test_same(void **state) {
  (void)state;
  sl_addr a, b;
  assert_int_equal(SL_OK, sl_addr_parse(&a, "127.0.0.1", 7000));
  assert_int_equal(SL_OK, sl_addr_parse(&b, "127.0.0.1", 7000));
  assert_true(sl_addr_same((const struct sockaddr *)&a.ss, (const struct sockaddr *)&b.ss));
  assert_int_equal(SL_OK, sl_addr_parse(&b, "127.0.0.1", 7001));
  assert_false(sl_addr_same((const struct sockaddr *)&a.ss, (const struct sockaddr *)&b.ss));
  assert_int_equal(SL_OK, sl_addr_parse(&b, "127.0.0.2", 7000));
  assert_false(sl_addr_same((const struct sockaddr *)&a.ss, (const struct sockaddr *)&b.ss));
  assert_int_equal(SL_OK, sl_addr_parse(&a, "::1", 7000));
  assert_int_equal(SL_OK, sl_addr_parse(&b, "::1", 7000));
  assert_true(sl_addr_same((const struct sockaddr *)&a.ss, (const struct sockaddr *)&b.ss));
  ((struct sockaddr_in6 *)(void *)&b.ss)->sin6_scope_id = 2;
  assert_false(sl_addr_same((const struct sockaddr *)&a.ss, (const struct sockaddr *)&b.ss));
  assert_int_equal(SL_OK, sl_addr_parse(&b, "::1", 7001));
  assert_false(sl_addr_same((const struct sockaddr *)&a.ss, (const struct sockaddr *)&b.ss));
}

/* The system's resolver: localhost from /etc/hosts, a numeric host as
 * itself, each address once. (Names that do not resolve, and names of a
 * hosts file of its own: spec/integration/resolve_spec.lua.) */
static void test_host_name(void **state) {
  (void)state;
  const char *good[] = {"db", "db.internal", "db.internal.", "a-b.c", "x1", "1x", "1-2.example"};
  for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
    assert_true(sl_addr_is_host_name(good[i]));
  char label63[64], label64[65], long254[255];
  memset(label63, 'a', 63);
  label63[63] = '\0';
  memset(label64, 'a', 64);
  label64[64] = '\0';
  memset(long254, 'a', 254);
  for (int i = 63; i < 254; i += 64) long254[i] = '.';
  long254[254] = '\0';
  assert_true(sl_addr_is_host_name(label63));
  const char *bad[] = {"", ".", "a..b", ".a", "-a", "a-", "a-.b", "a_b", "a b", "10.0.0.1",
                       "1.2.3", "[::1]", "a:b", label64, long254};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    if (sl_addr_is_host_name(bad[i])) fail_msg("taken as a host name: \"%s\"", bad[i]);
  }
}

static void test_resolve(void **state) {
  (void)state;
  char text[SL_ADDR_RESOLVE_MAX][46];
  int family[SL_ADDR_RESOLVE_MAX], n = -1;
  const char *why = NULL;
  assert_int_equal(sl_addr_resolve("localhost", text, family, &n, &why), SL_OK);
  assert_true(n >= 1);
  int v4 = 0;
  for (int i = 0; i < n; i++) {
    if (family[i] == AF_INET && strcmp(text[i], "127.0.0.1") == 0) v4++;
    assert_true(family[i] == AF_INET || family[i] == AF_INET6);
    for (int j = 0; j < i; j++)
      assert_false(family[i] == family[j] && strcmp(text[i], text[j]) == 0);
  }
  assert_int_equal(v4, 1);
  assert_int_equal(sl_addr_resolve("192.0.2.7", text, family, &n, &why), SL_OK);
  assert_int_equal(n, 1);
  assert_int_equal(family[0], AF_INET);
  assert_string_equal(text[0], "192.0.2.7");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_parse_and_format),
      cmocka_unit_test(test_loopback),
      cmocka_unit_test(test_same_host),
      cmocka_unit_test(test_same),
      cmocka_unit_test(test_host_name),
      cmocka_unit_test(test_resolve),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
