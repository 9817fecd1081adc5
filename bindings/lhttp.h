/* deploy.http: an HTTP client for Lua on the engine's loop (see lhttp.c). */
#ifndef DEPLOY_LHTTP_H
#define DEPLOY_LHTTP_H

#include <lua.h>

/* Sets deploy.http = { request = ... } in the module table on top of L. */
void lhttp_register(lua_State *L);

#endif
