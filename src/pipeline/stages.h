/* Stages implemented in C, found by module name from the config, and
 * their options. */
#ifndef SL_STAGES_H
#define SL_STAGES_H

#include "pipeline/opts.h"
#include "pipeline/pipeline.h"

/* The C stage registered under name, or NULL. */
const sl_stage_ops *sl_stage_builtin(const char *name);

/* NULL-terminated list of the registered names. */
const char *const *sl_stage_builtin_names(void);

/* Parses opts (NULL: none) for a C stage into a new configuration, once
 * per pipeline entry: *conf is +1 (sl_stage_unconfigure), NULL for a stage
 * without configure (which ignores options). SL_OK, or SL_ERROR with
 * "<key>: expected ..., got ..." in err. Borrows opts. */
int sl_stage_configure(const sl_stage_ops *ops, const sl_opts *opts, void **conf, char *err,
                       size_t errlen);

/* Frees a configuration from sl_stage_configure (NULL is fine). */
void sl_stage_unconfigure(const sl_stage_ops *ops, void *conf);

/* Appends a C stage with its configuration (borrowed: it must outlive the
 * pipeline). Returns the context, or NULL on ENOMEM. */
sl_ctx *sl_stage_add(sl_pipeline *p, const sl_stage_ops *ops, const char *name,
                     const void *conf);

/* The same before `before` (a live context of p, or &p->tail), as
 * sl_pipeline_insert: for stages added while the pipeline runs. */
sl_ctx *sl_stage_insert(sl_pipeline *p, sl_ctx *before, const sl_stage_ops *ops,
                        const char *name, const void *conf);

/* sluice.stages.echo: writes back what it reads. */
extern const sl_stage_ops sl_stage_echo;

/* Frame codecs (src/pipeline/codec/): Netty's frame decoders and the
 * length field prepender. Decoded frames are derived buffers (retained
 * slices of the cumulation); a malformed or oversized frame closes the
 * connection with "malformed_frame" or "frame_too_large". */
extern const sl_stage_ops sl_codec_length_field;
extern const sl_stage_ops sl_codec_line;
extern const sl_stage_ops sl_codec_delimiter;
extern const sl_stage_ops sl_codec_fixed_length;
extern const sl_stage_ops sl_codec_length_field_prepender;
/* sluice.proxy_protocol: the PROXY protocol header (v1, v2) sets the client
 * address; the first stage of a pipeline (codec/proxy_protocol.c). */
extern const sl_stage_ops sl_stage_proxy_protocol;

#endif
