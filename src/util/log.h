/* Leveled logging to standard error, one record per line. The error_log
 * setting points standard error at a file (the runtime dup2s it). */
#ifndef SL_LOG_H
#define SL_LOG_H

#include <stdarg.h>
#include <stddef.h>

typedef enum {
  SL_LOG_DEBUG = 0,
  SL_LOG_INFO = 1,
  SL_LOG_WARN = 2,
  SL_LOG_ERROR = 3,
} sl_log_level;

/* Process-wide threshold; set once at start-up before workers run. */
void sl_log_set_level(sl_log_level level);
sl_log_level sl_log_get_level(void);

/* Parses "debug", "info", "warn" or "error". Returns SL_OK or SL_ERROR. */
int sl_log_parse_level(const char *s, sl_log_level *out);

/* Writes one record: timestamp, level, message. Thread-safe (one write(2) per record). */
void sl_log(sl_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Writes a preformatted message (may hold newlines: a traceback). */
void sl_log_text(sl_log_level level, const char *text);

/* Collects this thread's records (text and newline, no prefix) into buf
 * instead of printing them; buf NULL prints again. */
void sl_log_capture(char *buf, size_t size);
size_t sl_log_captured(void);

/* Writes the current UTC time as "2026-11-22T02:51:56.070Z" into out.
 * Returns its length. */
int sl_log_format_time(char *out, size_t outlen);

#define sl_log_enabled(l) ((l) >= sl_log_get_level())

#endif
