/*
 * netload: the small network peers of the proxy benchmark (bench/proxy/run).
 *
 *   netload port [N]           print N (default 1, at most 64) distinct free TCP
 *                              ports on 127.0.0.1, one a line
 *   netload sink PORT          accept on 127.0.0.1:PORT, read and discard; close
 *                              a connection at its EOF; runs until SIGTERM/SIGINT
 *   netload bulk PORT BYTES    connect, send BYTES, half-close, wait for the
 *                              peer's close; prints "bytes=N seconds=S gbit_s=G"
 *   netload idle PORT N HOLD   open N connections (at most 256 connecting at a
 *                              time), print "connected=N", hold them until
 *                              SIGTERM/SIGINT or HOLD seconds, then exit 0
 *   netload churn PORT N       N connections one after another: connect, send
 *                              one HTTP/1.1 GET with "Connection: close", read
 *                              to the server's close, close; prints
 *                              "conns=N bytes=B" (bench/proxy/conn_cost)
 *   netload requests PORT N    one keep-alive connection, N HTTP/1.1 GETs one
 *                              after another, each response read whole (by its
 *                              Content-Length); prints "requests=N bytes=B"
 *
 * Every loop is bounded: sink ends on a signal, bulk on the byte count and a
 * 600 s alarm, idle on HOLD seconds. Exit 1 on any socket error, with a
 * message on stderr.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NETLOAD_IO_SIZE (1 << 20)   /* bytes per send and per recv */
#define NETLOAD_MAX_CONNECTING 256  /* idle: connects in flight at once */
#define NETLOAD_BULK_TIMEOUT_S 600

static volatile sig_atomic_t netload_stop;

static void netload_on_signal(int sig) {
  (void)sig;
  netload_stop = 1;
}

static void netload_die(const char *what) {
  fprintf(stderr, "netload: %s: %s\n", what, strerror(errno));
  exit(1);
}

static double netload_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static struct sockaddr_in netload_addr(int port) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof(a));
  a.sin_family = AF_INET;
  a.sin_port = htons((uint16_t)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

static int netload_parse_port(const char *s) {
  char *end;
  long v = strtol(s, &end, 10);
  if (*end != '\0' || v < 1 || v > 65535) {
    fprintf(stderr, "netload: bad port %s\n", s);
    exit(2);
  }
  return (int)v;
}

static long long netload_parse_count(const char *s) {
  char *end;
  long long v = strtoll(s, &end, 10);
  if (*end != '\0' || v < 1) {
    fprintf(stderr, "netload: bad count %s\n", s);
    exit(2);
  }
  return v;
}

static void netload_signals(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = netload_on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGALRM, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
}

/* N distinct free ports: bind port 0 N times, all held until every port is
 * read, then closed. */
static int netload_port(long long n) {
  int fds[64];
  if (n > 64) n = 64;
  for (long long i = 0; i < n; i++) {
    fds[i] = socket(AF_INET, SOCK_STREAM, 0);
    if (fds[i] < 0) netload_die("socket");
    struct sockaddr_in a = netload_addr(0);
    a.sin_port = 0;
    socklen_t len = sizeof(a);
    if (bind(fds[i], (struct sockaddr *)&a, sizeof(a)) < 0) netload_die("bind");
    if (getsockname(fds[i], (struct sockaddr *)&a, &len) < 0) netload_die("getsockname");
    printf("%d\n", ntohs(a.sin_port));
  }
  for (long long i = 0; i < n; i++) close(fds[i]);
  return 0;
}

static int netload_sink(int port) {
  static char buf[NETLOAD_IO_SIZE];
  netload_signals();
  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (lfd < 0) netload_die("socket");
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  struct sockaddr_in a = netload_addr(port);
  if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0) netload_die("bind");
  if (listen(lfd, 4096) < 0) netload_die("listen");
  int ep = epoll_create1(0);
  if (ep < 0) netload_die("epoll_create1");
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0) netload_die("epoll_ctl");
  struct epoll_event evs[256];
  while (!netload_stop) {
    int n = epoll_wait(ep, evs, 256, 500);
    if (n < 0) {
      if (errno == EINTR) continue;
      netload_die("epoll_wait");
    }
    for (int i = 0; i < n; i++) {
      int fd = evs[i].data.fd;
      if (fd == lfd) {
        for (;;) {
          int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
          if (c < 0) break;   /* EAGAIN, or EMFILE: retried at the next wake-up */
          struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
          if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev) < 0) netload_die("epoll_ctl");
        }
        continue;
      }
      for (;;) {
        ssize_t r = recv(fd, buf, sizeof(buf), 0);
        if (r > 0) continue;
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) break;
        close(fd);   /* EOF or a reset */
        break;
      }
    }
  }
  return 0;
}

