/*
 * The frame decoders' cost per frame: 64 KiB reads of 64-byte frames (1024
 * a read) through a decoder to a C stage that releases each frame, the way
 * a channel delivers them (each read a fresh buffer its channel answers
 * for, at the default leak detection level). Prints wall-clock ns per
 * frame; bench/codec/run also counts instructions with callgrind.
 *
 *   codec_bench MODULE READS      (MODULE: line, delimiter, length_field,
 *                                  fixed_length)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "alloc/pool.h"
#include "buf/buf.h"
#include "buf/leak.h"
#include "pipeline/stages.h"
#include "util/log.h"

#define FRAME 64
#define READ_SIZE 65536

static void release_frame(sl_ctx *ctx, sl_buf *b) {
  (void)ctx;
  sl_buf_release(b);
}

static const sl_stage_ops sink_ops = {.name = "sink", .on_read = release_frame};

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: codec_bench line|delimiter|length_field|fixed_length READS\n");
    return 2;
  }
  sl_log_set_level(SL_LOG_ERROR);
  const char *which = argv[1];
  long reads = atol(argv[2]);
  static uint8_t data[READ_SIZE];
  sl_opts *o = sl_opts_new();
  char module[64];
  snprintf(module, sizeof(module), "sluice.codec.%s", which);
  for (size_t i = 0; i < READ_SIZE; i += FRAME) {
    memset(data + i, 'a', FRAME);
    if (strcmp(which, "length_field") == 0) {
      data[i] = 0;
      data[i + 1] = FRAME - 2;
    } else {
      data[i + FRAME - 1] = '\n';
    }
  }
  if (strcmp(which, "line") == 0) {
    sl_opts_add_number(o, "max_length", 1024);
  } else if (strcmp(which, "delimiter") == 0) {
    sl_opts_add_list(o, "delimiters");
    sl_opts_list_push(o, "delimiters", "\n", 1);
    sl_opts_add_number(o, "max_frame_length", 1024);
  } else if (strcmp(which, "length_field") == 0) {
    sl_opts_add_number(o, "max_frame_length", 1024);
    sl_opts_add_number(o, "length_field_length", 2);
    sl_opts_add_number(o, "initial_bytes_to_strip", 2);
  } else {
    sl_opts_add_number(o, "frame_length", FRAME);
  }
  const sl_stage_ops *ops = sl_stage_builtin(module);
  void *conf;
  char err[256];
  if (ops == NULL || sl_stage_configure(ops, o, &conf, err, sizeof(err)) != 0) {
    fprintf(stderr, "%s: %s\n", module, ops ? err : "no such stage");
    return 2;
  }
  sl_pool *pool = sl_pool_create(NULL, 0);
  sl_pool_bind_thread(pool);
  sl_buf_owner owner = {.name = "bench"};
  sl_pipeline p;
  sl_pipeline_init(&p, NULL);
  sl_stage_add(&p, ops, module, conf);
  sl_stage_add(&p, &sink_ops, "sink", NULL);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long r = 0; r < reads; r++) {
    sl_buf *b = sl_buf_alloc(pool, READ_SIZE, READ_SIZE);
    memcpy(b->data, data, READ_SIZE); /* what recv() does */
    b->wr = READ_SIZE;
    sl_buf_set_owner(b, &owner);
    sl_pipeline_fire_read(&p, b);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double ns = (double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec);
  double frames = (double)reads * (READ_SIZE / FRAME);
  printf("%s %.1f ns/frame (%.0f frames, %.2f GB/s)\n", which, ns / frames, frames,
         (double)reads * READ_SIZE / ns);
  sl_pipeline_fire_removed(&p);
  sl_pipeline_destroy(&p);
  sl_stage_unconfigure(ops, conf);
  sl_opts_free(o);
  sl_pool_destroy(pool);
  return 0;
}
