/*
 * A listener on a real worker loop and real sockets, in a SO_REUSEPORT
 * group of two on 127.0.0.1: the worker's socket ("ours", accepted by the
 * listener) and another the test accepts on by hand ("theirs", as another
 * worker would). What the Lua watchdog does to a stuck worker's sockets
 * (sl_listener_withdraw: new connections go to theirs, our accept fails,
 * the listener goes OUT) and undoes (sl_listener_listen, then the worker's
 * wake: ours accepts again), and how that meets the gate's max_connections
 * (a listener paused at the limit stays paused until there is room).
 */
#include "test_util.h"

#include <netinet/in.h>
#include <stdio.h>

#include "io/listener.h"
#include "io/worker.h"
#include "util/common.h"

typedef struct fixture {
  sl_worker *w;
  sl_listen_gate gate;
  sl_listener l;
  int ours, theirs;        /* the group's two sockets */
  struct sockaddr_in at;   /* their address */
  int accepted[64];        /* what the listener accepted, still open */
  int naccepted;
  int theirs_accepted;     /* connections that went to theirs */
  int woken;               /* the gate's wake was called */
  int clients[128];
  int nclients;
  int lost;                /* reset in our queue by a withdrawal, never accepted */
} fixture;

static void on_accept(sl_listener *l, int fd, const sl_addr *remote) {
  SL_UNUSED(remote);
  fixture *f = l->ud;
  assert_true(f->naccepted < 64);
  f->accepted[f->naccepted++] = fd;
}

static void on_gate_wake(void *ud) {
  fixture *f = ud;
  f->woken++;
}

static int fixture_setup(void **state) {
  fixture *f = calloc(1, sizeof(*f));
  if (f == NULL) return -1;
  f->w = sl_worker_create(0, NULL);
  if (f->w == NULL) return -1;
  /* A port of its own, as sluice's listeners always have: the kernel gives
   * back a port it chose at bind (port 0) when the socket is withdrawn. */
  sl_addr a;
  if (sl_addr_parse(&a, "127.0.0.1", 0) != SL_OK) return -1;
  int probe = sl_listener_bind(&a, 0, 511);
  socklen_t len = sizeof(f->at);
  if (probe < 0 || getsockname(probe, (struct sockaddr *)&f->at, &len) != 0) return -1;
  close(probe);
  if (sl_addr_parse(&a, "127.0.0.1", ntohs(f->at.sin_port)) != SL_OK) return -1;
  f->ours = sl_listener_bind(&a, 1, 511);
  f->theirs = sl_listener_bind(&a, 1, 511);
  if (f->ours < 0 || f->theirs < 0) return -1;
  sl_listen_gate_init(&f->gate, 0, on_gate_wake, f);
  sl_listener_start(&f->l, f->w, f->ours, &f->gate, "front", on_accept, f);
  *state = f;
  return 0;
}

static int fixture_teardown(void **state) {
  fixture *f = *state;
  sl_listener_stop(&f->l);
  for (int i = 0; i < f->naccepted; i++) close(f->accepted[i]);
  for (int i = 0; i < f->nclients; i++) close(f->clients[i]);
  close(f->ours);
  close(f->theirs);
  SL_TEST_ASSERT_POOL_CLEAN(f->w->pool);
  sl_worker_destroy(f->w);
  free(f);
  return 0;
}

/* Runs the worker's loop once, and accepts what theirs has. */
static void turn(fixture *f) {
  ev_run(f->w->loop, EVRUN_NOWAIT);
  int fd;
  while ((fd = accept(f->theirs, NULL, NULL)) >= 0) {
    close(fd);
    f->theirs_accepted++;
  }
}

static int all_taken(const fixture *f) {
  return f->naccepted + f->theirs_accepted + f->lost >= f->nclients;
}

/* Turns until every client so far has been taken by one of the two (the
 * kernel queues a loopback connection before connect returns; bounded all
 * the same). */
static void settle(fixture *f) {
  for (int i = 0; i < 2000; i++) {
    turn(f);
    if (all_taken(f)) return;
    usleep(1000);
  }
  fail_msg("%d connections (%d lost), %d accepted by ours and %d by theirs", f->nclients,
           f->lost, f->naccepted, f->theirs_accepted);
}

