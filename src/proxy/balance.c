#include "proxy/balance.h"

#include <math.h>
#include <string.h>

#include "util/common.h"

static const char *const sl_balance_names[] = {"round_robin", "least_conn", "hash", "random_two"};

int sl_balance_parse(const char *name, sl_balance *out) {
  for (int i = 0; i < 4; i++) {
    if (strcmp(name, sl_balance_names[i]) == 0) {
      *out = (sl_balance)i;
      return SL_OK;
    }
  }
  return SL_ERROR;
}

const char *sl_balance_name(sl_balance kind) {
  return (unsigned)kind < 4 ? sl_balance_names[kind] : "?";
}

static uint64_t sl_balance_mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

uint64_t sl_balance_hash(const void *data, size_t len) {
  const uint8_t *p = data;
  uint64_t h = 0x9e3779b97f4a7c15ULL ^ len;
  for (size_t i = 0; i < len; i++) h = sl_balance_mix(h ^ p[i]) + i;
  return sl_balance_mix(h);
}

int sl_balance_available(const sl_balancer *b, size_t i, double now) {
  const sl_peer *p = &b->peers[i];
  return !p->check_down && now >= p->down_until;
}

/* What server i is to a pick (cand[i]): not a candidate (unavailable or
 * tried), or a candidate of its class. A pick takes the primaries when
 * there is one, else the backups: `want` below. */
enum { SL_CAND_NONE = 0, SL_CAND_PRIMARY = 1, SL_CAND_BACKUP = 2 };

/* Smooth weighted round robin over the peers with cand[i] == want. */
static int sl_balance_smooth(sl_balancer *b, const uint8_t *cand, uint8_t want) {
  int best = -1;
  int total = 0;
  for (size_t i = 0; i < b->n; i++) {
    if (cand[i] != want) continue;
    sl_peer *p = &b->peers[i];
    p->current += p->weight;
    total += p->weight;
    if (best < 0 || p->current > b->peers[best].current) best = (int)i;
  }
  if (best >= 0) b->peers[best].current -= total;
  return best;
}

/* a's load is below b's: active / weight, compared without division. */
static int sl_balance_lighter(const sl_peer *a, const sl_peer *b) {
  return (uint64_t)a->active * (uint64_t)b->weight < (uint64_t)b->active * (uint64_t)a->weight;
}

static int sl_balance_same_load(const sl_peer *a, const sl_peer *b) {
  return (uint64_t)a->active * (uint64_t)b->weight == (uint64_t)b->active * (uint64_t)a->weight;
}

static uint64_t sl_balance_random(sl_balancer *b) {
  /* xorshift64* */
  uint64_t x = b->rng ? b->rng : 0x2545f4914f6cdd1dULL;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  b->rng = x;
  return x * 0x2545f4914f6cdd1dULL;
}

/* A candidate (cand[i] == want) drawn at random in proportion to weight,
 * other than not. */
static int sl_balance_draw(sl_balancer *b, const uint8_t *cand, uint8_t want, int not) {
  uint64_t total = 0;
  for (size_t i = 0; i < b->n; i++)
    if (cand[i] == want && (int)i != not) total += (uint64_t)b->peers[i].weight;
  if (total == 0) return -1;
  uint64_t r = (sl_balance_random(b) >> 11) % total;
  for (size_t i = 0; i < b->n; i++) {
    if (cand[i] != want || (int)i == not) continue;
    if (r < (uint64_t)b->peers[i].weight) return (int)i;
    r -= (uint64_t)b->peers[i].weight;
  }
  return -1;
}

static double sl_balance_score(const sl_peer *p, uint64_t key) {
  uint64_t h = sl_balance_mix(key ^ sl_balance_mix(p->id + 0x9e3779b97f4a7c15ULL));
  double u = ((double)(h >> 11) + 0.5) * (1.0 / 9007199254740992.0); /* (0, 1) */
  return -(double)p->weight / log(u);
}

int sl_balance_pick(sl_balancer *b, uint64_t key, const uint8_t *skip, double now) {
  uint8_t cand_small[64];
  uint8_t *cand = b->n <= sizeof(cand_small) ? cand_small : malloc(b->n);
  if (cand == NULL) return -1;
  size_t ncand[3] = {0, 0, 0};
  int only[3] = {-1, -1, -1};
  int primary_up = 0;
  for (size_t i = 0; i < b->n; i++) {
    const sl_peer *p = &b->peers[i];
    int up = sl_balance_available(b, i, now);
    primary_up |= up && !p->backup;
    uint8_t c = !up || (skip != NULL && skip[i]) ? SL_CAND_NONE
                : p->backup                      ? SL_CAND_BACKUP
                                                 : SL_CAND_PRIMARY;
    cand[i] = c;
    ncand[c]++;
    only[c] = (int)i;
  }
  uint8_t want = ncand[SL_CAND_PRIMARY] ? SL_CAND_PRIMARY : SL_CAND_BACKUP;
  int pick = -1;
  if (ncand[want] <= 1) {
    pick = only[want];
  } else {
    switch (b->kind) {
      case SL_BALANCE_ROUND_ROBIN: pick = sl_balance_smooth(b, cand, want); break;
      case SL_BALANCE_LEAST_CONN: {
        int best = -1;
        for (size_t i = 0; i < b->n; i++)
          if (cand[i] == want && (best < 0 || sl_balance_lighter(&b->peers[i], &b->peers[best])))
            best = (int)i;
        /* Only the least loaded take part in the round robin. */
        for (size_t i = 0; i < b->n; i++)
          if (cand[i] == want && !sl_balance_same_load(&b->peers[i], &b->peers[best]))
            cand[i] = SL_CAND_NONE;
        pick = sl_balance_smooth(b, cand, want);
        break;
      }
      case SL_BALANCE_HASH: {
        double best_score = -1.0;
        for (size_t i = 0; i < b->n; i++) {
          if (cand[i] != want) continue;
          double s = sl_balance_score(&b->peers[i], key);
          if (s > best_score) {
            best_score = s;
            pick = (int)i;
          }
        }
        break;
      }
      case SL_BALANCE_RANDOM_TWO: {
        int x = sl_balance_draw(b, cand, want, -1);
        int y = sl_balance_draw(b, cand, want, x);
        pick = sl_balance_lighter(&b->peers[y], &b->peers[x]) ? y : x;
        break;
      }
    }
  }
  if (cand != cand_small) free(cand);
  /* A backup taken only because this connection tried the primaries that
   * are up is not a switch to the backups. */
  if (!primary_up && pick >= 0) b->on_backups = 1;
  return pick;
}

int sl_balance_report(sl_balancer *b, size_t i, int ok, double now) {
  sl_peer *p = &b->peers[i];
  if (ok) {
    p->fails = 0;
    /* Back on the primaries only with one that picks would take: a
     * connect started before a mark that succeeds after it is not that. */
    if (!p->backup && sl_balance_available(b, i, now)) b->on_backups = 0;
    return 0;
  }
  p->fails++;
  if (b->max_fails <= 0 || b->n < 2 || p->fails < (uint32_t)b->max_fails) return 0;
  /* Marked again at each failure past max_fails: a server that fails the
   * one connect it gets after fail_timeout is skipped for another period. */
  p->down_until = now + b->fail_timeout;
  return 1;
}

size_t sl_balance_reset_passive(sl_balancer *b) {
  size_t n = 0;
  for (size_t i = 0; i < b->n; i++) {
    if (b->peers[i].down_until > 0) n++;
    b->peers[i].down_until = 0;
    b->peers[i].fails = 0;
  }
  return n;
}
