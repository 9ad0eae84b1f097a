/*
 * sl_channel: one non-blocking TCP socket on a worker's loop, with its
 * pipeline and outbound queue (Netty's Channel).
 *
 * States: CONNECTING (outgoing, until the connect completes or times out)
 * -> ACTIVE -> CLOSED. While ACTIVE, input and output close independently
 * (half-close): INPUT_CLOSED after the peer's FIN, OUTPUT_CLOSED after our
 * shutdown(SHUT_WR), which waits for the queue to drain (SHUTDOWN_PENDING).
 * A channel with both closed closes itself. CLOSE_PENDING closes once the
 * queue has drained.
 *
 * Lifetime: a channel is freed when its reference count drops to zero. The
 * open channel holds one reference, dropped by sl_channel_close; code that
 * must survive a close in the middle of an event (the read loop, deferred
 * Lua events) holds another.
 *
 * Joined channels (a client and its upstream) point at each other through
 * peer; closing one unlinks both and closes the other: at once if the
 * close was an error, after its queue drains otherwise.
 */
#ifndef SL_CHANNEL_H
#define SL_CHANNEL_H

#include <ev.h>
#include <stdint.h>

#include "io/addr.h"
#include "io/outq.h"
#include "pipeline/pipeline.h"

struct sl_worker;
typedef struct sl_channel sl_channel;

enum {
  SL_CH_ACTIVE = 0x1,
  SL_CH_CONNECTING = 0x2,
  SL_CH_AUTOREAD = 0x4,
  SL_CH_INPUT_CLOSED = 0x8,
  SL_CH_OUTPUT_CLOSED = 0x10,
  SL_CH_SHUTDOWN_PENDING = 0x20,
  SL_CH_CLOSE_PENDING = 0x40,
  SL_CH_CLOSED = 0x80,
  SL_CH_ERROR = 0x100,          /* closed because of an error */
  SL_CH_READ_PAUSED = 0x200,    /* out of buffer memory: retrying */
  SL_CH_READ_ONCE = 0x400,      /* autoread off, one read asked for (ctx:read) */
  SL_CH_EMBEDDED = 0x800,       /* no socket: sluice.testing drives it */
};

/* Called when an outgoing connect completes (err 0) or fails (errno value). */
typedef void (*sl_channel_connect_fn)(sl_channel *ch, int err);

/* Called once when the channel closes, after its close line is logged and
 * before its stages hear of it (the owner's accounting: access log, limits). */
typedef void (*sl_channel_close_fn)(sl_channel *ch);

typedef struct sl_channel_config {
  size_t low_water_mark;
  size_t high_water_mark;
} sl_channel_config;

struct sl_channel {
  ev_io rio;                 /* readable */
  ev_io wio;                 /* writable: queue waiting, or connect pending */
  ev_timer timer;            /* connect timeout, read retry */
  ev_timer idle;             /* idle timeout (client channels that have one) */
  struct sl_worker *w;
  struct sl_worker_gen *gen; /* the worker's generation it was created in */
  int fd;
  uint32_t flags;            /* SL_CH_* */
  uint32_t refs;
  sl_pipeline pipe;
  sl_outq outq;
  sl_channel *peer;          /* joined channel, or NULL */
  sl_channel *prev, *next;   /* the worker's channel list */
  sl_addr remote;
  uint8_t recv_index;        /* adaptive receive size: index in the table */
  uint8_t recv_shrink_armed; /* one small read seen; the next shrinks */
  sl_channel_connect_fn on_connect;
  sl_channel_close_fn on_close;
  void *ud;                  /* owner's data (the proxy's listener or upstream) */
  uint64_t bytes_in, bytes_out;
  ev_tstamp last_active;     /* loop time of the last bytes read or written */
  double idle_timeout;       /* seconds; 0: none */
  sl_addr peer_remote;       /* the joined channel's address (kept after unjoin) */
  sl_buf_owner owned;        /* buffers this channel answers for (leak tracking) */
  ev_tstamp started;
  char desc[112];            /* "client 127.0.0.1:5000 on front" for logs */
  char reason[160];          /* why it closed */
};

