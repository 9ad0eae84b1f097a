/* libFuzzer target: sluice.codec.line. Options from 3 bytes: max_length
 * 1..1024, strip_delimiter, fail_fast. */
#include "fuzz_codec.h"

static sl_opts *line_opts(const uint8_t *o) {
  sl_opts *opts = sl_opts_new();
  sl_opts_add_number(opts, "max_length", 1 + ((o[0] | o[1] << 8) % 1024));
  sl_opts_add_boolean(opts, "strip_delimiter", o[2] & 1);
  sl_opts_add_boolean(opts, "fail_fast", o[2] & 2);
  return opts;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  sl_fuzz_input in;
  if (!sl_fuzz_split(data, size, 3, &in)) return 0;
  size_t max = 1 + ((in.opt[0] | in.opt[1] << 8) % 1024);
  size_t limit = (in.opt[2] & 1) ? max : max + 2;
  sl_fuzz_decode_twice("sluice.codec.line", line_opts, &in, 1, limit, 0);
  return 0;
}
