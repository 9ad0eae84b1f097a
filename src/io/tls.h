/*
 * TLS contexts (OpenSSL 3): a server context per listener that terminates
 * TLS, a client context per upstream that speaks TLS to its servers. Each
 * is built when the configuration loads (a start, --check, a reload), so
 * that an unreadable file, a key that does not belong to its certificate
 * or a cipher list OpenSSL rejects is a configuration error. Connections take their SSL from it (SSL_new holds
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
struct ssl_st;
struct ssl_session_st;

/* A certificate and its key (PEM files), and the OCSP response stapled
 * with it (a DER file, NULL: none; tls_ocsp.h). */
typedef struct sl_tls_cert {
  const char *certificate;
  const char *key;
  const char *ocsp_response;
} sl_tls_cert;

typedef struct sl_tls_opts {
  const char *certificate;     /* PEM file: the certificate, then its chain (a client
                                  context: NULL, or the client certificate it shows) */
  const char *key;             /* PEM file: its private key (no passphrase) */
  const char *ciphers;         /* TLS 1.2 cipher list (OpenSSL's syntax), NULL: OpenSSL's */
  const char *ciphersuites;    /* TLS 1.3 suites, NULL: OpenSSL's */
  int min_version;             /* TLS1_2_VERSION or TLS1_3_VERSION (values of OpenSSL) */
  const unsigned char *alpn;   /* protocols in wire format (length-prefixed), NULL: none;
                                  borrowed for the context's life */
  size_t alpn_len;
  /* Server contexts only: more certificates, each chosen for a client whose
   * ClientHello names (SNI) one of its DNS names (subject alternative
   * names, else its common name; "*.example.com" covers one label). Any
   * other client gets certificate. */
  const sl_tls_cert *sni;
  size_t nsni;
  /* Server contexts only: client certificates (mutual TLS). client_ca: a
   * PEM file of the CAs that issue them, NULL: none asked for; with
   * client_optional a client without one is let in (one with a bad one
   * is not). */
  const char *client_ca;
  int client_optional;
  /* Server contexts only: the OCSP response of certificate (NULL: none),
   * and the files of the session ticket keys (tls_tickets.h; none: the
   * process's own keys, drawn once). */
  const char *ocsp_response;
  const char *const *ticket_keys;
  size_t nticket_keys;
  /* A PEM file of CRLs the peer's certificate is checked against (with
   * client_ca on a server context, with verify on a client one; NULL:
   * none; tls_crl.h). */
  const char *crl;
  /* Client contexts only. */
  int verify;                  /* 1: the server's certificate is verified (chain and name) */
  const char *ca;              /* PEM file of trusted certificates; NULL: the system's */
  int session_reuse;           /* 1: sessions are resumed (sl_tls_session_slot) */
} sl_tls_opts;

#define SL_TLS_1_2 0x0303      /* TLS1_2_VERSION */
#define SL_TLS_1_3 0x0304      /* TLS1_3_VERSION */

/* A server context for o. Returns it (one reference), or NULL with the
 * message in err, starting with the key at fault: "certificate: cannot
 * read /etc/x.pem (No such file or directory)", "certificates[2].key:
 * ...", or "certificates[2].certificate: ... names api.example.com, as
 * certificates[1] does" (each name may be chosen by one certificate). */
struct ssl_ctx_st *sl_tls_ctx_new(const sl_tls_opts *o, char *err, size_t errlen);

/* A client context for o (an upstream's tls): the same options, where a
 * certificate is the client certificate shown to servers that ask for
 * one, plus verify, ca and session_reuse. Same errors as sl_tls_ctx_new,
 * the key at fault first ("ca: cannot read ..."). */
struct ssl_ctx_st *sl_tls_client_ctx_new(const sl_tls_opts *o, char *err, size_t errlen);

/* A client SSL of ctx (a client context) on the socket fd, in connect
 * state: server_name goes in the ClientHello (SNI; NULL: none),
 * verify_name is the host name or address the server's certificate must
 * be for when ctx verifies, and session_slot (NULL: none) is resumed from
 * and given the new sessions (sl_tls_session_slot). NULL when out of
 * memory. */
struct ssl_st *sl_tls_client_new(struct ssl_ctx_st *ctx, int fd, const char *server_name,
                                 const char *verify_name, struct ssl_session_st **session_slot);

/* Session resumption for a client context with session_reuse: ssl, a
 * client SSL of such a context, gives every session the server issues it
 * (after the handshake, or in TLS 1.3 tickets read later) to *slot, which
 * then holds one reference (dropping the one it held). The slot must
 * outlive ssl. The caller resumes with SSL_set_session(ssl, *slot) before
 * the handshake and frees the slot's session with sl_tls_session_free. */
void sl_tls_session_slot(struct ssl_st *ssl, struct ssl_session_st **slot);
void sl_tls_session_free(struct ssl_session_st **slot);

/* Takes one more reference on ctx (a configuration derived from another
 * shares its contexts); returns ctx. */
struct ssl_ctx_st *sl_tls_ctx_ref(struct ssl_ctx_st *ctx);

/* Drops the reference sl_tls_ctx_new returned (connections keep theirs).
 * NULL is fine. */
void sl_tls_ctx_free(struct ssl_ctx_st *ctx);

/* The subject of the certificate the peer of ssl showed, verified (RFC
 * 2253: "CN=client.test,O=Example"), in a buffer of the calling thread's
 * that the next call overwrites; NULL when it showed none. */
const char *sl_tls_peer_subject(const struct ssl_st *ssl);

/* The host name a client asked for by SNI on ssl (a server's SSL), or
 * the one a client SSL sent; NULL when none. Borrowed from ssl. */
const char *sl_tls_server_name(const struct ssl_st *ssl);

/* The text of OpenSSL's first queued error on this thread ("wrong version number"),
 * or fallback when there is none; the thread's error queue is emptied. */
const char *sl_tls_error_text(char *buf, size_t len, const char *fallback);

#endif
