/*
 * Balancing (src/proxy/balance.c): which server each algorithm picks, with
 * weights, active connections, passive health marks, health-check marks,
 * backup servers and the servers a connection already tried. No sockets:
 * the balancer is a pure function of its state, so every count below is
 * exact or a fixed bound on a deterministic hash.
 */
#include "test_util.h"

#include <math.h>
#include <stdio.h>

#include "proxy/balance.h"
#include "proxy/config.h"
#include "util/common.h"

#define MAXP 16

typedef struct {
  sl_balancer b;
  sl_peer peers[MAXP];
} bal_fixture;

static void bal_init(bal_fixture *f, sl_balance kind, const int *weights, size_t n) {
  memset(f, 0, sizeof(*f));
  f->b.kind = kind;
  f->b.peers = f->peers;
  f->b.n = n;
  f->b.max_fails = 1;
  f->b.fail_timeout = 10.0;
  f->b.rng = 12345;
  for (size_t i = 0; i < n; i++) {
    char text[32];
    snprintf(text, sizeof(text), "127.0.0.1:%zu", 7000 + i);
    f->peers[i].weight = weights ? weights[i] : 1;
    f->peers[i].id = sl_balance_hash(text, strlen(text));
  }
}

static uint64_t key_of(uint32_t client) {
  uint8_t ip[4] = {10, (uint8_t)(client >> 16), (uint8_t)(client >> 8), (uint8_t)client};
  return sl_balance_hash(ip, sizeof(ip));
}

/* ---- names ---- */

static void test_parse_names(void **state) {
  SL_UNUSED(state);
  sl_balance k;
  const char *names[] = {"round_robin", "least_conn", "hash", "random_two"};
  for (int i = 0; i < 4; i++) {
    assert_int_equal(sl_balance_parse(names[i], &k), SL_OK);
    assert_int_equal(k, i);
    assert_string_equal(sl_balance_name(k), names[i]);
  }
  assert_int_equal(sl_balance_parse("rr", &k), SL_ERROR);
}

/* ---- round robin ---- */

static void test_round_robin_equal_weights_alternate(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_ROUND_ROBIN, NULL, 3);
  for (int i = 0; i < 30; i++) assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 0), i % 3);
}

static void test_round_robin_smooth_sequence(void **state) {
  SL_UNUSED(state);
  /* nginx's example: weights 5, 1, 1 give a a b a c a a, not a a a a a b c. */
  bal_fixture f;
  int w[] = {5, 1, 1};
  bal_init(&f, SL_BALANCE_ROUND_ROBIN, w, 3);
  int want[] = {0, 0, 1, 0, 2, 0, 0};
  for (int round = 0; round < 3; round++)
    for (int i = 0; i < 7; i++) assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 0), want[i]);
}

static void test_round_robin_distribution_follows_weights(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  int w[] = {1, 2, 3, 4};
  bal_init(&f, SL_BALANCE_ROUND_ROBIN, w, 4);
  int count[4] = {0};
  for (int i = 0; i < 1000; i++) count[sl_balance_pick(&f.b, 0, NULL, 0)]++;
  /* Exact in every window of sum(weights) picks. */
  assert_int_equal(count[0], 100);
  assert_int_equal(count[1], 200);
  assert_int_equal(count[2], 300);
  assert_int_equal(count[3], 400);
}

static void test_round_robin_retry_order_skips_tried(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_ROUND_ROBIN, NULL, 4);
  uint8_t skip[4] = {0};
  /* One connection trying every server: each once, then none left. */
  int seen[4] = {0};
  for (int t = 0; t < 4; t++) {
    int i = sl_balance_pick(&f.b, 0, skip, 0);
    assert_true(i >= 0 && i < 4);
    assert_false(skip[i]);
    skip[i] = 1;
    seen[i]++;
  }
  for (int i = 0; i < 4; i++) assert_int_equal(seen[i], 1);
  assert_int_equal(sl_balance_pick(&f.b, 0, skip, 0), -1);
}

