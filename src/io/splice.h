/*
 * Kernel pipes for splicing: the bytes of a pass-through connection move
 * from one socket to the other through a pipe with splice(2), so they are
 * never copied into user space (HAProxy's splice, Netty epoll's spliceTo).
 *
 * A worker keeps its pipes in a pool: a connection takes one for a read
 * burst and gives it back as soon as the peer's socket has taken all of
 * it (a pop and a push), so only connections with bytes in flight hold a
 * pipe; an empty pipe stays in the pool for the next burst, one that still
 * holds bytes (a connection closed with an error) is closed. Idle pipes are
 * closed once none has been taken for the worker's trim_idle_ms. At most
 * max_open pipes are open at once (two descriptors each; the runtime sets
 * it from the open-files limit); past that, or when the system refuses a
 * pipe, connections use buffers.
 */
#ifndef SL_SPLICE_H
#define SL_SPLICE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define SL_PIPE_MAX_OPEN 1024      /* per worker */
#define SL_PIPE_SIZE_MIN 65536     /* the kernel's default */
#define SL_PIPE_SIZE_MAX 1048576   /* /proc/sys/fs/pipe-max-size's default */

typedef struct sl_pipe {
  int rd, wr;
  uint32_t cap;                    /* bytes it holds at most (F_GETPIPE_SZ) */
} sl_pipe;

typedef struct sl_pipe_pool {
  sl_pipe idle[SL_PIPE_MAX_OPEN];
  unsigned nidle;
  unsigned open;                   /* in use and idle */
  unsigned max_open;               /* at most SL_PIPE_MAX_OPEN */
  uint64_t created, refused;
  uint64_t gets;                   /* pipes taken */
  uint64_t gets_at_tick;           /* gets when the last tick saw them change */
  int64_t quiet_since_ms;          /* since then no pipe was taken */
} sl_pipe_pool;

void sl_pipe_pool_init(sl_pipe_pool *pp);

/* A pipe: an idle one, else a new one whose capacity is asked to be size
 * (clamped to [SL_PIPE_SIZE_MIN, SL_PIPE_SIZE_MAX]; a refusal keeps the
 * kernel's). SL_OK, or SL_ERROR at max_open or when pipe2 fails. */
int sl_pipe_get(sl_pipe_pool *pp, size_t size, sl_pipe *out);

/* Gives p back: kept for reuse when it is empty, else closed. */
void sl_pipe_put(sl_pipe_pool *pp, const sl_pipe *p, int empty);

/* Closes every idle pipe. */
void sl_pipe_pool_trim(sl_pipe_pool *pp);

/* From the worker's timer (now_ms on the allocator's clock): closes the
 * idle pipes once no pipe has been taken for idle_ms. Returns how many it
 * closed. */
unsigned sl_pipe_pool_tick(sl_pipe_pool *pp, int64_t now_ms, int64_t idle_ms);

/* splice(2) from the socket sock into p, at most max bytes; and from p
 * into sock, at most len bytes. Non-blocking; as splice(2): bytes moved,
 * 0 at the socket's end of input (sl_splice_in), -1 with errno. */
ssize_t sl_splice_in(int sock, const sl_pipe *p, size_t max);
ssize_t sl_splice_out(const sl_pipe *p, int sock, size_t len);

#endif
