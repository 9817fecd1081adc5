/* The configuration: a Lua table, or the path of a Lua file returning one.
 * Every field is checked here, with a message that names it; each target's
 * provider and router are made from it. */
#ifndef DEPLOY_LCONFIG_H
#define DEPLOY_LCONFIG_H

#include <lua.h>

#include "target.h"

typedef struct lconfig {
  char state[1024];        /* store location: a path, or postgresql://... */
  int virtual_clock;       /* 1 virtual, 0 real, -1 not set (keep the engine's) */
  size_t ntargets;
  target_config **targets; /* owned until taken */
} lconfig;

/* Reads the config (table at idx, or a path to a Lua file returning one);
 * raises a Lua error naming the field on bad input. The config is owned by
 * the userdata pushed on the stack (its __gc frees what was not taken). */
lconfig *lconfig_load(lua_State *L, int idx);
/* The config userdata's first user value is a table { gitops = {...},
 * serve = {...} }: those sections, checked (README "deployctl serve"). */

/* The config file used when none is named (lconfig_path.c): $DEPLOY_CONFIG,
 * else ./deployctl.lua, else a ./deploy.lua that is a config (legacy set,
 * a warning printed once). Returns buf. */
const char *lconfig_default_path(lua_State *L, char *buf, size_t size, int *legacy);
/* 1 when the file returns a table with a targets table, run sandboxed. */
int lconfig_is_config_file(lua_State *L, const char *path);
/* deploy._config_path() -> path, legacy */
int lconfig_path_lua(lua_State *L);
/* lconfig_test.c: provider/router kind "test" from the section at idx
 * (named path), and --simulate: with deploy._host{ simulate = true },
 * every target's provider and router replaced by test ones (instances
 * scripted by the config's `simulate` section, those of the store taken
 * as running) and the store by a temporary copy. */
void lconfig_test_provider(lua_State *L, int idx, const char *path, target_config *t);
void lconfig_test_router(lua_State *L, int idx, const char *path, target_config *t);
int lconfig_simulating(lua_State *L);
void lconfig_simulate(lua_State *L, int idx, lconfig *c);
/* Hands the targets over (to a service); the config keeps none. */
target_config **lconfig_take_targets(lconfig *c, size_t *n);

#endif
