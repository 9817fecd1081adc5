/* require "deploy": the module table, made of the classes' register
 * functions, and the few module-level functions (sleep, now, _host,
 * router_weights, mann_whitney, http.request). */
#include <stdlib.h>
#include <string.h>

#include "ldeployment.h"
#include "lgitops.h"
#include "lhealth.h"
#include "lconfig.h"
#include "lhttp.h"
#include "lmanager.h"
#include "lparallel.h"
#include "lserve.h"
#include "lsched.h"
#include "lstrategy.h"
#include "lutil.h"
#include "mannwhitney.h"
#include "router.h"
#include "store_pg.h"
#include "util.h"

#ifndef DEPLOY_VERSION
#define DEPLOY_VERSION "0.0.0-dev" /* set by CMake from project(VERSION) */
#endif

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

static double *number_list(lua_State *L, int arg, size_t *n) {
  luaL_checktype(L, arg, LUA_TTABLE);
  lua_Integer len = luaL_len(L, arg);
  luaL_argcheck(L, len >= 1 && len <= 100000, arg, "must be a list of 1 to 100000 numbers");
  for (lua_Integer i = 1; i <= len; i++) {
    if (lua_rawgeti(L, arg, i) != LUA_TNUMBER)
      luaL_error(L, "deploy.mann_whitney: argument #%d[%d] must be a number, got %s", arg, (int)i,
                 luaL_typename(L, -1));
    lua_pop(L, 1);
  }
  double *v = lua_newuserdatauv(L, (size_t)len * sizeof *v, 0); /* freed by the GC */
  for (lua_Integer i = 1; i <= len; i++) {
    lua_rawgeti(L, arg, i);
    v[i - 1] = lua_tonumber(L, -1);
    lua_pop(L, 1);
  }
  *n = (size_t)len;
  return v;
}

/* deploy.mann_whitney(x, y) -> { u, p_greater, p_less }: the test the
 * probe analysis judges latencies with (runtime/mannwhitney.c), for hooks
 * that compare samples of their own. */
static int deploy_mann_whitney(lua_State *L) {
  size_t nx, ny;
  double *x = number_list(L, 1, &nx), *y = number_list(L, 2, &ny);
  mw_result r;
  if (mw_test(x, nx, y, ny, &r) != 0)
    return luaL_error(L, "deploy: out of memory");
  lua_createtable(L, 0, 3);
  lset_number(L, "u", r.u);
  lset_number(L, "p_greater", r.p_greater);
  lset_number(L, "p_less", r.p_less);
  return 1;
}

/* deploy.now(): the engine clock, epoch seconds (virtual when simulating). */
static int deploy_now(lua_State *L) {
  lua_pushnumber(L, engine_now(lengine_get(L)));
  return 1;
}

/* deploy._flush([seconds]): lets the notifications and event webhooks
 * still queued leave before the process exits (deployctl calls it last;
 * nothing else waits for them). At most `seconds` (10): what is left is
 * dropped with the process. Returns how many were left. */
static int deploy_flush(lua_State *L) {
  double s = luaL_optnumber(L, 1, 10);
  if (!(s >= 0 && s <= 3600))
    return luaL_error(L, "deploy._flush: seconds must be between 0 and 3600, got %f", s);
  lua_pushinteger(L, (lua_Integer)engine_flush(lengine_get(L), s));
  return 1;
}

/* deploy.virtual_clock(): true when waits return at once (simulating). */
static int deploy_virtual_clock(lua_State *L) {
  lua_pushboolean(L, lengine_get(L)->virtual_clock);
  return 1;
}

/* deploy._host{ config = path, simulate = bool }: set by deployctl run.
 * config: what DeploymentManager{} uses when given no config; simulate:
 * a dry run for everything in this process: the virtual clock, test
 * providers and routers, a copy of the store. */
static int deploy_host(lua_State *L) {
  luaL_checktype(L, 1, LUA_TTABLE);
  if (lua_getfield(L, 1, "config") == LUA_TSTRING)
    lua_setfield(L, LUA_REGISTRYINDEX, "deploy.default_config");
  else
    lua_pop(L, 1);
  lua_getfield(L, 1, "simulate");
  if (lua_toboolean(L, -1)) {
    if (engine_set_virtual(lengine_get(L), 1) != 0)
      return luaL_error(L, "deploy: cannot switch to the virtual clock while timers are pending");
    /* Every config loaded from now on is simulated (lconfig_simulate). */
    lua_pushboolean(L, 1);
    lua_setfield(L, LUA_REGISTRYINDEX, "deploy.simulate");
  }
  return 0;
}