static void test_round_robin_retry_takes_the_next_in_turn(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_ROUND_ROBIN, NULL, 3);
  uint8_t skip[3] = {0};
  assert_int_equal(sl_balance_pick(&f.b, 0, skip, 0), 0);
  skip[0] = 1;                         /* 0 failed: the retry goes to 1 */
  assert_int_equal(sl_balance_pick(&f.b, 0, skip, 0), 1);
  skip[1] = 1;
  assert_int_equal(sl_balance_pick(&f.b, 0, skip, 0), 2);
}

/* ---- passive health ---- */

static void test_failed_server_is_skipped_for_fail_timeout(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_ROUND_ROBIN, NULL, 3);
  f.b.max_fails = 2;
  f.b.fail_timeout = 10.0;
  assert_int_equal(sl_balance_report(&f.b, 1, 0, 100.0), 0);   /* one failure: still in */
  assert_true(sl_balance_available(&f.b, 1, 100.0));
  assert_int_equal(sl_balance_report(&f.b, 1, 0, 101.0), 1);   /* two in a row: out */
  assert_false(sl_balance_available(&f.b, 1, 101.0));
  for (int i = 0; i < 20; i++) assert_int_not_equal(sl_balance_pick(&f.b, 0, NULL, 105.0), 1);
  /* Back after fail_timeout. */
  assert_true(sl_balance_available(&f.b, 1, 111.0));
  int got1 = 0;
  for (int i = 0; i < 3; i++) got1 += sl_balance_pick(&f.b, 0, NULL, 111.0) == 1;
  assert_int_equal(got1, 1);
  /* It fails its one connect: out again at once (the count was not reset). */
  assert_int_equal(sl_balance_report(&f.b, 1, 0, 111.0), 1);
  assert_false(sl_balance_available(&f.b, 1, 111.5));
}

static void test_success_clears_the_failure_count(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_ROUND_ROBIN, NULL, 2);
  f.b.max_fails = 2;
  sl_balance_report(&f.b, 0, 0, 1.0);
  sl_balance_report(&f.b, 0, 1, 2.0);
  assert_int_equal(f.peers[0].fails, 0);
  assert_int_equal(sl_balance_report(&f.b, 0, 0, 3.0), 0);
  assert_true(sl_balance_available(&f.b, 0, 3.0));
}

static void test_max_fails_zero_and_single_server_never_mark(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_ROUND_ROBIN, NULL, 2);
  f.b.max_fails = 0;
  for (int i = 0; i < 5; i++) assert_int_equal(sl_balance_report(&f.b, 0, 0, 1.0), 0);
  assert_true(sl_balance_available(&f.b, 0, 1.0));
  bal_init(&f, SL_BALANCE_ROUND_ROBIN, NULL, 1);
  for (int i = 0; i < 5; i++) assert_int_equal(sl_balance_report(&f.b, 0, 0, 1.0), 0);
  assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 1.0), 0);
}

static void test_all_marked_down_then_reset(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_LEAST_CONN, NULL, 2);
  sl_balance_report(&f.b, 0, 0, 1.0);
  sl_balance_report(&f.b, 1, 0, 1.0);
  assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 2.0), -1);
  assert_int_equal(sl_balance_reset_passive(&f.b), 2);
  assert_true(sl_balance_pick(&f.b, 0, NULL, 2.0) >= 0);
}

static void test_health_check_down_is_skipped_by_every_algorithm(void **state) {
  SL_UNUSED(state);
  for (int k = 0; k < 4; k++) {
    bal_fixture f;
    bal_init(&f, (sl_balance)k, NULL, 3);
    f.peers[2].check_down = 1;
    for (uint32_t c = 0; c < 200; c++) assert_int_not_equal(sl_balance_pick(&f.b, key_of(c), NULL, 0), 2);
    /* A passive reset does not bring back what a health check holds down. */
    sl_balance_reset_passive(&f.b);
    f.peers[0].check_down = f.peers[1].check_down = 1;
    assert_int_equal(sl_balance_pick(&f.b, key_of(1), NULL, 0), -1);
  }
}

/* ---- least_conn ---- */

