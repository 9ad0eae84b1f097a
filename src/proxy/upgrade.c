#include "proxy/upgrade.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io/listener.h"
#include "proxy/activation.h"
#include "util/common.h"
#include "util/log.h"

#define SL_UPGRADE_FDS_ENV "SLUICE_LISTEN_FDS"
#define SL_UPGRADE_SHARED_ENV "SLUICE_LISTEN_SHARED"
#define SL_UPGRADE_FROM_ENV "SLUICE_UPGRADE_FROM"

extern char **environ;

/* One inherited socket: fd < 0 once taken or closed. */
typedef struct sl_inherited {
  int fd;
  sl_addr addr;
  int shared;          /* 1: one socket for every worker (systemd's) */
  int activated;       /* 1: passed by systemd to this process (LISTEN_FDS) */
  char name[64];       /* its LISTEN_FDNAMES name, or "" */
} sl_inherited;

static struct {
  char **argv;
  char exe[PATH_MAX];
  sl_inherited *socks;
  int nsocks;
  pid_t from;
} sl_up;

/* Whether fd is already in the table. */
static int sl_upgrade_known(int fd) {
  for (int i = 0; i < sl_up.nsocks; i++)
    if (sl_up.socks[i].fd == fd) return 1;
  return 0;
}

/* Adds fd (a bound TCP socket whose address is a) to the table: close on
 * exec, non-blocking. SL_OK, or SL_ERROR when out of memory. */
static int sl_upgrade_keep(int fd, const sl_addr *a, int shared, int activated,
                           const char *name) {
  sl_inherited *grown = realloc(sl_up.socks, (size_t)(sl_up.nsocks + 1) * sizeof(*grown));
  if (grown == NULL) return SL_ERROR;
  (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
  (void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  sl_up.socks = grown;
  sl_inherited *s = &sl_up.socks[sl_up.nsocks++];
  s->fd = fd;
  s->addr = *a;
  s->shared = shared;
  s->activated = activated;
  snprintf(s->name, sizeof(s->name), "%s", name);
  return SL_OK;
}

/* Keeps fd when it is a bound TCP socket (IPv4 or IPv6) of a binary
 * upgrade, its address read back; shared: one socket for every worker. */
static void sl_upgrade_adopt(int fd, int shared) {
  int type = 0;
  socklen_t tlen = sizeof(type);
  sl_addr a;
  a.len = sizeof(a.ss);
  if (sl_upgrade_known(fd)) return;   /* listed twice */
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tlen) != 0 || type != SOCK_STREAM ||
      getsockname(fd, (struct sockaddr *)&a.ss, &a.len) != 0 ||
      (a.ss.ss_family != AF_INET && a.ss.ss_family != AF_INET6)) {
    sl_log(SL_LOG_WARN, SL_UPGRADE_FDS_ENV ": descriptor %d is not a bound TCP socket; ignored",
           fd);
    return;
  }
  if (sl_upgrade_keep(fd, &a, shared, 0, "") != SL_OK)
    sl_log(SL_LOG_WARN, SL_UPGRADE_FDS_ENV ": out of memory; descriptor %d ignored", fd);
}

/* Descriptor fd of LISTEN_FDS, named name: kept when it is a listening TCP
 * socket (IPv4 or IPv6); else SL_ERROR with the reason in err. */
static int sl_upgrade_activated(int fd, const char *name, char *err, size_t errlen) {
  char label[96];
  snprintf(label, sizeof(label), "descriptor %d%s%s%s", fd, name[0] ? " (\"" : "", name,
           name[0] ? "\")" : "");
  int type = 0, listening = 0;
  socklen_t len = sizeof(type);
  sl_addr a;
  a.len = sizeof(a.ss);
  const char *what = NULL;
  if (fcntl(fd, F_GETFD) < 0) what = "is not open";
  else if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) what = "is not a socket";
  else if (getsockname(fd, (struct sockaddr *)&a.ss, &a.len) != 0) what = "has no address";
  else if (a.ss.ss_family != AF_INET && a.ss.ss_family != AF_INET6)
    what = a.ss.ss_family == AF_UNIX ? "is a UNIX socket" : "is not an IPv4 or IPv6 socket";
  else if (type != SOCK_STREAM) what = type == SOCK_DGRAM ? "is a datagram (UDP) socket"
                                                          : "is not a stream socket";
  else {
    len = sizeof(listening);
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening)
      what = "is a TCP socket that does not listen";
  }
  if (what != NULL) {
    snprintf(err, errlen, "LISTEN_FDS: %s %s: sluice takes listening TCP sockets only "
             "(ListenStream= with an IP address and a port, Accept=no)", label, what);
    return SL_ERROR;
  }
  if (sl_upgrade_known(fd)) return SL_OK;
  /* Connections accepted inherit TCP_NODELAY from their listener, as from
   * the sockets sluice binds (io/listener.c). */
  int one = 1;
  (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (sl_upgrade_keep(fd, &a, 1, 1, name) != SL_OK) {
    snprintf(err, errlen, "LISTEN_FDS: out of memory");
    return SL_ERROR;
  }
  return SL_OK;
}

