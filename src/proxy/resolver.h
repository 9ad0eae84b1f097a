/*
 * Upstream host names resolved again while sluice runs (resolve_interval_ms).
 *
 * One thread of its own calls the system's resolver (getaddrinfo, which
 * blocks for as long as DNS takes) for each host name the running
 * configuration's upstreams have, every resolve_interval_ms (the smallest of
 * the upstreams that name it), and keeps the latest answer of each. When an
 * answer differs from the one before, or is a name's first, it sends a
 * signal to the main thread, which builds a configuration with the new
 * servers from the kept answers (sl_config_derive, no resolving there) and
 * switches new connections to it if any server changed. A name that stops
 * resolving keeps its last answer (a warning is logged once).
 *
 * Threads: sl_resolver_watch and sl_resolver_lookup are the main thread's;
 * the answers are under a mutex.
 */
#ifndef SL_RESOLVER_H
#define SL_RESOLVER_H

#include <lua.h>
#include <pthread.h>
#include <signal.h>

/* The signal the resolver sends the main thread (blocked there, taken
 * with sigwait). */
#define SL_SIG_RESOLVED SIGRTMIN

struct sl_config;
typedef struct sl_resolver sl_resolver;

/* A resolver that signals `thread` with signo (pthread_kill) when answers
 * change. Its thread starts with the first name to watch. NULL on ENOMEM. */
sl_resolver *sl_resolver_create(pthread_t thread, int signo);

/* Watches the host names of cfg's upstreams whose resolve_interval_ms is
 * not 0, instead of those watched before: each name's answer becomes the
 * addresses cfg has for it (cfg was just loaded: resolved), a name kept
 * keeps its schedule, a new one is resolved at once, and a resolution
 * under way for the list before is dropped. SL_OK, or SL_ERROR when the thread cannot start or memory is
 * short (logged; names are then not resolved again). */
int sl_resolver_watch(sl_resolver *r, const struct sl_config *cfg);

/* A resolve function for sl_config_derive (its upvalue: the sl_resolver):
 * the kept answer of a watched name, { { host, family }, ... }, or nil and
 * why when there is none. */
int sl_resolver_lookup(lua_State *L);

/* Asks the thread to stop (no more resolutions or signals), without
 * waiting for it. NULL is fine. */
void sl_resolver_stop(sl_resolver *r);

/* Stops the thread and frees r: SL_OK (NULL is fine). SL_ERROR when the
 * thread is still waiting for the system's resolver after a second: it is
 * left to end with the process, and r with it. */
int sl_resolver_destroy(sl_resolver *r);

#endif