static void test_least_conn_picks_fewest_active(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_LEAST_CONN, NULL, 3);
  f.peers[0].active = 5;
  f.peers[1].active = 2;
  f.peers[2].active = 7;
  assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 0), 1);
  /* Counting each pick as a new connection: the loads even out. */
  for (int i = 0; i < 12; i++) f.peers[sl_balance_pick(&f.b, 0, NULL, 0)].active++;
  /* 26 in all: 9, 9 and 8 in some order. */
  uint32_t lo = SL_MIN(f.peers[0].active, SL_MIN(f.peers[1].active, f.peers[2].active));
  uint32_t hi = SL_MAX(f.peers[0].active, SL_MAX(f.peers[1].active, f.peers[2].active));
  assert_int_equal(f.peers[0].active + f.peers[1].active + f.peers[2].active, 26);
  assert_int_equal(lo, 8);
  assert_int_equal(hi, 9);
}

static void test_least_conn_is_weighted(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  int w[] = {1, 3};
  bal_init(&f, SL_BALANCE_LEAST_CONN, w, 2);
  f.peers[0].active = 2;   /* 2 per unit of weight */
  f.peers[1].active = 5;   /* 1.67 per unit */
  assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 0), 1);
  /* 40 connections that all stay open end up 1:3. */
  f.peers[0].active = f.peers[1].active = 0;
  for (int i = 0; i < 40; i++) f.peers[sl_balance_pick(&f.b, 0, NULL, 0)].active++;
  assert_int_equal(f.peers[0].active, 10);
  assert_int_equal(f.peers[1].active, 30);
}

static void test_least_conn_ties_go_round_robin(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_LEAST_CONN, NULL, 3);
  f.peers[2].active = 1;
  /* Connections that close at once: 0 and 1 tie and alternate; 2 is busier. */
  for (int i = 0; i < 10; i++) assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 0), i % 2);
}

static void test_least_conn_retry_skips_tried(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_LEAST_CONN, NULL, 3);
  f.peers[0].active = 0;
  f.peers[1].active = 3;
  f.peers[2].active = 1;
  uint8_t skip[3] = {1, 0, 0};
  assert_int_equal(sl_balance_pick(&f.b, 0, skip, 0), 2);
  skip[2] = 1;
  assert_int_equal(sl_balance_pick(&f.b, 0, skip, 0), 1);
}

/* ---- hash ---- */

static void test_hash_is_stable_per_client(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_HASH, NULL, 5);
  int first[100];
  for (uint32_t c = 0; c < 100; c++) first[c] = sl_balance_pick(&f.b, key_of(c), NULL, 0);
  for (int round = 0; round < 3; round++)
    for (uint32_t c = 0; c < 100; c++)
      assert_int_equal(sl_balance_pick(&f.b, key_of(c), NULL, 0), first[c]);
}

static void test_hash_spreads_by_weight(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  int w[] = {1, 1, 2, 4};
  bal_init(&f, SL_BALANCE_HASH, w, 4);
  int count[4] = {0};
  const int n = 40000;
  for (uint32_t c = 0; c < (uint32_t)n; c++) count[sl_balance_pick(&f.b, key_of(c), NULL, 0)]++;
  /* Expected 5000, 5000, 10000, 20000: within 5% of each (a fixed hash, so
   * the counts are the same at every run). */
  int want[] = {5000, 5000, 10000, 20000};
  for (int i = 0; i < 4; i++) {
    assert_true(abs(count[i] - want[i]) < want[i] / 20);
  }
}

static void test_hash_skip_moves_only_that_servers_clients(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_HASH, NULL, 5);
  enum { N = 5000 };
  static int before[N];
  for (uint32_t c = 0; c < N; c++) before[c] = sl_balance_pick(&f.b, key_of(c), NULL, 0);
  /* Server 3 is skipped (tried and failed, or marked down). */
  uint8_t skip[5] = {0, 0, 0, 1, 0};
  int moved = 0;
  int to[5] = {0};
  for (uint32_t c = 0; c < N; c++) {
    int now = sl_balance_pick(&f.b, key_of(c), skip, 0);
    assert_int_not_equal(now, 3);
    if (before[c] != 3) {
      assert_int_equal(now, before[c]);   /* everyone else stays */
    } else {
      moved++;
      to[now]++;
    }
  }
  /* Server 3's clients spread over the other four, not onto one. */
  assert_true(moved > N / 5 - N / 25 && moved < N / 5 + N / 25);
  for (int i = 0; i < 5; i++)
    if (i != 3) assert_true(to[i] > moved / 8);
  /* Marking down instead of skipping gives the same answer. */
  f.peers[3].check_down = 1;
  for (uint32_t c = 0; c < N; c++) {
    int now = sl_balance_pick(&f.b, key_of(c), NULL, 0);
    if (before[c] != 3) assert_int_equal(now, before[c]);
  }
}

