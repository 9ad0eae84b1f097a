/*
 * The running process, seen from the main thread: it opens the logs and
 * the listening sockets, starts one thread per worker once everything is
 * in place, and turns signals into work for the workers:
 *
 *   SIGTERM, SIGINT  stop accepting, drain for drain_timeout_ms, close the
 *                    rest ("shutdown"), check the pools, exit 0 (a second
 *                    signal closes everything at once)
 *   SIGHUP           reload the configuration file (refused with a logged
 *                    error when it is invalid), and reopen the log files
 *   SIGUSR1          reopen the log files (rotation)
 *
 * Workers never see a signal: they hear from this thread through ev_async.
 */
#ifndef SL_RUNTIME_H
#define SL_RUNTIME_H

struct sl_config;

/* Runs the proxy described by cfg until it is stopped. Takes ownership of
 * cfg. Returns the exit code: 0 after a stop, 1 when start-up failed. */
int sl_runtime_run(struct sl_config *cfg);

#endif
