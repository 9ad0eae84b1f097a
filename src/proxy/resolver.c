#include "proxy/resolver.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <errno.h>
#include <lauxlib.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "io/addr.h"
#include "io/dns.h"
#include "proxy/config.h"
#include "util/common.h"
#include "util/log.h"

/* One watched host name and its latest answer. */
typedef struct sl_resolved {
  char *host;
  int interval_ms;             /* the smallest of the upstreams naming it */
  double due;                  /* monotonic seconds of its next resolution */
  int have;                    /* 1 once an answer is kept */
  int failing;                 /* 1 while its resolutions fail (warned once) */
  int n;
  char text[SL_ADDR_RESOLVE_MAX][46];
  int family[SL_ADDR_RESOLVE_MAX];
} sl_resolved;

/* A cached answer for lookups. */
typedef struct sl_cached {
  char host[256];
  double expires;              /* monotonic seconds; 0: a free slot */
  unsigned next;               /* the address the next connect takes */
  int n;
  char text[SL_ADDR_RESOLVE_MAX][46];
  int family[SL_ADDR_RESOLVE_MAX];
} sl_cached;

#define SL_RESOLVER_CACHE 256   /* names whose answers are kept */
#define SL_RESOLVER_BURST 16    /* lookups answered in a row while periodic names are due */
#define SL_RESOLVER_THREADS 4   /* lookups of different names in flight at once: the
                                   resolver's thread and up to 3 more, started when
                                   a lookup finds every thread busy */

struct sl_resolver {
  pthread_mutex_t mu;
  pthread_cond_t cv;           /* watch list changed, a lookup queued, or stop */
  pthread_t thread;
  int started, stop;
  pthread_t lookers[SL_RESOLVER_THREADS - 1];   /* threads that only answer lookups */
  int nlookers;
  int idle;                    /* threads waiting for work (under mu) */
  char inflight[SL_RESOLVER_THREADS][256];      /* the name each thread looks up now, or "" */
  pthread_t notify;
  int signo;
  sl_resolved *names;          /* under mu */
  size_t nnames;
  unsigned gen;                /* bumped by each sl_resolver_watch (under mu) */
  sl_lookup *lookups;          /* under mu: queued, oldest first */
  sl_lookup **lookups_tail;
  unsigned nlookups;
  int cache_ms;                /* resolve_cache_ms (under mu) */
  sl_dns dns;                  /* the configuration's resolver (under mu; copied out
                                  for each lookup) */
  unsigned turn;               /* the next address a lookup's connect takes, modulo its count */
  unsigned served;             /* lookups answered since the last periodic step */
  sl_cached *cache;            /* SL_RESOLVER_CACHE slots, made at the first answer */
};

static sl_resolver *_Atomic sl_resolver_the;

sl_resolver *sl_resolver_shared(void) { return atomic_load(&sl_resolver_the); }

void sl_resolver_share(sl_resolver *r) { atomic_store(&sl_resolver_the, r); }

static double sl_resolver_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static sl_resolved *sl_resolver_find(sl_resolver *r, const char *host) {
  for (size_t i = 0; i < r->nnames; i++)
    if (strcmp(r->names[i].host, host) == 0) return &r->names[i];
  return NULL;
}

static sl_lookup *sl_resolver_next(sl_resolver *r);

/* Resolves the names that are due, the lock released around each call.
 * Returns 1 when an answer changed (or came first). Called with r->mu. */