static void test_hash_retry_order_is_the_clients_ranking(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_HASH, NULL, 4);
  for (uint32_t c = 0; c < 50; c++) {
    uint8_t skip[4] = {0};
    int order[4];
    for (int t = 0; t < 4; t++) {
      order[t] = sl_balance_pick(&f.b, key_of(c), skip, 0);
      assert_true(order[t] >= 0);
      skip[order[t]] = 1;
    }
    assert_int_equal(sl_balance_pick(&f.b, key_of(c), skip, 0), -1);
    /* The same client retries in the same order every time. */
    memset(skip, 0, sizeof(skip));
    for (int t = 0; t < 4; t++) {
      assert_int_equal(sl_balance_pick(&f.b, key_of(c), skip, 0), order[t]);
      skip[order[t]] = 1;
    }
  }
}

/* ---- random_two ---- */

static void test_random_two_never_picks_the_busiest(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_RANDOM_TWO, NULL, 4);
  f.peers[0].active = 1;
  f.peers[1].active = 2;
  f.peers[2].active = 100;
  f.peers[3].active = 3;
  int count[4] = {0};
  for (int i = 0; i < 2000; i++) count[sl_balance_pick(&f.b, 0, NULL, 0)]++;
  /* Of two different candidates the less busy wins: 2 never, 0 whenever drawn. */
  assert_int_equal(count[2], 0);
  assert_true(count[0] > count[1] && count[1] > count[3]);
  /* With two servers, both are always the candidates. */
  bal_init(&f, SL_BALANCE_RANDOM_TWO, NULL, 2);
  f.peers[0].active = 4;
  f.peers[1].active = 3;
  for (int i = 0; i < 100; i++) assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 0), 1);
}

static void test_random_two_spreads_by_weight_when_idle(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  int w[] = {1, 1, 2};
  bal_init(&f, SL_BALANCE_RANDOM_TWO, w, 3);
  int count[3] = {0};
  for (int i = 0; i < 20000; i++) count[sl_balance_pick(&f.b, 0, NULL, 0)]++;
  /* Every pick is drawn at random, yet each server is used, the heavier one
   * most (a seeded generator: the same counts at every run). */
  assert_true(count[0] > 2000 && count[1] > 2000);
  assert_true(count[2] > count[0] && count[2] > count[1]);
}

static void test_random_two_with_connections_kept_open_evens_load(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_RANDOM_TWO, NULL, 8);
  for (int i = 0; i < 800; i++) f.peers[sl_balance_pick(&f.b, 0, NULL, 0)].active++;
  uint32_t lo = UINT32_MAX, hi = 0;
  for (int i = 0; i < 8; i++) {
    lo = SL_MIN(lo, f.peers[i].active);
    hi = SL_MAX(hi, f.peers[i].active);
  }
  /* Two choices keep the spread tiny (one random choice would be ~+-30). */
  assert_true(hi - lo <= 4);
}

static void test_random_two_retry_skips_tried(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_RANDOM_TWO, NULL, 3);
  for (int i = 0; i < 100; i++) {
    uint8_t skip[3] = {1, 0, 1};
    assert_int_equal(sl_balance_pick(&f.b, 0, skip, 0), 1);
    skip[1] = 1;
    assert_int_equal(sl_balance_pick(&f.b, 0, skip, 0), -1);
  }
}

/* ---- backup servers ---- */

/* What a pick of every method gives over many clients at now: the set of
 * servers it chose, as bits. */
