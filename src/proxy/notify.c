#include "proxy/notify.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "util/log.h"

static int sl_notify_fd = -1;
static struct sockaddr_un sl_notify_addr;
static socklen_t sl_notify_len;
static char sl_notify_path[sizeof(sl_notify_addr.sun_path)];   /* as NOTIFY_SOCKET gave it */

void sl_notify_init(void) {
  const char *path = getenv("NOTIFY_SOCKET");
  if (path == NULL || path[0] == '\0') return;
  size_t n = strlen(path);
  if ((path[0] != '/' && path[0] != '@') || n >= sizeof(sl_notify_addr.sun_path)) {
    sl_log(SL_LOG_WARN, "NOTIFY_SOCKET=%s: not a socket path; systemd is not told of readiness",
           path);
    return;
  }
  memset(&sl_notify_addr, 0, sizeof(sl_notify_addr));
  sl_notify_addr.sun_family = AF_UNIX;
  memcpy(sl_notify_addr.sun_path, path, n);
  memcpy(sl_notify_path, path, n + 1);
  if (path[0] == '@') sl_notify_addr.sun_path[0] = '\0';   /* the abstract namespace */
  sl_notify_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (path[0] == '/'));
  sl_notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (sl_notify_fd < 0)
    sl_log(SL_LOG_WARN, "NOTIFY_SOCKET: socket: %s; systemd is not told of readiness",
           strerror(errno));
  unsetenv("NOTIFY_SOCKET");
}

void sl_notify(const char *fmt, ...) {
  if (sl_notify_fd < 0) return;
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n >= sizeof(msg)) n = (int)sizeof(msg) - 1;
  if (sendto(sl_notify_fd, msg, (size_t)n, MSG_NOSIGNAL, (const struct sockaddr *)&sl_notify_addr,
             sl_notify_len) < 0)
    sl_log(SL_LOG_DEBUG, "NOTIFY_SOCKET: sendto: %s", strerror(errno));
}

void sl_notify_reloading(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  sl_notify("RELOADING=1\nMONOTONIC_USEC=%llu",
            (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000u);
}

const char *sl_notify_socket(void) {
  return sl_notify_fd >= 0 ? sl_notify_path : NULL;
}

void sl_notify_close(void) {
  if (sl_notify_fd >= 0) close(sl_notify_fd);
  sl_notify_fd = -1;
}