/* One more client connection to the group. */
static void connect_one(fixture *f) {
  assert_true(f->nclients < 128);
  int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  assert_true(c >= 0);
  assert_int_equal(connect(c, (struct sockaddr *)&f->at, sizeof(f->at)), 0);
  f->clients[f->nclients++] = c;
}

/* Connects clients one at a time until ours has accepted `want` in all
 * (the kernel spreads them over the group by their addresses: half of
 * them, on average, come to ours). */
static void connect_until_ours(fixture *f, int want) {
  while (f->naccepted < want) {
    if (f->nclients >= 100) fail_msg("ours accepted %d of %d", f->naccepted, f->nclients);
    connect_one(f);
    settle(f);
  }
}

/* Connects clients one at a time until one comes to ours while the gate
 * is full: ours pauses, and that one waits in our queue. */
static void connect_until_paused(fixture *f) {
  while (!f->l.at_limit) {
    if (f->nclients >= 100) fail_msg("never paused");
    connect_one(f);
    for (int i = 0; i < 20 && !f->l.at_limit && !all_taken(f); i++) {
      turn(f);
      usleep(1000);
    }
  }
  assert_false(ev_is_active(&f->l.io));
}

/* Withdrawn, ours takes nothing: its accept fails, it goes OUT and says
 * so; a wake changes nothing until the socket listens again; then ours
 * accepts again. Twice, as a worker stuck twice would be. */
static void test_a_withdrawn_listener_goes_out_and_comes_back(void **state) {
  fixture *f = *state;
  connect_until_ours(f, 1);
  for (int round = 0; round < 2; round++) {
    assert_int_equal(sl_listener_withdraw(f->ours), SL_OK);
    int before = f->naccepted;
    for (int i = 0; i < 20; i++) connect_one(f);
    settle(f);
    assert_int_equal(f->naccepted, before);
    assert_true(f->l.out);
    assert_false(ev_is_active(&f->l.io));
    sl_listener_retry(&f->l);  /* a wake for another reason (the gate) */
    assert_true(f->l.out);
    assert_false(ev_is_active(&f->l.io));

    assert_int_equal(sl_listener_listen(f->ours, 511), SL_OK);
    sl_listener_retry(&f->l);
    assert_false(f->l.out);
    assert_true(ev_is_active(&f->l.io));
    connect_until_ours(f, before + 1);
  }
  assert_int_equal(f->woken, 0);
}

/* Put back before the worker's accept noticed: nothing to resume, it goes
 * on accepting. */
static void test_a_listener_put_back_before_it_noticed_goes_on(void **state) {
  fixture *f = *state;
  assert_int_equal(sl_listener_withdraw(f->ours), SL_OK);
  assert_int_equal(sl_listener_listen(f->ours, 511), SL_OK);
  connect_until_ours(f, 2);
  assert_false(f->l.out);
  sl_listener_retry(&f->l);
  assert_true(ev_is_active(&f->l.io));
}

/* Paused at max_connections when withdrawn and put back: it stays paused
 * while the gate is full (a wake finds no room), and resumes once a
 * connection leaves. */
static void test_paused_at_the_limit_stays_paused_across_a_withdrawal(void **state) {
  fixture *f = *state;
  atomic_store(&f->gate.max, 1);
  connect_until_ours(f, 1);
  connect_until_paused(f);
  assert_int_equal(f->naccepted, 1);
  assert_false(ev_is_active(&f->l.io));

  /* The connection waiting in our queue is reset. */
  assert_int_equal(sl_listener_withdraw(f->ours), SL_OK);
  f->lost++;
  assert_int_equal(sl_listener_listen(f->ours, 511), SL_OK);
  sl_listener_retry(&f->l);
  assert_true(f->l.at_limit);
  assert_false(f->l.out);
  assert_false(ev_is_active(&f->l.io));

  /* A connection leaves: the gate wakes the workers, ours resumes. */
  close(f->accepted[0]);
  f->accepted[0] = f->accepted[--f->naccepted];
  sl_listen_gate_leave(&f->gate);
  assert_int_equal(f->woken, 1);
  sl_listener_retry(&f->l);
  assert_false(f->l.at_limit);
  assert_true(ev_is_active(&f->l.io));
  connect_until_ours(f, 1);
}

