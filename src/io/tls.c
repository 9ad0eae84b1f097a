#include "io/tls.h"

#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
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

SSL_CTX *sl_tls_ctx_new(const sl_tls_opts *o, char *err, size_t errlen) {
  char why[256];
  ERR_clear_error();
  SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
  if (ctx == NULL) {
    snprintf(err, errlen, "certificate: cannot create a TLS context (%s)",
             sl_tls_error_text(why, sizeof(why), "out of memory"));
    return NULL;
  }
  SSL_CTX_set_default_passwd_cb(ctx, sl_tls_no_passphrase);
  SSL_CTX_set_min_proto_version(ctx, o->min_version ? o->min_version : TLS1_2_VERSION);
  SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF |
                               SSL_OP_CIPHER_SERVER_PREFERENCE);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                            SSL_MODE_RELEASE_BUFFERS);
  SSL_CTX_set_read_ahead(ctx, 1);
  if (SSL_CTX_use_certificate_chain_file(ctx, o->certificate) != 1) {
    sl_tls_file_error(err, errlen, "certificate", o->certificate, "a PEM certificate");
    goto fail;
  }
  if (SSL_CTX_use_PrivateKey_file(ctx, o->key, SSL_FILETYPE_PEM) != 1) {
    unsigned long e = ERR_peek_last_error();
    if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH) {
      ERR_clear_error();
      snprintf(err, errlen, "key: %s does not match the certificate %s", o->key, o->certificate);
    } else {
      sl_tls_file_error(err, errlen, "key", o->key, "a PEM private key without a passphrase");
    }
    goto fail;
  }
  if (SSL_CTX_check_private_key(ctx) != 1) {
    ERR_clear_error();
    snprintf(err, errlen, "key: %s does not match the certificate %s", o->key, o->certificate);
    goto fail;
  }
  if (o->ciphers && SSL_CTX_set_cipher_list(ctx, o->ciphers) != 1) {
    snprintf(err, errlen, "ciphers: no usable cipher in \"%s\" (%s)", o->ciphers,
             sl_tls_error_text(why, sizeof(why), "rejected"));
    goto fail;
  }
  if (o->ciphersuites && SSL_CTX_set_ciphersuites(ctx, o->ciphersuites) != 1) {
    snprintf(err, errlen, "ciphersuites: no usable suite in \"%s\" (%s)", o->ciphersuites,
             sl_tls_error_text(why, sizeof(why), "rejected"));
    goto fail;
  }
  if (o->alpn) SSL_CTX_set_alpn_select_cb(ctx, sl_tls_alpn_select, (void *)o);
  ERR_clear_error();
  return ctx;
fail:
  SSL_CTX_free(ctx);
  ERR_clear_error();
  return NULL;
}

void sl_tls_ctx_free(SSL_CTX *ctx) { SSL_CTX_free(ctx); }
