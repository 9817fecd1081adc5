/* Glue every binding file shares: argument checks, table setters, errors,
 * JSON between Lua values and jansson, and the one engine of a Lua state.
 * Nothing here decides anything: policy lives in runtime/. */
#ifndef DEPLOY_LUTIL_H
#define DEPLOY_LUTIL_H

#include <jansson.h>
#include <lauxlib.h>
#include <lua.h>

#include "engine.h"

/* The one engine of this Lua state (created on first use, closed when the
 * state closes, after every object that uses it). */
engine *lengine_get(lua_State *L);

/* Raises unless every key of the table at idx is one of `allowed`
 * (NULL-terminated). fmt gets the offending key, then the known ones:
 * "deploy: CanaryStrategy has no parameter '%s' (known: %s)". */
void lcheck_keys(lua_State *L, int idx, const char *const *allowed, const char *fmt);
/* A string argument without NUL bytes; raises naming method and argument. */
const char *lcheck_string(lua_State *L, int arg, const char *name, const char *method);

/* t[key] = v for the table on top of the stack. */
void lset_string(lua_State *L, const char *key, const char *v);
void lset_string_or_nil(lua_State *L, const char *key, const char *v); /* "" and NULL: nil */
void lset_integer(lua_State *L, const char *key, lua_Integer v);
void lset_number(lua_State *L, const char *key, lua_Number v);
void lset_boolean(lua_State *L, const char *key, int v);
/* Pushes an integer when v is integral (10, not 10.0), else a float. */
void lpush_number(lua_State *L, double v);
/* A list of strings as a Lua table (nil when n == 0). */
void lpush_strings(lua_State *L, const char *const *v, size_t n);

/* Raises msg (copied to the Lua stack first: never raise with heap memory
 * still owned by the C frame). */
int lerror(lua_State *L, const char *msg);

/* The Lua value at idx as JSON (jansson): tables with keys 1..n become
 * arrays, other tables objects (string keys only), numbers keep their
 * integer-ness. Raises naming `what` for what JSON cannot hold (functions,
 * NaN, mixed keys, invalid UTF-8, nesting deeper than 64). NULL for nil. */
json_t *ljson_from(lua_State *L, int idx, const char *what);
/* ljson_from, encoded; heap, caller frees. Raises when it is larger than
 * max bytes (naming what and the limit). */
char *ljson_encode(lua_State *L, int idx, const char *what, size_t max);
/* Pushes a JSON value (integers as integers); NULL pushes nil. */
void ljson_push(lua_State *L, const json_t *v);
/* Decodes JSON text and pushes the value; nil for NULL or bad text. */
void ljson_decode(lua_State *L, const char *json);

#endif
