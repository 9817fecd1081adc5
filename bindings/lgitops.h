/* GitOpsSynchronizer (runtime/gitsync.c from Lua). */
#ifndef DEPLOY_LGITOPS_H
#define DEPLOY_LGITOPS_H

#include <lua.h>

#include "gitsync.h"

void lgitops_register(lua_State *L);
/* The synchronizer of the GitOpsSynchronizer at idx (raises when it is
 * none, or closed). */
gitsync *lgitops_gitsync(lua_State *L, int idx);

#endif
