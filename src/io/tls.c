#include "io/tls.h"

#include <ctype.h>
#include <errno.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "io/tls_crl.h"
#include "io/tls_internal.h"
#include "io/tls_ocsp.h"
#include "io/tls_tickets.h"
#include "util/common.h"

const char *sl_tls_error_text(char *buf, size_t len, const char *fallback) {
  unsigned long e = ERR_peek_error();   /* the first: the cause, before its consequences */
  const char *r = e ? ERR_reason_error_string(e) : NULL;
  if (e != 0 && r == NULL) {
    ERR_error_string_n(e, buf, len);
    r = buf;
  } else if (r != NULL) {
    snprintf(buf, len, "%s", r);
    r = buf;
  } else {
    snprintf(buf, len, "%s", fallback);
    r = buf;
  }
  ERR_clear_error();
  return r;
}

/* Configuration files never prompt: a key with a passphrase fails to load. */
static int sl_tls_no_passphrase(char *buf, int size, int rwflag, void *ud) {
  SL_UNUSED(buf);
  SL_UNUSED(size);
  SL_UNUSED(rwflag);
  SL_UNUSED(ud);
  return 0;
}

/* ALPN: the first of our protocols (in our order) that the client offers;
 * none in common, no protocol is selected and the handshake goes on. */
static int sl_tls_alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                              const unsigned char *in, unsigned int inlen, void *arg) {
  SL_UNUSED(ssl);
  const sl_tls_opts *o = arg;
  unsigned char *sel = NULL;
  if (SSL_select_next_proto(&sel, outlen, o->alpn, (unsigned)o->alpn_len, in, inlen) !=
      OPENSSL_NPN_NEGOTIATED)
    return SSL_TLSEXT_ERR_NOACK;
  *out = sel;
  return SSL_TLSEXT_ERR_OK;
}

void sl_tls_file_error(char *err, size_t errlen, const char *key, const char *path,
                       const char *what) {
  char why[256];
  if (access(path, R_OK) != 0) {
    ERR_clear_error();
    snprintf(err, errlen, "%s: cannot read %s (%s)", key, path, strerror(errno));
    return;
  }
  snprintf(err, errlen, "%s: %s is not %s (%s)", key, path, what,
           sl_tls_error_text(why, sizeof(why), "unknown error"));
}

unsigned char *sl_tls_read_file(const char *path, size_t max, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (f == NULL) return NULL;
  unsigned char *b = malloc(max + 1);
  size_t n = b ? fread(b, 1, max + 1, f) : 0;
  int e = b == NULL ? ENOMEM : ferror(f) ? EIO : n > max ? EFBIG : 0;
  fclose(f);
  if (e != 0) {
    free(b);
    errno = e;
    return NULL;
  }
  *len = n;
  return b;
}

/* What server and client contexts share: the options set for every
 * connection (tls.h), the oldest version, the certificate and its key
 * when o has them, the cipher lists. SL_OK, or SL_ERROR with err. */
static int sl_tls_ctx_setup(SSL_CTX *ctx, const sl_tls_opts *o, char *err, size_t errlen) {
  char why[256];
  SSL_CTX_set_default_passwd_cb(ctx, sl_tls_no_passphrase);
  SSL_CTX_set_min_proto_version(ctx, o->min_version ? o->min_version : TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                            SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_read_ahead(ctx, 1);
  if (o->certificate && SSL_CTX_use_certificate_chain_file(ctx, o->certificate) != 1) {
    sl_tls_file_error(err, errlen, "certificate", o->certificate, "a PEM certificate");
    return SL_ERROR;
  }
  if (o->certificate && SSL_CTX_use_PrivateKey_file(ctx, o->key, SSL_FILETYPE_PEM) != 1) {
    unsigned long e = ERR_peek_last_error();
    if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH) {
      ERR_clear_error();
      snprintf(err, errlen, "key: %s does not match the certificate %s", o->key, o->certificate);
    } else {
      sl_tls_file_error(err, errlen, "key", o->key, "a PEM private key without a passphrase");
    }
    return SL_ERROR;
  }
  if (o->certificate && SSL_CTX_check_private_key(ctx) != 1) {
    ERR_clear_error();
    snprintf(err, errlen, "key: %s does not match the certificate %s", o->key, o->certificate);
    return SL_ERROR;
  }
  if (o->ciphers && SSL_CTX_set_cipher_list(ctx, o->ciphers) != 1) {
    snprintf(err, errlen, "ciphers: no usable cipher in \"%s\" (%s)", o->ciphers,
             sl_tls_error_text(why, sizeof(why), "rejected"));
    return SL_ERROR;
  }
  if (o->ciphersuites && SSL_CTX_set_ciphersuites(ctx, o->ciphersuites) != 1) {
    snprintf(err, errlen, "ciphersuites: no usable suite in \"%s\" (%s)", o->ciphersuites,
             sl_tls_error_text(why, sizeof(why), "rejected"));
    return SL_ERROR;
  }
  return SL_OK;
}

