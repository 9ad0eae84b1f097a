#include "proxy/upgrade.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io/listener.h"
#include "util/common.h"
#include "util/log.h"

#define SL_UPGRADE_FDS_ENV "SLUICE_LISTEN_FDS"
#define SL_UPGRADE_FROM_ENV "SLUICE_UPGRADE_FROM"

extern char **environ;

/* One inherited socket: fd < 0 once taken or closed. */
typedef struct sl_inherited {
  int fd;
  sl_addr addr;
} sl_inherited;

static struct {
  char **argv;
  char exe[PATH_MAX];
  sl_inherited *socks;
  int nsocks;
  pid_t from;
} sl_up;

/* Keeps fd when it is a bound TCP socket (IPv4 or IPv6): close on exec,
 * non-blocking, its address read back. */
static void sl_upgrade_adopt(int fd) {
  int type = 0;
  socklen_t tlen = sizeof(type);
  sl_addr a;
  a.len = sizeof(a.ss);
  for (int i = 0; i < sl_up.nsocks; i++)
    if (sl_up.socks[i].fd == fd) return;   /* listed twice */
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) != 0 || type != SOCK_STREAM ||
      getsockname(fd, (struct sockaddr *)&a.ss, &a.len) != 0 ||
      (a.ss.ss_family != AF_INET && a.ss.ss_family != AF_INET6)) {
    sl_log(SL_LOG_WARN, SL_UPGRADE_FDS_ENV ": descriptor %d is not a bound TCP socket; ignored",
           fd);
    return;
  }
  sl_inherited *grown = realloc(sl_up.socks, (size_t)(sl_up.nsocks + 1) * sizeof(*grown));
  if (grown == NULL) {
    sl_log(SL_LOG_WARN, SL_UPGRADE_FDS_ENV ": out of memory; descriptor %d ignored", fd);
    return;
  }
  (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
  (void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  sl_up.socks = grown;
  sl_up.socks[sl_up.nsocks].fd = fd;
  sl_up.socks[sl_up.nsocks].addr = a;
  sl_up.nsocks++;
}

/* The executable's path as sluice was started, made absolute but not
 * resolved: through a symbolic link (a "current" link to versioned
 * folders), a new sluice runs what the link points at then. argv[0] with
 * a slash is taken from the working folder; without one, it is looked up
 * in PATH, as the shell did. Failing both: /proc/self/exe (the file this
 * process runs, symbolic links resolved). */
static void sl_upgrade_find_exe(const char *arg0) {
  char *out = sl_up.exe;
  size_t room = sizeof(sl_up.exe);
  if (arg0 != NULL && arg0[0] == '/') {
    if ((size_t)snprintf(out, room, "%s", arg0) < room) return;
  } else if (arg0 != NULL && strchr(arg0, '/') != NULL) {
    char cwd[PATH_MAX];
    if (getcwd(cwd, sizeof(cwd)) != NULL && (size_t)snprintf(out, room, "%s/%s", cwd, arg0) < room)
      return;
  } else if (arg0 != NULL && arg0[0] != '\0') {
    const char *path = getenv("PATH");
    for (const char *p = path; p != NULL && *p != '\0';) {
      size_t len = strcspn(p, ":");
      if (len > 0 && (size_t)snprintf(out, room, "%.*s/%s", (int)len, p, arg0) < room &&
          out[0] == '/' && access(out, X_OK) == 0)
        return;
      p += len + (p[len] == ':');
    }
  }
  ssize_t n = readlink("/proc/self/exe", out, room - 1);
  if (n > 0 && (size_t)n < room - 1) out[n] = '\0';
  else snprintf(out, room, "%s", arg0 != NULL ? arg0 : "sluice");
}

void sl_upgrade_init(int argc, char **argv) {
  SL_UNUSED(argc);
  sl_up.argv = argv;
  sl_upgrade_find_exe(argv[0]);
  const char *fds = getenv(SL_UPGRADE_FDS_ENV);
  for (const char *p = fds; p != NULL && *p != '\0';) {
    char *end;
    long fd = strtol(p, &end, 10);
    if (end == p || fd < 0 || fd > INT_MAX || (*end != ',' && *end != '\0')) {
      sl_log(SL_LOG_WARN, SL_UPGRADE_FDS_ENV "=%s: expected descriptors separated by commas; "
             "the rest ignored", fds);
      break;
    }
    sl_upgrade_adopt((int)fd);
    p = *end == ',' ? end + 1 : end;
  }
  const char *from = getenv(SL_UPGRADE_FROM_ENV);
  if (from != NULL && *from != '\0') {
    long pid = strtol(from, NULL, 10);
    if (pid > 1 && (pid_t)pid == getppid()) sl_up.from = (pid_t)pid;
  }
  unsetenv(SL_UPGRADE_FDS_ENV);
  unsetenv(SL_UPGRADE_FROM_ENV);
}

int sl_upgrade_take(const sl_addr *addr, int *fds, int n, int backlog, char *err,
                    size_t errlen) {
  int found = 0;
  for (int i = 0; i < sl_up.nsocks; i++)
    found += sl_up.socks[i].fd >= 0 && sl_addr_same((const struct sockaddr *)&addr->ss,
                                                     (const struct sockaddr *)&sl_up.socks[i].addr.ss);
  if (found == 0) return 0;
  if (found != n) {
    snprintf(err, errlen, "the sluice it replaces has %d socket%s on it and this one runs %d "
             "worker%s: an upgrade keeps the number of workers (restart sluice to change it)",
             found, found == 1 ? "" : "s", n, n == 1 ? "" : "s");
    return -1;
  }
  int k = 0;
  for (int i = 0; i < sl_up.nsocks; i++) {
    sl_inherited *s = &sl_up.socks[i];
    if (s->fd < 0 || !sl_addr_same((const struct sockaddr *)&addr->ss,
                                   (const struct sockaddr *)&s->addr.ss))
      continue;
    /* Listening again: a socket its old worker had withdrawn (stuck in
     * Lua) rejoins its group, and the backlog is this configuration's. */
    if (sl_listener_listen(s->fd, backlog) != SL_OK) {
      snprintf(err, errlen, "listen on an inherited socket: %s", strerror(errno));
      for (int j = 0; j < k; j++) fds[j] = -1;
      return -1;
    }
    fds[k++] = s->fd;
  }
  for (int i = 0; i < sl_up.nsocks; i++)
    if (sl_addr_same((const struct sockaddr *)&addr->ss,
                     (const struct sockaddr *)&sl_up.socks[i].addr.ss))
      sl_up.socks[i].fd = -1;
  return n;
}

int sl_upgrade_close_rest(void) {
  int closed = 0;
  for (int i = 0; i < sl_up.nsocks; i++) {
    if (sl_up.socks[i].fd < 0) continue;
    close(sl_up.socks[i].fd);
    closed++;
  }
  free(sl_up.socks);
  sl_up.socks = NULL;
  sl_up.nsocks = 0;
  return closed;
}

pid_t sl_upgrade_predecessor(void) {
  return sl_up.from > 0 && getppid() == sl_up.from ? sl_up.from : 0;
}

/* environ without the variables an upgrade sets, then those: NULL when out
 * of memory. The strings are environ's, or vars'. */
static char **sl_upgrade_env(char **vars, int nvars) {
  size_t n = 0;
  while (environ[n] != NULL) n++;
  char **env = calloc(n + (size_t)nvars + 1, sizeof(*env));
  if (env == NULL) return NULL;
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    const char *e = environ[i];
    if (strncmp(e, SL_UPGRADE_FDS_ENV "=", sizeof(SL_UPGRADE_FDS_ENV)) == 0 ||
        strncmp(e, SL_UPGRADE_FROM_ENV "=", sizeof(SL_UPGRADE_FROM_ENV)) == 0 ||
        strncmp(e, "NOTIFY_SOCKET=", 14) == 0)
      continue;
    env[k++] = environ[i];
  }
  for (int i = 0; i < nvars; i++) env[k++] = vars[i];
  return env;
}

