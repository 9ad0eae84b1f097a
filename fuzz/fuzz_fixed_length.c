/* libFuzzer target: sluice.codec.fixed_length. frame_length 1..512 from 2
 * bytes; every frame is exactly that long. */
#include "fuzz_codec.h"

static sl_opts *fixed_opts(const uint8_t *o) {
  sl_opts *opts = sl_opts_new();
  sl_opts_add_number(opts, "frame_length", 1 + ((o[0] | o[1] << 8) % 512));
  return opts;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  sl_fuzz_input in;
  if (!sl_fuzz_split(data, size, 2, &in)) return 0;
  size_t len = 1 + ((in.opt[0] | in.opt[1] << 8) % 512);
  sl_fuzz_decode_twice("sluice.codec.fixed_length", fixed_opts, &in, 1, len, len);
  return 0;
}
