/* Socket addresses: parse "host" + port, format for logs. */
#ifndef SL_ADDR_H
#define SL_ADDR_H

#include <sys/socket.h>

typedef struct sl_addr {
  struct sockaddr_storage ss;
  socklen_t len;
} sl_addr;

/* Parses a numeric IPv4 or IPv6 host (no brackets) and a port.
 * SL_OK or SL_ERROR. */
int sl_addr_parse(sl_addr *a, const char *host, int port);

/* Writes "1.2.3.4:80" or "[::1]:80" into out. Returns out. */
char *sl_addr_format(const struct sockaddr *sa, char *out, size_t outlen);

/* Whether sa is on the loopback interface: 127.0.0.0/8, ::1 or
 * ::ffff:127.0.0.0/104. */
int sl_addr_is_loopback(const struct sockaddr *sa);

/* Whether a and b are the same IPv4 or IPv6 address (ports aside; an
 * IPv4 address and its IPv4-mapped form are not the same). */
int sl_addr_same_host(const struct sockaddr *a, const struct sockaddr *b);

#endif
