/*
 * The C frame codecs: each decoder fed the same stream in many random
 * chunkings gives the same frames (derived buffers, no copy), limits and
 * strip options, byte orders and every length field size, malformed and
 * oversized frames closing the connection with their reason, the
 * cumulation's own rules, the prepender, and the option errors. Every test
 * ends with the pool clean. The expected frames are built here, from the
 * stream's own description, never from a decoder.
 */
#include "test_util.h"

#include "codec_harness.h"
#include "util/common.h"
#include "util/log.h"

#define CHUNKINGS 64

/* ---- building streams and the frames they must give ---- */

typedef struct bytes {
  uint8_t *p;
  size_t n, cap;
} bytes;

static void put(bytes *b, const void *src, size_t n) {
  if (b->n + n > b->cap) {
    b->cap = (b->n + n) * 2 + 64;
    b->p = realloc(b->p, b->cap);
    assert_non_null(b->p);
  }
  if (n > 0) memcpy(b->p + b->n, src, n);
  b->n += n;
}

static void put_str(bytes *b, const char *s) { put(b, s, strlen(s)); }

/* A frame as the harness records it: u32 length, bytes. */
static void put_frame(bytes *b, const void *src, size_t n) {
  uint32_t len = (uint32_t)n;
  put(b, &len, 4);
  put(b, src, n);
}

static void bytes_free(bytes *b) {
  free(b->p);
  memset(b, 0, sizeof(*b));
}

/* Random payload bytes avoiding the bytes in `avoid` (a delimiter's). */
static void random_payload(uint64_t *s, uint8_t *p, size_t n, const char *avoid) {
  for (size_t i = 0; i < n; i++) {
    uint8_t c;
    do c = (uint8_t)sl_ch_rand(s); while (avoid && c != 0 && strchr(avoid, c));
    p[i] = c;
  }
}

