/*
 * Kernel pipes for splicing: the bytes of a pass-through connection move
 * from one socket to the other through a pipe with splice(2), so they are
 * never copied into user space (HAProxy's splice, Netty epoll's spliceTo).
 *
 * A worker keeps its pipes in a pool: a connection that splices takes one
 * and gives it back when it stops splicing or closes; an empty pipe is
 * kept for the next connection (up to SL_PIPE_IDLE_MAX), one that still
 * holds bytes is closed, and so are the idle ones when the worker goes
 * idle. At most max_open pipes are open at once (two descriptors each);
 * past that, or when the system refuses a pipe, connections use buffers.
 */
#ifndef SL_SPLICE_H
#define SL_SPLICE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define SL_PIPE_IDLE_MAX 16
#define SL_PIPE_MAX_OPEN 1024      /* per worker */
#define SL_PIPE_SIZE_MIN 65536     /* the kernel's default */
#define SL_PIPE_SIZE_MAX 1048576   /* /proc/sys/fs/pipe-max-size's default */

typedef struct sl_pipe {
  int rd, wr;
  uint32_t cap;                    /* bytes it holds at most (F_GETPIPE_SZ) */
} sl_pipe;

typedef struct sl_pipe_pool {
  sl_pipe idle[SL_PIPE_IDLE_MAX];
  unsigned nidle;
  unsigned open;                   /* in use and idle */
  unsigned max_open;
  uint64_t created, refused;
} sl_pipe_pool;

void sl_pipe_pool_init(sl_pipe_pool *pp);

/* A pipe: an idle one, else a new one whose capacity is asked to be size
 * (clamped to [SL_PIPE_SIZE_MIN, SL_PIPE_SIZE_MAX]; a refusal keeps the
 * kernel's). SL_OK, or SL_ERROR at max_open or when pipe2 fails. */
int sl_pipe_get(sl_pipe_pool *pp, size_t size, sl_pipe *out);

/* Gives p back: kept for reuse when it is empty and the pool has room,
 * else closed. */
void sl_pipe_put(sl_pipe_pool *pp, const sl_pipe *p, int empty);

/* Closes every idle pipe. */
void sl_pipe_pool_trim(sl_pipe_pool *pp);

/* splice(2) from the socket sock into p, at most max bytes; and from p
 * into sock, at most len bytes. Non-blocking; as splice(2): bytes moved,
 * 0 at the socket's end of input (sl_splice_in), -1 with errno. */
ssize_t sl_splice_in(int sock, const sl_pipe *p, size_t max);
ssize_t sl_splice_out(const sl_pipe *p, int sock, size_t len);

#endif
