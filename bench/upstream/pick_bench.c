/*
 * Cost of one balancing decision (sl_balance_pick), per algorithm and
 * number of servers: nanoseconds per pick (median of 5 runs) and, under
 * callgrind with --toggle-collect=sl_balance_pick, instructions per pick.
 * Connections are counted open for least_conn and random_two and closed
 * again after 64 picks, so loads move as they would under traffic.
 *
 *   pick_bench NPICKS [REPS]         every case: "algo servers ns" per line
 *   pick_bench NPICKS 1 ALGO SERVERS one case (for callgrind)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "proxy/balance.h"

static double now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static double run(sl_balance kind, size_t n, long picks, uint64_t *sink) {
  sl_peer *peers = calloc(n, sizeof(sl_peer));
  int ring[64];
  for (size_t i = 0; i < n; i++) {
    char text[32];
    snprintf(text, sizeof(text), "10.0.0.%zu:6379", i);
    peers[i].weight = 1 + (int)(i % 3);
    peers[i].id = sl_balance_hash(text, strlen(text));
  }
  sl_balancer b = {.kind = kind, .peers = peers, .n = n, .max_fails = 1, .fail_timeout = 10,
                   .rng = 88172645463325252ULL};
  double t0 = now_ns();
  for (long k = 0; k < picks; k++) {
    int i = sl_balance_pick(&b, (uint64_t)k * 0x9e3779b97f4a7c15ULL, NULL, 1.0);
    peers[i].active++;
    if (k >= 64) peers[ring[k % 64]].active--;
    ring[k % 64] = i;
    *sink += (uint64_t)i;
  }
  double ns = (now_ns() - t0) / (double)picks;
  free(peers);
  return ns;
}

int main(int argc, char **argv) {
  long picks = argc > 1 ? atol(argv[1]) : 2000000;
  int reps = argc > 2 ? atoi(argv[2]) : 5;
  static const sl_balance kinds[] = {SL_BALANCE_ROUND_ROBIN, SL_BALANCE_LEAST_CONN,
                                     SL_BALANCE_HASH, SL_BALANCE_RANDOM_TWO};
  static const size_t sizes[] = {2, 8, 64};
  uint64_t sink = 0;
  if (argc > 4) {
    sl_balance kind;
    if (sl_balance_parse(argv[3], &kind) != 0) return 2;
    printf("%s %s %.1f\n", argv[3], argv[4], run(kind, (size_t)atol(argv[4]), picks, &sink));
    return 0;
  }
  for (size_t k = 0; k < 4; k++) {
    for (size_t s = 0; s < 3; s++) {
      double t[16];
      for (int r = 0; r < reps && r < 16; r++) t[r] = run(kinds[k], sizes[s], picks, &sink);
      qsort(t, (size_t)reps, sizeof(double), cmp_double);
      printf("%s %zu %.1f\n", sl_balance_name(kinds[k]), sizes[s], t[reps / 2]);
    }
  }
  fprintf(stderr, "(checksum %llu)\n", (unsigned long long)sink);
  return 0;
}
