/* libFuzzer target: sluice.codec.length_field_prepender. Options from 3
 * bytes (field length, byte order, adjustment -128..127); the stream is cut
 * into messages by the chunking and written. What comes out must be, per
 * message, its length field then the message itself, until a length that
 * is negative or does not fit closes the connection with that reason. */
#include "fuzz_codec.h"
#include "pipeline/codec/length.h"

static const int lens[] = {1, 2, 3, 4, 8};

static sl_opts *pre_opts(const uint8_t *o) {
  sl_opts *opts = sl_opts_new();
  sl_opts_add_number(opts, "length_field_length", lens[o[0] % 5]);
  sl_opts_add_string(opts, "byte_order", (o[1] & 1) ? "big" : "little", (o[1] & 1) ? 3 : 6);
  sl_opts_add_number(opts, "length_adjustment", (int8_t)o[2]);
  return opts;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  sl_fuzz_input in;
  if (!sl_fuzz_split(data, size, 3, &in)) return 0;
  int len = lens[in.opt[0] % 5], big = in.opt[1] & 1, adj = (int8_t)in.opt[2];
  sl_ch h;
  if (!sl_fuzz_open(&h, "sluice.codec.length_field_prepender", pre_opts(in.opt))) abort();
  uint64_t s = in.seed | 1;
  size_t off = 0, max_chunk = 1 + (size_t)(in.seed >> 56) % 300, pos = 0;
  while (off < in.n && !h.closed) {
    size_t c = (size_t)(sl_ch_rand(&s) % (max_chunk + 1)); /* empty messages too */
    if (c > in.n - off) c = in.n - off;
    sl_ch_write(&h, in.stream + off, c);
    int64_t v = (int64_t)c + adj;
    int fits = v >= 0 && (len == 8 || ((uint64_t)v >> (8 * len)) == 0);
    if (!fits) {
      SL_FUZZ_CHECK(h.closed, "a length of %lld in %d bytes did not close", (long long)v, len);
      SL_FUZZ_CHECK(strcmp(h.reason, v < 0 ? "malformed_frame" : "frame_too_large") == 0,
                    "closed with %s", h.reason);
      break;
    }
    /* [u32 len][field] [u32 len][message] in the harness's record */
    SL_FUZZ_CHECK(h.out_len == pos + 8 + (size_t)len + c, "recorded %zu bytes", h.out_len);
    uint32_t rec;
    memcpy(&rec, h.out + pos, 4);
    SL_FUZZ_CHECK(rec == (uint32_t)len, "a field of %u bytes", rec);
    SL_FUZZ_CHECK(sl_length_get(h.out + pos + 4, len, big) == (uint64_t)v, "a wrong length");
    memcpy(&rec, h.out + pos + 4 + len, 4);
    SL_FUZZ_CHECK(rec == c && memcmp(h.out + pos + 8 + len, in.stream + off, c) == 0,
                  "the message changed");
    pos = h.out_len;
    off += c;
  }
  sl_fuzz_finish(&h);
  sl_ch_free(&h);
  return 0;
}