static SSL_CTX *sl_tls_ctx_alloc(const SSL_METHOD *method, char *err, size_t errlen) {
  char why[256];
  ERR_clear_error();
  SSL_CTX *ctx = SSL_CTX_new(method);
  if (ctx == NULL)
    snprintf(err, errlen, "certificate: cannot create a TLS context (%s)",
             sl_tls_error_text(why, sizeof(why), "out of memory"));
  return ctx;
}

/* Asks clients of ctx for a certificate issued by one of o->client_ca's. */
static int sl_tls_client_ca(SSL_CTX *ctx, const sl_tls_opts *o, char *err, size_t errlen) {
  STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(o->client_ca);
  if (names == NULL || SSL_CTX_load_verify_locations(ctx, o->client_ca, NULL) != 1) {
    sk_X509_NAME_pop_free(names, X509_NAME_free);
    sl_tls_file_error(err, errlen, "client_ca", o->client_ca, "a PEM file of certificates");
    return SL_ERROR;
  }
  SSL_CTX_set_client_CA_list(ctx, names);   /* named in the CertificateRequest */
  if (o->crl && sl_tls_crl_load(ctx, o->crl, err, errlen) != SL_OK) return SL_ERROR;
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | (o->client_optional ? 0 : SSL_VERIFY_FAIL_IF_NO_PEER_CERT),
                     NULL);
  return SL_OK;
}

const char *sl_tls_peer_subject(const SSL *ssl) {
  static __thread char text[256];
  X509 *x = ssl ? SSL_get0_peer_certificate(ssl) : NULL;
  if (x == NULL) return NULL;
  BIO *b = BIO_new(BIO_s_mem());
  if (b == NULL) return NULL;
  int n = X509_NAME_print_ex(b, X509_get_subject_name(x), 0, XN_FLAG_RFC2253);
  int got = n > 0 ? BIO_read(b, text, (int)sizeof(text) - 1) : 0;
  BIO_free(b);
  text[got > 0 ? got : 0] = '\0';
  return text;
}

/* Session ticket keys (a name, an HMAC key and an AES key: OpenSSL's 80
 * bytes), drawn once per process: every server context without
 * ticket_keys uses them, so a ticket a client got before a reload still
 * resumes after it. A new process (a restart, a binary upgrade) draws new
 * ones; ticket_keys (tls_tickets.h) are what outlives it. */
static unsigned char sl_tls_ticket_keys[80];
static int sl_tls_ticket_ok;
static pthread_once_t sl_tls_ticket_once = PTHREAD_ONCE_INIT;

static void sl_tls_ticket_init(void) {
  sl_tls_ticket_ok = RAND_priv_bytes(sl_tls_ticket_keys, sizeof(sl_tls_ticket_keys)) == 1;
}

