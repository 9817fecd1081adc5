/* One deployment seen from Lua: the Deployment value handed to strategies
 * and hooks and its methods (d:start, d:set_traffic, d:wait, ...), a Lua
 * strategy as a driver of the rollout (its execute(d) runs as a coroutine
 * whose d:* calls hand actions to the rollout and yield), the hooks, and
 * the event handlers. */
#ifndef DEPLOY_LDEPLOYMENT_H
#define DEPLOY_LDEPLOYMENT_H

#include <lua.h>

#include "rollout.h"
#include "service.h"

typedef void (*lrun_done_cb)(void *payload, const rollout_result *res);

typedef struct lrun_spec {
  service *svc;
  const char *target;
  const char *version;
  const char *kind;            /* "deploy" or "rollback" */
  int strategy_idx;            /* built-in strategy userdata or Lua strategy table */
  int hooks_idx;               /* table of hooks from the options, or 0 */
  double hook_timeout;         /* seconds; default 30 */
  int metadata_idx;            /* table, or 0 */
  const char *metadata_json;   /* or JSON text (GitOps), or NULL */
  const webhook_list *webhooks;/* a manifest's, over the strategy's (same name: these), or NULL */
  int on_event_idx;            /* function, or 0 */
  int on_event2_idx;           /* the manager's handler, or 0 */
  lrun_done_cb cb;
  void *payload;
} lrun_spec;

/* Checks the hooks and the strategy (raising for programming mistakes),
 * asks strategy:validate(d), then starts the rollout. DC_OK: cb runs once
 * when it ends (a locked target included). DC_ERROR: err says why, cb
 * never runs, nothing changed. */
int lrun_start(lua_State *L, const lrun_spec *spec, char *err);

/* Pushes an event as handlers and manager:events() see it. */
void lrun_push_event(lua_State *L, const store_event *ev);
/* Pushes a DeploymentResult. */
void lrun_push_result(lua_State *L, const rollout_result *r);

void ldeployment_register(lua_State *L);

#endif
