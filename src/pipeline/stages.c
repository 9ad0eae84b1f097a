#include "pipeline/stages.h"

#include <stdlib.h>
#include <string.h>

#include "util/common.h"

static const sl_stage_ops *const sl_stage_table[] = {
    &sl_stage_echo,
    &sl_codec_length_field,
    &sl_codec_line,
    &sl_codec_delimiter,
    &sl_codec_fixed_length,
    &sl_codec_length_field_prepender,
    &sl_stage_proxy_protocol,
    NULL,
};

static const char *const sl_stage_names[] = {
    "sluice.stages.echo",
    "sluice.codec.length_field",
    "sluice.codec.line",
    "sluice.codec.delimiter",
    "sluice.codec.fixed_length",
    "sluice.codec.length_field_prepender",
    "sluice.proxy_protocol",
    NULL,
};

_Static_assert(sizeof(sl_stage_table) == sizeof(sl_stage_names), "one name per stage");

const sl_stage_ops *sl_stage_builtin(const char *name) {
  for (int i = 0; sl_stage_names[i] != NULL; i++)
    if (strcmp(sl_stage_names[i], name) == 0) return sl_stage_table[i];
  return NULL;
}

const char *const *sl_stage_builtin_names(void) { return sl_stage_names; }

int sl_stage_configure(const sl_stage_ops *ops, const sl_opts *opts, void **conf, char *err,
                       size_t errlen) {
  *conf = NULL;
  if (ops->configure == NULL) return SL_OK;
  void *c = calloc(1, ops->conf_size ? ops->conf_size : 1);
  if (c == NULL) {
    snprintf(err, errlen, "out of memory");
    return SL_ERROR;
  }
  if (ops->configure(c, opts, err, errlen) != SL_OK) {
    sl_stage_unconfigure(ops, c);
    return SL_ERROR;
  }
  *conf = c;
  return SL_OK;
}

void sl_stage_unconfigure(const sl_stage_ops *ops, void *conf) {
  if (conf == NULL) return;
  if (ops->unconfigure) ops->unconfigure(conf);
  free(conf);
}

sl_ctx *sl_stage_insert(sl_pipeline *p, sl_ctx *before, const sl_stage_ops *ops,
                        const char *name, const void *conf) {
  sl_ctx *ctx = sl_pipeline_insert(p, before, ops, name);
  if (ctx != NULL) ctx->conf = conf;
  return ctx;
}

sl_ctx *sl_stage_add(sl_pipeline *p, const sl_stage_ops *ops, const char *name,
                     const void *conf) {
  return sl_stage_insert(p, &p->tail, ops, name, conf);
}
