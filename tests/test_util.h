/*
 * Helpers shared by the C tests: cmocka includes, the pool leak check, a
 * byte pattern that shows reordering, and socket helpers that never block
 * for ever (a broken queue fails the test instead of hanging it).
 */
#ifndef SL_TEST_UTIL_H
#define SL_TEST_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "alloc/pool.h"
#include "buf/buf.h"

/* How long a test waits for bytes that should arrive, in milliseconds. */
#define SL_TEST_WAIT_MS 5000

/* Asserts that pool holds no live buffer, no block and no byte: the state of
 * a fresh pool. Every test ends with it. */
#define SL_TEST_ASSERT_POOL_CLEAN(pool)                 \
  do {                                                  \
    sl_pool_stats clean_st_;                            \
    sl_pool_get_stats((pool), &clean_st_);              \
    assert_int_equal(clean_st_.bufs_active, 0);         \
    assert_int_equal(clean_st_.blocks_in_use, 0);       \
    assert_int_equal(clean_st_.bytes_in_use, 0);        \
    assert_int_equal(clean_st_.bufs_active_bytes, 0);   \
    assert_int_equal(clean_st_.headers_free, clean_st_.headers_total); \
  } while (0)

/* Asserts that root b has no views: the flag is clear, and views holds
 * what a root without views keeps there (its block's subpage for a small
 * class, else sl_pool_own_none). */
#define SL_TEST_ASSERT_NO_VIEWS(b)                                              \
  do {                                                                          \
    const sl_buf *nv_b_ = (b);                                                  \
    const sl_pool *nv_p_ = sl_pool_of(nv_b_);                                   \
    assert_int_equal(nv_b_->flags & SL_BUF_HAS_VIEWS, 0);                       \
    if (nv_b_->sclass < nv_p_->nsmall)                                          \
      assert_ptr_equal(nv_b_->views,                                            \
                       sl_pool_subpage_of(nv_p_, nv_b_->data, nv_b_->sclass));  \
    else                                                                        \
      assert_ptr_equal(nv_b_->views, &sl_pool_own_none);                        \
  } while (0)

static inline sl_pool_stats sl_test_stats(const sl_pool *p) {
  sl_pool_stats st;
  sl_pool_get_stats(p, &st);
  return st;
}

/* cmocka group fixtures: a private pool bound to the test thread as *state. */
static inline int sl_test_pool_setup(void **state) {
  sl_pool *p = sl_pool_create(NULL, 0);
  if (p == NULL) return -1;
  sl_pool_bind_thread(p);
  *state = p;
  return 0;
}

static inline int sl_test_pool_teardown(void **state) {
  sl_pool_bind_thread(NULL);
  sl_pool_destroy(*state);
  return 0;
}

/* The byte at stream offset k: not periodic in 256, so a reordered,
 * duplicated or dropped chunk shows up as a mismatch. */
static inline uint8_t sl_test_pattern_byte(size_t k) {
  return (uint8_t)((((uint64_t)k * 2654435761u) >> 13) ^ (k >> 8));
}

static inline void sl_test_fill_pattern(uint8_t *dst, size_t n, size_t offset) {
  for (size_t i = 0; i < n; i++) dst[i] = sl_test_pattern_byte(offset + i);
}

/* Index of the first byte of got[0, n) that differs from the pattern at
 * offset, or n when they all match. */
static inline size_t sl_test_pattern_mismatch(const uint8_t *got, size_t n, size_t offset) {
  for (size_t i = 0; i < n; i++)
    if (got[i] != sl_test_pattern_byte(offset + i)) return i;
  return n;
}

/* A new buffer of len readable bytes holding the pattern from stream offset. */
static inline sl_buf *sl_test_pattern_buf(sl_pool *pool, size_t len, size_t offset) {
  sl_buf *b = sl_buf_alloc(pool, len, 0);
  assert_non_null(b);
  sl_test_fill_pattern(b->data, len, offset);
  b->wr = (uint32_t)len;
  return b;
}

static inline void sl_test_set_nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);
  assert_true(fl >= 0);
  assert_int_equal(fcntl(fd, F_SETFL, fl | O_NONBLOCK), 0);
}

/* A connected AF_UNIX stream pair; sv[0] (the writing end) is non-blocking. */
static inline void sl_test_socketpair(int sv[2]) {
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  sl_test_set_nonblock(sv[0]);
}

/* Shrinks the kernel buffers so that a modest amount of data fills them. */
static inline void sl_test_small_buffers(int writer, int reader, int bytes) {
  assert_int_equal(setsockopt(writer, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes)), 0);
  assert_int_equal(setsockopt(reader, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes)), 0);
}

/* Reads whatever fd holds right now (without blocking) into dst, at most
 * room bytes. Returns the count; 0 when nothing is there. Fails on EOF or
 * an error. */
static inline size_t sl_test_read_available(int fd, uint8_t *dst, size_t room) {
  size_t got = 0;
  while (got < room) {
    ssize_t n = recv(fd, dst + got, room - got, MSG_DONTWAIT);
    if (n > 0) {
      got += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    fail_msg("recv on the peer end: %s", n == 0 ? "unexpected EOF" : strerror(errno));
  }
  return got;
}

/* Reads exactly n bytes from fd, waiting up to SL_TEST_WAIT_MS for each. */
static inline void sl_test_read_exact(int fd, uint8_t *dst, size_t n) {
  size_t got = 0;
  while (got < n) {
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int r = poll(&pfd, 1, SL_TEST_WAIT_MS);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) fail_msg("timed out with %zu of %zu bytes read", got, n);
    assert_true(r > 0);
    got += sl_test_read_available(fd, dst + got, n - got);
  }
}

/* Asserts that fd has no byte to read right now (nor EOF). */
static inline void sl_test_assert_nothing_to_read(int fd) {
  uint8_t c;
  ssize_t n = recv(fd, &c, 1, MSG_DONTWAIT);
  assert_int_equal(n, -1);
  assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
}

#endif
