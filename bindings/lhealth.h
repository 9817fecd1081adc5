/* deploy.health.check (runtime/health.c from Lua). */
#ifndef DEPLOY_LHEALTH_H
#define DEPLOY_LHEALTH_H

#include <lua.h>

void lhealth_register(lua_State *L);

#endif
