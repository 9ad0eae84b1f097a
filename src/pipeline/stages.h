/* Stages implemented in C, found by module name from the config. */
#ifndef SL_STAGES_H
#define SL_STAGES_H

#include "pipeline/pipeline.h"

/* The C stage registered under name, or NULL. */
const sl_stage_ops *sl_stage_builtin(const char *name);

/* NULL-terminated list of the registered names. */
const char *const *sl_stage_builtin_names(void);

/* sluice.stages.echo: writes back what it reads. */
extern const sl_stage_ops sl_stage_echo;

#endif