pid_t sl_upgrade_spawn(const int *fds, int nfds, int stderr_fd, const char *notify_socket,
                       char *err, size_t errlen) {
  /* Everything the child needs is made before fork: between fork and exec
   * it calls async-signal-safe functions only (the other threads' locks
   * may be held). */
  size_t room = (size_t)nfds * 12 + sizeof(SL_UPGRADE_FDS_ENV) + 2;
  char *list = malloc(room), from[48], notify[160];
  char *vars[3];
  int nvars = 0;
  if (list == NULL) {
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  size_t len = (size_t)snprintf(list, room, SL_UPGRADE_FDS_ENV "=");
  for (int i = 0; i < nfds; i++)
    len += (size_t)snprintf(list + len, room - len, "%s%d", i ? "," : "", fds[i]);
  vars[nvars++] = list;
  snprintf(from, sizeof(from), SL_UPGRADE_FROM_ENV "=%d", (int)getpid());
  vars[nvars++] = from;
  if (notify_socket != NULL) {
    snprintf(notify, sizeof(notify), "NOTIFY_SOCKET=%s", notify_socket);
    vars[nvars++] = notify;
  }
  char **env = sl_upgrade_env(vars, nvars);
  if (env == NULL) {
    free(list);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  pid_t pid = fork();
  if (pid == 0) {
    for (int i = 0; i < nfds; i++) (void)fcntl(fds[i], F_SETFD, 0);
    if (stderr_fd >= 0 && stderr_fd != STDERR_FILENO) (void)dup2(stderr_fd, STDERR_FILENO);
    /* The signal mask stays as the runtime set it (exec keeps it, and
     * what is pending): a SIGHUP or SIGUSR1 meant for sluice while the new
     * one loads its configuration waits for it instead of killing it. */
    execve(sl_up.exe, sl_up.argv, env);
    _exit(127);
  }
  int e = errno;
  free(env);
  free(list);
  if (pid < 0) {
    snprintf(err, errlen, "fork: %s", strerror(e));
    return -1;
  }
  return pid;
}
