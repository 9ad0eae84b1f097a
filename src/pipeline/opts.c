#include "pipeline/opts.h"

#include <lauxlib.h>
#include <lua.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/common.h"

sl_opts *sl_opts_new(void) { return calloc(1, sizeof(sl_opts)); }

static void sl_opt_clear(sl_opt *v) {
  free(v->str.s);
  for (size_t i = 0; i < v->nlist; i++) free(v->list[i].s);
  free(v->list);
  v->str.s = NULL;
  v->list = NULL;
  v->nlist = 0;
}

void sl_opts_free(sl_opts *o) {
  if (o == NULL) return;
  for (size_t i = 0; i < o->n; i++) {
    sl_opt_clear(&o->v[i]);
    free(o->v[i].key);
  }
  free(o->v);
  free(o);
}

const sl_opt *sl_opts_get(const sl_opts *o, const char *key) {
  for (size_t i = 0; o != NULL && i < o->n; i++)
    if (strcmp(o->v[i].key, key) == 0) return &o->v[i];
  return NULL;
}

/* The slot for key, emptied and typed; NULL on ENOMEM. */
static sl_opt *sl_opts_slot(sl_opts *o, const char *key, sl_opt_type type) {
  sl_opt *v = (sl_opt *)(uintptr_t)sl_opts_get(o, key);
  if (v != NULL) {
    sl_opt_clear(v);
  } else {
    if (o->n == o->cap) {
      size_t cap = o->cap ? o->cap * 2 : 8;
      sl_opt *nv = realloc(o->v, cap * sizeof(*nv));
      if (nv == NULL) return NULL;
      o->v = nv;
      o->cap = cap;
    }
    char *k = strdup(key);
    if (k == NULL) return NULL;
    v = &o->v[o->n++];
    memset(v, 0, sizeof(*v));
    v->key = k;
  }
  v->type = type;
  return v;
}

static int sl_opt_str_set(sl_opt_str *d, const char *s, size_t len) {
  d->s = malloc(len + 1);
  if (d->s == NULL) return SL_ERROR;
  if (len > 0) memcpy(d->s, s, len);
  d->s[len] = '\0';
  d->len = len;
  return SL_OK;
}

int sl_opts_add_number(sl_opts *o, const char *key, double x) {
  sl_opt *v = sl_opts_slot(o, key, SL_OPT_NUMBER);
  if (v == NULL) return SL_ERROR;
  v->num = x;
  return SL_OK;
}

int sl_opts_add_string(sl_opts *o, const char *key, const char *s, size_t len) {
  sl_opt *v = sl_opts_slot(o, key, SL_OPT_STRING);
  return v == NULL ? SL_ERROR : sl_opt_str_set(&v->str, s, len);
}

int sl_opts_add_boolean(sl_opts *o, const char *key, int b) {
  sl_opt *v = sl_opts_slot(o, key, SL_OPT_BOOLEAN);
  if (v == NULL) return SL_ERROR;
  v->boolean = b != 0;
  return SL_OK;
}

int sl_opts_add_list(sl_opts *o, const char *key) {
  return sl_opts_slot(o, key, SL_OPT_LIST) == NULL ? SL_ERROR : SL_OK;
}

int sl_opts_add_table(sl_opts *o, const char *key) {
  return sl_opts_slot(o, key, SL_OPT_TABLE) == NULL ? SL_ERROR : SL_OK;
}

int sl_opts_list_push(sl_opts *o, const char *key, const char *s, size_t len) {
  sl_opt *v = (sl_opt *)(uintptr_t)sl_opts_get(o, key);
  if (v == NULL || v->type != SL_OPT_LIST) return SL_ERROR;
  sl_opt_str *nl = realloc(v->list, (v->nlist + 1) * sizeof(*nl));
  if (nl == NULL) return SL_ERROR;
  v->list = nl;
  if (sl_opt_str_set(&v->list[v->nlist], s, len) != SL_OK) return SL_ERROR;
  v->nlist++;
  return SL_OK;
}

/* ---- from a Lua table ---- */

