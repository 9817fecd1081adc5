/* Webhook and notification declarations from Lua tables (a target's
 * webhooks and notify, a strategy's webhooks): conversion only; what is
 * valid is runtime/webhook.c's and runtime/notify.c's. */
#ifndef DEPLOY_LWEBHOOK_H
#define DEPLOY_LWEBHOOK_H

#include <lua.h>

#include "notify.h"
#include "webhook.h"

/* Appends the list at idx (a sequence of tables) to out. Raises on bad
 * input with "<what>[i].<field> <what is wrong>", after clearing out (its
 * owner keeps nothing half-read). */
void lwebhook_read(lua_State *L, int idx, const char *what, webhook_list *out);
void lnotify_read(lua_State *L, int idx, const char *what, notify_list *out);

#endif
