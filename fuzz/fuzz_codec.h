/*
 * What every codec fuzz target shares: a pool for the process, reading
 * options and a chunking seed from the front of the input, and the checks
 * made after each input (the harness's frames are derived buffers; the pool
 * is back to zero: no block, no buffer, no header outstanding).
 *
 * Input layout: [option bytes][8 bytes of chunking seed][the stream].
 */
#ifndef SL_FUZZ_CODEC_H
#define SL_FUZZ_CODEC_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "../tests/codec_harness.h"
#include "util/log.h"

#define SL_FUZZ_CHECK(cond, ...)                                    \
  do {                                                              \
    if (!(cond)) {                                                  \
      fprintf(stderr, "fuzz check failed: %s: ", #cond);            \
      fprintf(stderr, __VA_ARGS__);                                 \
      fprintf(stderr, "\n");                                        \
      abort();                                                      \
    }                                                               \
  } while (0)

static sl_pool *sl_fuzz_pool;

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  sl_log_set_level(SL_LOG_ERROR);
  sl_fuzz_pool = sl_pool_create(NULL, 0);
  if (sl_fuzz_pool == NULL) abort();
  sl_pool_bind_thread(sl_fuzz_pool);
  return 0;
}

/* The input cut into options, seed and stream; 0 when it is too short. */
typedef struct sl_fuzz_input {
  const uint8_t *opt;
  uint64_t seed;
  const uint8_t *stream;
  size_t n;
} sl_fuzz_input;

static inline int sl_fuzz_split(const uint8_t *data, size_t size, size_t nopt,
                                sl_fuzz_input *in) {
  if (size < nopt + 8) return 0;
  in->opt = data;
  in->seed = 0;
  for (int i = 0; i < 8; i++) in->seed = (in->seed << 8) | data[nopt + i];
  in->stream = data + nopt + 8;
  in->n = size - nopt - 8;
  return 1;
}

/* Opens h on module with opts (freed); 0 when the options were refused. */
static inline int sl_fuzz_open(sl_ch *h, const char *module, sl_opts *opts) {
  char err[256];
  int rc = sl_ch_open(h, sl_fuzz_pool, module, opts, err, sizeof(err));
  sl_opts_free(opts);
  return rc == SL_OK;
}

/* Feeds the stream whole (chunked == 0) or in chunks of 1..max_chunk. */
static inline void sl_fuzz_feed(sl_ch *h, const sl_fuzz_input *in, int chunked) {
  if (!chunked) {
    if (in->n > 0) sl_ch_feed(h, in->stream, in->n);
    return;
  }
  size_t max_chunk = 1 + (size_t)(in->seed >> 56) % 64;
  sl_ch_feed_chunked(h, in->stream, in->n, in->seed, max_chunk);
}

/* Closes h and checks what must hold after every input. */
static inline void sl_fuzz_finish(sl_ch *h) {
  SL_FUZZ_CHECK(!h->bad, "a frame that is not a derived buffer of the cumulation");
  sl_ch_close(h);
  SL_FUZZ_CHECK(h->owner.count == 0 && h->owner.bytes == 0, "%u buffers still owned",
                h->owner.count);
  sl_pool_stats st;
  sl_pool_get_stats(sl_fuzz_pool, &st);
  SL_FUZZ_CHECK(st.blocks_in_use == 0 && st.bufs_active == 0, "%llu blocks outstanding",
                (unsigned long long)st.blocks_in_use);
  SL_FUZZ_CHECK(st.headers_free == st.headers_total, "%llu headers outstanding",
                (unsigned long long)(st.headers_total - st.headers_free));
}

/* Decodes the input whole and chunked: both must give the same frames
 * (when `same` says the codec promises it), no frame may be longer than
 * limit, and with exact every frame must be exactly that long. */
static inline void sl_fuzz_decode_twice(const char *module,
                                        sl_opts *(*opts_of)(const uint8_t *),
                                        const sl_fuzz_input *in, int same, size_t limit,
                                        size_t exact) {
  sl_ch h[2];
  for (int k = 0; k < 2; k++) {
    if (!sl_fuzz_open(&h[k], module, opts_of(in->opt))) return;
    h[k].keep_every = (int)(in->seed % 5);
    sl_fuzz_feed(&h[k], in, k);
    SL_FUZZ_CHECK(h[k].max_frame <= limit, "a frame of %zu bytes, limit %zu", h[k].max_frame,
                  limit);
    SL_FUZZ_CHECK(!exact || h[k].out_len == h[k].nframes * (4 + exact),
                  "frames of other lengths than %zu", exact);
    sl_fuzz_finish(&h[k]);
  }
  if (same) {
    SL_FUZZ_CHECK(h[0].out_len == h[1].out_len &&
                      (h[0].out_len == 0 || memcmp(h[0].out, h[1].out, h[0].out_len) == 0),
                  "whole: %zu frames, chunked: %zu frames", h[0].nframes, h[1].nframes);
    SL_FUZZ_CHECK(h[0].closed == h[1].closed, "whole %s, chunked %s",
                  h[0].closed ? h[0].reason : "open", h[1].closed ? h[1].reason : "open");
  }
  sl_ch_free(&h[0]);
  sl_ch_free(&h[1]);
}

#endif
