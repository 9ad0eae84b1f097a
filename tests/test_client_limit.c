/*
 * max_connections_per_client's table (proxy/client_limit.h): keys from
 * addresses, the limit per key, growth and shrinking with probe runs kept
 * whole, and threads entering and leaving at once.
 */
#include "test_util.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <string.h>

#include "proxy/client_limit.h"
#include "util/common.h"

static sl_addr_key key4(uint32_t host_order) {
  struct sockaddr_in sa = {.sin_family = AF_INET};
  sa.sin_addr.s_addr = htonl(host_order);
  sa.sin_port = htons((uint16_t)(host_order & 0xffff));
  sl_addr_key k;
  sl_addr_key_of((const struct sockaddr *)&sa, &k);
  return k;
}

static sl_addr_key key_text(const char *text, int port) {
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof(ss));
  struct sockaddr_in *in4 = (struct sockaddr_in *)&ss;
  struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
  if (inet_pton(AF_INET, text, &in4->sin_addr) == 1) {
    in4->sin_family = AF_INET;
    in4->sin_port = htons((uint16_t)port);
  } else {
    assert_int_equal(inet_pton(AF_INET6, text, &in6->sin6_addr), 1);
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
  }
  sl_addr_key k;
  sl_addr_key_of((const struct sockaddr *)&ss, &k);
  return k;
}

static void test_keys_ignore_ports_and_map_ipv4(void **state) {
  (void)state;
  sl_addr_key a = key_text("192.0.2.1", 1000), b = key_text("192.0.2.1", 2000);
  sl_addr_key m = key_text("::ffff:192.0.2.1", 3000), c = key_text("192.0.2.2", 1000);
  sl_addr_key v6 = key_text("2001:db8::1", 1000);
  assert_memory_equal(&a, &b, sizeof(a));
  assert_memory_equal(&a, &m, sizeof(a));
  assert_memory_not_equal(&a, &c, sizeof(a));
  assert_int_equal(v6.family, AF_INET6);
  struct sockaddr_storage un = {.ss_family = AF_UNIX};
  sl_addr_key u;
  sl_addr_key_of((const struct sockaddr *)&un, &u);
  assert_int_equal(u.family, 0);
}

static void test_limit_per_client(void **state) {
  (void)state;
  sl_client_limit cl;
  sl_client_limit_init(&cl, 2);
  sl_addr_key a = key_text("192.0.2.1", 1), b = key_text("192.0.2.2", 1);
  assert_int_equal(sl_client_limit_enter(&cl, &a), SL_CLIENT_COUNTED);
  assert_int_equal(sl_client_limit_enter(&cl, &a), SL_CLIENT_COUNTED);
  assert_int_equal(sl_client_limit_enter(&cl, &a), SL_CLIENT_REFUSED);
  assert_int_equal(sl_client_limit_enter(&cl, &b), SL_CLIENT_COUNTED);   /* others are not */
  assert_int_equal(sl_client_limit_open(&cl, &a), 2);
  sl_client_limit_leave(&cl, &a);
  assert_int_equal(sl_client_limit_enter(&cl, &a), SL_CLIENT_COUNTED);  /* room again */
  /* A reload that lifts the limit: new connections are not counted, the
   * counted ones still leave. */
  atomic_store(&cl.max, 0);
  assert_int_equal(sl_client_limit_enter(&cl, &a), SL_CLIENT_UNCOUNTED);
  sl_client_limit_leave(&cl, &a);
  sl_client_limit_leave(&cl, &a);
  sl_client_limit_leave(&cl, &b);
  assert_int_equal(cl.n, 0);
  sl_addr_key none = {0};
  atomic_store(&cl.max, 1);
  assert_int_equal(sl_client_limit_enter(&cl, &none), SL_CLIENT_UNCOUNTED);
  sl_client_limit_free(&cl);
}

/* Many clients: the table grows, every count stays right while entries
 * leave in an order that punches holes in probe runs, and it shrinks. */
