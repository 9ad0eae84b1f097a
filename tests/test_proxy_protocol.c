/*
 * sluice.proxy_protocol on its own, in the codec harness (a pipeline
 * without a socket): v1 and v2 headers, with TLVs, fed whole and split at
 * every byte, pass on exactly the bytes after the header; bad headers close
 * with their reason; the headers sluice writes (send_proxy) read back; every
 * test ends with the pool clean. (The address it
 * sets on a real channel is proved by spec/integration/proxy_protocol_spec.lua.)
 */
#include "test_util.h"

#include "codec_harness.h"
#include "io/addr.h"
#include "pipeline/codec/proxy_protocol.h"
#include "util/common.h"
#include "util/log.h"

/* The bytes the harness collected, without its u32 frame lengths. */
static size_t collected(const sl_ch *h, uint8_t *out, size_t cap) {
  size_t n = 0;
  for (size_t off = 0; off + 4 <= h->out_len;) {
    uint32_t len;
    memcpy(&len, h->out + off, 4);
    assert_true(n + len <= cap);
    memcpy(out + n, h->out + off + 4, len);
    n += len;
    off += 4 + len;
  }
  return n;
}

/* Feeds stream in reads split at `split` (0: whole), returns what came out
 * and the close reason ("" while open). */
static size_t run(sl_pool *pool, const uint8_t *stream, size_t n, size_t split, uint8_t *out,
                  size_t cap, char *reason) {
  sl_ch h;
  char err[128];
  assert_int_equal(SL_OK, sl_ch_open(&h, pool, "sluice.proxy_protocol", NULL, err, sizeof(err)));
  if (split == 0 || split >= n) {
    sl_ch_feed(&h, stream, n);
  } else {
    sl_ch_feed(&h, stream, split);
    if (!h.closed) sl_ch_feed(&h, stream + split, n - split);
  }
  size_t got = collected(&h, out, cap);
  snprintf(reason, 64, "%s", h.closed ? h.reason : "");
  h.bad = 0; /* the stage passes buffers on as they come: not derived frames */
  sl_ch_close(&h);
  sl_ch_free(&h);
  sl_pool_stats st;
  sl_pool_get_stats(pool, &st);
  assert_int_equal(0, st.blocks_in_use);
  return got;
}

/* Every split of header + payload gives the payload, and stays open. */
static void check_every_split(sl_pool *pool, const uint8_t *hdr, size_t hn) {
  static const char payload[] = "the bytes after the header";
  uint8_t stream[512], out[512];
  char reason[64];
  memcpy(stream, hdr, hn);
  memcpy(stream + hn, payload, sizeof(payload) - 1);
  size_t n = hn + sizeof(payload) - 1;
  for (size_t split = 0; split < n; split++) {
    size_t got = run(pool, stream, n, split, out, sizeof(out), reason);
    assert_string_equal("", reason);
    assert_int_equal(sizeof(payload) - 1, got);
    assert_memory_equal(payload, out, got);
  }
}

static void test_v1_tcp4_tcp6_unknown(void **state) {
  const char *lines[] = {
      "PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n",
      "PROXY TCP6 2001:db8::5 2001:db8::1 6000 443\r\n",
      "PROXY UNKNOWN\r\n",
      "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
      "PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
      "PROXY TCP6 ::ffff:10.0.0.1 ::1 65535 0\r\n",
      /* The longest lines: 104 bytes for TCP6, 107 for UNKNOWN. */
      "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
      "65535 65535\r\n",
      "PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
      "65535 65535\r\n",
  };
  for (size_t i = 0; i < sizeof(lines) / sizeof(lines[0]); i++)
    check_every_split(*state, (const uint8_t *)lines[i], strlen(lines[i]));
  assert_int_equal(104, strlen(lines[6]));
  assert_int_equal(107, strlen(lines[7]));
}

