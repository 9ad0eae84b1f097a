#include "io/tls.h"

#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

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

/* "cannot read PATH (strerror)" when the file is not readable, else what
 * OpenSSL said about its content. */
static void sl_tls_file_error(char *err, size_t errlen, const char *key, const char *path,
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

SSL_CTX *sl_tls_ctx_new(const sl_tls_opts *o, char *err, size_t errlen) {
  SSL_CTX *ctx = sl_tls_ctx_alloc(TLS_server_method(), err, errlen);
  if (ctx == NULL) return NULL;
  if (sl_tls_ctx_setup(ctx, o, err, errlen) != SL_OK) {
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return NULL;
  }
  SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
  if (o->alpn) SSL_CTX_set_alpn_select_cb(ctx, sl_tls_alpn_select, (void *)o);
  ERR_clear_error();
  return ctx;
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
