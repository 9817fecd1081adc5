/* GitOpsSynchronizer (runtime/gitsync.c from Lua). */
#ifndef DEPLOY_LGITOPS_H
#define DEPLOY_LGITOPS_H

#include <lua.h>

void lgitops_register(lua_State *L);

#endif
