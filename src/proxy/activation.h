/*
 * systemd's socket activation (sd_listen_fds(3)), without libsystemd: the
 * service manager (systemd with a .socket unit, or systemd-socket-activate)
 * opens the listening sockets itself and starts sluice with them as
 * descriptors 3, 4, ... and, in the environment:
 *
 *   LISTEN_FDS      how many (descriptors 3 to 3 + LISTEN_FDS - 1)
 *   LISTEN_PID      the process they are for: another one's (a process that
 *                   passed its environment on) are not sluice's to take
 *   LISTEN_FDNAMES  their names, separated by colons (FileDescriptorName=),
 *                   for the log; optional
 *
 * This file reads the variables; proxy/upgrade.c adopts the sockets as it
 * adopts those of a binary upgrade, and matches each to a listener (or the
 * admin endpoint) by the address it is bound to.
 */
#ifndef SL_ACTIVATION_H
#define SL_ACTIVATION_H

#include <stddef.h>
#include <sys/types.h>

#define SL_ACTIVATION_FDS_START 3   /* SD_LISTEN_FDS_START */

/* The number of sockets the variables' values (NULL: unset) pass to the
 * process self, into *n: 0 when LISTEN_FDS is unset or empty, or when
 * LISTEN_PID is unset or another process's. SL_OK; SL_ERROR with a
 * message in err when, for self, LISTEN_FDS is not a count of descriptors,
 * or LISTEN_FDNAMES does not have one name for each; or when LISTEN_PID is
 * not a process id. */
int sl_activation_parse(const char *listen_pid, const char *listen_fds, const char *fdnames,
                        pid_t self, int *n, char *err, size_t errlen);

/* The name of socket i (from 0) in fdnames (LISTEN_FDNAMES; NULL: none)
 * into out: "" when it has none. Returns out. */
char *sl_activation_name(const char *fdnames, int i, char *out, size_t outlen);

#endif