/* Adds the table at idx under key: a list when it holds only strings at
 * 1..n, else "another table". */
static int sl_opts_add_lua_table(sl_opts *o, const char *key, lua_State *L, int idx) {
  size_t n = lua_objlen(L, idx), count = 0;
  int strings = 1;
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    count++;
    if (lua_type(L, -1) != LUA_TSTRING) strings = 0;
    lua_pop(L, 1);
  }
  if (!strings || count != n) return sl_opts_add_table(o, key);
  if (sl_opts_add_list(o, key) != SL_OK) return SL_ERROR;
  for (size_t i = 1; i <= n; i++) {
    lua_rawgeti(L, idx, (int)i);
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    int rc = sl_opts_list_push(o, key, s, len);
    lua_pop(L, 1);
    if (rc != SL_OK) return SL_ERROR;
  }
  return SL_OK;
}

sl_opts *sl_opts_from_lua(lua_State *L, int idx, char *err, size_t errlen) {
  if (idx < 0) idx = lua_gettop(L) + idx + 1;
  sl_opts *o = sl_opts_new();
  if (o == NULL) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  int top = lua_gettop(L);
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    int rc = SL_OK;
    if (lua_type(L, -2) == LUA_TSTRING) {
      const char *key = lua_tostring(L, -2);
      size_t len;
      switch (lua_type(L, -1)) {
        case LUA_TNUMBER: rc = sl_opts_add_number(o, key, lua_tonumber(L, -1)); break;
        case LUA_TBOOLEAN: rc = sl_opts_add_boolean(o, key, lua_toboolean(L, -1)); break;
        case LUA_TSTRING: {
          const char *s = lua_tolstring(L, -1, &len);
          rc = sl_opts_add_string(o, key, s, len);
          break;
        }
        case LUA_TTABLE: rc = sl_opts_add_lua_table(o, key, L, lua_gettop(L)); break;
        default:
          snprintf(err, errlen, "%s: expected plain data (a string, number, boolean or table), "
                   "got a %s", key, lua_typename(L, lua_type(L, -1)));
          lua_settop(L, top);
          sl_opts_free(o);
          return NULL;
      }
    }
    lua_pop(L, 1);
    if (rc != SL_OK) {
      snprintf(err, errlen, "out of memory");
      lua_settop(L, top);
      sl_opts_free(o);
      return NULL;
    }
  }
  return o;
}

/* ---- showing values ---- */

static void sl_opts_quote(const char *s, size_t len, char *buf, size_t cap) {
  size_t n = 0;
#define SL_PUT(c) do { if (n + 1 < cap) buf[n] = (c); n++; } while (0)
  SL_PUT('"');
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    const char *esc = NULL;
    char num[8];
    switch (c) {
      case '"': esc = "\\\""; break;
      case '\\': esc = "\\\\"; break;
      case '\n': esc = "\\n"; break;
      case '\r': esc = "\\r"; break;
      case '\t': esc = "\\t"; break;
      default:
        if (c < 32 || c == 127) {
          snprintf(num, sizeof(num), "\\%03u", c);
          esc = num;
        }
    }
    if (esc == NULL) {
      SL_PUT((char)c);
    } else {
      for (const char *e = esc; *e; e++) SL_PUT(*e);
    }
  }
  SL_PUT('"');
#undef SL_PUT
  buf[n < cap ? n : cap - 1] = '\0';
}

void sl_opts_show(const sl_opt *v, char *buf, size_t len) {
  if (len == 0) return;
  if (v == NULL) {
    snprintf(buf, len, "nil");
    return;
  }
  switch (v->type) {
    case SL_OPT_NUMBER: snprintf(buf, len, "%.14g", v->num); break;
    case SL_OPT_BOOLEAN: snprintf(buf, len, "%s", v->boolean ? "true" : "false"); break;
    case SL_OPT_STRING: sl_opts_quote(v->str.s, v->str.len, buf, len); break;
    case SL_OPT_LIST: snprintf(buf, len, "%s", v->nlist == 0 ? "an empty table" : "a table"); break;
    case SL_OPT_TABLE: snprintf(buf, len, "a table"); break;
  }
}

