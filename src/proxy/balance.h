/*
 * Balancing: which server of an upstream a new connection tries next. Pure
 * functions over one worker's view of the servers (no sockets, no loop), so
 * that each worker balances its own connections without locks.
 *
 * A server is *available* at time now unless an active health check holds
 * it down or it failed max_fails connects in a row and now < down_until
 * (passive health). A pick never returns an unavailable server, nor one
 * marked in skip (the servers this connection already tried).
 *
 * Backup servers (nginx's and HAProxy's `backup`): a pick chooses among
 * the primary (non-backup) candidates; only when no primary is a candidate
 * (none available, or this connection tried every one) does it choose
 * among the backup candidates, with the same algorithm. The classes are
 * told apart in the one pass over the servers a pick already makes.
 *
 * Algorithms:
 *   ROUND_ROBIN  smooth weighted round robin (nginx's): every pick adds each
 *                candidate's weight to its current value, takes the largest
 *                and subtracts the candidates' total from it.
 *   LEAST_CONN   fewest active connections per unit of weight; ties are
 *                broken by the smooth round robin among the tied servers.
 *   HASH         weighted rendezvous hashing of the key (the client's
 *                address): the highest score weight / -ln(h(key, server))
 *                wins, so skipping a server moves only the keys it had, and
 *                a retry takes the key's next-ranked server.
 *   RANDOM_TWO   two different candidates drawn at random (by weight); the
 *                one with fewer active connections per unit of weight wins
 *                (the power of two choices).
 */
#ifndef SL_BALANCE_H
#define SL_BALANCE_H

#include <stddef.h>
#include <stdint.h>

struct sl_metrics_server;

typedef enum {
  SL_BALANCE_ROUND_ROBIN = 0,
  SL_BALANCE_LEAST_CONN,
  SL_BALANCE_HASH,
  SL_BALANCE_RANDOM_TWO,
} sl_balance;

/* One server as one worker sees it. */
typedef struct sl_peer {
  int weight;            /* >= 1, from the config */
  int current;           /* smooth round robin: current weight */
  uint32_t active;       /* connections open or connecting to it */
  uint32_t fails;        /* failed connects in a row */
  double down_until;     /* passive health: skipped while now < down_until */
  int check_down;        /* active health check: 1 while it holds it down */
  int backup;            /* 1: a backup server, picked only when no primary is available */
  uint64_t id;           /* hash of the server's address (HASH) */
  struct sl_metrics_server *m; /* its counters (proxy/metrics.h), one reference; NULL: none */
} sl_peer;

typedef struct sl_balancer {
  sl_balance kind;
  sl_peer *peers;        /* n entries, owned by the caller */
  size_t n;
  int max_fails;         /* 0: passive health off */
  double fail_timeout;   /* seconds a server is skipped after max_fails */
  uint64_t rng;          /* RANDOM_TWO: xorshift64* state, never 0 */
  int on_backups;        /* 1 from a pick that found no primary available and took a
                            backup, until a connect to a primary succeeds (a primary
                            whose passive mark merely ran out is not back yet) */
} sl_balancer;

/* Parses "round_robin", "least_conn", "hash" or "random_two". SL_OK or SL_ERROR. */
int sl_balance_parse(const char *name, sl_balance *out);
const char *sl_balance_name(sl_balance kind);

/* 64-bit mix (splitmix64's finalizer): hashes addresses and keys. */
uint64_t sl_balance_hash(const void *data, size_t len);

/* 1 when peer i is available at now (health checks and passive marks). */
int sl_balance_available(const sl_balancer *b, size_t i, double now);

/* The index of the server to try next for a connection with key (HASH uses
 * it), skipping the peers whose skip[i] is non-zero (skip may be NULL), or
 * -1 when no server is left: a primary when one is a candidate, else a
 * backup. Updates the round robin state, the random generator and
 * on_backups (the caller compares it before and after to notice a switch
 * to the backups); does not count the connection (the caller adds to
 * active). */
int sl_balance_pick(sl_balancer *b, uint64_t key, const uint8_t *skip, double now);

/* Records the outcome of a connect to peer i. A failure that makes
 * max_fails in a row marks the server down until now + fail_timeout (never
 * the only server of an upstream); a success clears the count, and on a
 * primary clears on_backups. Returns 1 when this failure marked the server
 * down, else 0. */
int sl_balance_report(sl_balancer *b, size_t i, int ok, double now);

/* Clears every passive mark (used when no server at all was available, so
 * that the next connection tries them again: nginx's quick recovery).
 * Returns how many servers were marked. */
size_t sl_balance_reset_passive(sl_balancer *b);

#endif
