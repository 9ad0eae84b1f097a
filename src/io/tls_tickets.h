/*
 * Session ticket keys read from files, in nginx's ssl_session_ticket_key
 * format, so that tickets outlive the process (a binary upgrade, a
 * restart) and several sluice (or nginx) instances share them:
 *
 *   80 bytes: a name (16), an HMAC-SHA256 key (32), an AES-256-CBC key (32)
 *   48 bytes: a name (16), an AES-128-CBC key (16), an HMAC-SHA256 key (16)
 *
 * The first file's key encrypts the tickets a context issues; each of them
 * decrypts the tickets that carry its name. A ticket a later key decrypts
 * is renewed (the client gets one under the first key).
 */
#ifndef SL_TLS_TICKETS_H
#define SL_TLS_TICKETS_H

#include <stddef.h>

struct ssl_ctx_st;

/* Reads the n key files (paths) and has ctx encrypt and decrypt its
 * tickets with them. SL_OK, or SL_ERROR with "ticket_keys[i]: ..." in err
 * (unreadable, or neither 80 nor 48 bytes). The keys go with ctx's last
 * reference (wiped). */
int sl_tls_tickets_attach(struct ssl_ctx_st *ctx, const char *const *paths, size_t n,
                          char *err, size_t errlen);

#endif
