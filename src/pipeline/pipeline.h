/*
 * The pipeline: a doubly linked list of contexts, head <-> stages <-> tail,
 * Netty's ChannelPipeline. Inbound events travel head to tail, outbound
 * operations tail to head.
 *
 * A stage is a vtable (sl_stage_ops) plus per-connection state. A NULL
 * callback passes the event on. Lua stages use the same vtable
 * (src/lua/host.c) and report which callbacks their table defines, so a Lua
 * stage without channel_read costs nothing on the read path.
 *
 * Ownership: an inbound read or an outbound write passes one reference to
 * the callee (takes ownership). The tail releases any buffer that reaches
 * it; the head hands writes to the channel's outbound queue.
 */
#ifndef SL_PIPELINE_H
#define SL_PIPELINE_H

#include <stddef.h>
#include <stdint.h>

#include "buf/buf_types.h"

struct sl_channel;
typedef struct sl_ctx sl_ctx;
typedef struct sl_pipeline sl_pipeline;

/* Events, in the order of sl_stage_ops; also the codes Lua dispatch uses. */
typedef enum {
  SL_EV_ACTIVE = 0,
  SL_EV_INACTIVE,
  SL_EV_READ,
  SL_EV_READ_COMPLETE,
  SL_EV_WRITABILITY,
  SL_EV_USER_EVENT,
  SL_EV_ERROR,
  SL_EV_WRITE,
  SL_EV_FLUSH,
  SL_EV_CLOSE,
  SL_EV_READ_REQUEST,    /* outbound: read once more (autoread off) */
  SL_EV_COUNT
} sl_event;

#define SL_EV_BIT(ev) (1u << (ev))
#define SL_EV_INBOUND_MASK                                                  \
  (SL_EV_BIT(SL_EV_ACTIVE) | SL_EV_BIT(SL_EV_INACTIVE) | SL_EV_BIT(SL_EV_READ) | \
   SL_EV_BIT(SL_EV_READ_COMPLETE) | SL_EV_BIT(SL_EV_WRITABILITY) |          \
   SL_EV_BIT(SL_EV_USER_EVENT) | SL_EV_BIT(SL_EV_ERROR))

/* Built-in user events (Netty's ChannelInputShutdownEvent and friends). */
typedef enum {
  SL_UEV_INPUT_CLOSED = 1,  /* the peer sent FIN: no more reads */
} sl_user_event;

struct sl_opts;

typedef struct sl_stage_ops {
  const char *name;
  size_t state_size;                 /* bytes of per-context state, zeroed */
  /* Options (C stages): configure parses a pipeline entry's options once,
   * at load, into conf_size zeroed bytes that every context of the stage
   * then reads (ctx->conf). SL_OK, or SL_ERROR with "<key>: expected ...,
   * got ..." in err. unconfigure frees what configure allocated. A stage
   * without configure takes no options. See stages.h. */
  size_t conf_size;
  int (*configure)(void *conf, const struct sl_opts *opts, char *err, size_t errlen);
  void (*unconfigure)(void *conf);
  void (*destroy)(sl_ctx *ctx);      /* frees what the state holds */
  void (*on_active)(sl_ctx *ctx);
  void (*on_inactive)(sl_ctx *ctx);
  void (*on_read)(sl_ctx *ctx, sl_buf *b);          /* takes ownership of b */
  void (*on_read_complete)(sl_ctx *ctx);
  void (*on_writability)(sl_ctx *ctx, int writable);
  void (*on_user_event)(sl_ctx *ctx, int event);
  void (*on_error)(sl_ctx *ctx, const char *err);
  void (*write)(sl_ctx *ctx, sl_buf *b);            /* takes ownership of b */
  void (*flush)(sl_ctx *ctx);
  void (*close)(sl_ctx *ctx, const char *reason);
  void (*read)(sl_ctx *ctx);
  void (*on_removed)(sl_ctx *ctx);   /* the channel closed: after inactive */
} sl_stage_ops;