static void test_v2_with_tlvs_and_local(void **state) {
  /* PROXY, TCP over IPv4, 12 address bytes + a 7-byte TLV. */
  uint8_t v4[] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
                  0x21, 0x11, 0x00, 12 + 7, 198,  51,   100,  9,    10,   0,    0,    1,
                  0x9c, 0x40, 0x01, 0xbb, 0x04, 0x00, 0x04, 't',  'e',  's',  't'};
  check_every_split(*state, v4, sizeof(v4));
  /* PROXY, TCP over IPv6. */
  uint8_t v6[16 + 36] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51,
                         0x55, 0x49, 0x54, 0x0a, 0x21, 0x21, 0x00, 36};
  v6[16] = 0x20;
  v6[17] = 0x01;
  check_every_split(*state, v6, sizeof(v6));
  /* LOCAL, no addresses. */
  uint8_t local[] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51,
                     0x55, 0x49, 0x54, 0x0a, 0x20, 0x00, 0x00, 0x00};
  check_every_split(*state, local, sizeof(local));
}

static void test_bad_headers_close_with_their_reason(void **state) {
  struct {
    const char *stream;
    size_t n;
    const char *reason;
  } cases[] = {
      {"GET / HTTP/1.1\r\n\r\n", 18, "bad PROXY protocol header (not a PROXY protocol header)"},
      {"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", 34, "bad PROXY protocol header (too many fields)"},
      {"PROXY TCP4 1.2.3.4\r\n", 20, "bad PROXY protocol header (missing fields)"},
      {"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", 32, "bad PROXY protocol header (unknown protocol)"},
      {"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", 33, "bad PROXY protocol header (bad source port)"},
      {"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", 32,
       "bad PROXY protocol header (bad source address)"},
      /* The destination is checked as strictly as the source. */
      {"PROXY TCP4 1.2.3.4 not-an-address 1000 not-a-port\r\nhello\n", 57,
       "bad PROXY protocol header (bad destination address)"},
      {"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", 28, "bad PROXY protocol header (bad destination address)"},
      {"PROXY TCP4 1.2.3.4 5.6.7.8 1000 not-a-port\r\n", 44,
       "bad PROXY protocol header (bad destination port)"},
      {"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", 36,
       "bad PROXY protocol header (bad destination port)"},
      {"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", 33,
       "bad PROXY protocol header (bad destination port)"},
      {"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\0\r\n", 33,
       "bad PROXY protocol header (bad destination port)"},
      {"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", 33, "bad PROXY protocol header (bad source port)"},
      {"PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n", 37,
       "bad PROXY protocol header (bad source port)"},
      /* A bare LF does not end the line, nor is it part of one: the
       * client's "hello" is not taken into the header. */
      {"PROXY TCP4 1.2.3.4 127.0.0.1 1000 27162\nhello\r\nworld\n", 53,
       "bad PROXY protocol header (v1 line not ended by CRLF)"},
      {"PROXY UNKNOWN\nhello\r\n", 21, "bad PROXY protocol header (v1 line not ended by CRLF)"},
      /* Single spaces only, none at the end. */
      {"PROXY    TCP4  1.2.3.4   127.0.0.1 1000 27162\r\nhello\n", 53,
       "bad PROXY protocol header (not one space between fields)"},
      {"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", 33,
       "bad PROXY protocol header (not one space between fields)"},
      {"PROXY TCP4 1.2.3.4 5.6.7.8\t1 2\r\n", 32, "bad PROXY protocol header (missing fields)"},
      {"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", 31, "bad PROXY protocol header (not a PROXY line)"},
      {"PROXY UNKNOWNX\r\n", 16, "bad PROXY protocol header (unknown protocol)"},
      {"\r\n\r\n\0\r\nQUIX\n\x21\x11\0\0", 16, "bad PROXY protocol header (bad v2 signature)"},
      {"\r\n\r\n\0\r\nQUIT\n\x22\x11\0\0", 16, "bad PROXY protocol header (unknown command)"},
      {"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x04\1\2\3\4", 20,
       "bad PROXY protocol header (address block too short)"},
  };
  uint8_t out[256];
  char reason[64];
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    for (size_t split = 0; split < cases[i].n; split++) {
      run(*state, (const uint8_t *)cases[i].stream, cases[i].n, split, out, sizeof(out), reason);
      assert_string_equal(cases[i].reason ? cases[i].reason : "", reason);
    }
  }
  /* A v1 line that never ends within 107 bytes. */
  uint8_t longline[200];
  memset(longline, 'x', sizeof(longline));
  memcpy(longline, "PROXY ", 6);
  run(*state, longline, sizeof(longline), 50, out, sizeof(out), reason);
  assert_string_equal("bad PROXY protocol header (v1 line longer than 107 bytes)", reason);
  /* 108 bytes, the CRLF one byte past the longest line. */
  memset(longline, 'f', 106);
  memcpy(longline, "PROXY UNKNOWN ", 14);
  memcpy(longline + 106, "\r\n", 2);
  for (size_t split = 0; split < 108; split++) {
    run(*state, longline, 108, split, out, sizeof(out), reason);
    assert_string_equal("bad PROXY protocol header (v1 line longer than 107 bytes)", reason);
  }
}