/* Calls fn(fd, arg) for each descriptor separated by commas in the
 * variable env. A malformed list ends there, with a warning when warn is
 * set. */
static void sl_upgrade_each(const char *env, void (*fn)(int, int), int arg, int warn) {
  const char *fds = getenv(env);
  for (const char *p = fds; p != NULL && *p != '\0';) {
    char *end;
    long fd = strtol(p, &end, 10);
    if (end == p || fd < 0 || fd > INT_MAX || (*end != ',' && *end != '\0')) {
      if (warn)
        sl_log(SL_LOG_WARN, "%s=%s: expected descriptors separated by commas; the rest ignored",
               env, fds);
      break;
    }
    fn((int)fd, arg);
    p = *end == ',' ? end + 1 : end;
  }
}

/* Marks fd close on exec when it is a socket (what is not one is left
 * alone, as sl_upgrade_adopt leaves it). */
static void sl_upgrade_mark(int fd, int unused) {
  SL_UNUSED(unused);
  int type = 0;
  socklen_t len = sizeof(type);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0) (void)fcntl(fd, F_SETFD, FD_CLOEXEC);
}

void sl_upgrade_cloexec(void) {
  int n = 0;
  char err[8];
  /* The count only: the names, and what the descriptors are, are
   * sl_upgrade_init's to check. */
  if (sl_activation_parse(getenv("LISTEN_PID"), getenv("LISTEN_FDS"), NULL, getpid(), &n, err,
                          sizeof(err)) == SL_OK) {
    for (int i = 0; i < n; i++) {
      int fd = SL_ACTIVATION_FDS_START + i;
      int flags = fcntl(fd, F_GETFD);
      if (flags < 0) break;   /* not open: sl_upgrade_init refuses the variables */
      (void)fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
    }
  }
  sl_upgrade_each(SL_UPGRADE_FDS_ENV, sl_upgrade_mark, 0, 0);
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

/* The sockets systemd passed (LISTEN_FDS), when they are this process's;
 * the variables are removed either way. SL_OK, or SL_ERROR with err. */
static int sl_upgrade_systemd(char *err, size_t errlen) {
  const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
  const char *names = getenv("LISTEN_FDNAMES");
  int n = 0, rc = sl_activation_parse(pid, fds, names, getpid(), &n, err, errlen);
  if (rc == SL_OK && n == 0 && fds != NULL && fds[0] != '\0' && fds[0] != '0')
    sl_log(SL_LOG_INFO, "LISTEN_FDS=%s is for %s%s, not this process (pid %d): ignored", fds,
           pid ? "pid " : "another process", pid ? pid : "", (int)getpid());
  for (int i = 0; rc == SL_OK && i < n; i++) {
    char name[64];
    sl_activation_name(names, i, name, sizeof(name));
    rc = sl_upgrade_activated(SL_ACTIVATION_FDS_START + i, name, err, errlen);
  }
  unsetenv("LISTEN_PID");
  unsetenv("LISTEN_FDS");
  unsetenv("LISTEN_FDNAMES");
  return rc;
}

int sl_upgrade_init(int argc, char **argv, char *err, size_t errlen) {
  SL_UNUSED(argc);
  sl_up.argv = argv;
  sl_upgrade_find_exe(argv[0]);
  int rc = sl_upgrade_systemd(err, errlen);
  /* The shared ones first: they are listed in both. */
  if (rc == SL_OK) sl_upgrade_each(SL_UPGRADE_SHARED_ENV, sl_upgrade_adopt, 1, 1);
  if (rc == SL_OK) sl_upgrade_each(SL_UPGRADE_FDS_ENV, sl_upgrade_adopt, 0, 1);
  const char *from = getenv(SL_UPGRADE_FROM_ENV);
  if (from != NULL && *from != '\0') {
    long pid = strtol(from, NULL, 10);
    if (pid > 1 && (pid_t)pid == getppid()) sl_up.from = (pid_t)pid;
  }
  unsetenv(SL_UPGRADE_FDS_ENV);
  unsetenv(SL_UPGRADE_SHARED_ENV);
  unsetenv(SL_UPGRADE_FROM_ENV);
  return rc;
}

/* Shares the socket s across fds[0..n): fds[0] is s's descriptor, the
 * others duplicates of it. SL_OK, or SL_ERROR with err (nothing taken). */
static int sl_upgrade_share(sl_inherited *s, int *fds, int n, int backlog, char *err,
                            size_t errlen) {
  if (sl_listener_listen(s->fd, backlog) != SL_OK) {
    snprintf(err, errlen, "listen on %s: %s",
             s->activated ? "the socket systemd passed" : "an inherited socket", strerror(errno));
    return SL_ERROR;
  }
  for (int i = 1; i < n; i++) {
    fds[i] = fcntl(s->fd, F_DUPFD_CLOEXEC, SL_ACTIVATION_FDS_START);
    if (fds[i] >= 0) continue;
    snprintf(err, errlen, "cannot duplicate a listening socket: %s", strerror(errno));
    while (--i > 0) {
      close(fds[i]);
      fds[i] = -1;
    }
    return SL_ERROR;
  }
  fds[0] = s->fd;
  s->fd = -1;
  return SL_OK;
}

int sl_upgrade_take(const sl_addr *addr, int *fds, int n, int backlog, int *shared, char *err,
                    size_t errlen) {
  int found = 0, one = -1;
  for (int i = 0; i < sl_up.nsocks; i++) {
    if (sl_up.socks[i].fd >= 0 && sl_addr_same((const struct sockaddr *)&addr->ss,
                                               (const struct sockaddr *)&sl_up.socks[i].addr.ss)) {
      found++;
      one = i;
    }
  }
  if (found == 0) return 0;
  if (found == 1 && sl_up.socks[one].shared) {
    /* systemd's: one socket, one accept queue, for every worker. */
    if (sl_upgrade_share(&sl_up.socks[one], fds, n, backlog, err, errlen) != SL_OK) return -1;
    if (shared != NULL) *shared = 1;
    return n;
  }
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
  if (shared != NULL) *shared = 0;
  return n;
}

/* The port of an IPv4 or IPv6 address, or -1. */
static int sl_upgrade_port(const struct sockaddr_storage *ss) {
  if (ss->ss_family == AF_INET) return ntohs(((const struct sockaddr_in *)(const void *)ss)->sin_port);
  if (ss->ss_family == AF_INET6)
    return ntohs(((const struct sockaddr_in6 *)(const void *)ss)->sin6_port);
  return -1;
}

/* Whether the host of an IPv4 or IPv6 address is the wildcard one. */
static int sl_upgrade_wildcard(const struct sockaddr_storage *ss) {
  if (ss->ss_family == AF_INET)
    return ((const struct sockaddr_in *)(const void *)ss)->sin_addr.s_addr == htonl(INADDR_ANY);
  const struct in6_addr *a = &((const struct sockaddr_in6 *)(const void *)ss)->sin6_addr;
  return IN6_IS_ADDR_UNSPECIFIED(a);
}

/* Whether the listening socket s takes addr's port on addr's host: the
 * same port, and the same host or a wildcard one; across families, an
 * IPv6 wildcard socket that takes IPv4 too (not IPV6_V6ONLY). */
static int sl_upgrade_holds(const sl_inherited *s, const sl_addr *addr) {
  const struct sockaddr_storage *a = &addr->ss, *b = &s->addr.ss;
  if (sl_upgrade_port(a) < 0 || sl_upgrade_port(a) != sl_upgrade_port(b)) return 0;
  if (a->ss_family == b->ss_family)
    return sl_upgrade_wildcard(a) || sl_upgrade_wildcard(b) ||
           sl_addr_same_host((const struct sockaddr *)a, (const struct sockaddr *)b);
  int v6only = 1;
  socklen_t len = sizeof(v6only);
  return b->ss_family == AF_INET6 && sl_upgrade_wildcard(b) &&
         getsockopt(s->fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &len) == 0 && !v6only;
}

char *sl_upgrade_explain_in_use(const sl_addr *addr, char *out, size_t outlen) {
  if (outlen == 0) return out;
  out[0] = '\0';
  for (int i = 0; i < sl_up.nsocks; i++) {
    const sl_inherited *s = &sl_up.socks[i];
    if (s->fd < 0 || !s->shared || !sl_upgrade_holds(s, addr)) continue;
    char where[64];
    sl_addr_format((const struct sockaddr *)&s->addr.ss, where, sizeof(where));
    snprintf(out, outlen, " (the socket systemd passed on %s, descriptor %d%s%s%s, holds this "
             "port: a listener takes it when its listen is that same address)", where, s->fd,
             s->name[0] ? " \"" : "", s->name, s->name[0] ? "\"" : "");
    break;
  }
  return out;
}

int sl_upgrade_close_rest(void) {
  int closed = 0, inherited = 0;
  for (int i = 0; i < sl_up.nsocks; i++) {
    sl_inherited *s = &sl_up.socks[i];
    if (s->fd < 0) continue;
    if (s->shared) {
      /* systemd's, from systemd itself or through an upgrade: it stays
       * open there, and connections wait in it instead of being refused. */
      char where[64], which[192];
      if (s->activated)
        snprintf(which, sizeof(which), "LISTEN_FDS: the socket systemd passed as descriptor %d%s%s%s",
                 s->fd, s->name[0] ? " (\"" : "", s->name, s->name[0] ? "\")" : "");
      else
        snprintf(which, sizeof(which), "upgrade: a socket systemd passed (descriptor %d here)",
                 s->fd);
      sl_log(SL_LOG_WARN, "%s, on %s, is on no listener's address nor admin.listen: closed here "
             "(systemd keeps it listening: connections to it wait until a sluice listens there)",
             which, sl_addr_format((const struct sockaddr *)&s->addr.ss, where, sizeof(where)));
    } else {
      inherited++;
    }
    close(s->fd);
    closed++;
  }
  if (inherited > 0)
    sl_log(SL_LOG_INFO, "upgrade: %d inherited listening socket%s on addresses this "
           "configuration does not listen on: closed", inherited, inherited == 1 ? "" : "s");
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
        strncmp(e, SL_UPGRADE_SHARED_ENV "=", sizeof(SL_UPGRADE_SHARED_ENV)) == 0 ||
        strncmp(e, SL_UPGRADE_FROM_ENV "=", sizeof(SL_UPGRADE_FROM_ENV)) == 0 ||
        strncmp(e, "NOTIFY_SOCKET=", 14) == 0)
      continue;
    env[k++] = environ[i];
  }
  for (int i = 0; i < nvars; i++) env[k++] = vars[i];
  return env;
}

