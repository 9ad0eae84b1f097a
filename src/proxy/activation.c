#include "proxy/activation.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/common.h"

/* A decimal number, all of s (no sign, no spaces), into *v. SL_OK or
 * SL_ERROR. */
static int sl_activation_number(const char *s, long *v) {
  if (s[0] < '0' || s[0] > '9') return SL_ERROR;
  char *end;
  errno = 0;
  *v = strtol(s, &end, 10);
  return errno == 0 && *end == '\0' ? SL_OK : SL_ERROR;
}

int sl_activation_parse(const char *listen_pid, const char *listen_fds, const char *fdnames,
                        pid_t self, int *n, char *err, size_t errlen) {
  *n = 0;
  if (listen_fds == NULL || listen_fds[0] == '\0') return SL_OK;
  long pid = 0, count = 0;
  if (listen_pid == NULL || listen_pid[0] == '\0') return SL_OK;   /* not said: not ours */
  if (sl_activation_number(listen_pid, &pid) != SL_OK || pid < 1 || pid > INT_MAX) {
    snprintf(err, errlen, "LISTEN_PID=%s: expected the process id the sockets of LISTEN_FDS "
             "are for", listen_pid);
    return SL_ERROR;
  }
  if ((pid_t)pid != self) return SL_OK;
  if (sl_activation_number(listen_fds, &count) != SL_OK ||
      count > INT_MAX - SL_ACTIVATION_FDS_START) {
    snprintf(err, errlen, "LISTEN_FDS=%s: expected the number of listening sockets passed "
             "from descriptor %d on (sd_listen_fds(3))", listen_fds, SL_ACTIVATION_FDS_START);
    return SL_ERROR;
  }
  if (fdnames != NULL) {
    long names = fdnames[0] != '\0';
    for (const char *p = fdnames; *p; p++) names += *p == ':';
    if (names != count) {
      snprintf(err, errlen, "LISTEN_FDNAMES=%s: %ld name%s for the %ld socket%s of LISTEN_FDS",
               fdnames, names, names == 1 ? "" : "s", count, count == 1 ? "" : "s");
      return SL_ERROR;
    }
  }
  *n = (int)count;
  return SL_OK;
}

char *sl_activation_name(const char *fdnames, int i, char *out, size_t outlen) {
  if (outlen == 0) return out;
  out[0] = '\0';
  const char *p = fdnames;
  for (int k = 0; p != NULL && k < i; k++) {
    p = strchr(p, ':');
    if (p != NULL) p++;
  }
  if (p == NULL) return out;
  size_t len = strcspn(p, ":");
  snprintf(out, outlen, "%.*s", (int)SL_MIN(len, (size_t)INT_MAX), p);
  return out;
}