static unsigned picks_of(bal_fixture *f, double now) {
  unsigned seen = 0;
  for (uint32_t c = 0; c < 200; c++) {
    int i = sl_balance_pick(&f->b, key_of(c), NULL, now);
    assert_true(i >= 0 && i < (int)f->b.n);
    seen |= 1u << i;
  }
  return seen;
}

static void test_backup_only_while_no_primary_is_available(void **state) {
  SL_UNUSED(state);
  for (int k = 0; k < 4; k++) {
    bal_fixture f;
    bal_init(&f, (sl_balance)k, NULL, 4);     /* 0, 1 primaries; 2, 3 backups */
    f.peers[2].backup = f.peers[3].backup = 1;
    /* Idle backups, busy primaries: the load-aware methods keep to the primaries too. */
    f.peers[0].active = f.peers[1].active = 50;
    assert_int_equal(picks_of(&f, 100.0), 0x3u);
    assert_int_equal(f.b.on_backups, 0);
    /* One primary failed: the other one takes everything. */
    assert_int_equal(sl_balance_report(&f.b, 0, 0, 100.0), 1);
    assert_int_equal(picks_of(&f, 100.0), 0x2u);
    assert_int_equal(f.b.on_backups, 0);
    /* Both failed: the backups, by the same method. */
    assert_int_equal(sl_balance_report(&f.b, 1, 0, 100.0), 1);
    assert_int_equal(picks_of(&f, 100.0), 0xcu);
    assert_int_equal(f.b.on_backups, 1);
    /* Primary 1's fail_timeout is over (0's is too, then a health check
     * holds 0 down): back to 1 only, from the first pick; the switch back
     * is its first connect that succeeds. */
    f.peers[0].check_down = 1;
    assert_int_equal(sl_balance_pick(&f.b, key_of(7), NULL, 110.5), 1);
    assert_int_equal(f.b.on_backups, 1);
    assert_int_equal(sl_balance_report(&f.b, 1, 1, 110.5), 0);
    assert_int_equal(f.b.on_backups, 0);
    assert_int_equal(picks_of(&f, 110.5), 0x2u);
    /* A backup held down by its health check is skipped among the backups;
     * a backup's connects do not end the switch. */
    f.peers[1].check_down = 1;
    f.peers[3].check_down = 1;
    assert_int_equal(picks_of(&f, 110.5), 0x4u);
    assert_int_equal(f.b.on_backups, 1);
    sl_balance_report(&f.b, 2, 1, 110.5);
    assert_int_equal(f.b.on_backups, 1);
    f.peers[0].check_down = 0;
    assert_int_equal(picks_of(&f, 110.5), 0x1u);
    sl_balance_report(&f.b, 0, 1, 110.5);
    assert_int_equal(f.b.on_backups, 0);
  }
}

static void test_backups_follow_their_weights(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  int w[] = {1, 3, 1};
  bal_init(&f, SL_BALANCE_ROUND_ROBIN, w, 3);
  f.peers[1].backup = f.peers[2].backup = 1;
  f.peers[0].check_down = 1;
  int count[3] = {0};
  for (int i = 0; i < 400; i++) count[sl_balance_pick(&f.b, 0, NULL, 0)]++;
  assert_int_equal(count[0], 0);
  assert_int_equal(count[1], 300);
  assert_int_equal(count[2], 100);
}

static void test_backup_retry_order_is_primaries_then_backups(void **state) {
  SL_UNUSED(state);
  for (int k = 0; k < 4; k++) {
    for (uint32_t c = 0; c < 20; c++) {
      bal_fixture f;
      bal_init(&f, (sl_balance)k, NULL, 5);  /* 1, 3 backups; 0, 2, 4 primaries */
      f.peers[1].backup = f.peers[3].backup = 1;
      uint8_t skip[5] = {0};
      for (int t = 0; t < 5; t++) {
        int i = sl_balance_pick(&f.b, key_of(c), skip, 0);
        assert_true(i >= 0 && i < 5);
        assert_false(skip[i]);
        /* Three tries of primaries first, then the two backups. */
        assert_int_equal(f.peers[i].backup, t >= 3);
        skip[i] = 1;
        /* Primaries are up, only tried: that is no switch to the backups. */
        assert_int_equal(f.b.on_backups, 0);
      }
      assert_int_equal(sl_balance_pick(&f.b, key_of(c), skip, 0), -1);
    }
  }
}