pid_t sl_upgrade_spawn(const int *fds, const int *shared, int nfds, int stderr_fd,
                       const char *notify_socket, char *err, size_t errlen) {
  /* Everything the child needs is made before fork: between fork and exec
   * it calls async-signal-safe functions only (the other threads' locks
   * may be held). */
  size_t room = (size_t)nfds * 12 + sizeof(SL_UPGRADE_SHARED_ENV) + 2;
  char *list = malloc(room), *shared_list = malloc(room), from[48], notify[160];
  char *vars[4];
  int nvars = 0;
  if (list == NULL || shared_list == NULL) {
    free(list);
    free(shared_list);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  size_t len = (size_t)snprintf(list, room, SL_UPGRADE_FDS_ENV "=");
  size_t slen = (size_t)snprintf(shared_list, room, SL_UPGRADE_SHARED_ENV "="), nshared = 0;
  for (int i = 0; i < nfds; i++) {
    len += (size_t)snprintf(list + len, room - len, "%s%d", i ? "," : "", fds[i]);
    if (shared != NULL && shared[i])
      slen += (size_t)snprintf(shared_list + slen, room - slen, "%s%d", nshared++ ? "," : "",
                               fds[i]);
  }
  vars[nvars++] = list;
  if (nshared > 0) vars[nvars++] = shared_list;
  snprintf(from, sizeof(from), SL_UPGRADE_FROM_ENV "=%d", (int)getpid());
  vars[nvars++] = from;
  if (notify_socket != NULL) {
    snprintf(notify, sizeof(notify), "NOTIFY_SOCKET=%s", notify_socket);
    vars[nvars++] = notify;
  }
  char **env = sl_upgrade_env(vars, nvars);
  if (env == NULL) {
    free(list);
    free(shared_list);
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
  free(shared_list);
  if (pid < 0) {
    snprintf(err, errlen, "fork: %s", strerror(e));
    return -1;
  }
  return pid;
}
