/* CanaryStrategy and BlueGreenStrategy (C step machines in userdata) and
 * DeploymentStrategy (the base class Lua strategies extend). */
#ifndef DEPLOY_LSTRATEGY_H
#define DEPLOY_LSTRATEGY_H

#include <lua.h>

#include "strategy.h"
#include "webhook.h"

/* The built-in strategy at idx, or NULL. */
strategy *lstrategy_test(lua_State *L, int idx);
/* The webhooks of the built-in strategy at idx (NULL when it is none). */
const webhook_list *lstrategy_webhooks(lua_State *L, int idx);
/* Pushes a userdata owning s (freed by its __gc). */
void lstrategy_push(lua_State *L, strategy *s);
/* Pushes a new BlueGreenStrategy with defaults (a manager's default
 * strategy); rollback: no warm window (scale_down_delay 0): the version
 * rolled back from is stopped at once. */
strategy *lstrategy_push_bluegreen(lua_State *L, int rollback);
/* Sets CanaryStrategy, BlueGreenStrategy and DeploymentStrategy on the
 * module table at -1. */
void lstrategy_register(lua_State *L);

#endif