static int netload_bulk(int port, long long bytes) {
  static char buf[NETLOAD_IO_SIZE];
  netload_signals();
  alarm(NETLOAD_BULK_TIMEOUT_S);
  memset(buf, 'x', sizeof(buf));
  double t0 = netload_now();
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) netload_die("socket");
  struct sockaddr_in a = netload_addr(port);
  if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) netload_die("connect");
  long long left = bytes;
  while (left > 0 && !netload_stop) {
    size_t want = left < (long long)sizeof(buf) ? (size_t)left : sizeof(buf);
    ssize_t w = send(fd, buf, want, 0);
    if (w < 0) {
      if (errno == EINTR) continue;
      netload_die("send");
    }
    left -= w;
  }
  if (netload_stop) {
    fprintf(stderr, "netload: bulk interrupted with %lld bytes unsent\n", left);
    return 1;
  }
  if (shutdown(fd, SHUT_WR) < 0) netload_die("shutdown");
  /* The sink closes at our EOF, after it read every byte: its close ends the run. */
  for (;;) {
    ssize_t r = recv(fd, buf, sizeof(buf), 0);
    if (r == 0) break;
    if (r < 0) {
      if (errno == EINTR && !netload_stop) continue;
      netload_die("recv (waiting for the sink to close)");
    }
  }
  double secs = netload_now() - t0;
  close(fd);
  printf("bytes=%lld seconds=%.6f gbit_s=%.3f\n", bytes, secs, (double)bytes * 8 / secs / 1e9);
  return 0;
}

static int netload_idle(int port, long long n, long long hold) {
  netload_signals();
  int ep = epoll_create1(0);
  if (ep < 0) netload_die("epoll_create1");
  struct sockaddr_in a = netload_addr(port);
  long long started = 0, connected = 0, inflight = 0;
  struct epoll_event evs[NETLOAD_MAX_CONNECTING];
  double deadline = netload_now() + 120;
  while (connected < n) {
    while (started < n && inflight < NETLOAD_MAX_CONNECTING) {
      int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
      if (fd < 0) netload_die("socket (raise ulimit -n)");
      if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0 && errno != EINPROGRESS)
        netload_die("connect");
      struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
      if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) netload_die("epoll_ctl");
      started++;
      inflight++;
    }
    if (netload_stop || netload_now() > deadline) {
      fprintf(stderr, "netload: idle: %lld of %lld connected before %s\n", connected, n,
              netload_stop ? "a signal" : "the 120 s deadline");
      return 1;
    }
    int k = epoll_wait(ep, evs, NETLOAD_MAX_CONNECTING, 500);
    if (k < 0) {
      if (errno == EINTR) continue;
      netload_die("epoll_wait");
    }
    for (int i = 0; i < k; i++) {
      int fd = evs[i].data.fd;
      int err = 0;
      socklen_t len = sizeof(err);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        errno = err;
        netload_die("connect");
      }
      /* Connected: stop watching it, keep the socket open. */
      epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
      connected++;
      inflight--;
    }
  }
  printf("connected=%lld\n", connected);
  fflush(stdout);
  alarm((unsigned)hold);
  while (!netload_stop) pause();
  return 0;
}

/* One connection at a time, so that every run makes the same calls in the
 * same order: the figure is for counting instructions, not for speed. */