static void test_backup_retry_when_primaries_are_down(void **state) {
  SL_UNUSED(state);
  for (int k = 0; k < 4; k++) {
    bal_fixture f;
    bal_init(&f, (sl_balance)k, NULL, 3);     /* 0 primary; 1, 2 backups */
    f.peers[1].backup = f.peers[2].backup = 1;
    /* The one primary fails its connect: marked (it is not the only
     * server), and the retry goes to a backup, then the other backup. */
    uint8_t skip[3] = {0};
    assert_int_equal(sl_balance_pick(&f.b, key_of(3), skip, 1.0), 0);
    skip[0] = 1;
    assert_int_equal(sl_balance_report(&f.b, 0, 0, 1.0), 1);
    int b1 = sl_balance_pick(&f.b, key_of(3), skip, 1.0);
    assert_true(b1 == 1 || b1 == 2);
    assert_int_equal(f.b.on_backups, 1);
    skip[b1] = 1;
    assert_int_equal(sl_balance_pick(&f.b, key_of(3), skip, 1.0), 3 - b1);
    /* Everything down: nothing, and the passive reset brings the primary back. */
    sl_balance_report(&f.b, 1, 0, 1.0);
    sl_balance_report(&f.b, 2, 0, 1.0);
    assert_int_equal(sl_balance_pick(&f.b, key_of(3), NULL, 2.0), -1);
    assert_int_equal(sl_balance_reset_passive(&f.b), 3);
    assert_int_equal(sl_balance_pick(&f.b, key_of(3), NULL, 2.0), 0);
    assert_int_equal(f.b.on_backups, 1);
    sl_balance_report(&f.b, 0, 1, 2.0);
    assert_int_equal(f.b.on_backups, 0);
  }
}

static void test_backup_hash_keeps_clients_on_their_backup(void **state) {
  SL_UNUSED(state);
  /* With the primaries down, hash spreads clients over the backups by
   * their key, the same backup each time; back on the primaries, each
   * client has the primary it had before. */
  bal_fixture f;
  bal_init(&f, SL_BALANCE_HASH, NULL, 4);
  f.peers[2].backup = f.peers[3].backup = 1;
  int before[100], on_backup[100];
  for (uint32_t c = 0; c < 100; c++) before[c] = sl_balance_pick(&f.b, key_of(c), NULL, 0);
  f.peers[0].check_down = f.peers[1].check_down = 1;
  int count[4] = {0};
  for (uint32_t c = 0; c < 100; c++) {
    on_backup[c] = sl_balance_pick(&f.b, key_of(c), NULL, 0);
    count[on_backup[c]]++;
  }
  assert_true(count[2] > 0 && count[3] > 0);
  for (uint32_t c = 0; c < 100; c++) assert_int_equal(sl_balance_pick(&f.b, key_of(c), NULL, 0), on_backup[c]);
  f.peers[0].check_down = f.peers[1].check_down = 0;
  for (uint32_t c = 0; c < 100; c++) assert_int_equal(sl_balance_pick(&f.b, key_of(c), NULL, 0), before[c]);
}

static void test_same_servers_sees_a_backup_flag_change(void **state) {
  SL_UNUSED(state);
  /* What decides whether host names resolved again changed an upstream. */
  char *text[] = {"127.0.0.1:1", "127.0.0.1:2"};
  int weights[] = {1, 1}, primaries[] = {0, 0}, one_backup[] = {0, 1};
  sl_upstream_cfg x = {.name = "back", .server_text = text, .weights = weights,
                       .backups = primaries, .nservers = 2, .tries = 2};
  sl_upstream_cfg y = x;
  assert_true(sl_upstream_same_servers(&x, &y));
  y.backups = one_backup;
  assert_false(sl_upstream_same_servers(&x, &y));
}

