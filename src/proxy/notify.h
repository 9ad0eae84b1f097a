/*
 * systemd's service notification protocol (sd_notify(3)), without
 * libsystemd: when sluice runs as a `Type=notify` (or `notify-reload`)
 * service, systemd passes a datagram socket in NOTIFY_SOCKET and learns
 * from it when sluice is ready (its listeners bound, its workers running),
 * when a reload starts and ends, and when it stops. Without NOTIFY_SOCKET
 * every call does nothing.
 */
#ifndef SL_NOTIFY_H
#define SL_NOTIFY_H

/* Reads NOTIFY_SOCKET (a path, or "@name" for the abstract namespace) and
 * removes it from the environment. Main thread, at start. */
void sl_notify_init(void);

/* Sends state lines ("READY=1\nSTATUS=..."), printf-style. A failure is
 * logged at debug level and otherwise ignored (systemd may be gone). */
void sl_notify(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload wants it. */
void sl_notify_reloading(void);

/* NOTIFY_SOCKET as sluice started with it, or NULL (none, or not usable):
 * a sluice started for a binary upgrade gets it (proxy/upgrade.h). */
const char *sl_notify_socket(void);

/* Closes the socket. */
void sl_notify_close(void);

#endif
