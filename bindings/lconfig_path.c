/* Where the configuration is when nobody names it: $DEPLOY_CONFIG, else
 * ./deployctl.lua, else (for this release only, with a warning) a
 * ./deploy.lua that is a config.
 *
 * The default used to be ./deploy.lua, a name that hides the `deploy`
 * module from require in that directory (busted run there loaded the
 * config instead of the module). A ./deploy.lua is taken as a config only
 * when it returns a table with a `targets` table, run in a sandbox (no
 * require, no io, no os but getenv, a bounded count of instructions): a
 * user's own module named deploy.lua is never loaded as the config. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lconfig.h"

#include <lauxlib.h>
#include <lualib.h>

#include "util.h"

#define LEGACY_NAME "deploy.lua"
#define DEFAULT_NAME "deployctl.lua"

static void too_long(lua_State *L, lua_Debug *ar) {
  (void)ar;
  luaL_error(L, "runs too long for a configuration");
}

/* The few globals a configuration may use. */
static void push_sandbox(lua_State *L) {
  static const char *const copied[] = {"pairs", "ipairs", "type", "tostring", "tonumber", "select", "error",
                                       "assert", "next", "rawget", "rawset", "setmetatable", "getmetatable",
                                       "string", "table", "math", "utf8", NULL};
  lua_newtable(L);
  lua_pushglobaltable(L);
  for (int i = 0; copied[i]; i++) {
    lua_getfield(L, -1, copied[i]);
    lua_setfield(L, -3, copied[i]);
  }
  lua_pop(L, 1);
  lua_newtable(L);
  lua_getglobal(L, "os");
  if (lua_istable(L, -1))
    lua_getfield(L, -1, "getenv");
  else
    lua_pushnil(L);
  lua_setfield(L, -3, "getenv");
  lua_pop(L, 1);
  lua_setfield(L, -2, "os");
}

int lconfig_is_config_file(lua_State *L, const char *path) {
  int top = lua_gettop(L);
  if (luaL_loadfilex(L, path, "t") != LUA_OK) {
    lua_settop(L, top);
    return 0;
  }
  push_sandbox(L);
  lua_setupvalue(L, -2, 1); /* _ENV */
  lua_Hook old = lua_gethook(L);
  int old_mask = lua_gethookmask(L), old_count = lua_gethookcount(L);
  lua_sethook(L, too_long, LUA_MASKCOUNT, 1000000);
  int ok = lua_pcall(L, 0, 1, 0) == LUA_OK;
  lua_sethook(L, old, old_mask, old_count);
  if (ok && lua_istable(L, -1)) {
    ok = lua_getfield(L, -1, "targets") == LUA_TTABLE;
    lua_pop(L, 1);
  } else {
    ok = 0;
  }
  lua_settop(L, top);
  return ok;
}

const char *lconfig_default_path(lua_State *L, char *buf, size_t size, int *legacy) {
  *legacy = 0;
  const char *env = getenv("DEPLOY_CONFIG");
  if (env && *env) {
    dc_strlcpy(buf, env, size);
    return buf;
  }
  if (access(DEFAULT_NAME, F_OK) != 0 && access(LEGACY_NAME, R_OK) == 0 && lconfig_is_config_file(L, LEGACY_NAME)) {
    *legacy = 1;
    /* Once per process: a pipeline that opens several managers is told once. */
    if (lua_getfield(L, LUA_REGISTRYINDEX, "deploy.legacy_warned") == LUA_TNIL) {
      fprintf(stderr, "deployctl: warning: reading the config from ./" LEGACY_NAME ", the old default name; rename it "
                      "to ./" DEFAULT_NAME " (the next release reads only ./" DEFAULT_NAME ": a file named " LEGACY_NAME
                      " hides the deploy module from require in its directory)\n");
      lua_pushboolean(L, 1);
      lua_setfield(L, LUA_REGISTRYINDEX, "deploy.legacy_warned");
    }
    lua_pop(L, 1);
    dc_strlcpy(buf, LEGACY_NAME, size);
    return buf;
  }
  dc_strlcpy(buf, DEFAULT_NAME, size);
  return buf;
}

/* deploy._config_path() -> path, legacy: the config file a command uses
 * when none is named (for the CLI, which reads it for secrets first). */
int lconfig_path_lua(lua_State *L) {
  char buf[1024];
  int legacy;
  lua_pushstring(L, lconfig_default_path(L, buf, sizeof buf, &legacy));
  lua_pushboolean(L, legacy);
  return 2;
}