static void test_grows_and_shrinks_keeping_counts(void **state) {
  (void)state;
  enum { N = 5000 };
  sl_client_limit cl;
  sl_client_limit_init(&cl, 3);
  for (uint32_t i = 0; i < N; i++) {
    sl_addr_key k = key4(0x0a000000u + i * 7919u);
    for (uint32_t j = 0; j <= i % 3; j++) assert_int_equal(sl_client_limit_enter(&cl, &k), SL_CLIENT_COUNTED);
  }
  assert_int_equal(cl.n, N);
  assert_true(cl.cap >= 2 * N);
  size_t grown = cl.cap;
  /* Every other client leaves entirely, in a scattered order. */
  for (uint32_t s = 0; s < N; s++) {
    uint32_t i = (s * 7u) % N;   /* 7 and N coprime: a permutation */
    if (i % 2) continue;
    sl_addr_key k = key4(0x0a000000u + i * 7919u);
    for (uint32_t j = 0; j <= i % 3; j++) sl_client_limit_leave(&cl, &k);
  }
  for (uint32_t i = 0; i < N; i++) {
    sl_addr_key k = key4(0x0a000000u + i * 7919u);
    assert_int_equal(sl_client_limit_open(&cl, &k), i % 2 ? i % 3 + 1 : 0);
    if (i % 2 && i % 3 == 2) assert_int_equal(sl_client_limit_enter(&cl, &k), SL_CLIENT_REFUSED);
  }
  for (uint32_t i = 1; i < N; i += 2) {
    sl_addr_key k = key4(0x0a000000u + i * 7919u);
    for (uint32_t j = 0; j <= i % 3; j++) sl_client_limit_leave(&cl, &k);
  }
  assert_int_equal(cl.n, 0);
  assert_true(cl.cap < grown);
  sl_client_limit_free(&cl);
}

typedef struct {
  sl_client_limit *cl;
  int counted, refused;
  int over;                    /* a count seen above the limit (must stay 0) */
} churn_job;

/* Enters each of 8 clients, holds what was counted while it checks the
 * count, then leaves: three such threads contend for 2 places each. */
static void *churn_thread(void *arg) {
  churn_job *j = arg;
  sl_addr_key k[8];
  int held[8];
  for (uint32_t i = 0; i < 8; i++) k[i] = key4(0x0b000000u + i);
  for (int round = 0; round < 3000; round++) {
    for (int i = 0; i < 8; i++) {
      held[i] = sl_client_limit_enter(j->cl, &k[i]) == SL_CLIENT_COUNTED;
      if (held[i]) j->counted++;
      else j->refused++;
      if (sl_client_limit_open(j->cl, &k[i]) > 2) j->over++;
    }
    for (int i = 0; i < 8; i++)
      if (held[i]) sl_client_limit_leave(j->cl, &k[i]);
  }
  return NULL;
}

/* Three threads, as three workers, on the same clients with a limit of
 * 2: no count ever exceeds it (a leave of what was not counted would
 * abort), all three threads get places, and every count ends at zero. */
static void test_threads_enter_and_leave_at_once(void **state) {
  (void)state;
  sl_client_limit cl;
  sl_client_limit_init(&cl, 2);
  churn_job jobs[3] = {{&cl, 0, 0, 0}, {&cl, 0, 0, 0}, {&cl, 0, 0, 0}};
  pthread_t th[3];
  for (int i = 0; i < 3; i++) assert_int_equal(pthread_create(&th[i], NULL, churn_thread, &jobs[i]), 0);
  for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(jobs[i].over, 0);
    assert_true(jobs[i].counted > 0);
    assert_int_equal(jobs[i].counted + jobs[i].refused, 3000 * 8);
  }
  assert_int_equal(cl.n, 0);
  sl_client_limit_free(&cl);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_keys_ignore_ports_and_map_ipv4),
      cmocka_unit_test(test_limit_per_client),
      cmocka_unit_test(test_grows_and_shrinks_keeping_counts),
      cmocka_unit_test(test_threads_enter_and_leave_at_once),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
