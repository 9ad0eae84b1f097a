/*
 * What the parts of the TLS contexts (tls.c, tls_crl.c, tls_ocsp.c,
 * tls_tickets.c) share, and no other module uses.
 */
#ifndef SL_TLS_INTERNAL_H
#define SL_TLS_INTERNAL_H

#include <stddef.h>

/* "KEY: cannot read PATH (strerror)" in err when the file is not
 * readable, else "KEY: PATH is not WHAT (what OpenSSL said)". OpenSSL's
 * error queue is emptied. */
void sl_tls_file_error(char *err, size_t errlen, const char *key, const char *path,
                       const char *what);

/* The whole of the file at path, at most max bytes, in a buffer the caller
 * frees (*len its size). NULL with errno (EFBIG: larger than max). */
unsigned char *sl_tls_read_file(const char *path, size_t max, size_t *len);

#endif