static int sl_resolver_round(sl_resolver *r) {
  int changed = 0;
  for (;;) {
    double now = sl_resolver_now();
    sl_resolved *due = NULL;
    for (size_t i = 0; i < r->nnames && due == NULL; i++)
      if (r->names[i].due <= now) due = &r->names[i];
    if (due == NULL || r->stop) return changed;
    char *host = strdup(due->host);
    if (host == NULL) {   /* tried again at its next time */
      due->due = now + due->interval_ms / 1000.0;
      continue;
    }
    unsigned gen = r->gen;
    sl_dns dns = r->dns;
    pthread_mutex_unlock(&r->mu);
    char text[SL_ADDR_RESOLVE_MAX][46];
    int family[SL_ADDR_RESOLVE_MAX], n = 0, ttl_ms;
    const char *why = NULL;
    int rc = sl_dns_resolve(&dns, host, text, family, &n, &ttl_ms, &why);
    pthread_mutex_lock(&r->mu);
    /* A list replaced meanwhile (a reload) has answers as fresh as this one. */
    sl_resolved *e = r->gen == gen && !r->stop ? sl_resolver_find(r, host) : NULL;
    if (e != NULL) {
      /* Again at the interval, or when the answer's TTL runs out first. */
      int wait_ms = rc == SL_OK && ttl_ms >= 0 && ttl_ms < e->interval_ms ? ttl_ms
                                                                          : e->interval_ms;
      e->due = sl_resolver_now() + wait_ms / 1000.0;
      if (rc != SL_OK) {
        if (!e->failing)
          sl_log(SL_LOG_WARN, "upstream host %s: cannot resolve it again: %s; its servers keep "
                 "the addresses they have", host, why);
        e->failing = 1;
      } else {
        if (e->failing) sl_log(SL_LOG_INFO, "upstream host %s: resolves again", host);
        e->failing = 0;
        int same = e->have && e->n == n;
        for (int i = 0; same && i < n; i++)
          same = e->family[i] == family[i] && strcmp(e->text[i], text[i]) == 0;
        if (!same) {
          memcpy(e->text, text, sizeof(text[0]) * (size_t)n);
          memcpy(e->family, family, sizeof(family[0]) * (size_t)n);
          e->n = n;
          e->have = 1;
          changed = 1;
        }
      }
    }
    free(host);
    if (sl_resolver_next(r) != NULL) return changed;   /* one name, then the lookups waiting */
  }
}

/* Keeps an answer for host for resolve_cache_ms, or its TTL when that is
 * shorter (ttl_ms -1: none known) (called with mu). */
static void sl_resolver_keep(sl_resolver *r, const char *host, const sl_lookup *a, int ttl_ms,
                             double now) {
  if (r->cache_ms <= 0) return;
  int keep_ms = ttl_ms >= 0 && ttl_ms < r->cache_ms ? ttl_ms : r->cache_ms;
  if (r->cache == NULL && (r->cache = calloc(SL_RESOLVER_CACHE, sizeof(*r->cache))) == NULL) return;
  sl_cached *slot = &r->cache[0];
  for (int i = 0; i < SL_RESOLVER_CACHE; i++) {   /* its own, else the one expiring first */
    sl_cached *c = &r->cache[i];
    if (c->expires > 0 && strcmp(c->host, host) == 0) {
      slot = c;
      break;
    }
    if (c->expires < slot->expires) slot = c;
  }
  snprintf(slot->host, sizeof(slot->host), "%s", host);
  slot->expires = now + keep_ms / 1000.0;
  slot->next = r->turn;   /* the turn goes on from the lookups answered now */
  slot->n = a->n;
  memcpy(slot->text, a->text, sizeof(a->text[0]) * (size_t)a->n);
  memcpy(slot->family, a->family, sizeof(a->family[0]) * (size_t)a->n);
}

/* The oldest queued lookup of a name no thread is looking up now, or NULL
 * (called with mu). */
static sl_lookup *sl_resolver_next(sl_resolver *r) {
  for (sl_lookup *l = r->lookups; l != NULL; l = l->next) {
    int taken = 0;
    for (int t = 0; t < SL_RESOLVER_THREADS && !taken; t++)
      taken = strcmp(r->inflight[t], l->host) == 0;
    if (!taken) return l;
  }
  return NULL;
}

/* Thread `slot` answers the oldest lookup of a name no other thread looks
 * up now, and every lookup of that name queued until the answer came, the
 * lock released around the resolver's call (called with mu). Returns 0
 * when there was none. */
static int sl_resolver_serve(sl_resolver *r, int slot) {
  sl_lookup *first = sl_resolver_next(r);
  if (first == NULL) return 0;
  char *host = r->inflight[slot];
  snprintf(host, sizeof(r->inflight[slot]), "%s", first->host);
  sl_dns dns = r->dns;
  pthread_mutex_unlock(&r->mu);
  sl_lookup a;
  a.why = NULL;
  int ttl_ms;
  a.rc = sl_dns_resolve(&dns, host, a.text, a.family, &a.n, &ttl_ms, &a.why);
  pthread_mutex_lock(&r->mu);
  if (r->stop) {   /* sl_resolver_destroy ends the queue */
    host[0] = '\0';
    return 1;
  }
  for (sl_lookup **pp = &r->lookups; *pp != NULL;) {
    sl_lookup *l = *pp;
    if (strcmp(l->host, host) != 0) {
      pp = &l->next;
      continue;
    }
    *pp = l->next;
    if (*pp == NULL) r->lookups_tail = pp;
    r->nlookups--;
    l->rc = a.rc;
    l->why = a.why;
    l->n = a.rc == SL_OK ? a.n : 0;
    l->pick = l->n > 0 ? (int)(r->turn++ % (unsigned)l->n) : 0;   /* in turn, cache or not */
    memcpy(l->text, a.text, sizeof(a.text[0]) * (size_t)l->n);
    memcpy(l->family, a.family, sizeof(a.family[0]) * (size_t)l->n);
    sl_worker_post(l->w, &l->msg);   /* mu held: destroy cannot pass meanwhile */
  }
  if (a.rc == SL_OK) sl_resolver_keep(r, host, &a, ttl_ms, sl_resolver_now());
  host[0] = '\0';
  return 1;
}

