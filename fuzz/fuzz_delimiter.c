/* libFuzzer target: sluice.codec.delimiter. Options from 4 bytes: one to
 * three delimiters of 1..3 bytes from a small alphabet (so they occur),
 * max_frame_length 1..1024, strip_delimiter, fail_fast. The same frames
 * whole and chunked are promised only when no delimiter occurs inside
 * another (Netty's semantics otherwise depend on what has arrived). */
#include <string.h>

#include "fuzz_codec.h"

/* Delimiter k (k < count) from the option bytes: 1..3 bytes of 'a'..'d'. */
static size_t delim_of(const uint8_t *o, int k, char *out) {
  uint8_t b = o[1 + k];
  size_t len = 1 + (size_t)(b % 3);
  for (size_t i = 0; i < len; i++) out[i] = (char)('a' + ((b >> (2 + 2 * i)) & 3));
  return len;
}

static int ndelims(const uint8_t *o) { return 1 + o[0] % 3; }

static sl_opts *delim_opts(const uint8_t *o) {
  sl_opts *opts = sl_opts_new();
  sl_opts_add_list(opts, "delimiters");
  for (int k = 0; k < ndelims(o); k++) {
    char d[4];
    size_t len = delim_of(o, k, d);
    sl_opts_list_push(opts, "delimiters", d, len);
  }
  sl_opts_add_number(opts, "max_frame_length", 1 + ((o[4] | o[5] << 8) % 1024));
  sl_opts_add_boolean(opts, "strip_delimiter", o[6] & 1);
  sl_opts_add_boolean(opts, "fail_fast", o[6] & 2);
  return opts;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  sl_fuzz_input in;
  if (!sl_fuzz_split(data, size, 7, &in)) return 0;
  char d[3][4];
  size_t dl[3], maxd = 0;
  int n = ndelims(in.opt), same = 1;
  for (int k = 0; k < n; k++) {
    dl[k] = delim_of(in.opt, k, d[k]);
    if (dl[k] > maxd) maxd = dl[k];
  }
  for (int i = 0; i < n; i++)
    for (int j = 0; j < n; j++)
      if (i != j && dl[i] <= dl[j] && memmem(d[j], dl[j], d[i], dl[i]) != NULL) same = 0;
  size_t max = 1 + ((in.opt[4] | in.opt[5] << 8) % 1024);
  size_t limit = (in.opt[6] & 1) ? max : max + maxd;
  sl_fuzz_decode_twice("sluice.codec.delimiter", delim_opts, &in, same, limit, 0);
  return 0;
}
