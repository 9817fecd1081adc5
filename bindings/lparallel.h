/* deploy.parallel{ fn, ... }: functions as coroutine tasks side by side. */
#ifndef DEPLOY_LPARALLEL_H
#define DEPLOY_LPARALLEL_H

#include <lua.h>

void lparallel_register(lua_State *L);

#endif