int sl_resolver_cached(sl_resolver *r, const char *host, char text[46], int *family) {
  int rc = SL_ERROR;
  pthread_mutex_lock(&r->mu);
  double now = r->cache ? sl_resolver_now() : 0;
  for (int i = 0; r->cache && i < SL_RESOLVER_CACHE; i++) {
    sl_cached *c = &r->cache[i];
    if (c->expires <= now || strcmp(c->host, host) != 0) continue;
    unsigned k = c->next++ % (unsigned)c->n;
    memcpy(text, c->text[k], 46);
    *family = c->family[k];
    rc = SL_OK;
    break;
  }
  pthread_mutex_unlock(&r->mu);
  return rc;
}

/* Starts the thread if it is not running (called with mu). */
static int sl_resolver_start_thread(sl_resolver *r);

/* Starts one more thread that answers lookups, while there are fewer than
 * SL_RESOLVER_THREADS in all (called with mu; a failure leaves the others
 * to it). */
static void sl_resolver_start_looker(sl_resolver *r);

int sl_resolver_start_lookup(sl_resolver *r, sl_lookup *l, const char **why) {
  pthread_mutex_lock(&r->mu);
  *why = r->stop ? "sluice is stopping"
         : r->nlookups >= SL_RESOLVER_MAX_LOOKUPS ? "too many host names being resolved"
         : sl_resolver_start_thread(r) != SL_OK ? "the resolver's thread cannot start"
         : NULL;
  if (*why != NULL) {
    pthread_mutex_unlock(&r->mu);
    return SL_ERROR;
  }
  l->next = NULL;
  *r->lookups_tail = l;
  r->lookups_tail = &l->next;
  r->nlookups++;
  /* Every thread busy (a DNS server that does not answer holds one for
   * its timeout): another one, up to SL_RESOLVER_THREADS. */
  if (r->idle == 0) sl_resolver_start_looker(r);
  pthread_cond_broadcast(&r->cv);
  pthread_mutex_unlock(&r->mu);
  return SL_OK;
}

static void *sl_resolver_main(void *arg) {
  sl_resolver *r = arg;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);
  pthread_mutex_lock(&r->mu);
  while (!r->stop) {
    /* Lookups first (a client waits on each), but a periodic name that is
     * due gets its turn after every SL_RESOLVER_BURST of them. */
    if (r->served < SL_RESOLVER_BURST && sl_resolver_serve(r, 0)) {
      r->served++;
      continue;
    }
    r->served = 0;
    if (sl_resolver_round(r) && !r->stop) {
      pthread_kill(r->notify, r->signo);   /* blocked there: pending until its sigwait */
      continue;
    }
    if (r->stop) break;
    double next = -1;
    for (size_t i = 0; i < r->nnames; i++)
      if (next < 0 || r->names[i].due < next) next = r->names[i].due;
    if (sl_resolver_next(r) != NULL) continue;   /* queued during the round */
    r->idle++;
    if (next < 0) {
      pthread_cond_wait(&r->cv, &r->mu);
    } else {
      struct timespec ts;
      ts.tv_sec = (time_t)next;
      ts.tv_nsec = (long)((next - (double)ts.tv_sec) * 1e9);
      pthread_cond_timedwait(&r->cv, &r->mu, &ts);
    }
    r->idle--;
  }
  pthread_mutex_unlock(&r->mu);
  return NULL;
}

typedef struct sl_looker_arg {
  sl_resolver *r;
  int slot;
} sl_looker_arg;

