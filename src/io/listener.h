/*
 * Listening sockets. Each worker accepts on a socket of its own: every
 * listen address has one SO_REUSEPORT socket per worker, opened by the main
 * thread before the workers start (so a bind error stops the start-up with
 * nothing running), and the kernel spreads new connections over them. (A
 * socket systemd passes is one for every worker instead: each watches it
 * through a duplicate descriptor, proxy/upgrade.h.)
 *
 * A gate counts the connections accepted on an address by all workers
 * together and enforces its max_connections: a worker that finds the gate
 * full stops its accept watcher (connections wait in the kernel's queue) and
 * is woken when a connection of that address closes.
 *
 * A gate may also hold its address to a rate (max_connection_rate): a
 * worker that finds the rate reached stops its accept watcher until the
 * next connection is due (connections wait in the kernel's queue), as
 * HAProxy's rate-limit sessions does. The rate is a GCRA ("virtual
 * scheduling") on one atomic word, shared by the workers: a second's worth
 * of connections may come at once, then one per 1/rate seconds.
 *
 * A worker stuck in Lua (proxy/watchdog.h) has its sockets taken out of
 * their SO_REUSEPORT groups by another thread (sl_listener_withdraw): its
 * accept then fails with EINVAL and the listener goes OUT. Once the worker
 * runs again, sl_listener_listen puts the socket back, and the worker, woken,
 * resumes accepting (sl_listener_retry).
 */
#ifndef SL_LISTENER_H
#define SL_LISTENER_H

#include <ev.h>
#include <stdatomic.h>
#include <stdint.h>

#include "io/addr.h"

struct sl_worker;
typedef struct sl_listener sl_listener;

/* Shared by the workers listening on one address. open and max change with
 * atomics on accept and close only (never per read or write). */
typedef struct sl_listen_gate {
  _Atomic uint32_t open;         /* connections accepted and not yet left */
  _Atomic uint32_t max;          /* 0: no limit; may change on reload */
  _Atomic int waiting;           /* some worker paused at the limit */
  void (*wake)(void *ud);        /* wakes every worker (any thread) */
  void *wake_ud;
  _Atomic uint32_t rate;         /* accepts per second, all workers; 0: no limit (reloadable) */
  _Atomic int64_t rate_due;      /* GCRA: when the accept after the next is due (ns,
                                    CLOCK_MONOTONIC); a second of them may be early */
} sl_listen_gate;

/* Takes ownership of fd. */
typedef void (*sl_listener_accept_fn)(sl_listener *l, int fd, const sl_addr *remote);

/* States: STOPPED (fd < 0) -> ACCEPTING <-> PAUSED (at the gate's limit, or
 * out of file descriptors) -> STOPPED; ACCEPTING <-> OUT (its socket was
 * withdrawn from its group; back once it listens again) -> STOPPED. */
struct sl_listener {
  ev_io io;
  ev_timer retry;            /* accepting paused after EMFILE/ENFILE */
  struct sl_worker *w;
  int fd;                    /* borrowed: the socket set owns it */
  int at_limit;              /* paused at the gate's limit */
  int out;                   /* OUT: accept found the socket withdrawn (EINVAL) */
  double rate_logged;        /* ev_now of the last "rate reached" line; 0: none yet */
  void (*on_rate_pause)(sl_listener *l);  /* paused at the gate's rate (NULL: nothing) */
  sl_listen_gate *gate;      /* borrowed */
  sl_listener_accept_fn on_accept;
  void *ud;
  const char *name;          /* for logs (borrowed) */
};

/* Opens a listening socket on addr (SO_REUSEADDR, and SO_REUSEPORT when
 * reuseport is set) with a queue of backlog connections. Returns the fd, or
 * -1 with errno set. */
int sl_listener_bind(const sl_addr *addr, int reuseport, int backlog);

/* Turns TCP_DEFER_ACCEPT on (1 s: the kernel hands a connection to accept
 * once its client has sent data) or off on the listening socket fd.
 * SL_OK, or SL_ERROR with errno. */
int sl_listener_defer_accept(int fd, int on);

/* Starts accepting on fd (borrowed) on w's loop. Every accepted connection
 * has entered gate: the owner calls sl_listen_gate_leave when it closes. */
void sl_listener_start(sl_listener *l, struct sl_worker *w, int fd, sl_listen_gate *gate,
                       const char *name, sl_listener_accept_fn fn, void *ud);

/* Stops accepting; the socket stays open (its owner closes it). */
void sl_listener_stop(sl_listener *l);

/* On the listener's worker after a wake: resumes a listener paused at its
 * gate's limit when there is room again, and one that is OUT once its
 * socket listens again (sl_listener_listen; still withdrawn: it stays
 * OUT). */
void sl_listener_retry(sl_listener *l);

/* Any thread: takes the listening socket fd (borrowed) out of its
 * SO_REUSEPORT group (shutdown for reading): the kernel gives new
 * connections to the group's other sockets, and resets those waiting in
 * fd's queue. SL_OK, or SL_ERROR with errno. */
int sl_listener_withdraw(int fd);

/* Any thread: listen(2) again on fd with backlog. It puts a socket that
 * sl_listener_withdraw took out back into its group (its options stay as
 * they were; its port must have been given at bind: a port the kernel
 * picked, port 0, is given back by the withdrawal and another one picked
 * here; the worker accepting on it resumes after a wake,
 * sl_listener_retry), and gives a listening socket a new backlog. SL_OK, or
 * SL_ERROR with errno. */
int sl_listener_listen(int fd, int backlog);

void sl_listen_gate_init(sl_listen_gate *g, uint32_t max, void (*wake)(void *), void *ud);

/* The rate: takes a place for an accept at now_ns (CLOCK_MONOTONIC
 * nanoseconds) and returns 0, or returns the seconds until the next one is
 * due when the gate's rate is reached (more than a second's worth would be
 * early), taking nothing. One compare-and-swap: workers never take more
 * than the rate between them. Any thread. */
double sl_listen_gate_rate_take(sl_listen_gate *g, int64_t now_ns);

/* Gives back a place taken for an accept that found no connection. */
void sl_listen_gate_rate_give_back(sl_listen_gate *g);

/* Sets the gate's rate (0: none); a new rate starts with a second's worth. */
void sl_listen_gate_set_rate(sl_listen_gate *g, uint32_t rate);

/* A connection counted by g has closed: may wake paused workers. */
void sl_listen_gate_leave(sl_listen_gate *g);

#endif
