/* require "deploy.testing": the kit for users' busted specs. Its Lua half
 * (bindings/testing.lua, compiled in) builds configs of test targets and
 * reads timelines; this half reads what only C sees: the test router's
 * record of applies and the test provider's request counts. Found by
 * Lua's all-in-one loader in deploy.so (luaopen_deploy_testing), so it
 * needs no file of its own on the Lua path. */
#include <string.h>

#include "lmanager.h"
#include "lutil.h"
#include "provider.h"
#include "router.h"
#include "service.h"

#include "testing_lua.h"

static target_config *target_of(lua_State *L) {
  service *svc = lmanager_service(L, 1);
  const char *name = lcheck_string(L, 2, "target", "deploy.testing");
  if (!svc)
    luaL_error(L, "deploy.testing: the manager is closed");
  target_config *t = service_target(svc, name);
  if (!t)
    luaL_error(L, "deploy.testing: unknown target '%s'", name);
  return t;
}

/* router_log(manager, target) -> { { at, servers = { { name, host, port, weight } } } } */
static int t_router_log(lua_State *L) {
  target_config *t = target_of(L);
  const router_test_apply *log;
  size_t n;
  if (router_test_log(t->router, &log, &n) != 0)
    return luaL_error(L, "deploy.testing: target '%s' has router kind '%s': give it router = { kind = \"test\" } "
                         "to read its traffic", t->name, t->router->kind);
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    lua_createtable(L, 0, 2);
    lset_number(L, "at", log[i].at);
    lua_createtable(L, (int)log[i].n, 0);
    for (size_t k = 0; k < log[i].n; k++) {
      lua_createtable(L, 0, 4);
      lset_string(L, "name", log[i].servers[k].name);
      lset_string(L, "host", log[i].servers[k].host);
      lset_integer(L, "port", log[i].servers[k].port);
      lset_integer(L, "weight", log[i].servers[k].weight);
      lua_rawseti(L, -2, (lua_Integer)k + 1);
    }
    lua_setfield(L, -2, "servers");
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  return 1;
}

/* stats(manager, target [, version]) -> requests, errors (5xx) of the running instances */
static int t_stats(lua_State *L) {
  target_config *t = target_of(L);
  const char *version = luaL_optstring(L, 3, NULL);
  unsigned long requests, errors;
  if (provider_test_stats(t->provider, version, &requests, &errors) != 0)
    return luaL_error(L, "deploy.testing: target '%s' has provider kind '%s': give it provider = { kind = \"test\" } "
                         "to count its requests", t->name, t->provider->kind);
  lua_pushinteger(L, (lua_Integer)requests);
  lua_pushinteger(L, (lua_Integer)errors);
  return 2;
}

int luaopen_deploy_testing(lua_State *L) {
  static const luaL_Reg c_side[] = {{"router_log", t_router_log}, {"stats", t_stats}, {NULL, NULL}};
  if (luaL_loadbufferx(L, (const char *)testing_lua, strlen((const char *)testing_lua), "=deploy.testing", "t") !=
      LUA_OK)
    return lua_error(L);
  luaL_newlib(L, c_side);
  lua_call(L, 1, 1);
  return 1;
}