static void *sl_resolver_looker(void *arg) {
  sl_looker_arg a = *(sl_looker_arg *)arg;
  free(arg);
  sl_resolver *r = a.r;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);
  pthread_mutex_lock(&r->mu);
  while (!r->stop) {
    if (sl_resolver_serve(r, a.slot)) continue;
    r->idle++;
    pthread_cond_wait(&r->cv, &r->mu);
    r->idle--;
  }
  pthread_mutex_unlock(&r->mu);
  return NULL;
}

static void sl_resolver_start_looker(sl_resolver *r) {
  if (r->nlookers >= SL_RESOLVER_THREADS - 1) return;
  sl_looker_arg *a = malloc(sizeof(*a));
  if (a == NULL) return;
  a->r = r;
  a->slot = r->nlookers + 1;
  int e = pthread_create(&r->lookers[r->nlookers], NULL, sl_resolver_looker, a);
  if (e != 0) {
    free(a);
    sl_log(SL_LOG_WARN, "cannot start another thread for host name lookups: %s", strerror(e));
    return;
  }
  r->nlookers++;
}

sl_resolver *sl_resolver_create(pthread_t thread, int signo) {
  sl_resolver *r = calloc(1, sizeof(*r));
  if (r == NULL) return NULL;
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_mutex_init(&r->mu, NULL);
  pthread_cond_init(&r->cv, &ca);
  pthread_condattr_destroy(&ca);
  r->notify = thread;
  r->signo = signo;
  r->lookups_tail = &r->lookups;
  return r;
}

/* Adds host to list (n entries) with interval, or lowers the interval of
 * the entry it has. SL_ERROR on ENOMEM. */
static int sl_resolver_add(sl_resolved **list, size_t *n, const char *host, int interval) {
  for (size_t i = 0; i < *n; i++) {
    if (strcmp((*list)[i].host, host) == 0) {
      if (interval < (*list)[i].interval_ms) (*list)[i].interval_ms = interval;
      return SL_OK;
    }
  }
  sl_resolved *grown = realloc(*list, (*n + 1) * sizeof(**list));
  if (grown == NULL) return SL_ERROR;
  *list = grown;
  sl_resolved *e = &grown[*n];
  memset(e, 0, sizeof(*e));
  e->host = strdup(host);
  if (e->host == NULL) return SL_ERROR;
  e->interval_ms = interval;
  (*n)++;
  return SL_OK;
}

/* e's answer from the servers cfg has for its host name (those an entry
 * "host:port" gave). */
