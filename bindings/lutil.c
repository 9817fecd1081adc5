#include "lutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "util.h"

#define ENGINE_MT "deploy.Engine"

/* ---- the engine ---- */

typedef struct lengine {
  engine e;
  int open;
} lengine;

static int engine_gc(lua_State *L) {
  lengine *le = luaL_checkudata(L, 1, ENGINE_MT);
  if (le->open) {
    le->open = 0;
    engine_close(&le->e);
  }
  return 0;
}

engine *lengine_get(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, ENGINE_MT ".instance") == LUA_TUSERDATA) {
    lengine *le = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return &le->e;
  }
  lua_pop(L, 1);
  lengine *le = lua_newuserdatauv(L, sizeof *le, 0);
  memset(le, 0, sizeof *le);
  if (luaL_newmetatable(L, ENGINE_MT)) {
    static const luaL_Reg meta[] = {{"__gc", engine_gc}, {NULL, NULL}};
    luaL_setfuncs(L, meta, 0);
  }
  lua_setmetatable(L, -2);
  if (engine_init(&le->e, 0) != 0)
    luaL_error(L, "deploy: cannot initialise the event loop");
  le->open = 1;
  lua_setfield(L, LUA_REGISTRYINDEX, ENGINE_MT ".instance");
  return &le->e;
}

/* ---- arguments ---- */

void lcheck_keys(lua_State *L, int idx, const char *const *allowed, const char *fmt) {
  idx = lua_absindex(L, idx);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int known = 0;
    if (lua_type(L, -2) == LUA_TSTRING)
      for (const char *const *a = allowed; *a; a++)
        known |= strcmp(*a, lua_tostring(L, -2)) == 0;
    if (!known) {
      char list[512] = "", key[128], msg[DC_ERR_MAX];
      size_t len = 0;
      for (const char *const *a = allowed; *a && len < sizeof list; a++)
        len += (size_t)snprintf(list + len, sizeof list - len, "%s%s", len ? ", " : "", *a);
      dc_strlcpy(key, lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : luaL_typename(L, -2), sizeof key);
      dc_fmt(msg, sizeof msg, fmt, key, list);
      lerror(L, msg);
    }
    lua_pop(L, 1);
  }
}

const char *lcheck_string(lua_State *L, int arg, const char *name, const char *method) {
  char msg[DC_ERR_MAX];
  if (lua_type(L, arg) != LUA_TSTRING) {
    dc_fmt(msg, sizeof msg, "deploy: %s: %s must be a string, got %s", method, name, luaL_typename(L, arg));
    lerror(L, msg);
  }
  size_t len;
  const char *s = lua_tolstring(L, arg, &len);
  if (strlen(s) != len) {
    dc_fmt(msg, sizeof msg, "deploy: %s: %s holds a NUL byte: use only printable characters", method, name);
    lerror(L, msg);
  }
  return s;
}

/* ---- tables ---- */

void lset_string(lua_State *L, const char *key, const char *v) {
  lua_pushstring(L, v);
  lua_setfield(L, -2, key);
}

void lset_string_or_nil(lua_State *L, const char *key, const char *v) {
  if (v && *v)
    lua_pushstring(L, v);
  else
    lua_pushnil(L);
  lua_setfield(L, -2, key);
}

void lset_integer(lua_State *L, const char *key, lua_Integer v) {
  lua_pushinteger(L, v);
  lua_setfield(L, -2, key);
}

void lset_number(lua_State *L, const char *key, lua_Number v) {
  lua_pushnumber(L, v);
  lua_setfield(L, -2, key);
}

void lset_boolean(lua_State *L, const char *key, int v) {
  lua_pushboolean(L, v);
  lua_setfield(L, -2, key);
}

void lpush_number(lua_State *L, double v) {
  if (v == (double)(lua_Integer)v && v > -1e15 && v < 1e15)
    lua_pushinteger(L, (lua_Integer)v);
  else
    lua_pushnumber(L, v);
}

void lpush_strings(lua_State *L, const char *const *v, size_t n) {
  if (n == 0) {
    lua_pushnil(L);
    return;
  }
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_pushstring(L, v[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
}

int lerror(lua_State *L, const char *msg) {
  lua_pushstring(L, msg);
  return lua_error(L);
}

/* ---- JSON ---- */

/* A table is an array when its keys are exactly 1..n (n >= 1). */
static int array_length(lua_State *L, int idx, size_t *n) {
  size_t count = 0;
  lua_Integer max = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 1) {
      lua_pop(L, 1);
      return 0;
    }
    if (lua_tointeger(L, -1) > max)
      max = lua_tointeger(L, -1);
    count++;
  }
  *n = count;
  return count > 0 && (size_t)max == count;
}

static json_t *from(lua_State *L, int idx, int depth, char *why, size_t size);