static void addr4(sl_addr *a, const char *ip, int port) {
  assert_int_equal(SL_OK, sl_addr_parse(a, ip, port));
}

static void test_written_headers_read_back(void **state) {
  sl_addr src, dst, src6, dst6;
  addr4(&src, "203.0.113.7", 51234);
  addr4(&dst, "10.0.0.1", 443);
  addr4(&src6, "2001:db8::5", 6000);
  addr4(&dst6, "2001:db8::1", 443);
  uint8_t h[SL_PROXY_HEADER_MAX];
  size_t n = sl_proxy_header(1, &src, &dst, h);
  assert_int_equal(strlen("PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n"), n);
  assert_memory_equal("PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n", h, n);
  n = sl_proxy_header(1, &src6, &dst6, h);
  assert_memory_equal("PROXY TCP6 2001:db8::5 2001:db8::1 6000 443\r\n", h, n);
  n = sl_proxy_header(1, NULL, NULL, h);
  assert_memory_equal("PROXY UNKNOWN\r\n", h, n);
  /* Families differ (a client behind sluice.proxy_protocol): both as IPv6,
   * the IPv4 one mapped, so that the client's address goes on. */
  n = sl_proxy_header(1, &src6, &dst, h);
  assert_int_equal(strlen("PROXY TCP6 2001:db8::5 ::ffff:10.0.0.1 6000 443\r\n"), n);
  assert_memory_equal("PROXY TCP6 2001:db8::5 ::ffff:10.0.0.1 6000 443\r\n", h, n);
  n = sl_proxy_header(1, &src, &dst6, h);
  assert_memory_equal("PROXY TCP6 ::ffff:203.0.113.7 2001:db8::1 51234 443\r\n", h, n);
  n = sl_proxy_header(2, &src6, &dst, h);
  assert_int_equal(16 + 36, n);
  assert_int_equal(0x21, h[13]);
  assert_int_equal(0x20, h[16]); /* 2001:db8::5 */
  assert_int_equal(0xff, h[32 + 10]);
  assert_int_equal(0xff, h[32 + 11]);
  assert_int_equal(10, h[32 + 12]);
  assert_int_equal(443 >> 8, h[50]);
  assert_int_equal(443 & 0xff, h[51]);
  /* Every header written, v1 and v2, reads back whole at every split. */
  const sl_addr *pairs[][2] = {{&src, &dst}, {&src6, &dst6}, {NULL, NULL}, {&src6, &dst}};
  for (int v = 1; v <= 2; v++) {
    for (size_t i = 0; i < 4; i++) {
      n = sl_proxy_header(v, pairs[i][0], pairs[i][1], h);
      assert_true(n > 0 && n <= SL_PROXY_HEADER_MAX);
      check_every_split(*state, h, n);
    }
  }
  n = sl_proxy_header(2, &src, &dst, h);
  assert_int_equal(16 + 12, n);
  assert_int_equal(0x21, h[12]);
  assert_int_equal(0x11, h[13]);
  assert_int_equal(203, h[16]);
  assert_int_equal(51234 >> 8, h[24]);
}

int main(void) {
  sl_log_set_level(SL_LOG_ERROR);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_v1_tcp4_tcp6_unknown),
      cmocka_unit_test(test_v2_with_tlvs_and_local),
      cmocka_unit_test(test_bad_headers_close_with_their_reason),
      cmocka_unit_test(test_written_headers_read_back),
  };
  return cmocka_run_group_tests(tests, sl_test_pool_setup, sl_test_pool_teardown);
}
