/*
 * Binary upgrades without a gap (SIGUSR2), as nginx and HAProxy do them:
 * the running sluice starts a new one from the same executable path and
 * command line, which inherits every listening socket (the listeners' and
 * the admin endpoint's) instead of binding its own. The sockets are the
 * same ones, so their accept queues are shared: while both run, either
 * accepts, and nothing queued is lost when the old one closes its copies.
 *
 * The new sluice reads the configuration file as any start does. Once its
 * workers run, it sends SIGTERM to the old one, which drains as on any
 * SIGTERM. A new sluice that cannot start (a bad configuration, a port it
 * cannot bind, another number of workers) exits, and the old one, which
 * waits for it (SIGCHLD), logs its status and goes on serving.
 *
 * Between the two, in the environment: SLUICE_LISTEN_FDS, the inherited
 * descriptors ("5,6,9"), SLUICE_LISTEN_SHARED, those of them that are
 * systemd's (a listener's: one socket for every worker, below; or the admin
 * endpoint's), and SLUICE_UPGRADE_FROM, the
 * old one's pid. A socket is matched to a listener by the address it is
 * bound to.
 *
 * The sockets systemd passes (socket activation, proxy/activation.h) are
 * taken the same way, matched by address: one socket per address, which
 * every worker of its listener accepts on (their descriptors are
 * duplicates of it), instead of one SO_REUSEPORT socket per worker. Its
 * accept queue is systemd's: connections wait in it while sluice starts,
 * restarts or upgrades.
 */
#ifndef SL_UPGRADE_H
#define SL_UPGRADE_H

#include <stddef.h>
#include <sys/types.h>

#include "io/addr.h"

/* Main thread, first of all: before the configuration's Lua runs, which
 * may start processes (os.execute, io.popen) that would otherwise hold the
 * listening sockets as long as they live, marks close on exec the
 * descriptors the environment passes, as sd_listen_fds(3) does at once:
 * systemd's (LISTEN_FDS, when LISTEN_PID is this process) and the sockets
 * of SLUICE_LISTEN_FDS. Nothing else: sl_upgrade_init checks and takes
 * them. */
void sl_upgrade_cloexec(void);

/* Main thread, before any other thread: keeps argv (borrowed for the whole
 * run: the command line a new sluice gets) and the executable's path, and
 * takes the inherited sockets out of the environment (SLUICE_LISTEN_FDS,
 * and systemd's LISTEN_FDS when LISTEN_PID is this process; every one of
 * these variables is removed, so that no child sees them). A descriptor
 * of SLUICE_LISTEN_FDS that is not a bound TCP socket is left alone, with
 * a warning. Returns SL_OK, or SL_ERROR with a message in err when the
 * LISTEN_ variables are malformed or a descriptor of LISTEN_FDS is not a
 * listening TCP socket (IPv4 or IPv6). */
int sl_upgrade_init(int argc, char **argv, char *err, size_t errlen);

/* The inherited sockets bound to addr: n descriptors go into fds (they are
 * the caller's now), listening again with backlog. One per worker from a
 * sluice that ran n workers; or, for a socket of systemd's (*shared set
 * to 1; else 0; shared may be NULL), that socket in fds[0] and duplicates
 * of it in the others. Returns n; 0 when none is bound to addr (fds
 * untouched); -1 with a message in err when some are but not n (the old
 * sluice ran another number of workers), or listen(2) or dup fails. */
int sl_upgrade_take(const sl_addr *addr, int *fds, int n, int backlog, int *shared, char *err,
                    size_t errlen);

/* When bind(2) on addr failed with EADDRINUSE: if a socket of systemd's
 * that nothing took holds addr's port on addr's host (the same port, and
 * the same host or a wildcard one, [::] taking IPv4 too), a note for the
 * error message saying so, into out, starting with a space; else "".
 * Returns out. */
char *sl_upgrade_explain_in_use(const sl_addr *addr, char *out, size_t outlen);

/* Closes the inherited sockets nothing took (addresses the new
 * configuration does not listen on), with a warning for each of
 * systemd's. Returns how many. */
int sl_upgrade_close_rest(void);

/* The pid of the sluice this one replaces, when it started this one for
 * an upgrade and is still its parent; else 0. */
pid_t sl_upgrade_predecessor(void);

/* Starts a new sluice from the executable's path with the same command
 * line and environment, which inherits fds[0..nfds) (borrowed: they stay
 * open here) as its listening sockets (shared[i] set: fds[i] is a socket
 * for every worker, systemd's; shared may be NULL), stderr_fd as its
 * standard error, and NOTIFY_SOCKET=notify_socket when that is not NULL.
 * Returns its pid, or -1 with a message in err. */
pid_t sl_upgrade_spawn(const int *fds, const int *shared, int nfds, int stderr_fd,
                       const char *notify_socket, char *err, size_t errlen);

#endif