/* Wraps an accepted, non-blocking fd. Returns the channel (not yet active:
 * build its pipeline, then sl_channel_activate), or NULL on ENOMEM (the fd is
 * closed). */
sl_channel *sl_channel_accepted(struct sl_worker *w, int fd, const sl_addr *remote,
                                const sl_channel_config *cfg, const char *desc_fmt_name);

/* A channel without a socket (sluice.testing's EmbeddedChannel): flushed
 * writes stay queued until sl_outq_take. NULL on ENOMEM. */
sl_channel *sl_channel_embedded(struct sl_worker *w, const sl_channel_config *cfg,
                                const char *name);

/* Forces writability (tests simulating a slow peer); fires the event on a
 * change. */
void sl_channel_set_writable(sl_channel *ch, int on);

/* Starts a non-blocking connect to addr; on_connect runs when it completes,
 * fails or times out. Returns the channel, or NULL with errno set. */
sl_channel *sl_channel_connect(struct sl_worker *w, const sl_addr *addr, double timeout,
                               const sl_channel_config *cfg, sl_channel_connect_fn on_connect,
                               void *ud, const char *for_name);

/* Fires channel_active and starts reading when autoread is on. */
void sl_channel_activate(sl_channel *ch);

/* Queues b (takes ownership). On a closed or output-closed channel b is
 * released at once and SL_ERROR returned. */
int sl_channel_write(sl_channel *ch, sl_buf *b);

/* Marks everything queued as flushed and writes what the socket takes. */
void sl_channel_flush(sl_channel *ch);

/* Closes now: stops watchers, releases the queue, fires channel_inactive,
 * closes the peer. reason is copied. is_error marks an abnormal close. */
void sl_channel_close(sl_channel *ch, const char *reason, int is_error);

/* Sends FIN once everything queued is written. */
void sl_channel_shutdown_output(sl_channel *ch);

/* Stops reading and closes once everything queued is written. */
void sl_channel_close_after_flush(sl_channel *ch, const char *reason);

void sl_channel_set_autoread(sl_channel *ch, int on);

/* With autoread off: reads once more (one wake-up's worth), as Netty's
 * Channel.read(). Nothing to do with autoread on. */
void sl_channel_read_request(sl_channel *ch);

/* Joins a client and its upstream: each remembers the other's address. */
void sl_channel_join(sl_channel *a, sl_channel *b);

/* Closes ch with reason "idle_timeout" when no bytes were read or written
 * for seconds (0: never). Call before activating. */
void sl_channel_set_idle_timeout(sl_channel *ch, double seconds);

void sl_channel_ref(sl_channel *ch);
void sl_channel_unref(sl_channel *ch);

void sl_channel_note_unhandled(sl_channel *ch);

/* Records b's creation site as "read from <channel>" (recorded buffers). */
void sl_channel_note_site(sl_channel *ch, sl_buf *b);
const char *sl_channel_describe(const sl_channel *ch);

static inline int sl_channel_is_closed(const sl_channel *ch) { return (ch->flags & SL_CH_CLOSED) != 0; }
static inline int sl_channel_is_writable(const sl_channel *ch) { return ch->outq.writable; }

/* The adaptive receive sizes (Netty's AdaptiveRecvByteBufAllocator). */
#define SL_RECV_MIN 64
#define SL_RECV_INITIAL 2048
#define SL_RECV_MAX 65536
#define SL_RECV_MAX_READS 16
size_t sl_channel_recv_size(const sl_channel *ch);
/* Records a read of n bytes into a buffer of the current size (tests use it). */
void sl_channel_recv_record(sl_channel *ch, size_t n);
void sl_channel_recv_reset(sl_channel *ch);

#endif