static void sl_resolver_seed(sl_resolved *e, const sl_config *cfg) {
  size_t hl = strlen(e->host);
  for (size_t i = 0; i < cfg->nupstreams; i++) {
    const sl_upstream_cfg *u = &cfg->upstreams[i];
    for (size_t j = 0; j < u->nservers && e->n < SL_ADDR_RESOLVE_MAX; j++) {
      const char *name = u->server_name[j];
      if (name == NULL || strncmp(name, e->host, hl) != 0 || name[hl] != ':') continue;
      const struct sockaddr *sa = (const struct sockaddr *)&u->servers[j].ss;
      const void *bytes =
          sa->sa_family == AF_INET6
              ? (const void *)&((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr
              : (const void *)&((const struct sockaddr_in *)(const void *)sa)->sin_addr;
      char text[46];
      if (inet_ntop(sa->sa_family, bytes, text, sizeof(text)) == NULL) continue;
      int dup = 0;
      for (int k = 0; k < e->n && !dup; k++) dup = strcmp(e->text[k], text) == 0;
      if (dup) continue;
      memcpy(e->text[e->n], text, sizeof(text));
      e->family[e->n++] = sa->sa_family;
    }
  }
  e->have = e->n > 0;
}

static void sl_resolver_free_list(sl_resolved *list, size_t n) {
  for (size_t i = 0; i < n; i++) free(list[i].host);
  free(list);
}

int sl_resolver_watch(sl_resolver *r, const sl_config *cfg) {
  sl_resolved *list = NULL;
  size_t n = 0;
  for (size_t i = 0; i < cfg->nupstreams; i++) {
    const sl_upstream_cfg *u = &cfg->upstreams[i];
    for (size_t j = 0; u->resolve_interval_ms > 0 && j < u->nhosts; j++) {
      if (sl_resolver_add(&list, &n, u->hosts[j], u->resolve_interval_ms) != SL_OK) {
        sl_resolver_free_list(list, n);
        sl_log(SL_LOG_ERROR, "upstream host names: out of memory; they are not resolved again");
        return SL_ERROR;
      }
    }
  }
  pthread_mutex_lock(&r->mu);
  double now = sl_resolver_now();
  for (size_t i = 0; i < n; i++) {
    sl_resolved *old = sl_resolver_find(r, list[i].host);
    char *host = list[i].host;
    int interval = list[i].interval_ms;
    /* Its answer: the addresses cfg has for it, resolved when cfg was
     * loaded. A new name is resolved again at once (its answer may have
     * changed since), one kept at its time. */
    sl_resolver_seed(&list[i], cfg);
    list[i].due = now;
    if (old != NULL) {
      list[i].due = old->due;
      if (interval < old->interval_ms) list[i].due -= (old->interval_ms - interval) / 1000.0;
      list[i].failing = old->failing;
    }
    list[i].host = host;
    list[i].interval_ms = interval;
  }
  sl_resolver_free_list(r->names, r->nnames);
  r->names = list;
  r->nnames = n;
  r->gen++;
  r->cache_ms = cfg->resolve_cache_ms;
  r->dns = sl_config_owner(cfg)->dns;
  if (r->cache) memset(r->cache, 0, SL_RESOLVER_CACHE * sizeof(*r->cache));   /* asked anew */
  int rc = n > 0 ? sl_resolver_start_thread(r) : SL_OK;
  pthread_cond_signal(&r->cv);
  pthread_mutex_unlock(&r->mu);
  return rc;
}

static int sl_resolver_start_thread(sl_resolver *r) {
  if (r->started) return SL_OK;
  int e = pthread_create(&r->thread, NULL, sl_resolver_main, r);
  if (e != 0) {
    sl_log(SL_LOG_ERROR, "cannot start the resolver's thread: %s; host names are not resolved "
           "again, and ctx:connect cannot take them", strerror(e));
    return SL_ERROR;
  }
  r->started = 1;
  return SL_OK;
}

int sl_resolver_lookup(lua_State *L) {
  sl_resolver *r = lua_touserdata(L, lua_upvalueindex(1));
  const char *host = luaL_checkstring(L, 1);
  pthread_mutex_lock(&r->mu);
  sl_resolved *e = sl_resolver_find(r, host);
  if (e == NULL || !e->have) {
    pthread_mutex_unlock(&r->mu);
    lua_pushnil(L);
    lua_pushstring(L, "not resolved yet");
    return 2;
  }
  int n = e->n;
  char text[SL_ADDR_RESOLVE_MAX][46];
  int family[SL_ADDR_RESOLVE_MAX];
  memcpy(text, e->text, sizeof(text[0]) * (size_t)n);
  memcpy(family, e->family, sizeof(family[0]) * (size_t)n);
  pthread_mutex_unlock(&r->mu);
  sl_config_push_addresses(L, text, family, n);
  return 1;
}

void sl_resolver_stop(sl_resolver *r) {
  if (r == NULL) return;
  pthread_mutex_lock(&r->mu);
  r->stop = 1;
  pthread_cond_broadcast(&r->cv);
  pthread_mutex_unlock(&r->mu);
}

int sl_resolver_destroy(sl_resolver *r) {
  if (r == NULL) return SL_OK;
  if (sl_resolver_shared() == r) sl_resolver_share(NULL);
  sl_resolver_stop(r);
  /* The workers are gone: what they queued ends here, under the lock the
   * thread takes before it posts anything. */
  pthread_mutex_lock(&r->mu);
  sl_lookup *l = r->lookups;
  r->lookups = NULL;
  r->lookups_tail = &r->lookups;
  r->nlookups = 0;
  pthread_mutex_unlock(&r->mu);
  while (l != NULL) {
    sl_lookup *next = l->next;
    l->msg.fn(NULL, &l->msg);
    l = next;
  }
  /* One second for all of them; a thread still in the system's resolver
   * keeps r (it ends with the process). Joined ones are not joined again
   * (nlookers counts down). */
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += 1;
  if (r->started) {
    if (pthread_timedjoin_np(r->thread, NULL, &until) != 0) return SL_ERROR;
    r->started = 0;
  }
  while (r->nlookers > 0) {
    if (pthread_timedjoin_np(r->lookers[r->nlookers - 1], NULL, &until) != 0) return SL_ERROR;
    r->nlookers--;
  }
  sl_resolver_free_list(r->names, r->nnames);
  free(r->cache);
  pthread_cond_destroy(&r->cv);
  pthread_mutex_destroy(&r->mu);
  free(r);
  return SL_OK;
}
