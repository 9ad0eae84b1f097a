/* A listening socket on a worker's loop: accepts and hands each new,
 * non-blocking fd to on_accept. */
#ifndef SL_LISTENER_H
#define SL_LISTENER_H

#include <ev.h>

#include "io/addr.h"

struct sl_worker;
typedef struct sl_listener sl_listener;

/* Takes ownership of fd. */
typedef void (*sl_listener_accept_fn)(sl_listener *l, int fd, const sl_addr *remote);

struct sl_listener {
  ev_io io;
  ev_timer retry;            /* accepting paused after EMFILE/ENFILE */
  struct sl_worker *w;
  int fd;
  sl_listener_accept_fn on_accept;
  void *ud;
  char text[64];             /* "127.0.0.1:7000" */
};

/* Binds and listens on addr (SO_REUSEADDR), starts
 * accepting. SL_OK, or SL_ERROR with errno set. */
int sl_listener_open(sl_listener *l, struct sl_worker *w, const sl_addr *addr,
                     sl_listener_accept_fn fn, void *ud);

/* Stops accepting and closes the socket. */
void sl_listener_close(sl_listener *l);

#endif