/* A connect to the primary started before it was marked down, which
 * succeeds after the mark, does not switch the upstream back: picks still
 * take the backup, and the switch would be logged again at once. */
static void test_a_late_success_does_not_end_the_backups(void **state) {
  SL_UNUSED(state);
  bal_fixture f;
  bal_init(&f, SL_BALANCE_ROUND_ROBIN, NULL, 2);   /* 0 primary, 1 backup */
  f.peers[1].backup = 1;
  assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 1.0), 0);
  assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 1.0), 0);
  assert_int_equal(sl_balance_report(&f.b, 0, 0, 1.0), 1);   /* marked down */
  uint8_t skip[2] = {1, 0};
  assert_int_equal(sl_balance_pick(&f.b, 0, skip, 1.0), 1);
  assert_int_equal(f.b.on_backups, 1);
  sl_balance_report(&f.b, 0, 1, 1.1);                        /* the other one succeeds */
  assert_int_equal(f.b.on_backups, 1);
  assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 1.2), 1);
  /* Once the mark runs out, a success on it switches back. */
  assert_int_equal(sl_balance_pick(&f.b, 0, NULL, 20.0), 0);
  sl_balance_report(&f.b, 0, 1, 20.0);
  assert_int_equal(f.b.on_backups, 0);
}

static void test_many_servers(void **state) {
  SL_UNUSED(state);
  /* More servers than the pick's on-stack candidate set. */
  enum { N = 100 };
  sl_peer *peers = calloc(N, sizeof(sl_peer));
  assert_non_null(peers);
  for (int i = 0; i < N; i++) peers[i].weight = 1;
  sl_balancer b = {.kind = SL_BALANCE_ROUND_ROBIN, .peers = peers, .n = N, .rng = 1};
  for (int i = 0; i < 3 * N; i++) assert_int_equal(sl_balance_pick(&b, 0, NULL, 0), i % N);
  free(peers);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_parse_names),
      cmocka_unit_test(test_round_robin_equal_weights_alternate),
      cmocka_unit_test(test_round_robin_smooth_sequence),
      cmocka_unit_test(test_round_robin_distribution_follows_weights),
      cmocka_unit_test(test_round_robin_retry_order_skips_tried),
      cmocka_unit_test(test_round_robin_retry_takes_the_next_in_turn),
      cmocka_unit_test(test_failed_server_is_skipped_for_fail_timeout),
      cmocka_unit_test(test_success_clears_the_failure_count),
      cmocka_unit_test(test_max_fails_zero_and_single_server_never_mark),
      cmocka_unit_test(test_all_marked_down_then_reset),
      cmocka_unit_test(test_health_check_down_is_skipped_by_every_algorithm),
      cmocka_unit_test(test_least_conn_picks_fewest_active),
      cmocka_unit_test(test_least_conn_is_weighted),
      cmocka_unit_test(test_least_conn_ties_go_round_robin),
      cmocka_unit_test(test_least_conn_retry_skips_tried),
      cmocka_unit_test(test_hash_is_stable_per_client),
      cmocka_unit_test(test_hash_spreads_by_weight),
      cmocka_unit_test(test_hash_skip_moves_only_that_servers_clients),
      cmocka_unit_test(test_hash_retry_order_is_the_clients_ranking),
      cmocka_unit_test(test_random_two_never_picks_the_busiest),
      cmocka_unit_test(test_random_two_spreads_by_weight_when_idle),
      cmocka_unit_test(test_random_two_with_connections_kept_open_evens_load),
      cmocka_unit_test(test_random_two_retry_skips_tried),
      cmocka_unit_test(test_backup_only_while_no_primary_is_available),
      cmocka_unit_test(test_a_late_success_does_not_end_the_backups),
      cmocka_unit_test(test_backups_follow_their_weights),
      cmocka_unit_test(test_backup_retry_order_is_primaries_then_backups),
      cmocka_unit_test(test_backup_retry_when_primaries_are_down),
      cmocka_unit_test(test_backup_hash_keeps_clients_on_their_backup),
      cmocka_unit_test(test_same_servers_sees_a_backup_flag_change),
      cmocka_unit_test(test_many_servers),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
