/* deployctl: a Lua 5.4 host. It preloads the deploy module (the same
 * bindings as deploy.so) and runs the CLI, itself a Lua program compiled in
 * (cli/deployctl.lua), under lua_pcall with a traceback handler, as Lua's
 * own lua.c does. Lua's symbols are exported from this executable so that
 * C modules loaded at run time (cjson.so) bind to this copy of Lua. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "cli_lua.h"
#include "engine.h"
#include "util.h"

int luaopen_deploy(lua_State *L);
int luaopen_deploy_testing(lua_State *L);

static lua_State *global_L;

/* Like lua.c's laction: the signal handler only sets this hook, which
 * stops Lua code that is running (the CLI turns it into exit 130). */
static void interrupted_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  lua_sethook(L, NULL, 0, 0);
  luaL_error(L, "interrupted");
}

static void on_signal(int sig) {
  dc_interrupts++;
  /* During a rollout the loop sees the counter and aborts it safely; a
   * third interrupt means the user really wants out at any cost. */
  if (dc_interrupts >= 3) {
    signal(sig, SIG_DFL);
    raise(sig);
  }
  if (!dc_interrupt_owners)
    lua_sethook(global_L, interrupted_hook, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
  else if (engine_wake_handle)
    uv_async_send(engine_wake_handle);
}

static int msghandler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* package.preload loader for one embedded CLI module. */
static int load_embedded(lua_State *L) {
  const char *name = luaL_checkstring(L, 1);
  for (int i = 0; deployctl_modules[i].name; i++) {
    if (strcmp(deployctl_modules[i].name, name) != 0)
      continue;
    char chunk[128];
    snprintf(chunk, sizeof chunk, "=%s", name);
    if (luaL_loadbufferx(L, (const char *)deployctl_modules[i].code, deployctl_modules[i].len, chunk, "t") != LUA_OK)
      return lua_error(L);
    return 1;
  }
  return luaL_error(L, "deployctl: no embedded module '%s'", name);
}

/* package.preload entry: load and run the module's chunk. */
static int require_embedded(lua_State *L) {
  lua_pushcfunction(L, load_embedded);
  lua_pushvalue(L, 1);
  lua_call(L, 1, 1);
  lua_pushvalue(L, 1);
  lua_call(L, 1, 1);
  return 1;
}

static int pmain(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = (char **)lua_touserdata(L, 2);
  luaL_openlibs(L);
  luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
  lua_pushcfunction(L, luaopen_deploy);
  lua_setfield(L, -2, "deploy");
  lua_pushcfunction(L, luaopen_deploy_testing);
  lua_setfield(L, -2, "deploy.testing");
  for (int i = 0; deployctl_modules[i].name; i++) {
    if (strcmp(deployctl_modules[i].name, "deployctl") == 0)
      continue;
    lua_pushcfunction(L, require_embedded);
    lua_setfield(L, -2, deployctl_modules[i].name);
  }
  lua_pop(L, 1);
  lua_createtable(L, argc, 1);
  for (int i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_setglobal(L, "arg");
  lua_pushcfunction(L, load_embedded);
  lua_pushliteral(L, "deployctl");
  lua_call(L, 1, 1);
  for (int i = 1; i < argc; i++)
    lua_pushstring(L, argv[i]);
  lua_call(L, argc - 1, 1);
  return 1;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  if (!L) {
    fprintf(stderr, "deployctl: cannot create the Lua state: out of memory\n");
    return 2;
  }
  global_L = L;
  signal(SIGINT, on_signal);
  signal(SIGTERM, on_signal);
  signal(SIGPIPE, SIG_IGN);
  lua_pushcfunction(L, msghandler);
  lua_pushcfunction(L, pmain);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  int status = lua_pcall(L, 2, 1, 1);
  int code = 0;
  if (status != LUA_OK) {
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "deployctl: %s\n", msg ? msg : "(error)");
    code = 2;
  } else if (lua_isinteger(L, -1)) {
    code = (int)lua_tointeger(L, -1);
  }
  fflush(stdout);
  lua_close(L);
  return code;
}