static json_t *from_table(lua_State *L, int idx, int depth, char *why, size_t size) {
  size_t n;
  if (depth > DC_JSON_MAX_DEPTH) {
    dc_fmt(why, size, "nested deeper than %d levels", DC_JSON_MAX_DEPTH);
    return NULL;
  }
  luaL_checkstack(L, 4, "JSON");
  if (array_length(L, idx, &n)) {
    json_t *a = json_array();
    for (size_t i = 1; a && i <= n; i++) {
      lua_rawgeti(L, idx, (lua_Integer)i);
      json_t *v = from(L, lua_gettop(L), depth + 1, why, size);
      lua_pop(L, 1);
      if (!v || json_array_append_new(a, v) != 0) {
        json_decref(a);
        return NULL;
      }
    }
    return a;
  }
  json_t *o = json_object();
  lua_pushnil(L);
  while (o && lua_next(L, idx)) {
    if (lua_type(L, -2) != LUA_TSTRING) {
      dc_fmt(why, size, "a table mixes a %s key with others: use string keys, or a list 1..n",
             luaL_typename(L, -2));
      lua_pop(L, 2);
      json_decref(o);
      return NULL;
    }
    json_t *v = from(L, lua_gettop(L), depth + 1, why, size);
    /* jansson refuses a key that is not valid UTF-8 (set_new frees v). */
    if (v && json_object_set_new(o, lua_tostring(L, -2), v) != 0) {
      dc_fmt(why, size, "a key is not valid UTF-8 text");
      v = NULL;
    }
    lua_pop(L, 1);
    if (!v) {
      lua_pop(L, 1);
      json_decref(o);
      return NULL;
    }
  }
  return o;
}

static json_t *from(lua_State *L, int idx, int depth, char *why, size_t size) {
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    return json_null();
  case LUA_TBOOLEAN:
    return json_boolean(lua_toboolean(L, idx));
  case LUA_TNUMBER:
    if (lua_isinteger(L, idx))
      return json_integer((json_int_t)lua_tointeger(L, idx));
    if (!isfinite(lua_tonumber(L, idx))) {
      dc_fmt(why, size, "a number is not finite (%g)", lua_tonumber(L, idx));
      return NULL;
    }
    return json_real(lua_tonumber(L, idx));
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    json_t *v = strlen(s) == len ? json_string(s) : NULL;
    if (!v)
      dc_fmt(why, size, "a string is not valid UTF-8 text (or holds a NUL byte)");
    return v;
  }
  case LUA_TTABLE:
    return from_table(L, lua_absindex(L, idx), depth, why, size);
  default:
    dc_fmt(why, size, "a %s cannot be stored", luaL_typename(L, idx));
    return NULL;
  }
}

json_t *ljson_from(lua_State *L, int idx, const char *what) {
  char why[DC_ERR_MAX] = "out of memory", msg[DC_ERR_MAX];
  idx = lua_absindex(L, idx);
  if (lua_isnoneornil(L, idx))
    return NULL;
  json_t *v = from(L, idx, 0, why, sizeof why);
  if (!v) {
    dc_fmt(msg, sizeof msg, "deploy: %s cannot be stored as JSON (%s): use strings, numbers, booleans and tables",
           what, why);
    lerror(L, msg);
  }
  return v;
}

char *ljson_encode(lua_State *L, int idx, const char *what, size_t max) {
  char msg[DC_ERR_MAX];
  json_t *v = ljson_from(L, idx, what);
  if (!v)
    return NULL;
  char *text = dc_json_dump(v);
  json_decref(v);
  if (!text)
    return (char *)(intptr_t)lerror(L, "deploy: out of memory");
  if (strlen(text) > max) {
    dc_fmt(msg, sizeof msg, "deploy: %s is %zu bytes once encoded as JSON: at most %zu are stored (keep it small)",
           what, strlen(text), max);
    free(text);
    lerror(L, msg);
  }
  return text;
}

void ljson_push(lua_State *L, const json_t *v) {
  luaL_checkstack(L, 3, "JSON");
  switch (json_typeof(v)) {
  case JSON_OBJECT: {
    const char *k;
    json_t *item;
    lua_createtable(L, 0, (int)json_object_size(v));
    json_object_foreach((json_t *)v, k, item) {
      ljson_push(L, item);
      lua_setfield(L, -2, k);
    }
    return;
  }
  case JSON_ARRAY: {
    size_t i;
    json_t *item;
    lua_createtable(L, (int)json_array_size(v), 0);
    json_array_foreach(v, i, item) {
      ljson_push(L, item);
      lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return;
  }
  case JSON_STRING:
    lua_pushlstring(L, json_string_value(v), json_string_length(v));
    return;
  case JSON_INTEGER:
    lua_pushinteger(L, (lua_Integer)json_integer_value(v));
    return;
  case JSON_REAL:
    lua_pushnumber(L, json_real_value(v));
    return;
  case JSON_TRUE:
  case JSON_FALSE:
    lua_pushboolean(L, json_is_true(v));
    return;
  default:
    lua_pushnil(L);
  }
}

void ljson_decode(lua_State *L, const char *text) {
  if (!text) {
    lua_pushnil(L);
    return;
  }
  json_error_t je;
  json_t *v = json_loads(text, JSON_DECODE_ANY, &je);
  if (!v) {
    lua_pushnil(L);
    return;
  }
  ljson_push(L, v);
  json_decref(v);
}
