#include "pipeline/stages.h"

#include <string.h>

static const char *const sl_stage_names[] = {"sluice.stages.echo", NULL};
static const sl_stage_ops *const sl_stage_table[] = {&sl_stage_echo, NULL};

const sl_stage_ops *sl_stage_builtin(const char *name) {
  for (int i = 0; sl_stage_names[i] != NULL; i++)
    if (strcmp(sl_stage_names[i], name) == 0) return sl_stage_table[i];
  return NULL;
}

const char *const *sl_stage_builtin_names(void) { return sl_stage_names; }
