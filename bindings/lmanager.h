/* DeploymentManager: deploy, rollback, get_status (the specification's
 * methods) and the read-side helpers the CLI uses, over the runtime's
 * deployment service. */
#ifndef DEPLOY_LMANAGER_H
#define DEPLOY_LMANAGER_H

#include <lua.h>

#include "ldeployment.h"
#include "service.h"

/* The service of the DeploymentManager at idx (raises when idx is not an
 * open manager). */
service *lmanager_service(lua_State *L, int idx);
/* Pushes the strategy registered with the manager under `name`, or nil;
 * returns the pushed type. */
int lmanager_push_strategy(lua_State *L, int manager_idx, const char *name);
/* Pushes the manager's on_event handler (nil when none); 1 when there is one. */
int lmanager_push_handler(lua_State *L, int manager_idx);
/* Starts a deployment of target through the manager at manager_idx with
 * the strategy at strategy_idx (0: the manager's default), recording
 * metadata_json, with webhooks (a manifest's, or NULL) over the strategy's. cb once, from the loop, when it ends. DC_ERROR: err says
 * why, cb never runs. */
int lmanager_start(lua_State *L, int manager_idx, const char *target, const char *version, int strategy_idx,
                   const char *metadata_json, const webhook_list *webhooks, lrun_done_cb cb, void *payload,
                   char *err);
/* Pushes a DeploymentManager{} made from the host's default config
 * ($DEPLOY_CONFIG, ./deployctl.lua); what_for names the caller in the error
 * when there is none. */
void lmanager_push_default(lua_State *L, const char *what_for);

void lmanager_register(lua_State *L);

#endif
