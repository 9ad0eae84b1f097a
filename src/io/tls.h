/*
 * TLS contexts (OpenSSL 3) for listeners that terminate TLS: one SSL_CTX
 * per listener of a configuration, built when the configuration loads (a
 * start, --check, a reload), so that an unreadable file, a key that does
 * not belong to its certificate or a cipher list OpenSSL rejects is a
 * configuration error. Connections take their SSL from it (SSL_new holds
 * a reference on the context): a reload builds new contexts, open
 * connections keep theirs.
 *
 * What a context sets for every connection: partial writes and moving
 * write buffers (the outbound queue hands SSL_write_ex whichever buffer
 * heads it), released buffers while idle, read-ahead (the channel drains
 * what OpenSSL holds before it waits for the socket again), no
 * renegotiation, a TCP end without close_notify read as an end, and no
 * passphrase prompt.
 */
#ifndef SL_TLS_H
#define SL_TLS_H

#include <stddef.h>

struct ssl_ctx_st;

typedef struct sl_tls_opts {
  const char *certificate;     /* PEM file: the certificate, then its chain */
  const char *key;             /* PEM file: its private key (no passphrase) */
  const char *ciphers;         /* TLS 1.2 cipher list (OpenSSL's syntax), NULL: OpenSSL's */
  const char *ciphersuites;    /* TLS 1.3 suites, NULL: OpenSSL's */
  int min_version;             /* TLS1_2_VERSION or TLS1_3_VERSION (values of OpenSSL) */
  const unsigned char *alpn;   /* protocols in wire format (length-prefixed), NULL: none;
                                  borrowed for the context's life */
  size_t alpn_len;
} sl_tls_opts;

#define SL_TLS_1_2 0x0303      /* TLS1_2_VERSION */
#define SL_TLS_1_3 0x0304      /* TLS1_3_VERSION */

/* A server context for o. Returns it (one reference), or NULL with the
 * message in err, starting with the key at fault: "certificate: cannot
 * read /etc/x.pem (No such file or directory)". */
struct ssl_ctx_st *sl_tls_ctx_new(const sl_tls_opts *o, char *err, size_t errlen);

/* Drops the reference sl_tls_ctx_new returned (connections keep theirs).
 * NULL is fine. */
void sl_tls_ctx_free(struct ssl_ctx_st *ctx);

/* The text of OpenSSL's first queued error on this thread ("wrong version number"),
 * or fallback when there is none; the thread's error queue is emptied. */
const char *sl_tls_error_text(char *buf, size_t len, const char *fallback);

#endif