/* A context: one stage in one channel's pipeline. */
struct sl_ctx {
  sl_ctx *next, *prev;
  const sl_stage_ops *ops;
  sl_pipeline *pipe;
  const char *name;     /* stage name for logs (borrowed from the config) */
  uint32_t mask;        /* SL_EV_BIT of each event the stage handles */
  int lua_stage;        /* Lua stages: key of the loaded stage, else 0 */
  double lua_id;        /* Lua stages: id of the Lua-side context, else 0 */
  void *state;          /* ops->state_size bytes, or NULL */
  const void *conf;     /* the stage's parsed options (C stages), or NULL */
  int removed;          /* left the pipeline while its channel lives */
  sl_ctx *gone;         /* next on the pipeline's removed list */
};

struct sl_pipeline {
  sl_ctx head;          /* hands writes to the channel */
  sl_ctx tail;          /* releases what reaches it */
  struct sl_channel *ch;
  uint32_t nstages;
  sl_ctx *removed;      /* contexts removed while running, freed with the pipeline */
};

/* Sets up an empty pipeline (head <-> tail) for ch. */
void sl_pipeline_init(sl_pipeline *p, struct sl_channel *ch);

/* Appends a stage before the tail. Returns the context, or NULL on ENOMEM. */
sl_ctx *sl_pipeline_add_last(sl_pipeline *p, const sl_stage_ops *ops,
                             const char *name);

/* Inserts a stage before `before` (a live context of p, or &p->tail).
 * Returns the context, or NULL on ENOMEM. */
sl_ctx *sl_pipeline_insert(sl_pipeline *p, sl_ctx *before, const sl_stage_ops *ops,
                           const char *name);

/* Takes a stage out of a running pipeline: on_removed runs, the context
 * stays allocated (and still forwards what it sends) until the pipeline is
 * destroyed. */
void sl_pipeline_remove(sl_ctx *ctx);

/* Tells every stage, head to tail, that it leaves the pipeline (the channel
 * closed); the contexts stay allocated until sl_pipeline_destroy. */
void sl_pipeline_fire_removed(sl_pipeline *p);

/* Destroys every stage (ops->destroy) and frees the contexts. */
void sl_pipeline_destroy(sl_pipeline *p);

/* Entry points: inbound events start at the head, outbound at the tail. */
void sl_pipeline_fire_active(sl_pipeline *p);
void sl_pipeline_fire_inactive(sl_pipeline *p);
void sl_pipeline_fire_read(sl_pipeline *p, sl_buf *b);    /* takes ownership */
void sl_pipeline_fire_read_complete(sl_pipeline *p);
void sl_pipeline_fire_writability(sl_pipeline *p, int writable);
void sl_pipeline_fire_user_event(sl_pipeline *p, int event);
void sl_pipeline_fire_error(sl_pipeline *p, const char *err);
void sl_pipeline_write(sl_pipeline *p, sl_buf *b);        /* takes ownership */
void sl_pipeline_flush(sl_pipeline *p);
void sl_pipeline_close(sl_pipeline *p, const char *reason);
void sl_pipeline_read(sl_pipeline *p);

/* From a context: the next handler in the event's direction gets it. */
void sl_ctx_fire_active(sl_ctx *ctx);
void sl_ctx_fire_inactive(sl_ctx *ctx);
void sl_ctx_fire_read(sl_ctx *ctx, sl_buf *b);            /* takes ownership */
void sl_ctx_fire_read_complete(sl_ctx *ctx);
void sl_ctx_fire_writability(sl_ctx *ctx, int writable);
void sl_ctx_fire_user_event(sl_ctx *ctx, int event);
void sl_ctx_fire_error(sl_ctx *ctx, const char *err);
void sl_ctx_write(sl_ctx *ctx, sl_buf *b);                /* takes ownership */
void sl_ctx_flush(sl_ctx *ctx);
void sl_ctx_close(sl_ctx *ctx, const char *reason);
void sl_ctx_read(sl_ctx *ctx);

/* The next context after ctx (inbound events) or before it (outbound) that
 * handles ev; never NULL (head and tail handle everything). */
sl_ctx *sl_ctx_next_handler(sl_ctx *ctx, sl_event ev);

static inline struct sl_channel *sl_ctx_channel(const sl_ctx *ctx) { return ctx->pipe->ch; }

#endif