/* A server context for o with the certificate and key of c. */
static SSL_CTX *sl_tls_server_ctx(const sl_tls_opts *o, const sl_tls_cert *c, char *err,
                                  size_t errlen) {
  SSL_CTX *ctx = sl_tls_ctx_alloc(TLS_server_method(), err, errlen);
  if (ctx == NULL) return NULL;
  sl_tls_opts one = *o;
  one.certificate = c->certificate;
  one.key = c->key;
  one.ocsp_response = c->ocsp_response;
  if (sl_tls_ctx_setup(ctx, &one, err, errlen) != SL_OK) {
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return NULL;
  }
  SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
  if (o->alpn) SSL_CTX_set_alpn_select_cb(ctx, sl_tls_alpn_select, (void *)o);
  /* Sessions resume only in the context that made them (and OpenSSL
   * refuses to resume without one when it verifies clients). */
  static const unsigned char sid[] = "sluice";
  SSL_CTX_set_session_id_context(ctx, sid, sizeof(sid) - 1);
  int rc = SL_OK;
  if (o->nticket_keys > 0) {
    rc = sl_tls_tickets_attach(ctx, o->ticket_keys, o->nticket_keys, err, errlen);
  } else {
    pthread_once(&sl_tls_ticket_once, sl_tls_ticket_init);
    if (sl_tls_ticket_ok)   /* else OpenSSL's own, per context */
      SSL_CTX_set_tlsext_ticket_keys(ctx, sl_tls_ticket_keys, sizeof(sl_tls_ticket_keys));
  }
  if (rc == SL_OK && c->ocsp_response)
    rc = sl_tls_ocsp_attach(ctx, c->ocsp_response, c->certificate, err, errlen);
  if (rc == SL_OK && o->client_ca) rc = sl_tls_client_ca(ctx, o, err, errlen);
  if (rc != SL_OK) {
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return NULL;
  }
  ERR_clear_error();
  return ctx;
}

/* ---- several certificates, chosen by SNI ---- */

/* One name a certificate is for, lowercase ("api.example.com",
 * "*.example.com"), and the context that shows it. */
typedef struct sl_sni_name {
  char *name;
  SSL_CTX *ctx;
  size_t cert;                 /* its index in o->sni */
} sl_sni_name;

typedef struct sl_sni_table {
  size_t n;
  sl_sni_name *names;
  size_t nctx;
  SSL_CTX **ctxs;              /* one reference each */
} sl_sni_table;

static int sl_tls_sni_index = -1;
static pthread_once_t sl_tls_sni_once = PTHREAD_ONCE_INIT;

static void sl_sni_table_free(sl_sni_table *t) {
  if (t == NULL) return;
  for (size_t i = 0; i < t->n; i++) free(t->names[i].name);
  for (size_t i = 0; i < t->nctx; i++) SSL_CTX_free(t->ctxs[i]);
  free(t->names);
  free(t->ctxs);
  free(t);
}

/* The table goes with the default context's last reference. */
static void sl_tls_sni_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                            void *argp) {
  SL_UNUSED(parent);
  SL_UNUSED(ad);
  SL_UNUSED(idx);
  SL_UNUSED(argl);
  SL_UNUSED(argp);
  sl_sni_table_free(ptr);
}

static void sl_tls_sni_init(void) {
  sl_tls_sni_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, sl_tls_sni_free);
}

/* The entry of t for host (exact first, then a wildcard for its first
 * label), or NULL. */
static const sl_sni_name *sl_sni_find(const sl_sni_table *t, const char *host) {
  for (size_t i = 0; i < t->n; i++)
    if (strcasecmp(t->names[i].name, host) == 0) return &t->names[i];
  const char *dot = strchr(host, '.');
  if (dot == NULL || dot == host) return NULL;
  for (size_t i = 0; i < t->n; i++)
    if (t->names[i].name[0] == '*' && strcasecmp(t->names[i].name + 1, dot) == 0)
      return &t->names[i];
  return NULL;
}

/* OpenSSL's servername callback on the default context: a name that one
 * of the other certificates is for switches the connection to its
 * context; any other (or none) keeps the default certificate. */
static int sl_tls_sni_select(SSL *ssl, int *alert, void *arg) {
  SL_UNUSED(alert);
  const sl_sni_table *t = arg;
  const char *host = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
  const sl_sni_name *e = host ? sl_sni_find(t, host) : NULL;
  if (e != NULL) SSL_set_SSL_CTX(ssl, e->ctx);
  return SSL_TLSEXT_ERR_OK;
}

/* Appends the DNS names of ctx's certificate (subject alternative names,
 * else its common name) to t, for certificate i. SL_ERROR with err when
 * it names none, or a name an earlier certificate has. */
