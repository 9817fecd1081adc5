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

/* Hands the targets over (to a service); the config keeps none. */
target_config **lconfig_take_targets(lconfig *c, size_t *n);

#endif
