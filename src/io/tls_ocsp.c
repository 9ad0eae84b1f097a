#include "io/tls_ocsp.h"

#include <errno.h>
#include <openssl/err.h>
#include <openssl/ocsp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "io/tls_internal.h"
#include "util/common.h"
#include "util/log.h"

/* A response file larger than this is not an OCSP response of one
 * certificate. */
#define SL_OCSP_MAX (64 * 1024)

/* The bytes stapled, and until when (0: no nextUpdate, always). */
typedef struct sl_ocsp_staple {
  unsigned char *der;
  size_t len;
  time_t until;
} sl_ocsp_staple;

static int sl_ocsp_index = -1;
static pthread_once_t sl_ocsp_once = PTHREAD_ONCE_INIT;

static void sl_ocsp_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                         void *argp) {
  SL_UNUSED(parent);
  SL_UNUSED(ad);
  SL_UNUSED(idx);
  SL_UNUSED(argl);
  SL_UNUSED(argp);
  sl_ocsp_staple *s = ptr;
  if (s == NULL) return;
  free(s->der);
  free(s);
}

static void sl_ocsp_init(void) {
  sl_ocsp_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, sl_ocsp_free);
}

/* OpenSSL's status callback (a client sent status_request): a copy of
 * the response, which OpenSSL frees; none once it is past nextUpdate. */
static int sl_ocsp_status(SSL *ssl, void *arg) {
  const sl_ocsp_staple *s = arg;
  if (s->until != 0 && time(NULL) >= s->until) return SSL_TLSEXT_ERR_NOACK;
  unsigned char *copy = OPENSSL_memdup(s->der, s->len);
  if (copy == NULL) return SSL_TLSEXT_ERR_NOACK;
  if (SSL_set_tlsext_status_ocsp_resp(ssl, copy, (long)s->len) != 1) {
    OPENSSL_free(copy);
    return SSL_TLSEXT_ERR_NOACK;
  }
  return SSL_TLSEXT_ERR_OK;
}

/* The issuer of leaf among ctx's chain certificates, or NULL. */
static X509 *sl_ocsp_issuer(SSL_CTX *ctx, X509 *leaf) {
  STACK_OF(X509) *chain = NULL;
  if (SSL_CTX_get0_chain_certs(ctx, &chain) != 1 || chain == NULL) return NULL;
  for (int i = 0; i < sk_X509_num(chain); i++) {
    X509 *c = sk_X509_value(chain, i);
    if (X509_check_issued(c, leaf) == X509_V_OK) return c;
  }
  return NULL;
}

/* The status of leaf in bs (V_OCSP_CERTSTATUS_*), its certificate
 * identified by SHA-1 (what openssl ocsp and most responders use) or
 * SHA-256; -1 when bs has none for it. */
static int sl_ocsp_find(OCSP_BASICRESP *bs, X509 *leaf, X509 *issuer,
                        ASN1_GENERALIZEDTIME **next) {
  const EVP_MD *mds[] = {EVP_sha1(), EVP_sha256()};
  for (size_t i = 0; i < sizeof(mds) / sizeof(mds[0]); i++) {
    OCSP_CERTID *id = OCSP_cert_to_id(mds[i], leaf, issuer);
    int status = -1, reason = 0;
    ASN1_GENERALIZEDTIME *rev = NULL, *this_upd = NULL;
    int found = id && OCSP_resp_find_status(bs, id, &status, &reason, &rev, &this_upd, next) == 1;
    OCSP_CERTID_free(id);
    if (found) return status;
  }
  return -1;
}

/* The response's checks (see tls_ocsp.h); its nextUpdate into *until. */
static int sl_ocsp_check(SSL_CTX *ctx, const unsigned char *der, size_t len, const char *path,
                         const char *cert_path, time_t *until, char *err, size_t errlen) {
  const unsigned char *p = der;
  OCSP_RESPONSE *resp = d2i_OCSP_RESPONSE(NULL, &p, (long)len);
  if (resp == NULL || p != der + len) {
    OCSP_RESPONSE_free(resp);
    ERR_clear_error();
    snprintf(err, errlen, "ocsp_response: %s is not an OCSP response (expected DER, as "
             "openssl ocsp -respout writes it)", path);
    return SL_ERROR;
  }
  int rc = SL_ERROR;
  OCSP_BASICRESP *bs = NULL;
  X509 *leaf = SSL_CTX_get0_certificate(ctx);
  X509 *issuer = leaf ? sl_ocsp_issuer(ctx, leaf) : NULL;
  int rs = OCSP_response_status(resp);
  ASN1_GENERALIZEDTIME *next = NULL;
  int status = -1;
  if (rs != OCSP_RESPONSE_STATUS_SUCCESSFUL) {
    snprintf(err, errlen, "ocsp_response: %s is an unsuccessful OCSP response (%s)", path,
             OCSP_response_status_str(rs));
  } else if ((bs = OCSP_response_get1_basic(resp)) == NULL) {
    snprintf(err, errlen, "ocsp_response: %s is not a basic OCSP response", path);
  } else if (issuer == NULL) {
    snprintf(err, errlen, "ocsp_response: the issuer of the certificate is not in %s (expected "
             "the certificate, then its chain with its issuer: the response names the "
             "certificate by its issuer)", cert_path);
  } else if ((status = sl_ocsp_find(bs, leaf, issuer, &next)) < 0) {
    snprintf(err, errlen, "ocsp_response: %s is not for the certificate %s (no status for it)",
             path, cert_path);
  } else {
    rc = SL_OK;
    struct tm tm;
    *until = next && ASN1_TIME_to_tm(next, &tm) == 1 ? timegm(&tm) : 0;
    if (status != V_OCSP_CERTSTATUS_GOOD)
      sl_log(SL_LOG_WARN, "ocsp_response: %s says the certificate %s is %s", path, cert_path,
             OCSP_cert_status_str(status));
    if (*until != 0 && time(NULL) >= *until)
      sl_log(SL_LOG_WARN, "ocsp_response: %s is past its nextUpdate: it is not stapled (fetch "
             "a newer one and reload)", path);
  }
  OCSP_BASICRESP_free(bs);
  OCSP_RESPONSE_free(resp);
  ERR_clear_error();
  return rc;
}

int sl_tls_ocsp_attach(SSL_CTX *ctx, const char *path, const char *cert_path, char *err,
                       size_t errlen) {
  size_t len = 0;
  unsigned char *der = sl_tls_read_file(path, SL_OCSP_MAX, &len);
  if (der == NULL) {
    snprintf(err, errlen, "ocsp_response: cannot read %s (%s)", path,
             errno == EFBIG ? "larger than 64 KiB" : strerror(errno));
    return SL_ERROR;
  }
  time_t until = 0;
  if (sl_ocsp_check(ctx, der, len, path, cert_path, &until, err, errlen) != SL_OK) {
    free(der);
    return SL_ERROR;
  }
  pthread_once(&sl_ocsp_once, sl_ocsp_init);
  sl_ocsp_staple *s = calloc(1, sizeof(*s));
  if (s == NULL || sl_ocsp_index < 0 || SSL_CTX_set_ex_data(ctx, sl_ocsp_index, s) != 1) {
    free(s);
    free(der);
    snprintf(err, errlen, "ocsp_response: out of memory");
    return SL_ERROR;
  }
  *s = (sl_ocsp_staple){.der = der, .len = len, .until = until};
  SSL_CTX_set_tlsext_status_cb(ctx, sl_ocsp_status);
  SSL_CTX_set_tlsext_status_arg(ctx, s);
  return SL_OK;
}