static sl_opts *opts_of(const char *spec) {
  /* "key=number key=str:text key=bool:1 key=list:a~b key=table" */
  sl_opts *o = sl_opts_new();
  assert_non_null(o);
  char *copy = strdup(spec), *save = NULL;
  for (char *tok = strtok_r(copy, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
    char *eq = strchr(tok, '=');
    assert_non_null(eq);
    *eq = '\0';
    char *v = eq + 1;
    if (strncmp(v, "str:", 4) == 0) {
      assert_int_equal(sl_opts_add_string(o, tok, v + 4, strlen(v + 4)), SL_OK);
    } else if (strncmp(v, "bool:", 5) == 0) {
      assert_int_equal(sl_opts_add_boolean(o, tok, v[5] == '1'), SL_OK);
    } else if (strncmp(v, "list:", 5) == 0) {
      assert_int_equal(sl_opts_add_list(o, tok), SL_OK);
      char *save2 = NULL;
      for (char *d = strtok_r(v + 5, "~", &save2); d; d = strtok_r(NULL, "~", &save2)) {
        /* \r and \n spelled as ^r and ^n */
        char buf[32];
        size_t k = 0;
        for (char *c = d; *c && k < sizeof(buf); c++) {
          if (*c == '^' && c[1] == 'n') { buf[k++] = '\n'; c++; }
          else if (*c == '^' && c[1] == 'r') { buf[k++] = '\r'; c++; }
          else buf[k++] = *c;
        }
        assert_int_equal(sl_opts_list_push(o, tok, buf, k), SL_OK);
      }
    } else if (strcmp(v, "table") == 0) {
      assert_int_equal(sl_opts_add_table(o, tok), SL_OK);
    } else {
      assert_int_equal(sl_opts_add_number(o, tok, strtod(v, NULL)), SL_OK);
    }
  }
  free(copy);
  return o;
}

static void open_codec(sl_ch *h, sl_pool *pool, const char *module, const char *spec) {
  sl_opts *o = opts_of(spec);
  char err[256] = "";
  int rc = sl_ch_open(h, pool, module, o, err, sizeof(err));
  sl_opts_free(o);
  if (rc != SL_OK) fail_msg("%s { %s }: %s", module, spec, err);
}

static void assert_frames(const sl_ch *h, const bytes *want, const char *what, uint64_t seed) {
  if (h->bad) fail_msg("%s (chunking %llu): a frame was not a derived buffer of the cumulation",
                       what, (unsigned long long)seed);
  if (h->out_len != want->n || memcmp(h->out, want->p, want->n) != 0)
    fail_msg("%s (chunking %llu): %zu frames, %zu bytes recorded; %zu bytes expected", what,
             (unsigned long long)seed, h->nframes, h->out_len, want->n);
}

/* Feeds stream in CHUNKINGS chunkings (the first whole, the second byte by
 * byte), each into a fresh codec; every one must give `want` and end open
 * (reason NULL) or closed with reason. Frames are held now and then, so
 * cumulations live on under them. */
static void check_chunkings(sl_pool *pool, const char *module, const char *spec,
                            const bytes *stream, const bytes *want, const char *reason) {
  for (uint64_t seed = 0; seed < CHUNKINGS; seed++) {
    sl_ch h;
    open_codec(&h, pool, module, spec);
    h.keep_every = (int)(seed % 4);
    if (seed == 0) sl_ch_feed(&h, stream->p, stream->n);
    else sl_ch_feed_chunked(&h, stream->p, stream->n, seed, seed == 1 ? 1 : 1 + seed * 7);
    assert_frames(&h, want, module, seed);
    if (reason == NULL) {
      if (h.closed) fail_msg("%s (chunking %llu): closed: %s", module, (unsigned long long)seed,
                             h.reason);
    } else {
      assert_true(h.closed);
      assert_string_equal(h.reason, reason);
    }
    sl_ch_close(&h);
    assert_int_equal(h.owner.count, 0);
    sl_ch_free(&h);
    SL_TEST_ASSERT_POOL_CLEAN(pool);
  }
}

/* ---- length_field ---- */

/* A length_field stream: nframes frames of [offset bytes][field][body],
 * field = body length - adjustment; the frames passed on start strip bytes
 * in. */
static void lf_stream(uint64_t *s, int offset, int len, int big, int adj, int strip, size_t nframes,
                      size_t max_body, bytes *stream, bytes *want) {
  for (size_t f = 0; f < nframes; f++) {
    size_t body = (size_t)(sl_ch_rand(s) % (max_body + 1));
    if ((int64_t)body < adj) body = (size_t)adj;
    uint8_t frame[8 + 64 + 1024];
    size_t n = 0;
    random_payload(s, frame, (size_t)offset, NULL);
    n += (size_t)offset;
    uint64_t field = (uint64_t)((int64_t)body - adj);
    for (int i = 0; i < len; i++) frame[n + (big ? len - 1 - i : i)] = (uint8_t)(field >> (8 * i));
    n += (size_t)len;
    random_payload(s, frame + n, body, NULL);
    n += body;
    put(stream, frame, n);
    put_frame(want, frame + strip, n - (size_t)strip);
  }
}

static void test_length_field_every_size_and_order(void **state) {
  sl_pool *pool = *state;
  static const int lens[] = {1, 2, 3, 4, 8};
  uint64_t s = 42;
  for (size_t l = 0; l < 5; l++) {
    for (int big = 0; big <= 1; big++) {
      int len = lens[l];
      size_t max_body = len == 1 ? 200 : 700;
      struct { int offset, adj, strip; } shapes[] = {{0, 0, 0}, {3, 0, 0}, {2, -2, 2 + len},
                                                     {1, 5, 1}};
      for (size_t k = 0; k < 4; k++) {
        int off = shapes[k].offset, adj = shapes[k].adj, strip = shapes[k].strip;
        if (len == 1 && adj < 0) continue;
        bytes stream = {0}, want = {0};
        lf_stream(&s, off, len, big, adj, strip, 40, max_body, &stream, &want);
        char spec[256];
        snprintf(spec, sizeof(spec),
                 "length_field_length=%d byte_order=str:%s length_field_offset=%d "
                 "length_adjustment=%d initial_bytes_to_strip=%d max_frame_length=%zu",
                 len, big ? "big" : "little", off, adj, strip, (size_t)(off + len) + max_body + 8);
        check_chunkings(pool, "sluice.codec.length_field", spec, &stream, &want, NULL);
        bytes_free(&stream);
        bytes_free(&want);
      }
    }
  }
}

/* max_frame_length counts the whole frame (header included), before
 * stripping: a frame of exactly the limit passes, one byte more does not. */
static void test_length_field_limit_is_inclusive(void **state) {
  sl_pool *pool = *state;
  bytes stream = {0}, want = {0};
  uint8_t f[2 + 98];
  memset(f, 'a', sizeof(f));
  f[0] = 0;
  f[1] = 98; /* 2 + 98 = 100 */
  put(&stream, f, sizeof(f));
  put_frame(&want, f + 2, 98);
  f[1] = 99;
  put(&stream, f, 2);
  check_chunkings(pool, "sluice.codec.length_field",
                  "length_field_length=2 initial_bytes_to_strip=2 max_frame_length=100", &stream,
                  &want, "frame_too_large");
  bytes_free(&stream);
  bytes_free(&want);
}

/* fail_fast (default): the connection closes as soon as the header says
 * the frame is too long; without it, once the whole frame has gone by. */
static void test_length_field_fail_fast_or_not(void **state) {
  sl_pool *pool = *state;
  uint8_t head[] = {0, 0, 0, 200};
  uint8_t body[200];
  memset(body, 'x', sizeof(body));
  for (int fast = 0; fast <= 1; fast++) {
    sl_ch h;
    open_codec(&h, pool, "sluice.codec.length_field",
               fast ? "max_frame_length=64" : "max_frame_length=64 fail_fast=bool:0");
    sl_ch_feed(&h, head, sizeof(head));
    assert_int_equal(h.closed, fast);
    if (!fast) {
      sl_ch_feed(&h, body, 100);
      assert_false(h.closed);
      assert_null(((sl_cum *)h.codec->state)->buf); /* discarded, not held */
      sl_ch_feed(&h, body, 99);
      assert_false(h.closed);
      sl_ch_feed(&h, body, 1);
      assert_true(h.closed);
    }
    assert_string_equal(h.reason, "frame_too_large");
    assert_int_equal(h.nframes, 0);
    sl_ch_close(&h);
    sl_ch_free(&h);
    SL_TEST_ASSERT_POOL_CLEAN(pool);
  }
}

/* A negative 8-byte length, an adjusted length shorter than the header or
 * than initial_bytes_to_strip, an overflowing adjustment: malformed_frame;
 * the frames before it are passed on first. */
static void test_length_field_malformed(void **state) {
  sl_pool *pool = *state;
  struct {
    const char *spec;
    uint8_t head[8];
    size_t n;
  } cases[] = {
      {"length_field_length=8 max_frame_length=1000", {0x80, 0, 0, 0, 0, 0, 0, 1}, 8},
      {"length_field_length=8 max_frame_length=1000", {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                                       0xff}, 8},
      {"length_field_length=8 length_adjustment=100 max_frame_length=1000",
       {0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xf0}, 8},
      {"length_field_length=2 length_adjustment=-10 max_frame_length=1000", {0, 5}, 2},
      {"length_field_length=1 initial_bytes_to_strip=5 max_frame_length=1000", {2, 'a', 'b'}, 3},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    sl_opts *o = opts_of(cases[i].spec);
    const sl_opt *lenopt = sl_opts_get(o, "length_field_length");
    const sl_opt *adjopt = sl_opts_get(o, "length_adjustment");
    int len = (int)lenopt->num;
    int adj = adjopt ? (int)adjopt->num : 0;
    sl_opts_free(o);
    /* one good frame first: a body of 3 */
    bytes stream = {0}, want = {0};
    uint8_t good[8 + 128] = {0};
    uint64_t field = (uint64_t)(3 - adj);
    if (3 - adj < 0) field = 0;
    for (int k = 0; k < len; k++) good[len - 1 - k] = (uint8_t)(field >> (8 * k));
    size_t body = (size_t)((int64_t)field + adj);
    memset(good + len, 'g', body);
    if (strstr(cases[i].spec, "initial_bytes_to_strip=5")) {
      /* a first frame long enough to strip 5 */
      good[0] = 6;
      body = 6;
      memset(good + 1, 'g', 6);
      put(&stream, good, 7);
      put_frame(&want, good + 5, 2);
    } else {
      put(&stream, good, (size_t)len + body);
      put_frame(&want, good, (size_t)len + body); /* nothing stripped: the header too */
    }
    put(&stream, cases[i].head, cases[i].n);
    check_chunkings(pool, "sluice.codec.length_field", cases[i].spec, &stream, &want,
                    "malformed_frame");
    bytes_free(&stream);
    bytes_free(&want);
  }
}

/* ---- line ---- */

static void line_stream(uint64_t *s, size_t nlines, size_t max_len, int strip, bytes *stream,
                        bytes *want) {
  for (size_t i = 0; i < nlines; i++) {
    uint8_t line[1100];
    size_t n = (size_t)(sl_ch_rand(s) % (max_len + 1));
    random_payload(s, line, n, "\r\n");
    int crlf = sl_ch_rand(s) & 1;
    memcpy(line + n, crlf ? "\r\n" : "\n", crlf ? 2 : 1);
    size_t d = crlf ? 2 : 1;
    put(stream, line, n + d);
    put_frame(want, line, strip ? n : n + d);
  }
}

static void test_line_chunkings_and_strip(void **state) {
  sl_pool *pool = *state;
  uint64_t s = 7;
  for (int strip = 0; strip <= 1; strip++) {
    bytes stream = {0}, want = {0};
    line_stream(&s, 300, 100, strip, &stream, &want);
    check_chunkings(pool, "sluice.codec.line",
                    strip ? "max_length=100" : "max_length=100 strip_delimiter=bool:0", &stream,
                    &want, NULL);
    bytes_free(&stream);
    bytes_free(&want);
  }
}

/* max_length does not count the ending, even when its "\r" arrives alone;
 * one byte more closes with frame_too_large after the lines before it. */
static void test_line_limit(void **state) {
  sl_pool *pool = *state;
  bytes stream = {0}, want = {0};
  put_str(&stream, "12345678\r\n1234567\n\n");
  put_frame(&want, "12345678", 8);
  put_frame(&want, "1234567", 7);
  put_frame(&want, "", 0);
  put_str(&stream, "123456789\r\nlater\n");
  for (int fast = 0; fast <= 1; fast++)
    check_chunkings(pool, "sluice.codec.line",
                    fast ? "max_length=8 fail_fast=bool:1" : "max_length=8", &stream, &want,
                    "frame_too_large");
  bytes_free(&stream);
  bytes_free(&want);

  /* Without fail_fast a long line is discarded until its end, then fails. */
  sl_ch h;
  open_codec(&h, pool, "sluice.codec.line", "max_length=4");
  sl_ch_feed(&h, (const uint8_t *)"ok\nabcdefgh", 11);
  assert_int_equal(h.nframes, 1);
  assert_false(h.closed);
  sl_ch_feed(&h, (const uint8_t *)"ijklmnop", 8);
  assert_false(h.closed);
  assert_null(((sl_cum *)h.codec->state)->buf); /* nothing held */
  sl_ch_feed(&h, (const uint8_t *)"q\r\n", 3);
  assert_true(h.closed);
  assert_string_equal(h.reason, "frame_too_large");
  sl_ch_close(&h);
  sl_ch_free(&h);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* ---- delimiter ---- */

static void test_delimiter_chunkings_and_strip(void **state) {
  sl_pool *pool = *state;
  static const char *const delims[] = {"||", "#!#", "\n"};
  uint64_t s = 99;
  for (int strip = 0; strip <= 1; strip++) {
    bytes stream = {0}, want = {0};
    for (size_t f = 0; f < 300; f++) {
      uint8_t buf[200];
      size_t n = (size_t)(sl_ch_rand(&s) % 120);
      random_payload(&s, buf, n, "|#!\n");
      const char *d = delims[sl_ch_rand(&s) % 3];
      memcpy(buf + n, d, strlen(d));
      put(&stream, buf, n + strlen(d));
      put_frame(&want, buf, strip ? n : n + strlen(d));
    }
    check_chunkings(pool, "sluice.codec.delimiter",
                    strip ? "delimiters=list:||~#!#~^n max_frame_length=120"
                          : "delimiters=list:||~#!#~^n max_frame_length=120 strip_delimiter=bool:0",
                    &stream, &want, NULL);
    bytes_free(&stream);
    bytes_free(&want);
  }
}

/* The delimiter giving the shortest frame wins, whatever its place in the
 * list; a frame over max_frame_length closes after the frames before it. */
static void test_delimiter_shortest_and_limit(void **state) {
  sl_pool *pool = *state;
  bytes stream = {0}, want = {0};
  put_str(&stream, "ab;cd,ef,;");
  put_frame(&want, "ab", 2);
  put_frame(&want, "cd", 2);
  put_frame(&want, "ef", 2);
  put_frame(&want, "", 0);
  check_chunkings(pool, "sluice.codec.delimiter", "delimiters=list:,~; max_frame_length=5",
                  &stream, &want, NULL);
  put_str(&stream, "123456,x,");
  for (int fast = 0; fast <= 1; fast++)
    check_chunkings(pool, "sluice.codec.delimiter",
                    fast ? "delimiters=list:,~; max_frame_length=5"
                         : "delimiters=list:,~; max_frame_length=5 fail_fast=bool:0",
                    &stream, &want, "frame_too_large");
  bytes_free(&stream);
  bytes_free(&want);

  /* Without fail_fast: discarded until the delimiter, then closed. */
  sl_ch h;
  open_codec(&h, pool, "sluice.codec.delimiter",
             "delimiters=list:#!# max_frame_length=4 fail_fast=bool:0");
  sl_ch_feed(&h, (const uint8_t *)"abcdefg#", 8);
  assert_false(h.closed);
  sl_ch_feed(&h, (const uint8_t *)"!", 1);
  assert_false(h.closed);
  sl_ch_feed(&h, (const uint8_t *)"#rest", 5);
  assert_true(h.closed);
  assert_string_equal(h.reason, "frame_too_large");
  sl_ch_close(&h);
  sl_ch_free(&h);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* ---- fixed_length ---- */

static void test_fixed_length_chunkings(void **state) {
  sl_pool *pool = *state;
  uint64_t s = 5;
  bytes stream = {0}, want = {0};
  uint8_t f[37];
  for (int i = 0; i < 200; i++) {
    random_payload(&s, f, sizeof(f), NULL);
    put(&stream, f, sizeof(f));
    put_frame(&want, f, sizeof(f));
  }
  put(&stream, f, 10); /* a partial frame at the end: never passed on */
  check_chunkings(pool, "sluice.codec.fixed_length", "frame_length=37", &stream, &want, NULL);
  bytes_free(&stream);
  bytes_free(&want);
}

/* ---- the cumulation ---- */

/* The first buffer becomes the cumulation: frames point into it. */
static void test_cumulation_first_buffer_is_not_copied(void **state) {
  sl_pool *pool = *state;
  sl_ch h;
  open_codec(&h, pool, "sluice.codec.fixed_length", "frame_length=4");
  h.keep_every = 1;
  sl_buf *b = sl_buf_from(pool, "abcdefghij", 10);
  sl_pipeline_fire_read(&h.pipe, b); /* b's reference goes to the codec */
  assert_int_equal(h.nkept, 2);
  assert_ptr_equal(h.kept[0]->data, b->data);
  assert_ptr_equal(h.kept[1]->data, b->data + 4);
  assert_ptr_equal(sl_buf_parent(h.kept[0]), b);
  assert_ptr_equal(((sl_cum *)h.codec->state)->buf, b); /* "ij" left */
  /* More bytes join by copy behind its writer index, or in a new buffer. */
  sl_ch_feed(&h, (const uint8_t *)"kl", 2);
  assert_int_equal(h.nkept, 3);
  assert_memory_equal(sl_buf_rptr(h.kept[2]), "ijkl", 4);
  sl_ch_close(&h);
  sl_ch_free(&h);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* An emptied cumulation is released; read bytes of one that is held only
 * by the codec are discarded after 16 reads (once half of it is read). */
static void test_cumulation_release_and_discard(void **state) {
  sl_pool *pool = *state;
  sl_ch h;
  open_codec(&h, pool, "sluice.codec.fixed_length", "frame_length=10");
  sl_cum *c = h.codec->state;
  uint8_t chunk[100];
  memset(chunk, 'z', sizeof(chunk));
  sl_ch_feed(&h, chunk, 55);
  sl_ch_feed(&h, chunk, 45);
  assert_int_equal(h.nframes, 10);
  assert_null(c->buf); /* empty: released */
  assert_int_equal(sl_test_stats(pool).blocks_in_use, 0);

  /* A first read with room behind it: later reads are copied in there. */
  sl_buf *b = sl_buf_alloc(pool, 4096, 4096);
  assert_non_null(b);
  memset(b->data, 'a', 2995);
  b->wr = 2995;
  sl_pipeline_fire_read(&h.pipe, b); /* 299 frames, 5 bytes left */
  assert_ptr_equal(c->buf, b);
  assert_int_equal(b->rd, 2990);
  for (int i = 2; i <= 15; i++) sl_ch_feed(&h, chunk, 10);
  assert_ptr_equal(c->buf, b);
  assert_int_equal(b->rd, 2990 + 14 * 10);
  sl_ch_feed(&h, chunk, 10); /* the 16th read: compacted */
  assert_ptr_equal(c->buf, b);
  assert_int_equal(b->rd, 0);
  assert_int_equal(b->wr, 5);
  assert_int_equal(h.nframes, 10 + 299 + 15);
  sl_ch_close(&h);
  sl_ch_free(&h);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* A frame whose stage closes the connection ends the decoding: no frame
 * after it, everything released once. */
static void test_cumulation_closed_by_a_frame(void **state) {
  sl_pool *pool = *state;
  sl_ch h;
  open_codec(&h, pool, "sluice.codec.line", "max_length=10");
  h.close_after = 2;
  sl_ch_feed(&h, (const uint8_t *)"a\nb\nc\nd\npartial", 15);
  assert_int_equal(h.nframes, 2);
  assert_true(h.closed);
  assert_string_equal(h.reason, "collector");
  sl_ch_feed(&h, (const uint8_t *)"e\n", 2); /* after the close: released */
  assert_int_equal(h.nframes, 2);
  sl_ch_close(&h);
  sl_ch_free(&h);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* Taken out of a running pipeline (a protocol switch), a decoder passes
 * what it has not decoded on to the next stage, as Netty's handlerRemoved;
 * later reads go past it. */
static void test_cumulation_removed_while_running_passes_the_rest_on(void **state) {
  sl_pool *pool = *state;
  sl_ch h;
  open_codec(&h, pool, "sluice.codec.line", "max_length=10");
  sl_ch_feed(&h, (const uint8_t *)"ab\ncd", 5);
  sl_pipeline_remove(h.codec);
  sl_ch_feed(&h, (const uint8_t *)"ef\n", 3);
  bytes want = {0};
  put_frame(&want, "ab", 2);
  put_frame(&want, "cd", 2);   /* the rest, as it was */
  put_frame(&want, "ef\n", 3); /* raw: the decoder is gone */
  assert_int_equal(h.out_len, want.n);
  assert_memory_equal(h.out, want.p, want.n);
  assert_false(h.closed);
  sl_ch_close(&h);
  sl_ch_free(&h);
  bytes_free(&want);
  SL_TEST_ASSERT_POOL_CLEAN(pool);
}

/* ---- length_field_prepender ---- */

static void test_prepender_every_size_and_order(void **state) {
  sl_pool *pool = *state;
  static const int lens[] = {1, 2, 3, 4, 8};
  for (size_t l = 0; l < 5; l++) {
    for (int big = 0; big <= 1; big++) {
      for (int adj = -1; adj <= 2; adj += 3) {
        char spec[128];
        snprintf(spec, sizeof(spec),
                 "length_field_length=%d byte_order=str:%s length_adjustment=%d", lens[l],
                 big ? "big" : "little", adj);
        sl_ch h;
        open_codec(&h, pool, "sluice.codec.length_field_prepender", spec);
        bytes want = {0};
        for (size_t n = 1; n < 200; n += 37) {
          uint8_t msg[200];
          memset(msg, (int)n, n);
          sl_ch_write(&h, msg, n);
          uint8_t field[8];
          uint64_t v = (uint64_t)((int64_t)n + adj);
          for (int i = 0; i < lens[l]; i++)
            field[big ? lens[l] - 1 - i : i] = (uint8_t)(v >> (8 * i));
          put_frame(&want, field, (size_t)lens[l]);
          put_frame(&want, msg, n);
        }
        assert_false(h.closed);
        assert_int_equal(h.out_len, want.n);
        assert_memory_equal(h.out, want.p, want.n);
        sl_ch_close(&h);
        sl_ch_free(&h);
        bytes_free(&want);
        SL_TEST_ASSERT_POOL_CLEAN(pool);
      }
    }
  }
}

/* Lengths that do not fit the field, or are negative, close the connection
 * and release the message. */
static void test_prepender_refuses(void **state) {
  sl_pool *pool = *state;
  struct { const char *spec; size_t n; const char *reason; } cases[] = {
      {"length_field_length=1", 256, "frame_too_large"},
      {"length_field_length=1 length_adjustment=-1", 256, NULL},
      {"length_field_length=2 length_adjustment=1", 65535, "frame_too_large"},
      {"length_field_length=2 length_adjustment=-3", 2, "malformed_frame"},
  };
  static uint8_t msg[70000];
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    sl_ch h;
    open_codec(&h, pool, "sluice.codec.length_field_prepender", cases[i].spec);
    sl_ch_write(&h, msg, cases[i].n);
    if (cases[i].reason) {
      assert_true(h.closed);
      assert_string_equal(h.reason, cases[i].reason);
      assert_int_equal(h.nwrites, 0);
    } else {
      assert_false(h.closed);
      assert_int_equal(h.nwrites, 2);
    }
    sl_ch_close(&h);
    sl_ch_free(&h);
    SL_TEST_ASSERT_POOL_CLEAN(pool);
  }
}

/* ---- options ---- */

static void test_option_errors(void **state) {
  (void)state;
  struct { const char *module, *spec, *err; } cases[] = {
      {"sluice.codec.line", "", "max_length: expected a positive integer, got nil"},
      {"sluice.codec.line", "max_length=0", "max_length: expected a positive integer, got 0"},
      {"sluice.codec.line", "max_length=1.5", "max_length: expected a positive integer, got 1.5"},
      {"sluice.codec.line", "max_length=str:10",
       "max_length: expected a positive integer, got \"10\""},
      {"sluice.codec.line", "max_length=10 strip_delimiter=1",
       "strip_delimiter: expected true or false, got 1"},
      {"sluice.codec.line", "max_length=10 maxlength=3 bogus=1",
       "bogus: unknown key (expected one of: max_length, strip_delimiter, fail_fast)"},
      {"sluice.codec.length_field", "max_frame_length=-1",
       "max_frame_length: expected a positive integer, got -1"},
      {"sluice.codec.length_field", "max_frame_length=2147483648",
       "max_frame_length: expected a positive integer, got 2147483648"},
      {"sluice.codec.length_field", "max_frame_length=100 length_field_length=5",
       "length_field_length: expected 1, 2, 3, 4 or 8, got 5"},
      {"sluice.codec.length_field", "max_frame_length=100 byte_order=str:middle",
       "byte_order: expected \"big\" or \"little\", got \"middle\""},
      {"sluice.codec.length_field", "max_frame_length=100 length_field_offset=97",
       "length_field_offset: expected at most max_frame_length - length_field_length (96), "
       "got 97"},
      {"sluice.codec.length_field", "max_frame_length=100 initial_bytes_to_strip=-1",
       "initial_bytes_to_strip: expected an integer from 0 to 2147483647, got -1"},
      {"sluice.codec.length_field", "max_frame_length=100 length_adjustment=3000000000",
       "length_adjustment: expected an integer from -2147483648 to 2147483647, got 3000000000"},
      {"sluice.codec.delimiter", "max_frame_length=10",
       "delimiters: expected a non-empty list of non-empty strings, got nil"},
      {"sluice.codec.delimiter", "delimiters=table max_frame_length=10",
       "delimiters: expected a non-empty list of non-empty strings, got a table"},
      {"sluice.codec.delimiter", "delimiters=list: max_frame_length=10",
       "delimiters: expected a non-empty list of non-empty strings, got an empty table"},
      {"sluice.codec.delimiter", "delimiters=str:^n max_frame_length=10",
       "delimiters: expected a non-empty list of non-empty strings, got \"^n\""},
      {"sluice.codec.fixed_length", "frame_length=0",
       "frame_length: expected a positive integer, got 0"},
      {"sluice.codec.length_field_prepender", "length_field_length=0",
       "length_field_length: expected 1, 2, 3, 4 or 8, got 0"},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    sl_opts *o = opts_of(cases[i].spec);
    void *conf = (void *)1;
    char err[256] = "";
    const sl_stage_ops *ops = sl_stage_builtin(cases[i].module);
    assert_non_null(ops);
    assert_int_equal(sl_stage_configure(ops, o, &conf, err, sizeof(err)), SL_ERROR);
    assert_null(conf);
    assert_string_equal(err, cases[i].err);
    sl_opts_free(o);
  }
  /* A stage without options ignores them; a good set parses. */
  void *conf = (void *)1;
  char err[256];
  sl_opts *o = opts_of("anything=1");
  assert_int_equal(sl_stage_configure(&sl_stage_echo, o, &conf, err, sizeof(err)), SL_OK);
  assert_null(conf);
  sl_opts_free(o);
  o = opts_of("delimiters=list:a~bc max_frame_length=10 strip_delimiter=bool:0");
  assert_int_equal(sl_stage_configure(&sl_codec_delimiter, o, &conf, err, sizeof(err)), SL_OK);
  assert_non_null(conf);
  sl_stage_unconfigure(&sl_codec_delimiter, conf);
  sl_opts_free(o);
}

#define POOL_TEST(fn) cmocka_unit_test_setup_teardown(fn, sl_test_pool_setup, sl_test_pool_teardown)

int main(void) {
  sl_log_set_level(SL_LOG_ERROR);
  const struct CMUnitTest tests[] = {
      POOL_TEST(test_length_field_every_size_and_order),
      POOL_TEST(test_length_field_limit_is_inclusive),
      POOL_TEST(test_length_field_fail_fast_or_not),
      POOL_TEST(test_length_field_malformed),
      POOL_TEST(test_line_chunkings_and_strip),
      POOL_TEST(test_line_limit),
      POOL_TEST(test_delimiter_chunkings_and_strip),
      POOL_TEST(test_delimiter_shortest_and_limit),
      POOL_TEST(test_fixed_length_chunkings),
      POOL_TEST(test_cumulation_first_buffer_is_not_copied),
      POOL_TEST(test_cumulation_release_and_discard),
      POOL_TEST(test_cumulation_closed_by_a_frame),
      POOL_TEST(test_cumulation_removed_while_running_passes_the_rest_on),
      POOL_TEST(test_prepender_every_size_and_order),
      POOL_TEST(test_prepender_refuses),
      POOL_TEST(test_option_errors),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
