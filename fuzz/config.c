/* The config loader (bindings/lconfig.c): a config file's Lua source, run
 * as `deployctl --config FILE` runs it (a text chunk, luaL_loadbufferx
 * with mode "t"), and the table it returns read by lconfig_load into
 * target configs, with their providers and routers made.
 *
 * Lua source rather than tables built from the bytes: a config is a
 * program, and what lconfig_load must survive is what a program can hand
 * it (metatables whose __index runs code, tables changed while they are
 * read, errors raised half-way). The mutations of the README's and the
 * specs' configs give that reach; a dictionary holds Lua's and the
 * config's words.
 *
 * Each input gets a fresh state, so no input sees what another left
 * behind, made as deployctl makes it: the deploy module's engine exists
 * before any config is read (luaopen_deploy), so objects are finalised
 * in the order they are in deployctl. The state holds the base, string,
 * table, math and utf8 libraries, without what touches files or prints
 * (dofile, loadfile, load, print): a config is trusted, the fuzzer's
 * mutations of one are not. Execution is bounded by an instruction-count
 * hook (the mechanism the runtime uses for untrusted Lua), not by a
 * timeout: a loop costs at most INSN_LIMIT instructions, deterministically,
 * so it reproduces and never shows up as a slow input. Memory is bounded
 * by the allocator: a string.rep of a gigabyte is an error like any other.
 * The one thing an input may do outside the process: a target with hosts
 * over ssh makes its private control directory (mkdtemp under /tmp), and
 * removes it when the config is freed; no ssh runs until a command does. */
#include "fuzz.h"

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include "lconfig.h"
#include "lutil.h"
#include "util.h"

/* A real config runs a few hundred instructions and allocates a few
 * kilobytes; these leave room for a hundred times that. */
#define INSN_STEP 1000
#define INSN_LIMIT (50 * INSN_STEP)
#define MEM_LIMIT (8u << 20)

typedef struct budget {
  size_t used;
  int insns;
} budget;

static void *limited_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
  budget *b = ud;
  size_t old = ptr ? osize : 0;
  if (nsize == 0) {
    free(ptr);
    b->used -= old;
    return NULL;
  }
  if (nsize > old && b->used - old + nsize > MEM_LIMIT)
    return NULL;
  void *p = realloc(ptr, nsize);
  if (p)
    b->used = b->used - old + nsize;
  return p;
}

static void count_hook(lua_State *L, lua_Debug *ar) {
  (void)ar;
  budget *b;
  lua_getallocf(L, (void **)&b);
  if (++b->insns > INSN_LIMIT / INSN_STEP)
    luaL_error(L, "fuzz: instruction limit reached");
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  /* The store location and ${NAME} come from the environment. */
  unsetenv("DEPLOY_STATE");
  setenv("APP_TOKEN", "s3cr3t-app-token", 1);
  setenv("HAPROXY_SOCKET", "/run/haproxy/admin.sock", 1);
  return 0;
}

static void check_config(lconfig *c) {
  char err[DC_ERR_MAX];
  FUZZ_CHECK(c->state[0] != '\0');
  FUZZ_CHECK(c->ntargets >= 1);
  for (size_t i = 0; i < c->ntargets; i++) {
    const target_config *t = c->targets[i];
    FUZZ_CHECK(t != NULL);
    FUZZ_CHECK(dc_validate_target_name(t->name, err) == 0);
    FUZZ_CHECK(t->instances >= 1 && t->instances <= 64);
    FUZZ_CHECK(t->provider != NULL && provider_check(t->provider, err) == 0);
    FUZZ_CHECK(t->router != NULL && router_check(t->router, err) == 0);
    FUZZ_CHECK(t->health.path[0] == '/');
    FUZZ_CHECK(t->health.expect_status >= 100 && t->health.expect_status <= 599);
    FUZZ_CHECK(t->health.failure_threshold >= 1 && t->health.failure_threshold <= 1000);
    FUZZ_CHECK(t->health.timeout > 0 && t->health.interval > 0 && t->health.start_timeout > 0);
  }
}

/* The chunk's result, read as a config: lconfig_load raises on bad input,
 * as it does under DeploymentManager. */
static int load(lua_State *L) {
  size_t size;
  const char *text = lua_tolstring(L, 1, &size);
  if (luaL_loadbufferx(L, text, size, "=deploy.lua", "t") != LUA_OK)
    return lua_error(L);
  lua_call(L, 0, 1);
  if (!lua_istable(L, -1))
    return 0; /* lconfig_load would read a string as a file name */
  check_config(lconfig_load(L, -1));
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  budget b = {0, 0};
  lua_State *L = lua_newstate(limited_alloc, &b);
  if (!L)
    abort();
  static const luaL_Reg libs[] = {{LUA_GNAME, luaopen_base},        {LUA_STRLIBNAME, luaopen_string},
                                  {LUA_TABLIBNAME, luaopen_table},   {LUA_MATHLIBNAME, luaopen_math},
                                  {LUA_UTF8LIBNAME, luaopen_utf8},   {NULL, NULL}};
  for (const luaL_Reg *lib = libs; lib->func; lib++) {
    luaL_requiref(L, lib->name, lib->func, 1);
    lua_pop(L, 1);
  }
  static const char *const unsafe[] = {"dofile", "loadfile", "load", "print", NULL};
  for (const char *const *u = unsafe; *u; u++) {
    lua_pushnil(L);
    lua_setglobal(L, *u);
  }
  lengine_get(L);
  lua_sethook(L, count_hook, LUA_MASKCOUNT, INSN_STEP);
  lua_pushcfunction(L, load);
  lua_pushlstring(L, (const char *)data, size);
  (void)lua_pcall(L, 1, 0, 0);
  lua_close(L);
  FUZZ_CHECK(b.used == 0);
  return 0;
}
