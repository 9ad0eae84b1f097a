/* libFuzzer target: sluice.proxy_protocol. The stream is fed whole and in
 * random chunks: both must pass on the same bytes (the ones after a valid
 * header) and end the same way (open, or closed with the same reason). */
#include "fuzz_codec.h"

#include <string.h>

/* What the harness collected, without its u32 frame lengths, in out. */
static size_t sl_fuzz_bytes(const sl_ch *h, uint8_t *out) {
  size_t n = 0;
  for (size_t off = 0; off + 4 <= h->out_len;) {
    uint32_t len;
    memcpy(&len, h->out + off, 4);
    memcpy(out + n, h->out + off + 4, len);
    n += len;
    off += 4 + len;
  }
  return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  sl_fuzz_input in;
  if (!sl_fuzz_split(data, size, 0, &in)) return 0;
  sl_ch h[2];
  uint8_t *got[2];
  size_t n[2];
  for (int k = 0; k < 2; k++) {
    if (!sl_fuzz_open(&h[k], "sluice.proxy_protocol", NULL)) abort();
    sl_fuzz_feed(&h[k], &in, k);
    got[k] = malloc(h[k].out_len + 1);
    if (got[k] == NULL) abort();
    n[k] = sl_fuzz_bytes(&h[k], got[k]);
    SL_FUZZ_CHECK(n[k] <= in.n, "more bytes out (%zu) than in (%zu)", n[k], in.n);
    SL_FUZZ_CHECK(n[k] == 0 || memcmp(got[k], in.stream + in.n - n[k], n[k]) == 0,
                  "what is passed on is not the end of the stream");
    h[k].bad = 0; /* buffers are passed on as they come, not as derived frames */
    sl_fuzz_finish(&h[k]);
  }
  SL_FUZZ_CHECK(n[0] == n[1] && memcmp(got[0], got[1], n[0]) == 0,
                "whole: %zu bytes passed on, chunked: %zu", n[0], n[1]);
  SL_FUZZ_CHECK(h[0].closed == h[1].closed && strcmp(h[0].reason, h[1].reason) == 0,
                "whole %s, chunked %s", h[0].closed ? h[0].reason : "open",
                h[1].closed ? h[1].reason : "open");
  free(got[0]);
  free(got[1]);
  sl_ch_free(&h[0]);
  sl_ch_free(&h[1]);
  return 0;
}
