/*
 * OCSP stapling: a server context hands clients that ask for it
 * (status_request) an OCSP response read from a file (DER, as `openssl
 * ocsp -respout` writes it, HAProxy's .ocsp file), the same bytes to
 * every client, until the response's nextUpdate.
 */
#ifndef SL_TLS_OCSP_H
#define SL_TLS_OCSP_H

#include <stddef.h>

struct ssl_ctx_st;

/* Reads the OCSP response at path for the certificate of ctx (loaded
 * already, from cert_path with its chain) and staples it on ctx's
 * handshakes. The response must parse, be successful and hold a status
 * for that certificate, whose issuer must be in the chain of cert_path
 * (its identity is the issuer's name and key). A status other than good,
 * or a nextUpdate already past, is logged (warn); past its nextUpdate a
 * response is not stapled any more. SL_OK, or SL_ERROR with
 * "ocsp_response: ..." in err. The response goes with ctx's last
 * reference. */
int sl_tls_ocsp_attach(struct ssl_ctx_st *ctx, const char *path, const char *cert_path,
                       char *err, size_t errlen);

#endif
