/* Socket addresses: parse "host" + port, format for logs. */
#ifndef SL_ADDR_H
#define SL_ADDR_H

#include <stdint.h>
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

/* Whether a and b are the same IPv4 or IPv6 socket address: the address
 * (as sl_addr_same_host), the port and an IPv6 scope id. */
int sl_addr_same(const struct sockaddr *a, const struct sockaddr *b);

/* An IP address as a key (ports aside): family (AF_INET, AF_INET6; 0:
 * neither) and its bytes (4 or 16, the rest zero). An IPv4-mapped IPv6
 * address is its IPv4 one. */
typedef struct sl_addr_key {
  uint8_t family;
  uint8_t addr[16];
} sl_addr_key;

/* The key of sa's address. */
void sl_addr_key_of(const struct sockaddr *sa, sl_addr_key *k);

/* Whether s is a host name, as the configuration takes them: dot-separated
 * labels of letters, digits and "-" (not first or last), 1 to 63 bytes
 * each, 253 in all (a final dot aside), not only digits and dots. */
int sl_addr_is_host_name(const char *s);

#define SL_ADDR_RESOLVE_MAX 64   /* addresses kept per name */

/* The addresses of host name `name` for TCP, as the system's resolver
 * finds them (getaddrinfo: /etc/hosts, DNS, as nsswitch.conf says), each
 * once, sorted (IPv4 first, then by address: an answer whose order rotates,
 * as round-robin DNS does, comes out the same), IPv4 and IPv6 (the first
 * SL_ADDR_RESOLVE_MAX the resolver gives; AI_ADDRCONFIG: a family only when the
 * machine has an address of it): their texts ("10.0.0.5", "fd00::5", no
 * brackets) into out[0..*n) and their families (AF_INET, AF_INET6) into
 * family, at most SL_ADDR_RESOLVE_MAX. Blocks until the resolver answers.
 * SL_OK, or SL_ERROR with *why the resolver's message (static storage). */
int sl_addr_resolve(const char *name, char out[][46], int *family, int *n, const char **why);

/* Adds the address bytes (4 or 16 of family fam) to the n in out, family
 * and keys (the sort keys of those n), in sl_addr_resolve's order, unless
 * it is there already or SL_ADDR_RESOLVE_MAX are. Returns 1 when added. */
int sl_addr_insert(char out[][46], int *family, uint8_t keys[][17], int *n, int fam,
                   const void *bytes);

#endif