static int sl_sni_add_names(sl_sni_table *t, SSL_CTX *ctx, size_t i, const sl_tls_cert *c,
                            char *err, size_t errlen) {
  X509 *x = SSL_CTX_get0_certificate(ctx);
  const char *found[64];
  size_t nfound = 0;
  char cn[256];
  GENERAL_NAMES *gens = x ? X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL) : NULL;
  for (int k = 0; gens && k < sk_GENERAL_NAME_num(gens) && nfound < 64; k++) {
    const GENERAL_NAME *g = sk_GENERAL_NAME_value(gens, k);
    if (g->type == GEN_DNS) found[nfound++] = (const char *)ASN1_STRING_get0_data(g->d.dNSName);
  }
  if (nfound == 0 && x &&
      X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof(cn)) > 0)
    found[nfound++] = cn;
  if (nfound == 0) {
    GENERAL_NAMES_free(gens);
    snprintf(err, errlen, "certificates[%zu].certificate: %s names no host (no DNS subject "
             "alternative name, no common name)", i + 1, c->certificate);
    return SL_ERROR;
  }
  sl_sni_name *grown = realloc(t->names, (t->n + nfound) * sizeof(*grown));
  if (grown == NULL) {
    GENERAL_NAMES_free(gens);
    snprintf(err, errlen, "certificates[%zu].certificate: out of memory", i + 1);
    return SL_ERROR;
  }
  t->names = grown;
  int rc = SL_OK;
  for (size_t k = 0; k < nfound && rc == SL_OK; k++) {
    for (size_t j = 0; j < t->n; j++) {
      if (strcasecmp(t->names[j].name, found[k]) != 0 || t->names[j].cert == i) continue;
      snprintf(err, errlen, "certificates[%zu].certificate: %s names %s, as certificates[%zu] "
               "does (expected each host name in one certificate)", i + 1, c->certificate,
               found[k], t->names[j].cert + 1);
      rc = SL_ERROR;
      break;
    }
    char *name = rc == SL_OK ? strdup(found[k]) : NULL;
    if (rc == SL_OK && name == NULL) {
      snprintf(err, errlen, "certificates[%zu].certificate: out of memory", i + 1);
      rc = SL_ERROR;
    }
    if (rc != SL_OK) break;
    for (char *p = name; *p; p++) *p = (char)tolower((unsigned char)*p);
    t->names[t->n++] = (sl_sni_name){.name = name, .ctx = ctx, .cert = i};
  }
  GENERAL_NAMES_free(gens);
  return rc;
}

/* Builds the contexts of o->sni and hangs their table on ctx. */
static int sl_tls_sni_attach(SSL_CTX *ctx, const sl_tls_opts *o, char *err, size_t errlen) {
  pthread_once(&sl_tls_sni_once, sl_tls_sni_init);
  sl_sni_table *t = calloc(1, sizeof(*t));
  if (t == NULL || (t->ctxs = calloc(o->nsni, sizeof(SSL_CTX *))) == NULL) {
    free(t);
    snprintf(err, errlen, "certificates: out of memory");
    return SL_ERROR;
  }
  for (size_t i = 0; i < o->nsni; i++) {
    char why[1024];
    SSL_CTX *c = sl_tls_server_ctx(o, &o->sni[i], why, sizeof(why));
    if (c == NULL) {
      snprintf(err, errlen, "certificates[%zu].%s", i + 1, why);
      sl_sni_table_free(t);
      return SL_ERROR;
    }
    t->ctxs[t->nctx++] = c;
    if (sl_sni_add_names(t, c, i, &o->sni[i], err, errlen) != SL_OK) {
      sl_sni_table_free(t);
      return SL_ERROR;
    }
  }
  if (sl_tls_sni_index < 0 || SSL_CTX_set_ex_data(ctx, sl_tls_sni_index, t) != 1) {
    sl_sni_table_free(t);
    snprintf(err, errlen, "certificates: out of memory");
    return SL_ERROR;
  }
  SSL_CTX_set_tlsext_servername_callback(ctx, sl_tls_sni_select);
  SSL_CTX_set_tlsext_servername_arg(ctx, t);
  return SL_OK;
}

SSL_CTX *sl_tls_ctx_new(const sl_tls_opts *o, char *err, size_t errlen) {
  sl_tls_cert main = {o->certificate, o->key, o->ocsp_response};
  SSL_CTX *ctx = sl_tls_server_ctx(o, &main, err, errlen);
  if (ctx != NULL && o->nsni > 0 && sl_tls_sni_attach(ctx, o, err, errlen) != SL_OK) {
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return NULL;
  }
  return ctx;
}

const char *sl_tls_server_name(const SSL *ssl) {
  return ssl ? SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name) : NULL;
}

