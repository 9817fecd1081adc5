/* require "deploy": the module table, and the engine that every manager,
 * health check and strategy of this Lua state shares. */
#include <stdlib.h>
#include <string.h>

#include "bindings.h"
#include "router.h"
#include "run.h"
#include "lsched.h"
#include "util.h"

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
    lua_pushcfunction(L, engine_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  if (engine_init(&le->e, 0) != 0)
    luaL_error(L, "deploy: cannot initialise the event loop");
  le->open = 1;
  lua_setfield(L, LUA_REGISTRYINDEX, ENGINE_MT ".instance");
  return &le->e;
}

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

void lset_string(lua_State *L, const char *key, const char *v) {
  lua_pushstring(L, v);
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

int lerror(lua_State *L, const char *msg) {
  lua_pushstring(L, msg);
  return lua_error(L);
}

char *ljson_encode(lua_State *L, int idx, const char *what) {
  idx = lua_absindex(L, idx);
  if (lua_isnoneornil(L, idx))
    return NULL;
  lua_getglobal(L, "require");
  lua_pushliteral(L, "cjson");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "encode");
  lua_pushvalue(L, idx);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    char msg[DC_ERR_MAX];
    dc_fmt(msg, sizeof msg, "deploy: %s cannot be stored as JSON (%s): use strings, numbers, booleans and tables",
           what, lua_tostring(L, -1));
    lua_pop(L, 2);
    lerror(L, msg);
  }
  size_t len;
  const char *s = lua_tolstring(L, -1, &len);
  if (len > 64 * 1024) {
    lua_pop(L, 2);
    lerror(L, "deploy: metadata is larger than 64 KiB once encoded as JSON: keep it small");
  }
  char *copy = strdup(s);
  lua_pop(L, 2);
  return copy;
}

/* lua-cjson decodes every number as a float; integral ones become
 * integers again, so 30 reads back as 30, not 30.0. */
static void integers(lua_State *L, int idx, int depth) {
  if (depth > 32)
    return;
  idx = lua_absindex(L, idx);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -1) == LUA_TNUMBER && !lua_isinteger(L, -1)) {
      double v = lua_tonumber(L, -1);
      if (v == (double)(lua_Integer)v && v > -1e15 && v < 1e15) {
        lua_pushvalue(L, -2);
        lua_pushinteger(L, (lua_Integer)v);
        lua_rawset(L, idx);
      }
    } else if (lua_type(L, -1) == LUA_TTABLE) {
      integers(L, -1, depth + 1);
    }
    lua_pop(L, 1);
  }
}

void ljson_decode(lua_State *L, const char *json) {
  if (!json) {
    lua_pushnil(L);
    return;
  }
  lua_getglobal(L, "require");
  lua_pushliteral(L, "cjson");
  lua_call(L, 1, 1);
  lua_getfield(L, -1, "decode");
  lua_remove(L, -2);
  lua_pushstring(L, json);
  if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
    lua_pop(L, 1);
    lua_pushnil(L);
  } else if (lua_istable(L, -1)) {
    integers(L, -1, 0);
  }
}

typedef struct sleep_wait {
  int fired, awaiting;
  ltask *task;
  engine_timer *timer;
} sleep_wait;

static void sleep_cancel(void *payload) {
  sleep_wait *w = payload;
  engine_timer_cancel(w->timer);
  w->timer = NULL;
}

static void sleep_done(void *payload) {
  sleep_wait *w = payload;
  w->timer = NULL;
  w->fired = 1;
  if (w->task)
    lsched_ready(w->task);
}

static int sleep_k(lua_State *L, int status, lua_KContext ctx) {
  (void)L;
  (void)status;
  (void)ctx;
  return 0;
}

/* deploy.sleep(seconds): waits on the engine clock while the loop runs (so
 * other rollouts progress); returns at once on the virtual clock. */
static int deploy_sleep(lua_State *L) {
  lsched_check_can_wait(L);
  double s = luaL_checknumber(L, 1);
  luaL_argcheck(L, s >= 0 && s < 1e9, 1, "seconds must be >= 0");
  engine *e = lengine_get(L);
  sleep_wait *w = lua_newuserdatauv(L, sizeof *w, 0); /* on the stack across a yield */
  w->fired = 0;
  w->task = lsched_current(L);
  w->awaiting = 1;
  w->timer = engine_timer_start(e, s, sleep_done, w);
  if (w->task)
    lsched_on_cancel(w->task, sleep_cancel, w);
  return lsched_await(L, &w->fired, (lua_KContext)w, sleep_k);
}

/* deploy.router_weights(pct, n_old, n_new) -> weight_old, weight_new: the
 * integer HAProxy weights a share of pct % to n_new servers beside n_old
 * gets (the exact split of notes/haproxy.md). */
static int deploy_router_weights(lua_State *L) {
  double pct = luaL_checknumber(L, 1);
  lua_Integer n_old = luaL_checkinteger(L, 2), n_new = luaL_checkinteger(L, 3);
  luaL_argcheck(L, pct >= 0 && pct <= 100, 1, "pct must be in 0..100");
  luaL_argcheck(L, n_old >= 0 && n_old <= 1000, 2, "n_old must be in 0..1000");
  luaL_argcheck(L, n_new >= 0 && n_new <= 1000, 3, "n_new must be in 0..1000");
  int w_old, w_new;
  router_split_weights(pct, (int)n_old, (int)n_new, &w_old, &w_new);
  lua_pushinteger(L, w_old);
  lua_pushinteger(L, w_new);
  return 2;
}

/* deploy.now(): the engine clock, epoch seconds (virtual when simulating). */
static int deploy_now(lua_State *L) {
  lua_pushnumber(L, engine_now(lengine_get(L)));
  return 1;
}

/* deploy._host{ config = path, simulate = bool }: set by deployctl run.
 * config: what DeploymentManager{} uses when given no config; simulate:
 * the virtual clock for everything in this process. */
static int deploy_host(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_getfield(L, 1, "config") == LUA_TSTRING)
    lua_setfield(L, LUA_REGISTRYINDEX, "deploy.default_config");
  else
    lua_pop(L, 1);
  lua_getfield(L, 1, "simulate");
  if (lua_toboolean(L, -1) && engine_set_virtual(lengine_get(L), 1) != 0)
    return luaL_error(L, "deploy: cannot switch to the virtual clock while timers are pending");
  return 0;
}

int luaopen_deploy(lua_State *L) {
  lengine_get(L);
  lua_newtable(L);
  lua_pushliteral(L, DEPLOY_VERSION);
  lua_setfield(L, -2, "_VERSION");
  lstrategy_register(L);
  lmanager_register(L);
  lhealth_register(L);
  lrun_register(L);
  lparallel_register(L);
  lgitops_register(L);
  lua_pushcfunction(L, deploy_sleep);
  lua_setfield(L, -2, "sleep");
  lua_pushcfunction(L, deploy_now);
  lua_setfield(L, -2, "now");
  lua_pushcfunction(L, deploy_host);
  lua_setfield(L, -2, "_host");
  lua_pushcfunction(L, deploy_router_weights);
  lua_setfield(L, -2, "router_weights");
  return 1;
}
