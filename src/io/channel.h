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
 *
 * Writing: flushed entries go out in bursts of at most write_spin_count
 * sendmsg calls (Netty's writeSpinCount); a channel with more left than one
 * burst waits for its next EV_WRITE, so that every other ready channel of
 * the worker gets its turn first. A write that would take the queue above
 * outbound_limit closes the channel (reason "outbound_limit ...", an error:
 * the peer closes at once) and releases everything queued.
 *
 * Kernel splicing: the two channels of a pass-through pair (no stage but
 * the bridges, see sl_channel_allow_splice) move bulk bytes with splice(2)
 * through a kernel pipe instead of buffers: once a channel's reads have
 * grown to the largest receive size, it splices what it reads into a pipe
 * and from there into its peer's socket, as long as the peer's outbound
 * queue is empty (bytes stay in order). The pipe is the peer's queue for
 * them: while it holds bytes the peer's socket did not take, the channel
 * reads nothing (backpressure, as with the high water mark) and the
 * peer's EV_WRITE moves them on. The pipe comes from the worker's pool for
 * a read burst and goes back once empty; a wake-up that splices little (an
 * interactive exchange) turns the channel back to buffers. A clean close
 * (an idle timeout) with bytes in the pipe hands them to the peer's queue.
 *
 * Write timeout (sl_channel_config.write_timeout): once bytes have waited
 * for the socket (a flushed queue, or the peer's splice pipe) that long
 * without one of them being taken, the channel closes with reason
 * "write_timeout", as an error (its peer closes at once; queued promises
 * fail with "timeout"). Bytes taken restart the clock; an empty queue
 * stops it. When the time is up the channel tries its socket once more, so
 * that a loop that ran late (a long callback elsewhere on the worker) is
 * not taken for a peer that stopped reading. The timer starts only when a
 * write leaves bytes waiting (the channel starts its EV_WRITE watcher), and
 * only notes times while they keep moving: it fires at most once per
 * timeout, and re-arms for the time left (libev's lazy timeout).
 *
 * TLS (sl_channel_tls_accept, the client side of a listener with tls; or
 * sl_channel_tls_client and sl_channel_tls_start, the upstream side of an
 * upstream with tls, where sluice is the TLS client and the handshake
 * follows the connect): the channel is not active until its handshake is
 * done; the handshake runs
 * on the read and write watchers as OpenSSL asks (WANT_READ, WANT_WRITE),
 * under a timeout on the channel's timer. Then reads go through
 * SSL_read_ex into the pooled buffer itself and writes through
 * SSL_write_ex from the queued buffers (a record at most per call; short
 * entries copied together into one record); a read that OpenSSL holds
 * data for (read-ahead) goes on without waiting for the socket. A read
 * that needs a write first waits for EV_WRITE, a write that needs a read
 * for EV_READ. Output closed (half-close) or a clean close (no error,
 * nothing queued dropped) sends close_notify first; an error close sends
 * none, so that the client sees the stream cut, not ended; a close_notify
 * received, or a TCP end without one,
 * is the input's end. A failed handshake or a bad record closes the
 * channel as an error with reason "tls_error (what OpenSSL said)"; a
 * handshake that does not finish in time, "tls_handshake_timeout". A
 * listener with tls.proxy_protocol reads a PROXY protocol header off the
 * socket first (peeked at, then exactly its bytes read, the TLS bytes
 * after it left to OpenSSL), as part of the handshake. A TLS channel never
 * splices.
 *
 * Write promises: a write may carry a promise id (sl_channel_promise_mark /
 * sl_channel_promise_attach). Each id is reported exactly once through the
 * worker's promise_done hook: err NULL once the bytes of its write are all
 * written, or one of the SL_PROMISE_* reasons when they never will be. Ids
 * that reached the queue are reported in queue order. The hook runs where
 * the channel is consistent; it may write, flush or close (a flush inside a
 * write burst only marks entries flushed: the running burst sends them).
 */
#ifndef SL_CHANNEL_H
#define SL_CHANNEL_H

#include <ev.h>
#include <netinet/in.h>
#include <stdint.h>

#include "io/addr.h"
#include "io/outq.h"
#include "io/splice.h"
#include "pipeline/pipeline.h"

struct ssl_st;
struct ssl_ctx_st;

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
  SL_CH_WRITING = 0x1000,       /* inside a write burst (Netty's inFlush0) */
  SL_CH_LAST_WRITE_DROPPED = 0x2000, /* the last sl_channel_write did not queue */
  SL_CH_SPECULATED = 0x4000,    /* a write was tried while connecting */
  SL_CH_READING = 0x8000,       /* inside a read burst */
  SL_CH_ACTIVATING = 0x10000,   /* inside sl_channel_activate's channel_active */
  SL_CH_READ_NOW = 0x20000,     /* sl_channel_read_now asked while activating */
  SL_CH_FIN_PENDING = 0x40000,  /* output closed, its shutdown() at the iteration's end */
  SL_CH_SPLICE_OK = 0x80000,    /* a pass-through pair: may splice to its peer */
  SL_CH_SPLICING = 0x100000,    /* reads go through a pipe to the peer (kernel splicing) */
  SL_CH_SPLICE_FULL = 0x200000, /* its pipe holds bytes the peer's socket did not take */
  SL_CH_HAS_PIPE = 0x400000,    /* spl is a pipe from the worker's pool */
  SL_CH_HALF_CLOSED = 0x800000, /* one direction ended: half_close_timeout applies */
  SL_CH_REMOTE_SET = 0x1000000, /* remote is not the socket's peer (sl_channel_set_remote) */
  SL_CH_NO_HALF_CLOSE = 0x2000000, /* its listener's half_close is false: a FIN ends the pair */
  SL_CH_DISCARD = 0x4000000,    /* that ended it: its input is read and dropped, not passed on */
  SL_CH_LINGERING = 0x8000000,  /* closing once its peer has what it sent (see sl_channel_linger) */
  SL_CH_PROBED = 0x10000000,    /* a read after a short read found nothing: no more such reads */
  SL_CH_WRITE_HELD = 0x20000000, /* on the worker's held list (a FIN may join the bytes) */
};

/* tls_state bits */
enum {
  SL_TLS_HANDSHAKE = 0x1,        /* the handshake runs: not active yet */
  SL_TLS_READ_WANTS_WRITE = 0x2, /* SSL_read_ex asked for EV_WRITE */
  SL_TLS_WRITE_WANTS_READ = 0x4, /* SSL_write_ex asked for EV_READ */
  SL_TLS_FAILED = 0x8,           /* a fatal TLS error: no close_notify */
  SL_TLS_PROXY_HEADER = 0x10,    /* with SL_TLS_HANDSHAKE: the PROXY protocol header first */
  SL_TLS_CLIENT = 0x20,          /* the client end (an upstream's): it verifies the server */
  SL_TLS_WAIT_CONNECT = 0x40,    /* a client whose connect is under way: nothing is written */
  SL_TLS_UNREADY = SL_TLS_HANDSHAKE | SL_TLS_WAIT_CONNECT, /* either: no byte may go yet */
};

/* Why a write promise failed (static strings, compared by value). */
#define SL_PROMISE_CLOSED "closed"                 /* closed before it was written */
#define SL_PROMISE_RESET "reset"                   /* the peer reset the connection */
#define SL_PROMISE_TIMEOUT "timeout"               /* a timeout closed the connection */
#define SL_PROMISE_OUTBOUND_LIMIT "outbound_limit" /* the queue went over its limit */
#define SL_PROMISE_ERROR "error"                   /* another socket error */

/* Called when an outgoing connect completes (err 0) or fails (errno value). */
typedef void (*sl_channel_connect_fn)(sl_channel *ch, int err);

/* Called once when the channel closes, after its close line is logged and
 * before its stages hear of it (the owner's accounting: access log, limits). */
typedef void (*sl_channel_close_fn)(sl_channel *ch);

typedef struct sl_channel_config {
  size_t low_water_mark;
  size_t high_water_mark;
  size_t outbound_limit;           /* 0: SL_OUTQ_DEFAULT_LIMIT */
  size_t max_bytes_per_gathering_write; /* 0: adaptive, from 2 x SO_SNDBUF */
  uint32_t write_spin_count;       /* 0: SL_OUTQ_DEFAULT_SPIN */
  int no_half_close;               /* 1: SL_CH_NO_HALF_CLOSE (a listener's half_close = false) */
  double write_timeout;            /* seconds; 0: none (see "Write timeout" above) */
} sl_channel_config;

struct sl_channel {
  ev_io rio;                 /* readable */
  ev_io wio;                 /* writable: queue waiting, or connect pending */
  ev_timer timer;            /* connect timeout, read retry */
  ev_timer idle;             /* idle timeout (client channels that have one) */
  ev_timer wtimer;           /* write timeout: started by the first wait for EV_WRITE, lazy */
  struct sl_worker *w;
  struct sl_worker_gen *gen; /* the worker's generation it was created in */
  int fd;
  uint32_t flags;            /* SL_CH_* */
  uint32_t refs;
  sl_pipeline pipe;
  sl_outq outq;
  sl_channel *peer;          /* joined channel, or NULL */
  sl_channel *prev, *next;   /* the worker's channel list */
  sl_channel *fin_next;      /* the worker's fin_list, while SL_CH_FIN_PENDING */
  sl_channel *held_next;     /* the worker's held list, while SL_CH_WRITE_HELD */
  sl_addr remote;
  sl_addr_key limit_key;     /* the client address its listener's max_connections_per_client
                                counted it under (family 0: not counted) */
  uint8_t recv_index;        /* adaptive receive size: index in the table */
  uint32_t mem_retries;      /* reads refused for want of buffer memory in a row (one log
                                line when it starts, one when it ends) */
  uint8_t recv_shrink_armed; /* one small read seen; the next shrinks */
  uint8_t tls_state;         /* SL_TLS_*, with ssl */
  uint8_t desc_pending;      /* SL_DESC_*: desc holds the listener's name alone; the rest is
                                written by the first sl_channel_describe (most connections
                                never log a line) */
  sl_channel_connect_fn on_connect;
  sl_channel_close_fn on_close;
  void *ud;                  /* owner's data (the proxy's listener or upstream) */
  uint64_t bytes_in, bytes_out;
  ev_tstamp last_active;     /* loop time of the last bytes read or written */
  double idle_timeout;       /* seconds; 0: none */
  double half_close_timeout; /* seconds, once one direction has ended; 0: idle_timeout */
  double write_timeout;      /* seconds; 0: none */
  ev_tstamp last_written;    /* loop time its wait for EV_WRITE began, or of the last bytes
                                written since (the write timeout counts from it) */
  union {                    /* the joined channel's address, kept after unjoin; */
    struct sockaddr sa;      /* sa_family AF_UNSPEC until joined */
    struct sockaddr_in in4;
    struct sockaddr_in6 in6;
  } peer_addr;
  sl_buf_owner owned;        /* buffers this channel answers for (leak tracking) */
  ev_tstamp started;
  uint16_t mlistener;        /* the listener it serves: index in the worker's metrics, 0: none */
  uint8_t mclient;           /* 1: an open client connection whose bytes metrics add */
  const char *promise_err;   /* SL_PROMISE_* for what its close fails, NULL: closed */
  uint64_t writes;           /* sl_channel_write calls */
  uint64_t writes_at_close;  /* writes when it closed */
  uint64_t last_seq;         /* queue number of the last write queued */
  struct ssl_st *ssl;        /* TLS on its socket (sl_channel_tls_accept or _client), or NULL */
  struct sl_proxy_parser *pp; /* SL_TLS_PROXY_HEADER: the header read so far, else NULL */
  const char *tls_version;   /* its handshake's version ("TLSv1.3", static), kept after close */
  sl_pipe spl;               /* SL_CH_HAS_PIPE: the pipe its reads splice into */
  uint32_t spl_len;          /* bytes in spl, not yet taken by the peer's socket */
  char desc[112];            /* "client 127.0.0.1:5000 on front" for logs: read it through
                                sl_channel_describe */
  char reason[160];          /* why it closed */
};

/* Lets src, one half of a joined pass-through pair (each with no stage
 * but its bridge), splice its bulk reads into its peer (see above). */
void sl_channel_allow_splice(sl_channel *src);

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

/* Starts TLS on ch, an accepted channel not yet active (its pipeline
 * built), as the server of ctx: the handshake runs (with at most timeout
 * seconds), then done(ch, 0) runs, which activates it; on a failure or
 * the timeout done(ch, errno value) runs (counting, not closing), then ch
 * closes with the reason. A close before the handshake ended (the idle
 * timeout, a stage, a stop) runs done(ch, ECONNABORTED) from inside the
 * close: every handshake is heard of once. proxy_protocol 1: a PROXY
 * protocol header (v1 or v2) comes first on the socket, before the TLS
 * bytes; it is read within the same timeout and its address becomes ch's
 * remote one (sl_channel_set_remote), as sluice.proxy_protocol does; a bad
 * header fails the handshake with reason "bad PROXY protocol header
 * (...)". SL_OK, or SL_ERROR when out of memory (nothing started). */
int sl_channel_tls_accept(sl_channel *ch, struct ssl_ctx_st *ctx, double timeout,
                          int proxy_protocol, sl_channel_connect_fn done);

/* Makes ch, a channel sl_channel_connect has just returned, a TLS client
 * of ctx (a client context, tls.h): nothing queued on it is written before
 * its handshake is done, not even speculatively. server_name goes in the
 * ClientHello (SNI; NULL: none, as for an address); verify_name is the
 * host name or address the server's certificate must be for when ctx
 * verifies (NULL: any). session_slot (NULL: none): the session the
 * handshake resumes, which the server's new sessions replace (the slot
 * must outlive ch). When the connect completes, on_connect runs as usual;
 * with err 0 it must start the handshake (sl_channel_tls_start) or close
 * ch. SL_OK, or SL_ERROR when out of memory (ch unchanged). */
struct ssl_session_st;
int sl_channel_tls_client(sl_channel *ch, struct ssl_ctx_st *ctx, const char *server_name,
                          const char *verify_name, struct ssl_session_st **session_slot);

/* Starts the handshake of ch, a TLS client whose connect has completed:
 * n bytes of prelude first in the clear (a PROXY protocol header; NULL,
 * 0: none), then the ClientHello. The handshake runs as an accepted one
 * does (at most timeout seconds; done(ch, 0), or done(ch, errno value)
 * with the reason in ch->reason, "tls_error (certificate verify failed:
 * hostname mismatch)" or "tls_handshake_timeout", then ch closes unless
 * done closed it; a close before the end runs done(ch, ECONNABORTED)).
 * Returns 0, or the errno value of a prelude the socket did not take
 * whole (nothing started, done never runs). */
int sl_channel_tls_start(sl_channel *ch, double timeout, const void *prelude, size_t n,
                         sl_channel_connect_fn done);

/* The TLS version ch negotiated ("TLSv1.3"), also once closed; NULL: no
 * TLS, or no handshake done. */
static inline const char *sl_channel_tls_version(const sl_channel *ch) { return ch->tls_version; }

/* Fires channel_active and starts reading when autoread is on. */
void sl_channel_activate(sl_channel *ch);

/* Reads once now, whatever autoread says: a client that speaks first has
 * its bytes there at accept, so they can go out with the upstream's connect
 * instead of after it. Nothing on a channel that is not active, whose
 * input is closed, or that is inside a read already (a stage that connects
 * from channel_read: what it holds must come first). Asked while
 * channel_active runs, the read waits until every stage has had it. */
void sl_channel_read_now(sl_channel *ch);

/* Queues b (takes ownership). On a closed or output-closed channel b is
 * released at once and SL_ERROR returned; over the outbound limit, b is
 * released, the channel closed and SL_ERROR returned. */
int sl_channel_write(sl_channel *ch, sl_buf *b);

/* A write with a promise id brackets the pipeline call that carries it:
 *   mark = sl_channel_promise_mark(ch); sl_ctx_write(ctx, b);
 *   sl_channel_promise_attach(ch, mark, pid);
 * The id goes to the last entry the head queued during the call: when a
 * stage turned the write into several (a header, then the body), it
 * completes once the last of them is written, so once all of them are.
 * No entry queued (a stage kept or dropped the write): a marker entry takes
 * the id, which completes once everything queued before it is written. The
 * last write dropped (output closed) or the channel closed: the id fails at
 * once, with the reason that closed the channel when this write is what
 * closed it (over the limit, or a reset seen while flushing it), else with
 * "closed". pid 0: nothing. */
static inline uint64_t sl_channel_promise_mark(const sl_channel *ch) { return ch->writes; }
void sl_channel_promise_attach(sl_channel *ch, uint64_t mark, uint32_t pid);

/* Marks everything queued as flushed and writes what the socket takes.
 * While connecting, the first flush tries the write at once (speculative
 * I/O): bytes taken complete the connect (on_connect runs with err 0 before
 * this returns), a socket error fails it (on_connect with that errno), and
 * EAGAIN leaves it to EV_WRITE. */
void sl_channel_flush(sl_channel *ch);

/* Moves everything queued on from and not yet sent (the bytes a failed
 * connect never wrote) to the end of to's queue, in order, with their
 * promises, and flushes to; the buffers are to's from now on. SL_OK, or
 * SL_ERROR when to cannot take them (closed or output closed: they stay on
 * from; out of memory: to is closed). */
int sl_channel_move_queue(sl_channel *from, sl_channel *to);

/* Closes now: stops watchers, releases the queue (failing its promises with
 * ch->promise_err, "closed" unless a socket error or a limit set another),
 * fires channel_inactive, closes the peer. reason is copied. is_error marks
 * an abnormal close. */
void sl_channel_close(sl_channel *ch, const char *reason, int is_error);

/* sl_channel_close, failing queued promises with promise_err (one of the
 * SL_PROMISE_* strings: "timeout" for an idle timeout, say). */
void sl_channel_close_with(sl_channel *ch, const char *promise_err, const char *reason,
                           int is_error);

/* Sends FIN once everything queued is written (and a TLS client's
 * handshake is done). */
void sl_channel_shutdown_output(sl_channel *ch);

/* Stops reading and closes once everything queued is written; a channel
 * still connecting or in a TLS client's handshake closes now. */
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

/* Once ch's input has ended (its peer's FIN) or its output was shut down,
 * the idle timeout becomes seconds when that is shorter (0: no change), and
 * its expiry closes ch with reason "half_close_timeout" (HAProxy's timeout
 * client-fin). Call before activating. */
void sl_channel_set_half_close_timeout(sl_channel *ch, double seconds);

/* TCP keepalive probes on ch's socket: after idle_s seconds without
 * traffic, every interval_s, count unanswered ones reset it (0: the
 * system's setting for that one). SL_OK, or SL_ERROR with errno. */
int sl_channel_set_keepalive(sl_channel *ch, int idle_s, int interval_s, int count);

void sl_channel_ref(sl_channel *ch);
void sl_channel_unref(sl_channel *ch);

void sl_channel_note_unhandled(sl_channel *ch);

/* Records b's creation site as "read from <channel>" (recorded buffers). */
void sl_channel_note_site(sl_channel *ch, sl_buf *b);
/* "client 127.0.0.1:5000 on front", "upstream 127.0.0.1:6379 for front": made
 * on the first call (a channel that never logs never formats its address). */
const char *sl_channel_describe(const sl_channel *ch);

/* A worker keeps up to this many freed channels for its next connections. */
#define SL_CHANNEL_SPARES 256

/* Frees the freed channels w keeps for reuse (when its pool goes idle, and
 * before w is destroyed). Worker thread. */
void sl_channel_spares_free(struct sl_worker *w);

static inline int sl_channel_is_closed(const sl_channel *ch) { return (ch->flags & SL_CH_CLOSED) != 0; }

/* Makes a the client's address (a PROXY protocol header told it): logs, the
 * access log and balancing by address use it from now on. */
void sl_channel_set_remote(sl_channel *ch, const sl_addr *a);
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
