/* deploy.Server: deployctl serve (runtime/serve.c) from Lua. */
#ifndef DEPLOY_LSERVE_H
#define DEPLOY_LSERVE_H

#include <lua.h>

void lserve_register(lua_State *L);

#endif