/* OUT while the other workers fill the gate: put back, it accepts nothing
 * past the limit (the first connection that comes pauses it), and resumes
 * once there is room. */
static void test_out_then_full_pauses_at_the_limit(void **state) {
  fixture *f = *state;
  assert_int_equal(sl_listener_withdraw(f->ours), SL_OK);
  connect_one(f);
  settle(f);
  for (int i = 0; i < 100 && !f->l.out; i++) {
    turn(f);
    usleep(1000);
  }
  assert_true(f->l.out);
  /* Other workers' connections fill it meanwhile. */
  atomic_store(&f->gate.max, 3);
  atomic_store(&f->gate.open, 3);
  assert_int_equal(sl_listener_listen(f->ours, 511), SL_OK);
  sl_listener_retry(&f->l);
  assert_false(f->l.out);
  connect_until_paused(f);
  assert_int_equal(f->naccepted, 0);
  sl_listen_gate_leave(&f->gate);
  assert_int_equal(f->woken, 1);
  sl_listener_retry(&f->l);
  assert_true(ev_is_active(&f->l.io));
  /* The one waiting in our queue. */
  for (int i = 0; i < 2000 && f->naccepted == 0; i++) {
    turn(f);
    usleep(1000);
  }
  assert_int_equal(f->naccepted, 1);
  assert_int_equal(atomic_load(&f->gate.open), 3);
}

/* max_connection_rate's arithmetic, at times the test gives: a second's
 * worth at once, then one per 1/rate seconds; a refusal takes nothing; a
 * place given back (an accept that found no connection) can be taken
 * again; a new rate starts afresh, the same one does not; an idle gate has
 * its second's worth again. */
static void test_rate(void **state) {
  SL_UNUSED(state);
  sl_listen_gate g;
  sl_listen_gate_init(&g, 0, NULL, NULL);
  const int64_t s = 1000000000;
  int64_t t = 10 * s;
  for (int i = 0; i < 100; i++) assert_true(sl_listen_gate_rate_take(&g, t) == 0);   /* no rate */
  sl_listen_gate_set_rate(&g, 4);
  for (int i = 0; i < 4; i++) assert_true(sl_listen_gate_rate_take(&g, t) == 0);
  double w = sl_listen_gate_rate_take(&g, t);
  assert_true(w > 0.2499 && w < 0.2501);
  w = sl_listen_gate_rate_take(&g, t);   /* refused: nothing was taken */
  assert_true(w > 0.2499 && w < 0.2501);
  t += s / 4;
  assert_true(sl_listen_gate_rate_take(&g, t) == 0);   /* due a quarter second on */
  assert_true(sl_listen_gate_rate_take(&g, t) > 0);
  sl_listen_gate_rate_give_back(&g);
  assert_true(sl_listen_gate_rate_take(&g, t) == 0);
  assert_true(sl_listen_gate_rate_take(&g, t) > 0);
  sl_listen_gate_set_rate(&g, 4);                       /* the same rate: no fresh start */
  assert_true(sl_listen_gate_rate_take(&g, t) > 0);
  sl_listen_gate_set_rate(&g, 8);
  for (int i = 0; i < 8; i++) assert_true(sl_listen_gate_rate_take(&g, t) == 0);
  w = sl_listen_gate_rate_take(&g, t);
  assert_true(w > 0.1249 && w < 0.1251);
  t += 20 * s;   /* idle */
  for (int i = 0; i < 8; i++) assert_true(sl_listen_gate_rate_take(&g, t) == 0);
  assert_true(sl_listen_gate_rate_take(&g, t) > 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_rate),
      cmocka_unit_test_setup_teardown(test_a_withdrawn_listener_goes_out_and_comes_back,
                                      fixture_setup, fixture_teardown),
      cmocka_unit_test_setup_teardown(test_a_listener_put_back_before_it_noticed_goes_on,
                                      fixture_setup, fixture_teardown),
      cmocka_unit_test_setup_teardown(test_paused_at_the_limit_stays_paused_across_a_withdrawal,
                                      fixture_setup, fixture_teardown),
      cmocka_unit_test_setup_teardown(test_out_then_full_pauses_at_the_limit, fixture_setup,
                                      fixture_teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