static int netload_churn(int port, long long n) {
  static const char req[] = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  char buf[4096];
  long long bytes = 0;
  netload_signals();
  alarm(NETLOAD_BULK_TIMEOUT_S);
  struct sockaddr_in a = netload_addr(port);
  for (long long i = 0; i < n && !netload_stop; i++) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) netload_die("socket");
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) netload_die("connect");
    if (send(fd, req, sizeof(req) - 1, 0) != (ssize_t)(sizeof(req) - 1)) netload_die("send");
    for (;;) {
      ssize_t r = recv(fd, buf, sizeof(buf), 0);
      if (r == 0) break;
      if (r < 0) {
        if (errno == EINTR && !netload_stop) continue;
        netload_die("recv");
      }
      bytes += r;
    }
    close(fd);
  }
  if (netload_stop) {
    fprintf(stderr, "netload: churn interrupted\n");
    return 1;
  }
  printf("conns=%lld bytes=%lld\n", n, bytes);
  return 0;
}

/* Reads one HTTP response (headers, then Content-Length bytes of body). */
static long long netload_read_response(int fd) {
  char buf[4096];
  size_t have = 0;
  long long body = -1, total = 0;
  size_t head = 0;
  for (;;) {
    ssize_t r = recv(fd, buf + have, sizeof(buf) - 1 - have, 0);
    if (r <= 0) {
      if (r < 0 && errno == EINTR && !netload_stop) continue;
      netload_die(r == 0 ? "recv (the server closed)" : "recv");
    }
    have += (size_t)r;
    total += r;
    buf[have] = '\0';
    if (body < 0) {
      char *end = strstr(buf, "\r\n\r\n");
      if (end == NULL) {
        if (have == sizeof(buf) - 1) { errno = EMSGSIZE; netload_die("response headers"); }
        continue;
      }
      head = (size_t)(end + 4 - buf);
      char *cl = strcasestr(buf, "\r\ncontent-length:");
      if (cl == NULL || cl > end) { errno = EPROTO; netload_die("no Content-Length"); }
      body = strtoll(cl + 18, NULL, 10);
    }
    if ((long long)(have - head) >= body) return total;
  }
}

/* One keep-alive connection, one request at a time. */
static int netload_requests(int port, long long n) {
  static const char req[] = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  long long bytes = 0;
  netload_signals();
  alarm(NETLOAD_BULK_TIMEOUT_S);
  struct sockaddr_in a = netload_addr(port);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) netload_die("socket");
  if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) netload_die("connect");
  for (long long i = 0; i < n && !netload_stop; i++) {
    if (send(fd, req, sizeof(req) - 1, 0) != (ssize_t)(sizeof(req) - 1)) netload_die("send");
    bytes += netload_read_response(fd);
  }
  close(fd);
  if (netload_stop) {
    fprintf(stderr, "netload: requests interrupted\n");
    return 1;
  }
  printf("requests=%lld bytes=%lld\n", n, bytes);
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 2 && strcmp(argv[1], "port") == 0) return netload_port(1);
  if (argc == 3 && strcmp(argv[1], "port") == 0) return netload_port(netload_parse_count(argv[2]));
  if (argc == 3 && strcmp(argv[1], "sink") == 0) return netload_sink(netload_parse_port(argv[2]));
  if (argc == 4 && strcmp(argv[1], "bulk") == 0)
    return netload_bulk(netload_parse_port(argv[2]), netload_parse_count(argv[3]));
  if (argc == 4 && strcmp(argv[1], "requests") == 0)
    return netload_requests(netload_parse_port(argv[2]), netload_parse_count(argv[3]));
  if (argc == 4 && strcmp(argv[1], "churn") == 0)
    return netload_churn(netload_parse_port(argv[2]), netload_parse_count(argv[3]));
  if (argc == 5 && strcmp(argv[1], "idle") == 0)
    return netload_idle(netload_parse_port(argv[2]), netload_parse_count(argv[3]),
                        netload_parse_count(argv[4]));
  fprintf(stderr,
          "usage: netload port [N] | sink PORT | bulk PORT BYTES | idle PORT N HOLD_SECONDS\n");
  return 2;
}