/* deploy._clock([mode]) -> the engine's clock ("real" or "virtual") before
 * the call; with mode, switches to it (deploy.testing gives the process
 * its clock back when a kit closes). */
static int deploy_clock(lua_State *L) {
  engine *e = lengine_get(L);
  lua_pushstring(L, e->virtual_clock ? "virtual" : "real");
  if (lua_isnoneornil(L, 1))
    return 1;
  const char *mode = luaL_checkstring(L, 1);
  luaL_argcheck(L, strcmp(mode, "real") == 0 || strcmp(mode, "virtual") == 0, 1, "must be 'real' or 'virtual'");
  if (engine_set_virtual(e, strcmp(mode, "virtual") == 0) != 0)
    return luaL_error(L, "deploy: cannot switch clocks while timers are pending");
  return 1;
}

/* deploy._simulation() -> what a --simulate run starts from (the store
 * copied, or an empty one), or nil when not simulating. */
static int deploy_simulation(lua_State *L) {
  if (lua_getfield(L, LUA_REGISTRYINDEX, "deploy.simulate") == LUA_TNIL)
    return 1;
  lua_getfield(L, LUA_REGISTRYINDEX, "deploy.simulate_note");
  if (lua_isnil(L, -1))
    lua_pushliteral(L, "simulated");
  return 1;
}

/* deploy.migrate_store(from, to): copies the SQLite store at `from` into
 * the empty PostgreSQL store at `to` (creating its schema), in one
 * transaction. Returns the counts copied, or nil and why. */
typedef struct migrate_wait {
  int done, rc;
  char err[DC_ERR_MAX];
  store_pg_import_counts counts;
} migrate_wait;

static void migrated(void *payload, int rc, const char *err, const store_pg_import_counts *counts) {
  migrate_wait *w = payload;
  w->rc = rc;
  if (err)
    dc_strlcpy(w->err, err, sizeof w->err);
  if (counts)
    w->counts = *counts;
  w->done = 1;
}

static int deploy_migrate_store(lua_State *L) {
  lsched_check_can_wait(L);
  const char *from = lcheck_string(L, 1, "from", "migrate_store");
  const char *to = lcheck_string(L, 2, "to", "migrate_store");
  if (!store_pg_is_url(to))
    return luaL_error(L, "deploy: migrate_store: to must be a postgresql:// URL, got '%s'", to);
  migrate_wait w;
  memset(&w, 0, sizeof w);
  if (store_pg_copy_file(lengine_get(L), from, to, migrated, &w, w.err) != 0) {
    lua_pushnil(L);
    lua_pushstring(L, w.err);
    return 2;
  }
  lsched_block(L, &w.done);
  if (w.rc != DC_OK) {
    lua_pushnil(L);
    lua_pushstring(L, w.err);
    return 2;
  }
  lua_createtable(L, 0, 6);
  lset_integer(L, "targets", (lua_Integer)w.counts.targets);
  lset_integer(L, "deployments", (lua_Integer)w.counts.deployments);
  lset_integer(L, "events", (lua_Integer)w.counts.events);
  lset_integer(L, "instances", (lua_Integer)w.counts.instances);
  lset_integer(L, "locks", (lua_Integer)w.counts.locks);
  lset_integer(L, "controls", (lua_Integer)w.counts.controls);
  return 1;
}

int luaopen_deploy(lua_State *L) {
  static const luaL_Reg functions[] = {{"sleep", deploy_sleep},
                                       {"now", deploy_now},
                                       {"virtual_clock", deploy_virtual_clock},
                                       {"_host", deploy_host},
                                       {"_flush", deploy_flush},
                                       {"router_weights", deploy_router_weights},
                                       {"mann_whitney", deploy_mann_whitney},
                                       {"migrate_store", deploy_migrate_store},
                                       {"_config_path", lconfig_path_lua},
                                       {"_simulation", deploy_simulation},
                                       {"_clock", deploy_clock},
                                       {NULL, NULL}};
  lengine_get(L);
  luaL_newlib(L, functions);
  /* deploy.VERSION: semantic versioning, CHANGELOG.md (_VERSION: the
   * same, the name Lua modules traditionally use). */
  lua_pushliteral(L, DEPLOY_VERSION);
  lua_setfield(L, -2, "VERSION");
  lua_pushliteral(L, DEPLOY_VERSION);
  lua_setfield(L, -2, "_VERSION");
  lstrategy_register(L);
  lmanager_register(L);
  lhealth_register(L);
  ldeployment_register(L);
  lparallel_register(L);
  lgitops_register(L);
  lserve_register(L);
  lhttp_register(L);
  return 1;
}