/* ---- client contexts (upstreams) ---- */

static int sl_tls_slot_index = -1;
static pthread_once_t sl_tls_slot_once = PTHREAD_ONCE_INIT;

static void sl_tls_slot_init(void) {
  sl_tls_slot_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
}

/* OpenSSL's new session callback: the session goes to the SSL's slot (1:
 * the reference is the slot's now). */
static int sl_tls_new_session(SSL *ssl, SSL_SESSION *sess) {
  SSL_SESSION **slot = SSL_get_ex_data(ssl, sl_tls_slot_index);
  if (slot == NULL) return 0;
  if (*slot) SSL_SESSION_free(*slot);
  *slot = sess;
  return 1;
}

void sl_tls_session_slot(SSL *ssl, SSL_SESSION **slot) {
  pthread_once(&sl_tls_slot_once, sl_tls_slot_init);
  if (sl_tls_slot_index >= 0) SSL_set_ex_data(ssl, sl_tls_slot_index, slot);
}

void sl_tls_session_free(SSL_SESSION **slot) {
  if (slot == NULL || *slot == NULL) return;
  SSL_SESSION_free(*slot);
  *slot = NULL;
}

SSL *sl_tls_client_new(SSL_CTX *ctx, int fd, const char *server_name, const char *verify_name,
                       SSL_SESSION **session_slot) {
  ERR_clear_error();
  SSL *ssl = SSL_new(ctx);
  int ok = ssl != NULL && SSL_set_fd(ssl, fd) == 1;
  /* SNI names a host, never an address (RFC 6066). */
  if (ok && server_name) ok = SSL_set_tlsext_host_name(ssl, server_name) == 1;
  /* An address is checked against the certificate's IP entries. */
  if (ok && verify_name && (SSL_get_verify_mode(ssl) & SSL_VERIFY_PEER))
    ok = SSL_set1_host(ssl, verify_name) == 1;
  if (ok && session_slot) {
    sl_tls_session_slot(ssl, session_slot);
    if (*session_slot) SSL_set_session(ssl, *session_slot);   /* a stale one: a full handshake */
  }
  if (!ok) {
    SSL_free(ssl);
    ERR_clear_error();
    return NULL;
  }
  SSL_set_connect_state(ssl);
  return ssl;
}

SSL_CTX *sl_tls_client_ctx_new(const sl_tls_opts *o, char *err, size_t errlen) {
  char why[256];
  SSL_CTX *ctx = sl_tls_ctx_alloc(TLS_client_method(), err, errlen);
  if (ctx == NULL) return NULL;
  if (sl_tls_ctx_setup(ctx, o, err, errlen) != SL_OK) goto fail;
  if (o->verify) {
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (o->ca && SSL_CTX_load_verify_locations(ctx, o->ca, NULL) != 1) {
      sl_tls_file_error(err, errlen, "ca", o->ca, "a PEM file of certificates");
      goto fail;
    }
    if (o->ca == NULL && SSL_CTX_set_default_verify_paths(ctx) != 1) {
      snprintf(err, errlen, "ca: cannot load the system's trusted certificates (%s)",
               sl_tls_error_text(why, sizeof(why), "unknown error"));
      goto fail;
    }
    if (o->crl && sl_tls_crl_load(ctx, o->crl, err, errlen) != SL_OK) goto fail;
  } else {
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
  }
  if (o->alpn && SSL_CTX_set_alpn_protos(ctx, o->alpn, (unsigned)o->alpn_len) != 0) {
    snprintf(err, errlen, "alpn: rejected (%s)",
             sl_tls_error_text(why, sizeof(why), "out of memory"));
    goto fail;
  }
  if (o->session_reuse) {
    /* Sessions go to the slot of each connection's server (the upstream
     * keeps one per server and worker), none to OpenSSL's own cache. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, sl_tls_new_session);
  } else {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
  }
  ERR_clear_error();
  return ctx;
fail:
  SSL_CTX_free(ctx);
  ERR_clear_error();
  return NULL;
}

SSL_CTX *sl_tls_ctx_ref(SSL_CTX *ctx) {
  SSL_CTX_up_ref(ctx);
  return ctx;
}

void sl_tls_ctx_free(SSL_CTX *ctx) { SSL_CTX_free(ctx); }
