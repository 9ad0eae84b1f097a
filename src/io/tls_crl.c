#include "io/tls_crl.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdio.h>

#include "io/tls_internal.h"
#include "util/common.h"
#include "util/log.h"

/* The issuer of crl (RFC 2253), for the log. */
static void sl_tls_crl_issuer(const X509_CRL *crl, char *out, size_t len) {
  BIO *b = BIO_new(BIO_s_mem());
  int got = 0;
  if (b && X509_NAME_print_ex(b, X509_CRL_get_issuer(crl), 0, XN_FLAG_RFC2253) > 0)
    got = BIO_read(b, out, (int)len - 1);
  BIO_free(b);
  out[got > 0 ? got : 0] = '\0';
}

int sl_tls_crl_load(SSL_CTX *ctx, const char *path, char *err, size_t errlen) {
  ERR_clear_error();
  BIO *in = BIO_new_file(path, "r");
  if (in == NULL) {
    sl_tls_file_error(err, errlen, "crl", path, "a PEM file of CRLs");
    return SL_ERROR;
  }
  X509_STORE *store = SSL_CTX_get_cert_store(ctx);
  int n = 0, rc = SL_OK;
  X509_CRL *crl;
  while ((crl = PEM_read_bio_X509_CRL(in, NULL, NULL, NULL)) != NULL) {
    const ASN1_TIME *next = X509_CRL_get0_nextUpdate(crl);
    if (next && X509_cmp_current_time(next) < 0) {
      char issuer[256];
      sl_tls_crl_issuer(crl, issuer, sizeof(issuer));
      sl_log(SL_LOG_WARN, "crl: %s: the CRL of %s is past its nextUpdate: every certificate "
             "it covers is refused (CRL has expired) until a newer one is loaded", path, issuer);
    }
    if (X509_STORE_add_crl(store, crl) != 1) rc = SL_ERROR;
    X509_CRL_free(crl);
    if (rc != SL_OK) break;
    n++;
  }
  /* The end of the file leaves "no start line" queued; anything else is
   * a block that is not a CRL. */
  unsigned long e = ERR_peek_last_error();
  int clean_end = e == 0 || (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE);
  BIO_free(in);
  if (rc != SL_OK || n == 0 || !clean_end) {
    if (n == 0 && clean_end) {
      ERR_clear_error();
      snprintf(err, errlen, "crl: %s holds no CRL (expected PEM blocks \"BEGIN X509 CRL\")", path);
    } else {
      sl_tls_file_error(err, errlen, "crl", path, "a PEM file of CRLs");
    }
    return SL_ERROR;
  }
  ERR_clear_error();
  X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK);
  return SL_OK;
}
