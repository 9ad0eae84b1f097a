/*
 * Certificate revocation lists for a context that verifies its peers (a
 * listener's client certificates, an upstream's servers).
 */
#ifndef SL_TLS_CRL_H
#define SL_TLS_CRL_H

#include <stddef.h>

struct ssl_ctx_st;

/* Adds every CRL of the PEM file at path (one or more) to ctx's store of
 * trusted certificates and has ctx check the peer's certificate against
 * them (X509_V_FLAG_CRL_CHECK: the peer's own certificate, whose issuer
 * must have a CRL in the file; not the CAs above it). A CRL past its
 * nextUpdate is logged (warn): OpenSSL then refuses every certificate of
 * that issuer ("CRL has expired"). SL_OK, or SL_ERROR with "crl: ..." in
 * err (unreadable, or no CRL in it). */
int sl_tls_crl_load(struct ssl_ctx_st *ctx, const char *path, char *err, size_t errlen);

#endif
