#include "io/tls_tickets.h"

#include <errno.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "io/tls_internal.h"
#include "util/common.h"

/* One key: its name (in every ticket it encrypts) and secrets. */
typedef struct sl_ticket_key {
  unsigned char name[16];
  unsigned char hmac[32];
  unsigned char aes[32];
  size_t hmac_len;            /* 32 (an 80-byte file) or 16 (48) */
  const EVP_CIPHER *cipher;   /* AES-256-CBC or AES-128-CBC */
} sl_ticket_key;

typedef struct sl_ticket_keys {
  size_t n;
  sl_ticket_key keys[];       /* keys[0] encrypts */
} sl_ticket_keys;

static int sl_tickets_index = -1;
static pthread_once_t sl_tickets_once = PTHREAD_ONCE_INIT;

static void sl_tickets_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                            void *argp) {
  SL_UNUSED(parent);
  SL_UNUSED(ad);
  SL_UNUSED(idx);
  SL_UNUSED(argl);
  SL_UNUSED(argp);
  sl_ticket_keys *k = ptr;
  if (k == NULL) return;
  OPENSSL_cleanse(k->keys, k->n * sizeof(k->keys[0]));
  free(k);
}

static void sl_tickets_init(void) {
  sl_tickets_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, sl_tickets_free);
}

static int sl_tickets_hmac(EVP_MAC_CTX *hctx, const sl_ticket_key *k) {
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY, (void *)k->hmac, k->hmac_len),
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
      OSSL_PARAM_construct_end(),
  };
  return EVP_MAC_CTX_set_params(hctx, params) == 1;
}

/* OpenSSL's ticket callback: enc 1, a new ticket under keys[0] (1);
 * enc 0, the key the ticket names: 1 (keys[0]), 2 (a later one: the
 * ticket is renewed), 0 (none: a full handshake), -1 on an error. */
static int sl_tickets_cb(SSL *ssl, unsigned char name[16], unsigned char *iv,
                         EVP_CIPHER_CTX *cctx, EVP_MAC_CTX *hctx, int enc) {
  const sl_ticket_keys *t = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), sl_tickets_index);
  if (t == NULL || t->n == 0) return enc ? -1 : 0;
  if (enc) {
    const sl_ticket_key *k = &t->keys[0];
    int ivlen = EVP_CIPHER_get_iv_length(k->cipher);
    memcpy(name, k->name, sizeof(k->name));
    if (RAND_bytes(iv, ivlen) != 1 || EVP_EncryptInit_ex(cctx, k->cipher, NULL, k->aes, iv) != 1 ||
        !sl_tickets_hmac(hctx, k))
      return -1;
    return 1;
  }
  for (size_t i = 0; i < t->n; i++) {
    const sl_ticket_key *k = &t->keys[i];
    if (memcmp(name, k->name, sizeof(k->name)) != 0) continue;
    if (EVP_DecryptInit_ex(cctx, k->cipher, NULL, k->aes, iv) != 1 || !sl_tickets_hmac(hctx, k))
      return -1;
    return i == 0 ? 1 : 2;
  }
  return 0;
}

/* Key i from the file at path. */
static int sl_tickets_read(sl_ticket_key *k, const char *path, size_t i, char *err,
                           size_t errlen) {
  size_t len = 0;
  unsigned char *b = sl_tls_read_file(path, 4096, &len);
  if (b == NULL) {
    snprintf(err, errlen, "ticket_keys[%zu]: cannot read %s (%s)", i + 1, path,
             errno == EFBIG ? "larger than 4 KiB, expected 80 or 48 bytes" : strerror(errno));
    return SL_ERROR;
  }
  int rc = SL_OK;
  memcpy(k->name, b, len >= 16 ? 16 : 0);
  if (len == 80) {   /* name, HMAC key, AES key: as nginx reads it */
    memcpy(k->hmac, b + 16, 32);
    memcpy(k->aes, b + 48, 32);
    k->hmac_len = 32;
    k->cipher = EVP_aes_256_cbc();
  } else if (len == 48) {   /* name, AES key, HMAC key: as nginx reads it */
    memcpy(k->aes, b + 16, 16);
    memcpy(k->hmac, b + 32, 16);
    k->hmac_len = 16;
    k->cipher = EVP_aes_128_cbc();
  } else {
    snprintf(err, errlen, "ticket_keys[%zu]: %s is %zu bytes (expected 80: a name, an HMAC key "
             "and an AES-256 key, as openssl rand 80 writes them; or 48, as nginx takes)",
             i + 1, path, len);
    rc = SL_ERROR;
  }
  OPENSSL_cleanse(b, len);
  free(b);
  return rc;
}

int sl_tls_tickets_attach(SSL_CTX *ctx, const char *const *paths, size_t n, char *err,
                          size_t errlen) {
  pthread_once(&sl_tickets_once, sl_tickets_init);
  sl_ticket_keys *t = calloc(1, sizeof(*t) + n * sizeof(t->keys[0]));
  if (t == NULL) {
    snprintf(err, errlen, "ticket_keys: out of memory");
    return SL_ERROR;
  }
  t->n = n;
  for (size_t i = 0; i < n; i++) {
    if (sl_tickets_read(&t->keys[i], paths[i], i, err, errlen) != SL_OK) {
      sl_tickets_free(NULL, t, NULL, 0, 0, NULL);
      return SL_ERROR;
    }
  }
  /* (the callback first: once ctx holds t, t goes with ctx) */
  if (sl_tickets_index < 0 || SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, sl_tickets_cb) != 1 ||
      SSL_CTX_set_ex_data(ctx, sl_tickets_index, t) != 1) {
    sl_tickets_free(NULL, t, NULL, 0, 0, NULL);
    snprintf(err, errlen, "ticket_keys: out of memory");
    return SL_ERROR;
  }
  return SL_OK;
}
