/*
 * sl_opts: the options of one pipeline entry ({ "module.name", key = value,
 * ... }) in a neutral form that C stages parse once, at load, into a
 * configuration of their own (sl_stage_ops.configure).
 *
 * A value is a number, a string (bytes, may hold NUL), a boolean, a list of
 * strings (a table with only string values at 1..n), or "another table"
 * (anything else a table can be: kept only so that errors can name it).
 *
 * Two ways to build one: sl_opts_from_lua from a Lua table (the config
 * reader), or the sl_opts_add_* calls (plain C types: usable through the
 * FFI, as lua/sluice/options.lua does for in-process test channels).
 *
 * The parse helpers write errors as "<key>: expected <what>, got <value>",
 * values shown as Lua writes them (strings quoted), the same text
 * lua/sluice/config/c_stage_options.lua gives with the key path in front.
 */
#ifndef SL_OPTS_H
#define SL_OPTS_H

#include <stddef.h>
#include <stdint.h>

typedef struct lua_State lua_State;

typedef enum {
  SL_OPT_NUMBER = 1,
  SL_OPT_STRING,
  SL_OPT_BOOLEAN,
  SL_OPT_LIST,      /* a list of strings */
  SL_OPT_TABLE,     /* any other table */
} sl_opt_type;

typedef struct sl_opt_str {
  char *s;                 /* NUL-terminated copy (may also hold NULs) */
  size_t len;
} sl_opt_str;

typedef struct sl_opt {
  char *key;
  sl_opt_type type;
  double num;              /* NUMBER */
  int boolean;             /* BOOLEAN */
  sl_opt_str str;          /* STRING */
  sl_opt_str *list;        /* LIST */
  size_t nlist;
} sl_opt;

typedef struct sl_opts {
  sl_opt *v;
  size_t n, cap;
} sl_opts;

/* A new, empty set. NULL on ENOMEM. */
sl_opts *sl_opts_new(void);
void sl_opts_free(sl_opts *o);

/* Adds key = value (a key added twice: the last value wins). SL_OK, or
 * SL_ERROR on ENOMEM. Strings are copied. add_list adds an empty list that
 * list_push appends to (SL_ERROR when key is not a list). */
int sl_opts_add_number(sl_opts *o, const char *key, double v);
int sl_opts_add_string(sl_opts *o, const char *key, const char *s, size_t len);
int sl_opts_add_boolean(sl_opts *o, const char *key, int v);
int sl_opts_add_list(sl_opts *o, const char *key);
int sl_opts_list_push(sl_opts *o, const char *key, const char *s, size_t len);
int sl_opts_add_table(sl_opts *o, const char *key);

/* The options of the table at idx: its string keys (other keys, like the
 * module name at [1], are skipped). Returns +1 (sl_opts_free), or NULL with
 * err ("<key>: ..." for a value that is not plain data, or out of memory).
 * Borrows L; leaves its stack as it was. */
sl_opts *sl_opts_from_lua(lua_State *L, int idx, char *err, size_t errlen);

/* The value of key, or NULL. */
const sl_opt *sl_opts_get(const sl_opts *o, const char *key);

/* Writes v as Lua shows it in errors: "text" (quoted, escaped), 12, true,
 * nil (v NULL), a table. */
void sl_opts_show(const sl_opt *v, char *buf, size_t len);

/* ---- parsing, for configure hooks: SL_OK, or SL_ERROR with err ---- */

/* Every key of o is in known (NULL-terminated); else "<key>: unknown key
 * (expected one of: a, b)" for the smallest unknown key. */
int sl_opts_check_keys(const sl_opts *o, const char *const *known, char *err, size_t errlen);

/* An integer in [lo, hi] (def when absent and not required), else "<key>:
 * expected <what>, got <value>". */
int sl_opts_int(const sl_opts *o, const char *key, int64_t lo, int64_t hi, int required,
                int64_t def, const char *what, int64_t *out, char *err, size_t errlen);

/* true or false (def when absent). */
int sl_opts_bool(const sl_opts *o, const char *key, int def, int *out, char *err, size_t errlen);

/* One of the strings in choices (NULL-terminated): its index in *out (def
 * when absent). "expected \"big\" or \"little\", got ...". */
int sl_opts_choice(const sl_opts *o, const char *key, const char *const *choices, int def,
                   int *out, char *err, size_t errlen);

/* A non-empty list of non-empty strings (*list borrowed from o; NULL and 0
 * when absent and not required). */
int sl_opts_strings(const sl_opts *o, const char *key, int required, const sl_opt_str **list,
                    size_t *n, char *err, size_t errlen);

#endif