/* "<key>: expected <what>, got <value>". */
static int sl_opts_expected(const sl_opt *v, const char *key, const char *what, char *err,
                            size_t errlen) {
  char shown[128];
  sl_opts_show(v, shown, sizeof(shown));
  snprintf(err, errlen, "%s: expected %s, got %s", key, what, shown);
  return SL_ERROR;
}

/* ---- parsing ---- */

int sl_opts_check_keys(const sl_opts *o, const char *const *known, char *err, size_t errlen) {
  const char *bad = NULL;
  for (size_t i = 0; o != NULL && i < o->n; i++) {
    int found = 0;
    for (const char *const *k = known; *k && !found; k++) found = strcmp(*k, o->v[i].key) == 0;
    if (!found && (bad == NULL || strcmp(o->v[i].key, bad) < 0)) bad = o->v[i].key;
  }
  if (bad == NULL) return SL_OK;
  size_t n = (size_t)snprintf(err, errlen, "%s: unknown key (expected one of: ", bad);
  for (const char *const *k = known; *k && n < errlen; k++)
    n += (size_t)snprintf(err + n, errlen - n, "%s%s", k == known ? "" : ", ", *k);
  if (n < errlen) snprintf(err + n, errlen - n, ")");
  return SL_ERROR;
}

int sl_opts_int(const sl_opts *o, const char *key, int64_t lo, int64_t hi, int required,
                int64_t def, const char *what, int64_t *out, char *err, size_t errlen) {
  const sl_opt *v = sl_opts_get(o, key);
  if (v == NULL && !required) {
    *out = def;
    return SL_OK;
  }
  if (v == NULL || v->type != SL_OPT_NUMBER || !(v->num >= (double)lo && v->num <= (double)hi) ||
      v->num != floor(v->num))
    return sl_opts_expected(v, key, what, err, errlen);
  *out = (int64_t)v->num;
  return SL_OK;
}

int sl_opts_bool(const sl_opts *o, const char *key, int def, int *out, char *err, size_t errlen) {
  const sl_opt *v = sl_opts_get(o, key);
  if (v == NULL) {
    *out = def;
    return SL_OK;
  }
  if (v->type != SL_OPT_BOOLEAN) return sl_opts_expected(v, key, "true or false", err, errlen);
  *out = v->boolean;
  return SL_OK;
}

int sl_opts_choice(const sl_opts *o, const char *key, const char *const *choices, int def,
                   int *out, char *err, size_t errlen) {
  const sl_opt *v = sl_opts_get(o, key);
  if (v == NULL) {
    *out = def;
    return SL_OK;
  }
  for (int i = 0; v->type == SL_OPT_STRING && choices[i]; i++) {
    if (strlen(choices[i]) == v->str.len && strcmp(choices[i], v->str.s) == 0) {
      *out = i;
      return SL_OK;
    }
  }
  char what[128];
  size_t n = 0;
  for (int i = 0; choices[i] && n < sizeof(what); i++)
    n += (size_t)snprintf(what + n, sizeof(what) - n, "%s\"%s\"",
                          i == 0 ? "" : choices[i + 1] ? ", " : " or ", choices[i]);
  return sl_opts_expected(v, key, what, err, errlen);
}

int sl_opts_strings(const sl_opts *o, const char *key, int required, const sl_opt_str **list,
                    size_t *n, char *err, size_t errlen) {
  const sl_opt *v = sl_opts_get(o, key);
  *list = NULL;
  *n = 0;
  if (v == NULL && !required) return SL_OK;
  int ok = v != NULL && v->type == SL_OPT_LIST && v->nlist > 0;
  for (size_t i = 0; ok && i < v->nlist; i++) ok = v->list[i].len > 0;
  if (!ok) return sl_opts_expected(v, key, "a non-empty list of non-empty strings", err, errlen);
  *list = v->list;
  *n = v->nlist;
  return SL_OK;
}
