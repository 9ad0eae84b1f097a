#include "util/log.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "util/common.h"

static sl_log_level sl_log_threshold = SL_LOG_INFO;

static const char *const sl_log_names[] = {"debug", "info", "warn", "error"};

void sl_log_set_level(sl_log_level level) { sl_log_threshold = level; }

sl_log_level sl_log_get_level(void) { return sl_log_threshold; }

int sl_log_parse_level(const char *s, sl_log_level *out) {
  for (int i = 0; i < 4; i++) {
    if (strcmp(s, sl_log_names[i]) == 0) {
      *out = (sl_log_level)i;
      return SL_OK;
    }
  }
  return SL_ERROR;
}

/* A thread may collect its records instead of printing them (the test
 * harness reads a leak report this way). */
static __thread char *sl_log_cap;
static __thread size_t sl_log_cap_size, sl_log_cap_len;

void sl_log_capture(char *buf, size_t size) {
  sl_log_cap = buf;
  sl_log_cap_size = size;
  sl_log_cap_len = 0;
  if (buf && size) buf[0] = '\0';
}

size_t sl_log_captured(void) { return sl_log_cap_len; }

int sl_log_format_time(char *out, size_t outlen) {
  struct timespec ts;
  struct tm tm;
  clock_gettime(CLOCK_REALTIME, &ts);
  gmtime_r(&ts.tv_sec, &tm);
  int n = snprintf(out, outlen, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ", tm.tm_year + 1900,
                   tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                   ts.tv_nsec / 1000000);
  return n < 0 ? 0 : (int)SL_MIN((size_t)n, outlen - 1);
}

static void sl_log_emit(sl_log_level level, const char *msg, size_t len) {
  if (sl_log_cap != NULL) {
    size_t room = sl_log_cap_size - sl_log_cap_len;
    if (room > 1) {
      size_t n = len < room - 2 ? len : room - 2;
      memcpy(sl_log_cap + sl_log_cap_len, msg, n);
      sl_log_cap_len += n;
      sl_log_cap[sl_log_cap_len++] = '\n';
      sl_log_cap[sl_log_cap_len] = '\0';
    }
    return;
  }
  char line[8192];
  int n = sl_log_format_time(line, sizeof(line));
  n += snprintf(line + n, sizeof(line) - (size_t)n, " [%s] ", sl_log_names[level]);
  size_t room = sizeof(line) - (size_t)n - 1;
  if (len > room) len = room;
  memcpy(line + n, msg, len);
  n += (int)len;
  line[n++] = '\n';
  /* One write per record keeps records whole when several threads log. */
  ssize_t w = write(STDERR_FILENO, line, (size_t)n);
  SL_UNUSED(w);
}

void sl_log(sl_log_level level, const char *fmt, ...) {
  if (level < sl_log_threshold) return;
  char msg[4096];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= sizeof(msg)) n = sizeof(msg) - 1;
  sl_log_emit(level, msg, (size_t)n);
}

void sl_log_text(sl_log_level level, const char *text) {
  if (level < sl_log_threshold) return;
  sl_log_emit(level, text, strlen(text));
}
