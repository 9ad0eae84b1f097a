/* libFuzzer target: sluice.codec.length_field. Options from 8 bytes: field
 * length (1, 2, 3, 4, 8), byte order, offset 0..7, adjustment -128..127,
 * initial_bytes_to_strip 0..15, max_frame_length 1..4096, fail_fast. The
 * options are refused exactly when the offset does not fit; frames are at
 * most max_frame_length - initial_bytes_to_strip long. */
#include "fuzz_codec.h"

static const int lens[] = {1, 2, 3, 4, 8};

static sl_opts *lf_opts(const uint8_t *o) {
  sl_opts *opts = sl_opts_new();
  sl_opts_add_number(opts, "length_field_length", lens[o[0] % 5]);
  sl_opts_add_string(opts, "byte_order", (o[1] & 1) ? "big" : "little", (o[1] & 1) ? 3 : 6);
  sl_opts_add_number(opts, "length_field_offset", o[2] % 8);
  sl_opts_add_number(opts, "length_adjustment", (int8_t)o[3]);
  sl_opts_add_number(opts, "initial_bytes_to_strip", o[4] % 16);
  sl_opts_add_number(opts, "max_frame_length", 1 + ((o[5] | o[6] << 8) % 4096));
  sl_opts_add_boolean(opts, "fail_fast", o[7] & 1);
  return opts;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  sl_fuzz_input in;
  if (!sl_fuzz_split(data, size, 8, &in)) return 0;
  int len = lens[in.opt[0] % 5];
  int offset = in.opt[2] % 8;
  size_t max = 1 + ((in.opt[5] | in.opt[6] << 8) % 4096);
  size_t strip = in.opt[4] % 16;
  sl_ch h;
  int accepted = sl_fuzz_open(&h, "sluice.codec.length_field", lf_opts(in.opt));
  SL_FUZZ_CHECK(accepted == (offset <= (int)max - len), "offset %d, length %d, max %zu: %s",
                offset, len, max, accepted ? "accepted" : "refused");
  if (!accepted) return 0;
  sl_ch_close(&h);
  sl_ch_free(&h);
  sl_fuzz_decode_twice("sluice.codec.length_field", lf_opts, &in, 1,
                       max > strip ? max - strip : 0, 0);
  return 0;
}
